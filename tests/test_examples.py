"""The examples run as documented: the echo bot sends a caller's voice back; the client
places a call through a running service and sees it end over SSE."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp

from gateway.app import Service
from gateway.calls import EndReason
from media import analysis
from tests.helpers import free_port
from tests.processes import serve, stop, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
USER = "+4915112345678"
TOKEN = "examples-token-0123456789"


async def test_the_echo_bot_sends_the_caller_back(settings):
    port = free_port()
    bot = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "examples" / "echo_bot.py"), "--port",
                                               str(port), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert b"echo bot on" in await asyncio.wait_for(bot.stdout.readline(), 30)
        async with Service(replace(settings, api_token=TOKEN), sandbox=True) as service:
            await service.sandbox.grant(USER, permanent=True)
            service.sandbox.users.update(USER, {"answer_after_ms": 0, "hangup_after_s": 4.0,
                                                "say": str(ROOT / "gateway/assets/user.ogg")})
            async with aiohttp.ClientSession(base_url=service.url,
                                             headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                async with http.post("/v1/calls", json={"to": USER, "bot": {
                        "protocol": "twilio", "url": f"ws://127.0.0.1:{port}/"}}) as resp:
                    assert resp.status == 201, await resp.text()
                    call = service.manager.get((await resp.json())["id"])
            await call.wait_finished(30)
            assert call.end_reason is EndReason.USER_HANGUP
            at_phone = service.sandbox.calls[call.wacid]
            await asyncio.wait_for(at_phone.finished.wait(), 30)
        x, rate = analysis.read_audio(at_phone.phone.recording_path)
        assert analysis.tone_seconds(x, rate, 600) >= 1.5  # the user heard their own 600 Hz
    finally:
        bot.terminate()
        await bot.wait()


async def test_the_client_example_places_a_call_and_sees_it_end(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve({"WACALL_PORT": str(port), "WACALL_DATA_DIR": str(tmp_path / "data"), "WACALL_API_TOKEN": TOKEN,
                    "WACALL_MEDIA_DIR": str(ROOT / "gateway" / "assets")}, sandbox=True, log=tmp_path / "serve.log")
    try:
        await wait_healthy(url, server)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/sandbox/users/{USER}/permission", json={"permanent": True}) as resp:
                assert resp.status == 200
            async with http.post(f"{url}/sandbox/users/{USER}", json={"answer_after_ms": 0, "hangup_after_s": 1.0}) as resp:
                assert resp.status == 200
        client = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "place_call.py"), USER, "--url", url, "--play", "business.ogg",
            env={**os.environ, "WACALL_API_TOKEN": TOKEN}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0, err.decode()[-2000:]
        lines = out.decode().splitlines()
        assert any(line.endswith("call.media_connected") for line in lines), lines
        ended = json.loads(lines[-1])
        assert ended["state"] == "ended" and ended["end_reason"] == "user_hangup"
    finally:
        stop(server)
