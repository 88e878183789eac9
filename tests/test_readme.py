"""The README's shell examples run as written, in order, against a real ``wacall serve
--sandbox`` (the ports swapped for free ones), and every ``curl`` answers the status the
README documents next to it (``# -> 201``; a 2xx where it documents none). ``curl`` is
wrapped only to record each status and to wait for the server to listen (a person typing
is slower than a script)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from media import analysis
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```sh\n(.*?)```", README, re.S)

#: Records every curl's status in $STATUS_LOG; the body goes to stdout as usual.
CURL_WRAPPER = r"""
curl() {
  local out rc tries=0
  while :; do  # (until the server listens: exit 7 is "could not connect"; at most 30 s)
    rc=0
    out=$(command curl -w '\n%{http_code}' "$@") || rc=$?
    [ "$rc" -eq 7 ] && [ "$tries" -lt 300 ] || break
    tries=$((tries + 1)); sleep 0.1
  done
  printf '%s\n' "${out%$'\n'*}"
  echo "${out##*$'\n'}" >> "$STATUS_LOG"
  # a stream cut by its own --max-time (exit 28) is how the SSE example ends
  [ "$rc" -eq 0 ] || [ "$rc" -eq 28 ]
}
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
set -e
"""


def block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"one README block with {marker!r}, found {len(found)}"
    return found[0]


def documented_statuses(script: str) -> list[str]:
    """The status each curl of ``script`` should answer ("2xx" where none is documented)."""
    lines = script.splitlines()
    expected: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("curl "):
            i += 1
            continue
        command = lines[i]
        while (command.endswith("\\") or command.count("'") % 2) and i + 1 < len(lines):
            i += 1  # a continued line, or a quoted body over several lines
            command += "\n" + lines[i]
        status = re.search(r"#\s*->\s*(\d{3})", command.rsplit("\n", 1)[-1])
        if status is None and i + 1 < len(lines):
            status = re.match(r"\s*#\s*->\s*(\d{3})", lines[i + 1])
        expected.append(status.group(1) if status else "2xx")
        i += 1
    return expected


def run(script: str, tmp_path: Path, ports: dict[str, int], timeout: float = 120) -> tuple[list[str], str]:
    for old, new in ports.items():
        script = script.replace(old, str(new))
    status_log = tmp_path / "statuses"
    env = {**os.environ, "STATUS_LOG": str(status_log), "WACALL_DATA_DIR": str(tmp_path / "data"),
           "WACALL_HOST": "127.0.0.1", "WACALL_MEDIA_ADDRESSES": "127.0.0.1", "WACALL_WORKERS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", CURL_WRAPPER + script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    statuses = status_log.read_text().split() if status_log.exists() else []
    return statuses, done.stdout


def matches(expected: list[str], got: list[str]) -> bool:
    return len(expected) == len(got) and all(e == g or (e == "2xx" and g.startswith("2"))
                                              for e, g in zip(expected, got))


def test_the_service_and_permission_examples_run_as_written(tmp_path):
    (tmp_path / "gateway").symlink_to(ROOT / "gateway")  # (the examples name gateway/assets/...)
    script = block("wacall serve --sandbox --port 8080 &") + block("U=+4915187654321")
    expected = documented_statuses(script)
    assert len(expected) >= 15 and "403" in expected and expected.count("201") >= 3
    statuses, out = run(script, tmp_path, {"8080": free_port()})
    assert matches(expected, statuses), f"{expected}\n{statuses}\n{out[-1500:]}"
    assert '"id": "call_' in out  # a call's JSON came back


def test_the_wacall_call_recipe_against_a_sandbox_runs_as_written(tmp_path):
    (tmp_path / "gateway").symlink_to(ROOT / "gateway")
    script = block("wacall call --to +4915112345678 --play gateway/assets/business.ogg")
    statuses, out = run(script, tmp_path, {"9000": free_port(), "9001": free_port()})
    assert statuses == ["200", "200"], statuses
    assert "ended" in out
    x, rate = analysis.read_audio(tmp_path / "out" / "user.wav")
    assert analysis.tone_seconds(x, rate, 600) >= 1.0, out[-3000:]  # the user's tone was recorded
