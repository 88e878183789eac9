"""The container files, checked without a Docker daemon (none runs where the tests run):
the Dockerfile's shape (two stages, the wheel installed non-editable, non-root, health
check), what it copies exists and is not ignored, the UDP media range agrees everywhere,
and compose.yaml wires wacall, the TLS proxy and the volumes. With a daemon the image is
built and its ``wacall --version`` run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_a_wheel_and_installs_it_without_the_source():
    steps = instructions()
    stages = [rest for word, rest in steps if word == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS build"), stages
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "pip wheel" in runs and "--constraint constraints.txt" in runs
    assert "-e ." not in runs and "--editable" not in runs
    final = steps[[w for w, _ in steps].index("FROM", 1):]
    assert ("USER", "wacall") in final  # not root
    assert any(w == "HEALTHCHECK" and "/healthz" in r for w, r in final)
    assert any(w == "CMD" and "serve" in r for w, r in final)
    # what the build stage copies exists, and .dockerignore does not hide it
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source
    assert {".git", ".venv", ".env"} <= ignored


def test_the_udp_media_range_agrees_everywhere():
    env = re.search(r"WACALL_MEDIA_PORT_RANGE=(\d+)-(\d+)", DOCKERFILE).groups()
    exposed = re.search(r"EXPOSE .*?(\d+)-(\d+)/udp", DOCKERFILE).groups()
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    wacall = compose["services"]["wacall"]
    assert wacall["environment"]["WACALL_MEDIA_PORT_RANGE"] == "-".join(env) == "-".join(exposed)
    assert f"{'-'.join(env)}:{'-'.join(env)}/udp" in wacall["ports"]  # published 1:1 (the SDP names them)


def test_compose_runs_wacall_behind_a_tls_proxy_with_persistent_data():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services, volumes = compose["services"], compose["volumes"]
    wacall, proxy = services["wacall"], services["proxy"]
    assert wacall["build"] == "." and wacall["env_file"] == ".env"
    assert "wacall-data:/data" in wacall["volumes"] and "wacall-data" in volumes
    assert "WACALL_ADVERTISED_ADDRESS" in wacall["environment"]
    assert not any(str(p).startswith("8080") for p in wacall.get("ports", []))  # HTTP only through the proxy
    command = " ".join(proxy["command"])
    assert "reverse-proxy" in command and "--to wacall:8080" in command
    assert {"80:80", "443:443"} <= set(proxy["ports"]) and "caddy-data:/data" in proxy["volumes"]
    # every variable compose needs is in the example environment file
    example = (ROOT / ".env.example").read_text()
    for name in re.findall(r"\$\{(\w+)", (ROOT / "compose.yaml").read_text()):
        assert re.search(rf"^{name}=", example, re.M), name


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(
    ["docker", "info"], capture_output=True).returncode != 0, reason="no Docker daemon here")
def test_the_image_builds_and_runs_wacall():  # pragma: no cover - needs a daemon
    subprocess.run(["docker", "build", "-t", "wacall-test", str(ROOT)], check=True, timeout=1800)
    out = subprocess.run(["docker", "run", "--rm", "wacall-test", "wacall", "--version"],
                         check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("wacall")
