"""The Twilio Media Streams bridge against a reference bot written from the protocol notes.

The bot is a plain aiohttp WebSocket server on 127.0.0.1 that records every message
(with the loop time it arrived) and sends what each test scripts. Calls are real aiortc
peer pairs (``tests/media_call.py``): the bridge attaches to the business peer, the
"user" peer is the phone. Barge-in and mark timing are measured on the business peer's
outbound tap (the frames as they go out) and on the user's received audio.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from media import analysis
from media.bridges import BridgeUnavailable, TwilioBridge, make_bridge
from media.g711 import decode_ulaw, encode_ulaw
from media.peer import MediaPeer
from media.sources.tone import ToneSource
from media_call import LOOPBACK, TIMEOUT, call_pair
from tests.helpers import Conditions

CALLER_HZ = 600.0
CALL_ID = "CA9b2e00000000000000000000000000aa"


def tone8k(freq: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    n = round(seconds * 8000)
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * np.arange(n) / 8000)).astype(np.int16)


class TwilioBot:
    """A Twilio-speaking bot: records messages, sends what it is told."""

    def __init__(self, *, status: int | None = None, read: bool = True) -> None:
        self.messages: list[tuple[float, dict]] = []
        self.ws: web.WebSocketResponse | None = None
        self.status = status
        self.socket_closed = asyncio.Event()
        self.read = read
        self._release = asyncio.Event()
        self._connected = asyncio.Event()
        self._waiters: list[tuple[object, asyncio.Future]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/media?token=secret"

    async def _handler(self, request: web.Request) -> web.StreamResponse:
        if self.status is not None:
            return web.Response(status=self.status, text="no")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        self._connected.set()
        if not self.read:  # a hung bot: never reads (so never answers a close either)
            await self._release.wait()
            return ws
        loop = asyncio.get_running_loop()
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                entry = (loop.time(), json.loads(msg.data))
                self.messages.append(entry)
                for pred, fut in list(self._waiters):
                    if not fut.done() and pred(entry[1]):
                        fut.set_result(entry)
                        self._waiters.remove((pred, fut))
        self.socket_closed.set()
        return ws

    async def __aenter__(self) -> TwilioBot:
        app = web.Application()
        app.router.add_get("/media", self._handler)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._release.set()
        await self._runner.cleanup()

    async def connected(self) -> web.WebSocketResponse:
        await asyncio.wait_for(self._connected.wait(), TIMEOUT)
        return self.ws

    async def wait(self, pred, timeout: float = TIMEOUT) -> tuple[float, dict]:
        """The first message (already received or coming) for which ``pred`` holds."""
        for entry in self.messages:
            if pred(entry[1]):
                return entry
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        return await asyncio.wait_for(fut, timeout)

    def events(self, name: str) -> list[dict]:
        return [m for _, m in self.messages if m["event"] == name]

    async def send(self, message: dict) -> None:
        await self.ws.send_str(json.dumps(message))

    async def media(self, pcm8k: np.ndarray) -> None:
        payload = base64.b64encode(encode_ulaw(pcm8k)).decode()
        await self.send({"event": "media", "streamSid": "MZignored", "media": {"payload": payload}})

    async def mark(self, name: str) -> None:
        await self.send({"event": "mark", "streamSid": "MZignored", "mark": {"name": name}})

    async def clear(self) -> None:
        await self.send({"event": "clear", "streamSid": "MZignored"})


class Tap:
    """Outbound tap on the business peer: ``(sent_at, pcm)`` of every frame sent."""

    def __init__(self, track) -> None:
        self.track = track
        self.rows: list[tuple[float, np.ndarray]] = []
        self._conditions = Conditions()

    def write(self, pcm, sample_rate, channels=1) -> None:
        self.rows.append((self.track.sent_at, pcm.copy()))
        self._conditions.changed()

    def close(self) -> None:
        pass

    async def until(self, pred, timeout: float = TIMEOUT) -> None:
        """Wait until ``pred()`` holds, checked as each frame is sent."""
        await self._conditions.until(pred, timeout)

    async def loud_frames(self, n: int) -> None:
        await self.until(lambda: sum(1 for _, pcm in self.rows if loud(pcm)) >= n)

    async def frames_after(self, t: float, n: int) -> list[tuple[float, np.ndarray]]:
        """Wait until ``n`` frames were sent after loop time ``t``; return them."""
        after = lambda: [r for r in self.rows if r[0] > t]  # noqa: E731
        await self.until(lambda: len(after()) >= n)
        return after()[:n]


class Ears:
    """The user's received audio (mono 48 kHz)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def write(self, pcm, sample_rate, channels=1) -> None:
        self.frames.append(pcm.reshape(-1, channels).mean(axis=1).astype(np.int16) if channels > 1 else pcm.copy())

    def close(self) -> None:
        pass

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.frames) if self.frames else np.zeros(0, np.int16)


