"""Media in worker processes (``WACALL_WORKERS``): calls spread over the workers carry
audio both ways (tones detected), record, take DTMF and bots; a worker that dies ends
only its own calls (terminated at the provider, ``media_failure``) and is started again."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
from dataclasses import replace

import aiohttp
import numpy as np
import pytest

from gateway.app import Service
from gateway.bots import BotSpec
from gateway.calls import CallState, EndReason
from media import analysis
from media.g711 import decode_ulaw
from media.pool import WorkerPool
from media.sinks.wav import WavSink
from media.sources.tone import ToneSource
from tests.helpers import drain, free_port, until
from tests.processes import serve, stop, wait_healthy
from tests.test_recording import channels

USERS = ["+4915112345601", "+4915112345602", "+4915112345603"]
TIMEOUT = 30


@pytest.fixture
async def service(settings):
    async with Service(replace(settings, workers=2), sandbox=True) as svc:
        for user in USERS:
            await svc.sandbox.grant(user, permanent=True)
        yield svc


def tone_s(path, hz: float) -> float:
    x, rate = analysis.read_audio(path)
    return analysis.tone_seconds(x, rate, hz)


async def connected_call(service, user, tmp_path, *, hz: float, record: bool = False):
    service.sandbox.users.update(user, {"answer_after_ms": 0, "say": None})
    heard = tmp_path / f"{user[-2:]}-heard.wav"
    call = await service.manager.place_call(user, sources=[ToneSource(hz, 1.0)], sinks=[WavSink(heard)],
                                            record=record)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    return call, heard


async def test_calls_spread_over_workers_with_audio_both_ways(service, tmp_path):
    pool = service.workers
    a, heard_a = await connected_call(service, USERS[0], tmp_path, hz=1000, record=True)
    service.manager.recording_format = "opus"  # (b: both legs as Opus, stereo.ogg, made in its worker)
    b, heard_b = await connected_call(service, USERS[1], tmp_path, hz=1500, record=True)
    assert sorted(pool.load()) == [1, 1]  # the least loaded worker took the second call
    assert {a.media.worker.pid, b.media.worker.pid} == {w.pid for w in pool.workers} and os.getpid() not in (
        a.media.worker.pid, b.media.worker.pid)
    phones = [service.sandbox.calls[c.wacid].phone for c in (a, b)]
    said = [phones[0].peer.play(ToneSource(600, 1.0)), phones[1].peer.play(ToneSource(800, 1.0))]
    await asyncio.gather(a.wait_playback(), b.wait_playback(), *(p.done for p in said))
    await drain(a.media, b.media, *(p.peer for p in phones))
    # DTMF from the business reaches the phone, through the worker
    await a.send_dtmf("42#")
    await until(lambda: "".join(phones[0].dtmf_received) == "42#", TIMEOUT)
    stats = await a.refresh_stats()
    assert stats["packets_sent"] > 50 and stats["packets_received"] > 50, stats
    for call in (a, b):
        await call.hangup()
        await call.wait_finished(TIMEOUT)
    assert pool.load() == [0, 0]  # the workers let go of the sessions
    for call in (a, b):
        sandbox_call = service.sandbox.calls[call.wacid]
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    # each side heard its own call's tone, all of it, and nothing of the other call
    assert tone_s(phones[0].recording_path, 1000) == pytest.approx(1.0, abs=0.1)
    assert tone_s(phones[1].recording_path, 1500) == pytest.approx(1.0, abs=0.1)
    assert tone_s(phones[0].recording_path, 1500) == 0
    assert tone_s(heard_a, 600) == pytest.approx(1.0, abs=0.1) and tone_s(heard_a, 800) == 0
    assert tone_s(heard_b, 800) == pytest.approx(1.0, abs=0.1) and tone_s(heard_b, 600) == 0
    # the QA recording was made in the worker, listed here, and has the user's tone
    assert tone_s(a.recording_files["user_wav"], 600) == pytest.approx(1.0, abs=0.1)
    left, right = channels(a.recording_files["stereo_wav"])  # user left, business right
    assert analysis.tone_seconds(left, 48000, 600) == pytest.approx(1.0, abs=0.1)
    assert analysis.tone_seconds(right, 48000, 1000) == pytest.approx(1.0, abs=0.1)
    assert set(b.recording_files) == {"stereo_ogg", "sidecar"}
    left, right = channels(b.recording_files["stereo_ogg"])
    assert analysis.tone_seconds(left, 48000, 800) == pytest.approx(1.0, abs=0.1)
    assert analysis.tone_seconds(right, 48000, 1500) == pytest.approx(1.0, abs=0.1)
    assert a.summary()["media"]["packets_received"] > 50  # stats kept after the end


async def test_a_dead_worker_ends_only_its_calls_and_is_replaced(service, tmp_path):
    pool = service.workers
    a, _ = await connected_call(service, USERS[0], tmp_path, hz=1000)
    b, heard_b = await connected_call(service, USERS[1], tmp_path, hz=1500)
    victim = a.media.worker
    assert b.media.worker is not victim
    os.kill(victim.pid, signal.SIGKILL)

    await a.wait_finished(TIMEOUT)
    assert a.end_reason is EndReason.MEDIA_FAILURE, (a.end_reason, a.end_detail)
    sandbox_a = service.sandbox.calls[a.wacid]
    await asyncio.wait_for(sandbox_a.finished.wait(), TIMEOUT)
    assert sandbox_a.ended_by == "business"  # terminated at the provider
    await until(lambda: pool.alive == 2, TIMEOUT)
    assert pool.restarts == 1 and pool.workers[victim.index].pid != victim.pid

    # the other call went on: the user's tone after the kill is heard through its worker
    assert b.state is CallState.MEDIA_CONNECTED
    phone_b = service.sandbox.calls[b.wacid].phone
    said = phone_b.peer.play(ToneSource(700, 1.0))
    await asyncio.wait_for(said.done, TIMEOUT)
    await drain(b.media, phone_b.peer)
    # a new call lands on the new worker (the least loaded) and carries audio
    c, heard_c = await connected_call(service, USERS[2], tmp_path, hz=1200)
    assert c.media.worker is pool.workers[victim.index]
    phone_c = service.sandbox.calls[c.wacid].phone
    said = phone_c.peer.play(ToneSource(900, 1.0))
    await asyncio.gather(c.wait_playback(), said.done)
    await drain(c.media, phone_c.peer)
    for call in (b, c):
        await call.hangup()
        await call.wait_finished(TIMEOUT)
    assert tone_s(heard_b, 700) == pytest.approx(1.0, abs=0.1)
    assert tone_s(heard_c, 900) == pytest.approx(1.0, abs=0.1)
    sandbox_c = service.sandbox.calls[c.wacid]
    await asyncio.wait_for(sandbox_c.finished.wait(), TIMEOUT)
    assert tone_s(phone_c.recording_path, 1200) == pytest.approx(1.0, abs=0.1)


def bot_heard(bot, hz: float) -> float:
    """Seconds of ``hz`` in what the bot received (mu-law 8 kHz media messages)."""
    pcm = b"".join(base64.b64decode(m["media"]["payload"]) for m in bot.events("media"))
    x = decode_ulaw(pcm).astype(np.float32) / 32768
    return analysis.tone_seconds(x, 8000, hz) if x.size else 0.0


async def test_a_bot_joins_a_call_whose_media_is_in_a_worker(service, tmp_path, caplog):
    from tests.test_bridge_twilio import TwilioBot, tone8k

    caplog.set_level(logging.INFO)
    service.sandbox.users.update(USERS[0], {"answer_after_ms": 0, "say": None})
    async with TwilioBot() as bot:
        call = await service.manager.place_call(USERS[0], bot=BotSpec.from_dict({"protocol": "twilio",
                                                                                 "url": bot.url}))
        ws = await bot.connected()
        start = (await bot.wait(lambda m: m["event"] == "start"))[1]
        assert start["start"]["callSid"] == call.id
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        phone = service.sandbox.calls[call.wacid].phone
        said = phone.peer.play(ToneSource(600, 1.0))
        await bot.media(tone8k(1000, 1.0))  # the bot speaks
        await asyncio.wait_for(said.done, TIMEOUT)
        # the user's tone reached the bot (mu-law 8 kHz), through the worker's bridge
        await until(lambda: bot_heard(bot, 600) >= 0.9, TIMEOUT)
        await drain(phone.peer, frames=60)
        await ws.close()  # the bot hangs up: the WhatsApp call ends
        await call.wait_finished(TIMEOUT)
    assert call.end_reason is EndReason.BOT_HANGUP
    sandbox_call = service.sandbox.calls[call.wacid]
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert tone_s(phone.recording_path, 1000) == pytest.approx(1.0, abs=0.1)  # the bot was heard
    # the bridge's log line came from the worker, through our logging, with the call id
    lines = [r for r in caplog.records if getattr(r, "worker", None) is not None and "bridge" in r.getMessage()]
    assert lines and all(getattr(r, "call_id", None) == call.id for r in lines), lines


async def test_worker_errors_come_back_as_themselves():
    from media.peer import MediaError, PeerConfig

    async with WorkerPool(1) as pool:
        session = pool.session(PeerConfig(host_addresses=["127.0.0.1"]), label="bad")
        with pytest.raises(MediaError):
            await session.answer("v=0\r\nnot an offer\r\n")
        with pytest.raises(ValueError):
            await session.send_dtmf("xyz")
        await session.close()
        assert pool.load() == [0]


async def test_serve_runs_one_media_worker_per_core(tmp_path):
    port = free_port()
    proc = serve({"WACALL_PORT": str(port), "WACALL_DATA_DIR": str(tmp_path / "data"),
                  "WACALL_API_TOKEN": "t" * 24}, sandbox=True, log=tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/readyz") as resp:
                body = await resp.json()
            async with http.get(f"{url}/metrics") as resp:
                metrics = await resp.text()
        assert body["media_workers"] == {"running": os.cpu_count(), "size": os.cpu_count(),
                                         "sessions": [0] * os.cpu_count(), "restarts": 0}, body
        assert f"wacall_media_workers {float(os.cpu_count())}" in metrics
        assert 'wacall_media_worker_sessions{worker="0"} 0.0' in metrics
    finally:
        stop(proc)


async def test_a_worker_lost_while_the_phone_rings_ends_that_call_at_once(service, tmp_path):
    service.sandbox.users.update(USERS[0], {"answer_after_ms": 60_000, "say": None})
    call = await service.manager.place_call(USERS[0])
    await call.wait_state(CallState.RINGING, TIMEOUT)
    victim = call.media.worker
    os.kill(victim.pid, signal.SIGKILL)
    await call.wait_finished(TIMEOUT)
    assert call.end_reason is EndReason.MEDIA_FAILURE, (call.end_reason, call.end_detail)
    assert "media worker lost" in (call.end_detail or "")
    sandbox_call = service.sandbox.calls[call.wacid]
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert sandbox_call.ended_by == "business"  # the ringing phone was hung up through the provider
