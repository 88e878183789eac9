"""The AudioSocket bridge (wacall as Asterisk) against a reference AudioSocket server
written from the protocol notes: ``kind u8 | length u16 BE | payload``, UUID first,
slin LE audio, ASCII DTMF, ``00 00 00`` hang-up, ``0xFF`` error. The server answers a
600 Hz caller with 1000 Hz, one reply frame per received frame (paced by the call)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid

import numpy as np
import pytest

from media import analysis
from media.bridges import AudioSocketBridge, BridgeUnavailable, make_bridge
from media.bridges.audiosocket import session_uuid_for
from media.peer import MediaPeer
from media.sources.tone import ToneSource
from media_call import LOOPBACK, TIMEOUT, call_pair
from tests.helpers import Conditions, ToneEars

CALLER_HZ = 600.0
BOT_HZ = 1000.0
KIND_RATE = {0x10: 8000, 0x12: 16000}


class AudioSocketServer:
    """One session at a time; records every frame as ``(kind, payload)``."""

    def __init__(self, *, reply_kind: int | None = None) -> None:
        self.reply_kind = reply_kind
        self.frames: list[tuple[int, bytes]] = []
        self.eof = asyncio.Event()
        self.heard_frames = 0
        self.writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._conditions = Conditions()
        self._phase = 0.0
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> AudioSocketServer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        if self.writer is not None:
            self.writer.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._connected.set()
        try:
            while True:
                header = await reader.readexactly(3)
                kind, length = struct.unpack("!BH", header)
                payload = await reader.readexactly(length) if length else b""
                self.frames.append((kind, payload))
                if kind in KIND_RATE and self.reply_kind is not None:
                    await self._answer(np.frombuffer(payload, "<i2").astype(np.float64), KIND_RATE[kind])
                self._conditions.changed()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            self._conditions.changed()

    async def _answer(self, pcm: np.ndarray, rate: int) -> None:
        power = np.abs(np.fft.rfft(pcm * np.hanning(pcm.size))) ** 2
        freqs = np.fft.rfftfreq(pcm.size, 1 / rate)
        band = power[np.abs(freqs - CALLER_HZ) <= 75].sum()
        if np.sqrt(np.mean(pcm * pcm)) > 300 and band > 0.5 * power.sum():
            self.heard_frames += 1
            step = 2 * np.pi * BOT_HZ / rate
            tone = np.round(0.3 * 32767 * np.sin(self._phase + step * np.arange(pcm.size)))
            self._phase = (self._phase + step * pcm.size) % (2 * np.pi)
            self.send(self.reply_kind, tone.astype("<i2").tobytes())

    def send(self, kind: int, payload: bytes = b"") -> None:
        self.writer.write(struct.pack("!BH", kind, len(payload)) + payload)

    async def until(self, pred, timeout: float = TIMEOUT) -> None:
        await self._conditions.until(pred, timeout)

    async def connected(self) -> None:
        await asyncio.wait_for(self._connected.wait(), TIMEOUT)

    def of_kind(self, kind: int) -> list[bytes]:
        return [p for k, p in self.frames if k == kind]


@pytest.mark.parametrize("rate, kind", [(8000, 0x10), (16000, 0x12)])
async def test_tone_in_tone_out_and_user_hangup(rate, kind):
    session = uuid.UUID("40325ec2-5efd-4bd3-805f-53576e581d13")
    async with AudioSocketServer(reply_kind=kind) as bot:
        ears = ToneEars(BOT_HZ)
        async with call_pair(lambda business, user: user.add_sink(ears)) as (business, user):
            bridge = make_bridge("audiosocket", bot.url, sample_rate=rate, session_uuid=session)
            assert isinstance(bridge, AudioSocketBridge)
            user.play(ToneSource(CALLER_HZ, None))
            await bridge.start(business, call_id="call-7")
            await ears.hears(1.0)
            reason = await bridge.stop("user hung up")
            await bot.until(lambda: bot.eof.is_set())
    assert reason == "user hung up"
    assert bot.frames[0] == (0x01, session.bytes)
    assert bot.frames[-1] == (0x00, b"")  # hang-up, then EOF
    audio = bot.of_kind(kind)
    assert {k for k, _ in bot.frames[1:-1]} == {kind}
    assert {len(p) for p in audio} == {rate // 50 * 2}
    heard = np.frombuffer(b"".join(audio[-50:]), "<i2")
    assert abs(analysis.dominant_frequency(heard, rate) - CALLER_HZ) < 2
    assert analysis.tone_seconds(heard, rate, CALLER_HZ, min_ratio=0.999) >= 0.9
    assert bot.heard_frames >= 50
    assert bridge.stats.frames_dropped == 0


async def test_session_uuid_defaults_and_dtmf_frames():
    async with AudioSocketServer() as bot, call_pair() as (business, user):
        call_id = "c0ffee00-0000-4000-8000-000000000001"
        bridge = make_bridge("audiosocket", f"127.0.0.1:{bot.port}")
        await bridge.start(business, call_id=call_id)
        await bot.connected()
        await user.send_dtmf("5*#", duration_ms=100, gap_ms=60)
        await bot.until(lambda: len(bot.of_kind(0x03)) == 3)
        await bridge.stop()
    assert bot.frames[0] == (0x01, uuid.UUID(call_id).bytes)
    assert bot.of_kind(0x03) == [b"5", b"*", b"#"]
    assert bridge.session_uuid == uuid.UUID(call_id)
    # A call id that is not a UUID maps to a stable name-based UUID.
    assert session_uuid_for("wacall-call-1") == session_uuid_for("wacall-call-1") != session_uuid_for("x")
    assert session_uuid_for("wacall-call-1").version == 5


@pytest.mark.parametrize(
    "ending, reason, by",
    [
        ("hangup", "bot hung up (hangup frame)", "bot"),
        ("eof", "bot hung up (connection closed)", "bot"),
        ("error", "bot protocol error: bot sent an error frame (code 0x02)", "error"),
        ("dtmf", "bot protocol error: unexpected frame kind 0x03 (1 bytes)", "error"),
        ("wrong-rate", "bot protocol error: audio of kind 0x12, expected 0x10 (8000 Hz)", "error"),
    ],
)
async def test_bot_ends_the_session(ending, reason, by):
    async with AudioSocketServer() as bot, call_pair() as (business, user):
        bridge = make_bridge("audiosocket", bot.url)
        await bridge.start(business, call_id="call-8")
        await bot.connected()
        # Some speech first: it is queued and still plays out after the hang-up.
        tone = np.round(0.3 * 32767 * np.sin(2 * np.pi * BOT_HZ * np.arange(1600) / 8000)).astype("<i2")
        bot.send(0x10, tone.tobytes())
        if ending == "hangup":
            bot.send(0x00)
        elif ending == "eof":
            bot.writer.close()
        elif ending == "error":
            bot.send(0xFF, b"\x02")
        elif ending == "dtmf":
            bot.send(0x03, b"1")
        else:
            bot.send(0x12, bytes(640))
        assert await asyncio.wait_for(bridge.closed, TIMEOUT) == reason
        assert bridge.ended_by == by
        await asyncio.wait_for(bridge.playback.done, TIMEOUT)
        await bot.until(lambda: bot.eof.is_set())
    assert bot.frames[0] == (0x01, session_uuid_for("call-8").bytes)
    assert bridge.stats.frames_played == 10
    assert (0x00, b"") not in bot.frames  # no hang-up sent back to a bot that ended


async def test_unreachable_and_bad_addresses():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = MediaPeer(LOOPBACK)
    try:
        bridge = make_bridge("audiosocket", f"tcp://127.0.0.1:{port}")
        t0 = time.monotonic()
        with pytest.raises(BridgeUnavailable) as err:
            await bridge.start(peer, call_id="call-9")
        assert time.monotonic() - t0 < 1.0
        assert str(err.value) == f"bot at tcp://127.0.0.1:{port} unreachable: connection refused"
    finally:
        await peer.close()
    for bad in ("ws://127.0.0.1:1/x", "127.0.0.1", "tcp://:9092"):
        with pytest.raises(ValueError):
            make_bridge("audiosocket", bad)
    with pytest.raises(ValueError):
        make_bridge("audiosocket", "127.0.0.1:9092", sample_rate=44100)
