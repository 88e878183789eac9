"""Voice bots on real calls through the gateway and the sandbox."""

import asyncio
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from gateway.app import Service
from gateway.calls import EndReason
from media import analysis

ROOT = Path(__file__).resolve().parent.parent
USER = "+4915112345678"
TOKEN = "bot-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 30


@pytest.fixture
async def api(settings):
    async with Service(replace(settings, api_token=TOKEN), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            service.http = http
            yield service


async def place(api, bot: dict, **extra):
    async with api.http.post("/v1/calls", json={"to": USER, "bot": bot, **extra}) as resp:
        return resp.status, await resp.json()


async def test_pipecat_bot_answers_the_user_through_wacall(api):
    """A real Pipecat pipeline (TwilioFrameSerializer, auto hang-up off) takes the call:
    the user says 600 Hz, the bot answers 1000 Hz, the user's phone records the answer."""
    pipecat = pytest.importorskip("tests.test_bridge_pipecat")
    async with pipecat.PipecatTwilioBot() as bot:
        api.sandbox.users.update(USER, {"answer_after_ms": 200, "hangup_after_s": 4.0,
                                        "say": str(ROOT / "gateway/assets/user.ogg")})
        status, body = await place(api, {"protocol": "twilio", "url": bot.url,
                                         "parameters": {"crm_lead": "9913"}})
        assert status == 201, body
        call = api.manager.get(body["id"])
        await call.wait_finished(TIMEOUT)
        await bot.pipeline_finished(TIMEOUT)  # the user hung up: stop, socket closed, pipeline done
        assert call.end_reason is EndReason.USER_HANGUP
        assert "bot_connected" in [e.name for e in call.timeline]
        data = bot.call_data[0]
        assert data["call_id"] == call.id and data["body"]["crm_lead"] == "9913"
        sandbox_call = api.sandbox.calls[call.wacid]
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    x, rate = analysis.read_audio(sandbox_call.phone.recording_path)
    assert analysis.tone_seconds(x, rate, 1000) >= 1.5  # the bot's answer reached the user


async def test_bot_hang_up_ends_the_whatsapp_call(api):
    from tests.test_bridge_twilio import TwilioBot

    async with TwilioBot() as bot:
        api.sandbox.users.update(USER, {"answer_after_ms": 0})
        status, body = await place(api, {"protocol": "twilio", "url": bot.url})
        assert status == 201, body
        call = api.manager.get(body["id"])
        ws = await bot.connected()
        start = (await bot.wait(lambda m: m["event"] == "start"))[1]
        assert start["start"]["callSid"] == call.id
        await ws.close()  # the bot hangs up
        await call.wait_finished(TIMEOUT)
    assert call.end_reason is EndReason.BOT_HANGUP
    sandbox_call = api.sandbox.calls[call.wacid]
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert sandbox_call.ended_by == "business"  # wacall sent terminate


async def test_user_hang_up_sends_stop_to_the_bot(api):
    from tests.test_bridge_twilio import TwilioBot

    async with TwilioBot() as bot:
        api.sandbox.users.update(USER, {"answer_after_ms": 0, "hangup_after_s": 0.5})
        status, body = await place(api, {"protocol": "twilio", "url": bot.url})
        call = api.manager.get(body["id"])
        await bot.wait(lambda m: m["event"] == "stop")
        await asyncio.wait_for(bot.socket_closed.wait(), TIMEOUT)
        await call.wait_finished(TIMEOUT)
    assert call.end_reason is EndReason.USER_HANGUP


async def test_unreachable_bot_means_no_call(api):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here
    status, body = await place(api, {"protocol": "twilio", "url": f"ws://127.0.0.1:{port}/ws?token=x"})
    assert status == 502 and body["error"]["code"] == "bot_unavailable"
    assert "not placed" in body["error"]["message"] and "token" not in body["error"]["message"]
    assert api.sandbox.calls == {}
    status, body = await place(api, {"protocol": "carrier-pigeon", "url": "ws://x"})
    assert status == 400


async def test_inbound_call_routed_to_a_bot_and_rejected_when_it_is_down(settings):
    from tests.test_bridge_twilio import TwilioBot

    async with TwilioBot() as bot:
        async with Service(replace(settings, inbound_bot_url=bot.url), sandbox=True) as service:
            sandbox_call = await service.sandbox.user_calls(USER, hangup_after_s=1.0)
            start = (await bot.wait(lambda m: m["event"] == "start"))[1]
            assert start["start"]["customParameters"]["direction"] == "USER_INITIATED"
            await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
            assert sandbox_call.accepted_at is not None
    # the bot is gone now: a new inbound call is rejected with a clear reason
    async with Service(replace(settings, inbound_bot_url=bot.url), sandbox=True) as service:
        sandbox_call = await service.sandbox.user_calls(USER)
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
        call = service.manager.get(sandbox_call.wacid)
        await call.wait_finished(TIMEOUT)
    assert sandbox_call.ended_by == "business_rejected"
    assert call.end_reason is EndReason.BOT_FAILURE and "unreachable" in call.end_detail


def test_a_bot_spec_is_a_leg_spec_and_survives_a_round_trip():
    from gateway.bots import BotSpec
    from gateway.calls.legs import LegSpec

    spec = BotSpec.from_dict({"protocol": "pcm", "url": "ws://127.0.0.1:9/bot", "parameters": {"lang": "de"},
                              "sample_rate": 16000, "frame_ms": 40})
    assert isinstance(spec, LegSpec) and spec.kind == "bot"
    assert BotSpec.from_dict(spec.to_dict()) == spec  # (what a parked call stores and reads back)
    assert spec.bridge().frames_per_message == 2
    for protocol, url, field, bad in (("pcm", "ws://127.0.0.1:9/bot", "frame_ms", 50),
                                      ("pcm", "ws://127.0.0.1:9/bot", "frame_ms", 40.0),
                                      ("pcm", "ws://127.0.0.1:9/bot", "frame_ms", "40"),
                                      ("pcm", "ws://127.0.0.1:9/bot", "sample_rate", 16000.0),
                                      ("audiosocket", "tcp://127.0.0.1:9", "sample_rate", 8000.0)):
        with pytest.raises(ValueError, match=field):  # (the API answers it with a 400)
            BotSpec.from_dict({"protocol": protocol, "url": url, field: bad})


@pytest.mark.parametrize("record", [False, True])
async def test_a_bot_call_is_decoded_at_the_bots_rate_unless_a_recording_wants_more(api, record):
    """Through the gateway (its speech detector attached): a 16 kHz pcm bot's call is
    decoded straight at 16 kHz; recorded as WAV, at 48 kHz (and resampled for the bot).
    The bot hears the user's tone either way."""
    from tests.test_bridge_pcm import PcmBot

    async with PcmBot(respond=False) as bot:
        api.sandbox.users.update(USER, {"answer_after_ms": 0, "say": str(ROOT / "gateway/assets/user.ogg")})
        status, body = await place(api, {"protocol": "pcm", "url": bot.url}, record=record)
        assert status == 201, body
        call = api.manager.get(body["id"])
        await bot.until(lambda: len(bot.frames) >= 60)
        decoder = call.media.peer._receiver.decoder
        assert decoder is not None and decoder.rate == (48000 if record else 16000)
        await call.hangup()
        await call.wait_finished(TIMEOUT)
    heard = np.frombuffer(b"".join(bot.frames[10:60]), "<i2").astype(np.float32) / 32768
    assert analysis.tone_seconds(heard, 16000, 600) >= 0.8
