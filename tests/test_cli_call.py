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
