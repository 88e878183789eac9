"""The raw PCM WebSocket bridge against a reference bot written from its protocol notes
(``media/bridges/pcm_ws.py``): JSON ``start``, binary L16 frames both ways, JSON
``mark``/``clear``/``dtmf``/``stop``. The bot answers a 600 Hz caller with 1000 Hz."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from media import analysis
from media.bridges import PcmBridge, make_bridge
from media.opus import OpusSettings
from media.sinks.meter import LevelMeter, SpeechDetector
from media.sources.tone import ToneSource
from media_call import LOOPBACK, TIMEOUT, call_pair
from tests.helpers import Conditions, ToneEars

CALLER_HZ = 600.0
BOT_HZ = 1000.0


class PcmBot:
    """Hears 600 Hz → answers each frame with the same length of 1000 Hz; records all."""

    def __init__(self, *, respond: bool = True) -> None:
        self.respond = respond
        self.texts: list[tuple[float, dict]] = []
        self.frames: list[bytes] = []
        self.heard_frames = 0
        self.ws: web.WebSocketResponse | None = None
        self.socket_closed = asyncio.Event()
        self._connected = asyncio.Event()
        self._conditions = Conditions()
        self._phase = 0.0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/pcm"

    async def __aenter__(self) -> PcmBot:
        app = web.Application()
        app.router.add_get("/pcm", self._handler)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    @property
    def rate(self) -> int:
        return self.texts[0][1]["format"]["sample_rate"]

    async def _handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        self._connected.set()
        loop = asyncio.get_running_loop()
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                self.texts.append((loop.time(), json.loads(msg.data)))
            elif msg.type is WSMsgType.BINARY:
                self.frames.append(msg.data)
                if self.respond:
                    await self._answer(np.frombuffer(msg.data, "<i2").astype(np.float64))
            self._conditions.changed()
        self.socket_closed.set()
        return ws

    async def _answer(self, pcm: np.ndarray) -> None:
        rate = self.rate
        power = np.abs(np.fft.rfft(pcm * np.hanning(pcm.size))) ** 2
        freqs = np.fft.rfftfreq(pcm.size, 1 / rate)
        band = power[np.abs(freqs - CALLER_HZ) <= 75].sum()
        if np.sqrt(np.mean(pcm * pcm)) > 300 and band > 0.5 * power.sum():
            self.heard_frames += 1
            step = 2 * np.pi * BOT_HZ / rate
            tone = np.round(0.3 * 32767 * np.sin(self._phase + step * np.arange(pcm.size)))
            self._phase = (self._phase + step * pcm.size) % (2 * np.pi)
            await self.ws.send_bytes(tone.astype("<i2").tobytes())

    async def until(self, pred, timeout: float = TIMEOUT) -> None:
        await self._conditions.until(pred, timeout)

    def events(self, name: str) -> list[dict]:
        return [m for _, m in self.texts if m["event"] == name]

    async def connected(self) -> web.WebSocketResponse:
        await asyncio.wait_for(self._connected.wait(), TIMEOUT)
        return self.ws


@pytest.mark.parametrize("rate, meter", [(16000, False), (24000, False), (48000, False), (16000, True)])
async def test_tone_in_tone_out_at_each_rate(rate, meter):
    """The caller's audio is decoded straight at the bot's rate (libopus, no resampler)
    while the bridge and the speech detector are its only readers; a reader of 48 kHz
    (a level meter) makes it 48 kHz, decimated for the bot: the bot hears the tone
    either way."""
    async with PcmBot() as bot:
        ears = ToneEars(BOT_HZ)
        async with call_pair(lambda business, user: user.add_sink(ears)) as (business, user):
            business.add_sink(SpeechDetector())
            if meter:
                business.add_sink(LevelMeter())
            bridge = make_bridge("pcm", bot.url, sample_rate=rate)
            assert isinstance(bridge, PcmBridge)
            user.play(ToneSource(CALLER_HZ, None))
            await bridge.start(business, call_id="call-42", parameters={"lang": "de"})
            await ears.hears(1.0)
            decoder = business._receiver.decoder
            assert decoder is not None and decoder.rate == (48000 if meter else rate)
            reason = await bridge.stop("user hung up")
            await asyncio.wait_for(bot.socket_closed.wait(), TIMEOUT)
    assert reason == "user hung up"
    start = bot.texts[0][1]
    assert start == {
        "event": "start",
        "protocol": "wacall.pcm",
        "version": 1,
        "call_id": "call-42",
        "stream_id": bridge.stream_id,
        "format": {"encoding": "pcm_s16le", "sample_rate": rate, "channels": 1, "frame_ms": 20},
        "parameters": {"lang": "de"},
    }
    assert bot.texts[-1][1] == {"event": "stop", "reason": "user hung up"}
    assert {len(f) for f in bot.frames} == {rate // 50 * 2}
    heard = np.frombuffer(b"".join(bot.frames[-50:]), "<i2")
    assert abs(analysis.dominant_frequency(heard, rate) - CALLER_HZ) < 2
    assert analysis.tone_seconds(heard, rate, CALLER_HZ, min_ratio=0.999) >= 0.9
    assert bot.heard_frames >= 50
    audio = ears.audio
    assert analysis.tone_seconds(audio, 48000, BOT_HZ) >= 1.0
    assert analysis.tone_seconds(audio, 48000, CALLER_HZ) < 0.1
    assert bridge.stats.frames_dropped == 0 and bridge.stats.ignored_messages == 0


async def test_longer_messages_carry_several_frames():
    """``frame_ms=60``: each message to the bot is 60 ms of the caller (1920 bytes at
    16 kHz), continuous (the tone's spectrum clean across message joins); the start
    says so; the statistics count 20 ms frames; the bot's answer plays."""
    async with PcmBot() as bot:
        ears = ToneEars(BOT_HZ)
        async with call_pair(lambda business, user: user.add_sink(ears)) as (business, user):
            bridge = make_bridge("pcm", bot.url, frame_ms=60)
            user.play(ToneSource(CALLER_HZ, None))
            await bridge.start(business, call_id="call-60")
            await ears.hears(1.0)
            await bot.until(lambda: len(bot.frames) >= 25)
            await bridge.stop("user hung up")
            await asyncio.wait_for(bot.socket_closed.wait(), TIMEOUT)
    assert bot.texts[0][1]["format"]["frame_ms"] == 60
    assert {len(f) for f in bot.frames} == {1920}
    heard = np.frombuffer(b"".join(bot.frames[-16:]), "<i2")
    assert abs(analysis.dominant_frequency(heard, 16000) - CALLER_HZ) < 2
    assert analysis.tone_seconds(heard, 16000, CALLER_HZ, min_ratio=0.999) >= 0.9
    assert bridge.stats.frames_to_bot == 3 * len(bot.frames)
    assert analysis.tone_seconds(ears.audio, 48000, BOT_HZ) >= 1.0
    with pytest.raises(ValueError, match="frame_ms"):
        make_bridge("pcm", bot.url, frame_ms=30)


@pytest.mark.parametrize("complexity", [0, 2])
async def test_the_bots_voice_is_encoded_with_the_configured_settings(complexity):
    """``WACALL_OPUS_COMPLEXITY``/``_BITRATE`` reach the encoder of the bot's 16 kHz voice;
    the cheap settings still carry the tone (the phone hears it, nothing else)."""
    settings = OpusSettings(bitrate=24_000, complexity=complexity)
    config = dataclasses.replace(LOOPBACK, opus=settings)
    async with PcmBot() as bot:
        ears = ToneEars(BOT_HZ)
        async with call_pair(lambda business, user: user.add_sink(ears), business_config=config) as (business, user):
            bridge = make_bridge("pcm", bot.url)
            user.play(ToneSource(CALLER_HZ, None))
            await bridge.start(business, call_id="call-7")
            encoder = bridge.source._encoder
            assert encoder is not None and encoder.rate == 16000
            assert encoder.settings() == {"bitrate": 24_000, "complexity": complexity}
            await ears.hears(1.0)
            await bridge.stop("user hung up")
    audio = ears.audio
    assert abs(analysis.dominant_frequency(audio[-48000:], 48000) - BOT_HZ) < 2
    assert analysis.tone_seconds(audio, 48000, BOT_HZ) >= 1.0
    assert analysis.tone_seconds(audio, 48000, CALLER_HZ) < 0.1


async def test_marks_clear_dtmf_odd_chunks_and_bot_stop():
    async with PcmBot(respond=False) as bot, call_pair() as (business, user):
        bridge = make_bridge("pcm", bot.url, sample_rate=16000)
        await bridge.start(business, call_id="call-43")
        ws = await bot.connected()
        tone = np.round(0.3 * 32767 * np.sin(2 * np.pi * BOT_HZ * np.arange(16000) / 16000)).astype("<i2").tobytes()
        # One second of audio in odd-sized pieces (samples split across messages).
        for i in range(0, len(tone), 999):
            await ws.send_bytes(tone[i : i + 999])
        await ws.send_str(json.dumps({"event": "mark", "name": "one"}))
        await ws.send_str(json.dumps({"event": "clear"}))
        await bot.until(lambda: bot.events("mark"))
        cleared_s = bridge.stats.audio_cleared_s
        await ws.send_bytes(tone[: 2 * 1600])  # 0.1 s
        await ws.send_str(json.dumps({"event": "mark", "name": "two"}))
        sent_two = asyncio.get_running_loop().time()
        await user.send_dtmf("5", duration_ms=100)
        await bot.until(lambda: len(bot.events("mark")) == 2 and bot.events("dtmf"))
        t_two = next(t for t, m in bot.texts if m.get("name") == "two")
        await ws.send_str(json.dumps({"event": "stop", "reason": "done"}))
        reason = await asyncio.wait_for(bridge.closed, TIMEOUT)
        await asyncio.wait_for(bot.socket_closed.wait(), TIMEOUT)
    assert reason == "bot hung up (done)" and bridge.ended_by == "bot"
    assert [m["name"] for m in bot.events("mark")] == ["one", "two"]
    # "two" came back only after its 0.1 s had played.
    assert t_two - sent_two >= 0.1
    assert 0.5 <= cleared_s <= 1.0  # all of it, or all but the frames already played
    assert bot.events("dtmf")[0]["digit"] == "5" and bot.events("dtmf")[0]["duration_ms"] >= 100
    assert bot.events("stop") == []  # the bot hung up: no stop back
    assert bridge.stats.audio_from_bot_s == pytest.approx(1.1)
    assert bridge.stats.ignored_messages == 0