def loud(pcm: np.ndarray) -> bool:
    """A frame that carries tone (not just the resampler's ring-out after one)."""
    return np.count_nonzero(np.abs(pcm) > 1000) > pcm.size // 4


def dominant(pcm: np.ndarray) -> float:
    return analysis.dominant_frequency(pcm, 48000) if loud(pcm) else 0.0


# -- handshake, media, stop -----------------------------------------------------------


async def test_handshake_media_and_user_hangup_speak_twilio_exactly():
    params = {"from_number": "+4915112345678", "to_number": "+4930123456", "lang": "de"}
    async with TwilioBot() as bot, call_pair() as (business, user):
        bridge = make_bridge("twilio", bot.url)
        assert isinstance(bridge, TwilioBridge)
        user.play(ToneSource(CALLER_HZ, None))
        await bridge.start(business, call_id=CALL_ID, parameters=params)
        await bot.wait(lambda m: m["event"] == "media" and m["media"]["chunk"] == "60")
        assert business._receiver.decoder.rate == 8000  # (libopus decodes to μ-law's rate)
        reason = await bridge.stop("user hung up")
        await asyncio.wait_for(bot.socket_closed.wait(), TIMEOUT)

    assert reason == "user hung up" and bridge.ended_by == "local"
    assert await asyncio.wait_for(bridge.closed, 1) == "user hung up"
    messages = [m for _, m in bot.messages]
    assert messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    start = messages[1]
    sid = bridge.stream_sid
    assert sid.startswith("MZ") and len(sid) == 34
    assert bridge.account_sid.startswith("AC") and len(bridge.account_sid) == 34
    assert start == {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": sid,
        "start": {
            "streamSid": sid,
            "accountSid": bridge.account_sid,
            "callSid": CALL_ID,
            "tracks": ["inbound"],
            "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    # Every message after `connected` counts up from "1", as strings.
    assert [m["sequenceNumber"] for m in messages[1:]] == [str(i) for i in range(1, len(messages))]
    media = [m for m in messages if m["event"] == "media"]
    assert len(media) >= 60
    for i, m in enumerate(media):
        assert m["streamSid"] == sid
        assert m["media"]["track"] == "inbound"
        assert m["media"]["chunk"] == str(i + 1)
        assert m["media"]["timestamp"] == str(20 * i)
        assert len(base64.b64decode(m["media"]["payload"])) == 160
    # The caller's 600 Hz arrives as 600 Hz μ-law at 8 kHz, continuous (no clicks: the
    # tone's spectrum stays clean across 20 ms frame boundaries).
    heard = np.concatenate([decode_ulaw(base64.b64decode(m["media"]["payload"])) for m in media])
    steady = heard[-8000:]
    assert abs(analysis.dominant_frequency(steady, 8000) - CALLER_HZ) < 2
    assert analysis.tone_seconds(steady, 8000, CALLER_HZ) >= 0.98
    assert analysis.tone_seconds(steady, 8000, CALLER_HZ, min_ratio=0.999) >= 0.9
    stop = messages[-1]
    assert stop == {
        "event": "stop",
        "sequenceNumber": str(len(messages) - 1),
        "streamSid": sid,
        "stop": {"accountSid": bridge.account_sid, "callSid": CALL_ID},
    }
    assert bridge.sink.closed and bridge.playback.done.done()


# -- bot audio, marks ----------------------------------------------------------------------


async def test_bot_audio_plays_and_marks_echo_in_order_after_their_audio():
    async with TwilioBot() as bot:
        tap = Tap(None)
        ears = Ears()

        def attach(business, user):
            tap.track = business.outbound
            business.add_outbound_sink(tap)
            user.add_sink(ears)

        async with call_pair(attach) as (business, user):
            bridge = make_bridge("twilio", bot.url)
            await bridge.start(business, call_id=CALL_ID)
            await bot.connected()
            # Faster than real time, as bots do: 0.3 s of A, mark a, 0.3 s of B, marks b c.
            await bot.media(tone8k(1000, 0.3))
            await bot.mark("a")
            await bot.media(tone8k(1500, 0.3))
            await bot.mark("b")
            await bot.mark("c")
            echo_c = await bot.wait(lambda m: m["event"] == "mark" and m["mark"]["name"] == "c")
            # With nothing queued, a mark comes straight back.
            asked = asyncio.get_running_loop().time()
            await bot.mark("d")
            echo_d = await bot.wait(lambda m: m["event"] == "mark" and m["mark"]["name"] == "d")
            await tap.frames_after(echo_d[0], 3)
            await bridge.stop()

    echoes = [(t, m["mark"]["name"]) for t, m in bot.messages if m["event"] == "mark"]
    assert [name for _, name in echoes] == ["a", "b", "c", "d"]
    assert all(m["streamSid"] == bridge.stream_sid for m in bot.events("mark"))
    frames = [(at, dominant(pcm)) for at, pcm in tap.rows]
    a_frames = [at for at, f in frames if abs(f - 1000) < 30]
    b_frames = [at for at, f in frames if abs(f - 1500) < 30]
    assert len(a_frames) == 15 and len(b_frames) == 15, (len(a_frames), len(b_frames))
    t_a, t_b, t_c = (t for t, name in echoes[:3])
    # "a" only after the last frame of A went out, and before B finished; not later than
    # one frame (+ scheduling slack) after A's last frame.
    assert a_frames[-1] < t_a < b_frames[-1]
    assert t_a - a_frames[-1] < 0.020 + 0.080
    assert b_frames[-1] < t_b <= t_c
    assert t_b - b_frames[-1] < 0.020 + 0.080
    assert echo_c[0] == t_c
    assert echo_d[0] - asked < 0.5
    # The user heard A then B, 0.3 s each.
    audio = ears.audio
    assert analysis.tone_seconds(audio, 48000, 1000) == pytest.approx(0.3, abs=0.045)
    assert analysis.tone_seconds(audio, 48000, 1500) == pytest.approx(0.3, abs=0.045)
    seg_a = analysis.tone_segments(audio, 48000, 1000)
    seg_b = analysis.tone_segments(audio, 48000, 1500)
    assert len(seg_a) == len(seg_b) == 1 and seg_a[0][1] <= seg_b[0][0] + 0.021
    stats = bridge.stats
    assert stats.marks_received == stats.marks_echoed == 4
    assert stats.frames_played == 30


async def test_clear_stops_bot_audio_within_one_frame_and_echoes_pending_marks():
    async with TwilioBot() as bot:
        tap = Tap(None)
        ears = Ears()

        def attach(business, user):
            tap.track = business.outbound
            business.add_outbound_sink(tap)
            user.add_sink(ears)

        async with call_pair(attach) as (business, user):
            bridge = make_bridge("twilio", bot.url)
            await bridge.start(business, call_id=CALL_ID)
            await bot.connected()
            await bot.media(tone8k(1000, 2.0))
            await bot.mark("x")
            await bot.media(tone8k(1000, 2.0))
            await bot.mark("y")
            await tap.loud_frames(10)
            cleared_by_bot = asyncio.get_running_loop().time()
            await bot.clear()
            y = await bot.wait(lambda m: m["event"] == "mark" and m["mark"]["name"] == "y")
            clear_at = bridge.stats.last_clear_at
            after = await tap.frames_after(clear_at, 10)
            # After the clear the bot speaks again: that plays normally.
            await bot.media(tone8k(1500, 0.2))
            await tap.frames_after(after[-1][0], 15)
            await bridge.stop()

    assert clear_at is not None and clear_at >= cleared_by_bot
    echoes = [(t, m["mark"]["name"]) for t, m in bot.messages if m["event"] == "mark"]
    assert [name for _, name in echoes] == ["x", "y"]
    # Both pending marks came back at the clear, long before their audio would have played.
    first_loud = next(at for at, pcm in tap.rows if loud(pcm))
    assert y[0] - first_loud < 1.0
    assert all(t >= clear_at for t, _ in echoes)
    # Audio time: the first frame after the clear holds at most the resampler's ring-out
    # (< 3 ms), the rest is digital silence.
    first, *rest = after
    assert np.count_nonzero(np.abs(first[1]) > 0) <= 144
    assert all(not pcm.any() for _, pcm in rest)
    # Wall time: that frame was the next one due.
    assert first[0] - clear_at <= 0.020 + 0.080
    played = [at for at, pcm in tap.rows if at < clear_at and abs(dominant(pcm) - 1000) < 30]
    assert bridge.stats.audio_cleared_s == pytest.approx(4.0 - len(played) * 0.02, abs=0.001)
    # The user heard one 1000 Hz segment, as long as the frames sent before the clear.
    segments = analysis.tone_segments(ears.audio, 48000, 1000)
    assert len(segments) == 1
    assert segments[0][1] - segments[0][0] == pytest.approx(len(played) * 0.02, abs=0.041)
    assert analysis.tone_seconds(ears.audio, 48000, 1500) == pytest.approx(0.2, abs=0.041)


# -- DTMF, hang-ups ------------------------------------------------------------------------


async def test_dtmf_from_the_user_reaches_the_bot():
    async with TwilioBot() as bot, call_pair() as (business, user):
        bridge = make_bridge("twilio", bot.url)
        await bridge.start(business, call_id=CALL_ID)
        await bot.connected()
        await user.send_dtmf("7#", duration_ms=100, gap_ms=60)
        await bot.wait(lambda m: m["event"] == "dtmf" and m["dtmf"]["digit"] == "#")
        await bridge.stop()
    dtmf = bot.events("dtmf")
    assert [m["dtmf"] for m in dtmf] == [
        {"track": "inbound_track", "digit": "7"},
        {"track": "inbound_track", "digit": "#"},
    ]
    assert all(m["streamSid"] == bridge.stream_sid and m["sequenceNumber"].isdigit() for m in dtmf)
    assert bridge.stats.dtmf_to_bot == 2


async def test_bot_hangup_resolves_closed_and_its_queued_audio_still_plays():
    async with TwilioBot() as bot:
        tap = Tap(None)

        def attach(business, user):
            tap.track = business.outbound
            business.add_outbound_sink(tap)

        async with call_pair(attach) as (business, user):
            bridge = make_bridge("twilio", bot.url)
            await bridge.start(business, call_id=CALL_ID)
            ws = await bot.connected()
            await bot.media(tone8k(1000, 0.5))  # "goodbye"
            await ws.close()
            reason = await asyncio.wait_for(bridge.closed, TIMEOUT)
            assert reason == "bot hung up (WebSocket closed, code 1000)"
            assert bridge.ended_by == "bot" and not bridge.running
            await asyncio.wait_for(bridge.playback.done, TIMEOUT)
            assert bridge.sink.closed
            # Nothing is sent to a closed bot; stop() after the fact just reports.
            assert await bridge.stop() == reason
    assert sum(1 for _, pcm in tap.rows if loud(pcm)) == 25
    assert bot.events("stop") == []


async def test_call_media_ending_stops_the_bridge():
    async with TwilioBot() as bot, call_pair() as (business, user):
        bridge = make_bridge("twilio", bot.url)
        await bridge.start(business, call_id=CALL_ID)
        await bot.connected()
        await business.close()
        reason = await asyncio.wait_for(bridge.closed, TIMEOUT)
        assert reason.startswith("call media ended")
        await bot.wait(lambda m: m["event"] == "stop")
        await asyncio.wait_for(bot.socket_closed.wait(), TIMEOUT)


# -- failures ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_bot_fails_fast_with_a_clear_reason():
    peer = MediaPeer(LOOPBACK)
    try:
        # Nothing listens: refused at once.
        port = _free_port()
        bridge = make_bridge("twilio", f"ws://127.0.0.1:{port}/ws?token=secret", connect_timeout_s=5)
        t0 = time.monotonic()
        with pytest.raises(BridgeUnavailable) as err:
            await bridge.start(peer, call_id=CALL_ID)
        assert time.monotonic() - t0 < 1.0
        assert str(err.value) == f"bot at ws://127.0.0.1:{port}/ws unreachable: connection refused"
        assert "secret" not in str(err.value)
        assert (await asyncio.wait_for(bridge.closed, 1)).startswith("unavailable: connection refused")

        # Listens but never answers the upgrade: the connect timeout.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            bridge = make_bridge("twilio", f"ws://127.0.0.1:{silent.getsockname()[1]}/ws", connect_timeout_s=0.3)
            t0 = time.monotonic()
            with pytest.raises(BridgeUnavailable, match=r"no answer within 0\.3 s"):
                await bridge.start(peer, call_id=CALL_ID)
            assert 0.3 <= time.monotonic() - t0 < 1.3

        # Answers, but not with a WebSocket.
        async with TwilioBot(status=404) as bot:
            bridge = make_bridge("twilio", bot.url)
            with pytest.raises(BridgeUnavailable, match=r"upgrade rejected \(HTTP 404"):
                await bridge.start(peer, call_id=CALL_ID)

        with pytest.raises(ValueError):
            make_bridge("twilio", "http://127.0.0.1/ws")
        with pytest.raises(ValueError, match="unknown bridge protocol"):
            make_bridge("sip", "ws://127.0.0.1/ws")
    finally:
        await peer.close()


async def test_stalled_bot_keeps_the_call_flowing_and_idles_out():
    async with TwilioBot() as bot:
        tap = Tap(None)
        ears = Ears()

        def attach(business, user):
            tap.track = business.outbound
            business.add_outbound_sink(tap)
            user.add_sink(ears)

        async with call_pair(attach) as (business, user):
            bridge = make_bridge("twilio", bot.url, idle_timeout_s=1.0)
            user.play(ToneSource(CALLER_HZ, None))
            await bridge.start(business, call_id=CALL_ID)
            await bot.connected()
            await bot.media(tone8k(1000, 0.3))
            last_from_bot = asyncio.get_running_loop().time()
            # ...then the bot says nothing more (still connected, still reading).
            reason = await asyncio.wait_for(bridge.closed, TIMEOUT)
            idle_for = asyncio.get_running_loop().time() - last_from_bot
            frames_then = len(tap.rows)
            await tap.frames_after(tap.rows[-1][0], 5)
            await asyncio.wait_for(bot.socket_closed.wait(), TIMEOUT)

    assert reason == "bot idle" and bridge.ended_by == "idle"
    assert 1.0 <= idle_for < 1.5
    assert bot.events("stop"), "the idle bot gets a stop before the socket closes"
    # While the bot was silent the caller still sent 20 ms frames and the user kept
    # receiving audio: the tone, then silence, at the track's pace.
    assert bridge.stats.silence_frames >= 30
    assert frames_then >= 45
    stamps = np.array([at for at, _ in tap.rows])
    assert np.diff(stamps).max() < 0.1
    assert analysis.tone_seconds(ears.audio, 48000, 1000) == pytest.approx(0.3, abs=0.045)
    media = bot.events("media")
    assert len(media) >= 45 and bridge.stats.frames_dropped == 0


async def test_a_slow_bot_socket_never_blocks_the_media_path():
    """The sink is called on the receive pump; a burst larger than the outbox (as after
    an event-loop stall) drops the oldest frames and keeps the newest."""
    peer = MediaPeer(LOOPBACK)
    try:
        async with TwilioBot() as bot:
            bridge = make_bridge("twilio", bot.url, outbox_frames=50)
            await bridge.start(peer, call_id=CALL_ID)
            await bot.connected()
            frame = np.round(0.3 * 32767 * np.sin(2 * np.pi * 600 * np.arange(960) / 48000)).astype(np.int16)
            t0 = time.perf_counter()
            for _ in range(500):  # 10 s of audio in one go, without yielding
                bridge.sink.write(frame, 48000, 1)
            per_frame_ms = (time.perf_counter() - t0) / 500 * 1000
            await bot.wait(lambda m: m["event"] == "media" and m["media"]["chunk"] == "500")
            await bridge.stop()
    finally:
        await peer.close()
    assert per_frame_ms < 1.0
    stats = bridge.stats
    assert stats.frames_dropped == 450 and stats.frames_to_bot == 50
    chunks = [int(m["media"]["chunk"]) for m in bot.events("media")]
    assert chunks == list(range(451, 501))
    timestamps = [int(m["media"]["timestamp"]) for m in bot.events("media")]
    assert timestamps == [20 * (c - 1) for c in chunks]


async def test_malformed_bot_messages_are_ignored():
    peer = MediaPeer(LOOPBACK)  # no media: nothing plays the bot's audio out
    try:
        async with TwilioBot() as bot:
            bridge = make_bridge("twilio", bot.url)
            await bridge.start(peer, call_id=CALL_ID)
            ws = await bot.connected()
            await ws.send_str("not json")
            await ws.send_bytes(b"\x00\x01")
            await bot.send({"event": "media", "media": {}})
            await bot.send({"event": "media", "media": {"payload": "!!!"}})
            await bot.send({"event": "mark", "mark": {}})
            await bot.send({"event": "wat"})
            await bot.send({"nothing": 1})
            await bot.media(tone8k(1000, 0.04))
            await bot.mark("m")
            await bot.clear()  # echoes "m": everything before it was handled
            await bot.wait(lambda m: m["event"] == "mark")
            await bridge.stop()
    finally:
        await peer.close()
    stats = bridge.stats
    assert stats.ignored_messages == 7 and stats.messages_from_bot == 10
    assert stats.audio_from_bot_s == pytest.approx(0.04) and stats.audio_cleared_s == pytest.approx(0.04)
    assert [m["mark"]["name"] for m in bot.events("mark")] == ["m"]


async def test_external_clear_drops_bot_audio_and_the_bridge_plays_again_later():
    """The gateway may ``peer.clear()`` (e.g. to play a prompt): the bot's queued audio
    goes, its pending marks come back, and the bot's next audio plays again."""
    async with TwilioBot() as bot:
        tap = Tap(None)

        def attach(business, user):
            tap.track = business.outbound
            business.add_outbound_sink(tap)

        async with call_pair(attach) as (business, user):
            bridge = make_bridge("twilio", bot.url)
            await bridge.start(business, call_id=CALL_ID)
            await bot.connected()
            await bot.media(tone8k(1000, 2.0))
            await bot.mark("m")
            await tap.loud_frames(5)
            first = bridge.playback
            business.clear()
            assert first.done.done()
            await bot.wait(lambda m: m["event"] == "mark")
            await bot.media(tone8k(1500, 0.2))
            await tap.until(lambda: sum(1 for _, p in tap.rows if abs(dominant(p) - 1500) < 30) >= 10)
            assert bridge.playback is not first and bridge.running
            await bridge.stop()
    assert [m["mark"]["name"] for m in bot.events("mark")] == ["m"]
    assert sum(1 for _, p in tap.rows if abs(dominant(p) - 1000) < 30) < 100


async def test_stop_is_bounded_when_the_bot_hangs():
    """A bot that stopped reading never answers the close handshake: stop() gives up
    after close_timeout_s instead of hanging the caller's hang-up."""
    async with TwilioBot(read=False) as bot, call_pair() as (business, user):
        bridge = make_bridge("twilio", bot.url, close_timeout_s=0.5)
        await bridge.start(business, call_id=CALL_ID)
        await bot.connected()
        t0 = time.monotonic()
        assert await bridge.stop("user hung up") == "user hung up"
        took = time.monotonic() - t0
        assert took < 0.5 + 1.0
        assert bridge.sink.closed
    print(f"stop took {took:.3f} s")
