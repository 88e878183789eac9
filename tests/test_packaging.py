"""The wheel: built from this checkout, installed outside it, ``wacall demo`` runs (the demo's
audio and the OpenAPI document are package data), and it carries the licence."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_runs_the_demo_outside_the_checkout(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("wacall-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("gateway/assets/business.ogg", "gateway/assets/user.ogg", "gateway/api/openapi.json",
                     "gateway/console/templates/call.html", "gateway/console/static/console.js"):
        assert expected in names, expected
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "fixtures/", "bench/")) for n in names)
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WACALL_DATA_DIR": str(elsewhere / "data")}
    where = subprocess.run([sys.executable, "-c", "import gateway; print(gateway.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr  # the wheel's, not the checkout's
    demo = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--json", "--out", str(elsewhere / "out")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=180)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "Traceback" not in demo.stderr
    from media import rtpcore

    if rtpcore.core is not None:  # (a C compiler here: the wheel carries the lean path's C core, and it loads)
        assert any(n.startswith("media/_rtpcore") and n.endswith(".so") for n in names)
        assert not any(n.endswith(".c") for n in names)
        core = subprocess.run([sys.executable, "-c", "import media.rtpcore as r; print(r.core.__file__)"],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
        assert core.stdout.startswith(str(site)), core.stdout + core.stderr
