"""The CLI on bad input or a bad environment: one line on stderr, no traceback, exit 2 for
usage and configuration problems (1 is kept for a call that failed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def wacall(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "WACALL_WEBHOOK_AUTH": "none", "WACALL_D360_API_KEY": "k", "WACALL_API_TOKEN": "t",
            "WACALL_LOG_FORMAT": "text", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_version():
    done = wacall("--version")
    assert done.returncode == 0 and done.stdout.startswith("wacall ")


@pytest.mark.parametrize(("args", "says"), [
    (("call", "--to", "12345"), "not an E.164 phone number"),
    (("call", "--to", "+4915112345678", "--port", "99999"), "--port must be a port"),
    (("serve", "--port", "99999"), "--port must be a port"),
    (("call", "--to", "+4915112345678", "--play", "/no/such/file.wav"), "no such media file"),
    (("permission", "--url", "http://127.0.0.1:9", "status", "+4915112345678"), "cannot reach"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, says):
    done = wacall(*args, env={"WACALL_DATA_DIR": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and says in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.startswith("wacall:")]) == 1


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = wacall("serve", "--port", str(port), env={"WACALL_DATA_DIR": str(tmp_path)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr


def test_a_bad_port_setting_is_a_configuration_error(tmp_path):
    done = wacall("config", env={"WACALL_PORT": "70000", "WACALL_DATA_DIR": str(tmp_path)})
    assert done.returncode == 2 and "WACALL_PORT" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["demo", "call", "serve", "config", "permission"])
def test_every_command_explains_itself_with_an_example(command):
    done = wacall(command, "--help")
    assert done.returncode == 0
    assert "example:\n  " in done.stdout and ("wacall " + command) in done.stdout.split("example:")[1]


def test_ctrl_c_ends_serve_with_130_and_no_traceback(tmp_path):
    """Ctrl-C (SIGINT) stops `wacall serve` cleanly, exit 130 like every command
    interrupted that way; SIGTERM (a service manager) is a normal stop, 0."""
    import signal
    import socket
    import time

    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 0)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "WACALL_DATA_DIR": str(tmp_path / f"data-{code}"), "WACALL_PORT": str(port),
               "WACALL_HOST": "127.0.0.1", "WACALL_WORKERS": "0"}
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--sandbox"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            line = proc.stdout.readline()  # "wacall serving on ..." once it listens
            assert "serving on" in line and time.monotonic() < deadline, line
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == code, (sig, proc.returncode, err[-2000:])
        assert "Traceback" not in err
