"""`wacall call` against a provider in another process (`wacall serve --sandbox`), as a
user with real credentials would run it against 360dialog."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from media import analysis
from tests.helpers import free_port
from tests.processes import wait_healthy

ROOT = Path(__file__).resolve().parent.parent
USER = "+4915112345678"


async def test_wacall_call_plays_and_records_through_a_provider_process(tmp_path):
    sandbox_port, call_port = free_port(), free_port()
    base = f"http://127.0.0.1:{sandbox_port}"
    env = {**os.environ, "WACALL_DATA_DIR": str(tmp_path / "sandbox-data"),
           "WACALL_PORT": str(sandbox_port), "WACALL_WEBHOOK_HEADER": "X-Test-Hook: shared-secret-1",
           "WACALL_SANDBOX_WEBHOOK_URL": f"http://127.0.0.1:{call_port}/webhooks/whatsapp"}
    server = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--sandbox"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await wait_healthy(base, server)
        async with aiohttp.ClientSession() as http:
            # the user granted earlier (the webhook went elsewhere): `wacall call` asks the
            # provider's permission-state endpoint before dialing
            call_env = {**os.environ, "WACALL_PROVIDER": "360dialog",
                        "WACALL_BASE_URL": f"{base}/sandbox", "WACALL_D360_API_KEY": "sandbox-key",
                        "WACALL_PORT": str(call_port), "WACALL_MEDIA_ADDRESSES": "127.0.0.1",
                        "WACALL_WEBHOOK_HEADER": "X-Test-Hook: shared-secret-1",
                        "WACALL_DATA_DIR": str(tmp_path / "call-data")}
            refused = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "call", "--to", USER, env=call_env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = await asyncio.wait_for(refused.communicate(), 60)
            assert refused.returncode == 1  # no permission yet: refused before dialing
            assert "138006" in err.decode() and "Traceback" not in err.decode()
            async with http.post(f"{base}/sandbox/users/{USER}/permission",
                                 json={"permanent": True, "notify": False}) as resp:
                assert resp.status == 200, await resp.text()
            async with http.post(f"{base}/sandbox/users/{USER}",
                                 json={"say": str(ROOT / "gateway/assets/user.ogg"),
                                       "answer_after_ms": 200}) as resp:
                assert resp.status == 200, await resp.text()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "call", "--to", USER,
                "--play", str(ROOT / "gateway/assets/business.ogg"), "--record", str(tmp_path / "out"),
                "--json", env=call_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, stderr.decode()
            summary = json.loads(stdout)
            assert summary["end_reason"] == "business_hangup"
            assert "4915112345678" not in stdout.decode() + stderr.decode()  # masked everywhere

            async with http.get(f"{base}/sandbox/users/{USER}/calls") as resp:
                calls = (await resp.json())["calls"]
        assert [c["id"] for c in calls] == [summary["wacid"]]
        assert calls[0]["ended_by"] == "business"
        x, rate = analysis.read_audio(calls[0]["phone_recording"])
        assert analysis.tone_seconds(x, rate, 1000) == pytest.approx(3.0, rel=0.10)
        y, rate = analysis.read_audio(tmp_path / "out" / "user.wav")
        assert analysis.dominant_frequency(y, rate) == pytest.approx(600, abs=5)
        assert analysis.tone_seconds(y, rate, 600) > 2.5
    finally:
        server.terminate()
        server.wait(20)
    assert server.returncode == 0


async def test_wacall_call_on_a_terminal_shows_a_live_status_line_and_a_summary(tmp_path):
    """On a TTY: a status line kept in place (state, time, both sides' levels) that log
    lines never break into, then a summary with the recording's path."""
    import pty
    import re

    sandbox_port, call_port = free_port(), free_port()
    base = f"http://127.0.0.1:{sandbox_port}"
    env = {**os.environ, "WACALL_DATA_DIR": str(tmp_path / "sandbox-data"), "WACALL_WORKERS": "0",
           "WACALL_PORT": str(sandbox_port), "WACALL_WEBHOOK_HEADER": "X-Test-Hook: shared-secret-1",
           "WACALL_SANDBOX_WEBHOOK_URL": f"http://127.0.0.1:{call_port}/webhooks/whatsapp"}
    server = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--sandbox"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_healthy(base, server)
        async with aiohttp.ClientSession() as http:
            for path, body in ((f"/sandbox/users/{USER}/permission", {"permanent": True, "notify": False}),
                               (f"/sandbox/users/{USER}", {"say": str(ROOT / "gateway/assets/user.ogg"),
                                                           "answer_after_ms": 200})):
                async with http.post(base + path, json=body) as resp:
                    assert resp.status == 200, await resp.text()
        call_env = {**os.environ, "WACALL_PROVIDER": "360dialog", "WACALL_BASE_URL": f"{base}/sandbox",
                    "WACALL_D360_API_KEY": "sandbox-key", "WACALL_PORT": str(call_port),
                    "WACALL_MEDIA_ADDRESSES": "127.0.0.1", "WACALL_WEBHOOK_HEADER": "X-Test-Hook: shared-secret-1",
                    "WACALL_DATA_DIR": str(tmp_path / "call-data"), "WACALL_LOG_FORMAT": "text",
                    "WACALL_LOG_LEVEL": "INFO"}
        controller, terminal = pty.openpty()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "call", "--to", USER,
            "--play", str(ROOT / "gateway/assets/business.ogg"), "--record", str(tmp_path / "out"),
            env=call_env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
        os.close(terminal)
        chunks: list[bytes] = []
        loop = asyncio.get_running_loop()

        def read_all() -> None:
            while True:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # the terminal closed: the process is gone
                    return
                if not data:
                    return
                chunks.append(data)

        reader = loop.run_in_executor(None, read_all)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await asyncio.wait_for(reader, 10)
        os.close(controller)
    finally:
        server.terminate()
        server.wait(15)
    text = b"".join(chunks).decode(errors="replace")
    screens = [segment for line in text.replace("\r\n", "\n").split("\n") for segment in line.split("\r")]
    status = [s for s in screens if "dBFS" in s and "media_connected" in s]
    assert status, text[-3000:]
    # both sides' levels were live: the user's 600 Hz tone and the business's 1 kHz prompt
    assert any(re.search(r"user +-\d+ dBFS .*business +-\d+ dBFS", s) for s in status), status[-5:]
    # no log line or timeline line was written into the status line
    for segment in screens:
        if "dBFS" in segment and "business" in segment:
            assert "INFO" not in segment and "WARNING" not in segment and "+" not in segment.split("media_connected")[0], segment
    assert re.search(r"call call_\w+: business_hangup after [\d.]+ s connected", text), text[-2000:]
    assert f"recording: {tmp_path / 'out' / 'user.wav'}" in text
    x, rate = analysis.read_audio(tmp_path / "out" / "user.wav")
    assert analysis.tone_seconds(x, rate, 600) >= 1.0
