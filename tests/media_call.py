"""Shared helpers for the media toolkit tests: a real aiortc call on 127.0.0.1 between a
"business" peer and a "user" peer, frame gates to wait on (no sleeps), signal helpers."""

from __future__ import annotations

import asyncio
import contextlib
import wave
from pathlib import Path

import numpy as np

from media import sdp as sdp_rules
from media.frames import FRAME_SAMPLES, SAMPLE_RATE
from media.opus import OpusEncoder, OpusSettings
from media.peer import MediaPeer, PeerConfig

TIMEOUT = 20
LOOPBACK = PeerConfig(host_addresses=["127.0.0.1"])


@contextlib.asynccontextmanager
async def call_pair(before_connect=None, *, business_config: PeerConfig = LOOPBACK):
    """``(business, user)`` peers with media up: offer → accept_offer → ICE-lite answer →
    apply_answer → media_up. ``before_connect(business, user)`` runs after the offer (to
    attach recorders before any media flows). Both peers are closed on exit."""
    business = MediaPeer(business_config, label="business")
    user = MediaPeer(LOOPBACK, label="user")
    try:
        offer = await business.create_offer()
        if before_connect is not None:
            before_connect(business, user)
        answer = sdp_rules.mark_ice_lite(await user.accept_offer(offer))
        await business.apply_answer(answer)
        await asyncio.wait_for(asyncio.gather(business.media_up(TIMEOUT), user.media_up(TIMEOUT)), TIMEOUT)
        yield business, user
    finally:
        await business.close()
        await user.close()


class FrameGate:
    """A sink counting frames; ``await gate.reached(n)`` resolves once ``n`` frames came.
    Also remembers the stream position (``received.pts``) of the first frame when given
    the peer."""

    def __init__(self, peer: MediaPeer | None = None) -> None:
        self.frames = 0
        self.first_pts: int | None = None
        self._peer = peer
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def write(self, pcm, sample_rate, channels=1) -> None:
        if self.frames == 0 and self._peer is not None:
            self.first_pts = self._peer.received.pts
        self.frames += 1
        for target, fut in list(self._waiters):
            if self.frames >= target and not fut.done():
                fut.set_result(self.frames)
                self._waiters.remove((target, fut))

    def close(self) -> None:
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(RuntimeError("the peer closed before enough frames arrived"))
        self._waiters.clear()

    async def reached(self, n: int, timeout: float = TIMEOUT) -> int:
        if self.frames >= n:
            return self.frames
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        return await asyncio.wait_for(fut, timeout)

    async def more(self, n: int, timeout: float = TIMEOUT) -> int:
        """Wait for ``n`` frames beyond those seen so far (drains the jitter buffer)."""
        return await self.reached(self.frames + n, timeout)


class SendLog:
    """Outbound tap: ``(sent_at, sent_pts, playback)`` of every frame a track sends."""

    def __init__(self, track) -> None:
        self.track = track
        self.rows: list[tuple[float, int, object]] = []

    def write(self, pcm, sample_rate, channels=1) -> None:
        t = self.track
        self.rows.append((t.sent_at, t.sent_pts, t.queue.current))

    def close(self) -> None:
        pass

    def of(self, playback) -> list[tuple[float, int, object]]:
        return [r for r in self.rows if r[2] is playback]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """``(samples, rate)``; samples shaped ``(n, channels)`` int16."""
    with wave.open(str(path), "rb") as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
        return data.reshape(-1, w.getnchannels()), w.getframerate()


def chirp(seconds: float, f0: float = 300.0, f1: float = 3400.0, amplitude: float = 0.4, seed: int = 3) -> np.ndarray:
    """A distinctive int16 test signal (a log chirp with a syllable envelope and a little
    noise) whose autocorrelation has a single sharp peak."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    k = np.log(f1 / f0) / seconds
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1) / k
    env = 0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)
    rng = np.random.default_rng(seed)
    x = np.sin(phase) * env + rng.normal(0, 0.05, n)
    x = x / np.abs(x).max() * amplitude
    pcm = np.round(x * 32767).astype(np.int16)
    pad = (-pcm.size) % FRAME_SAMPLES
    return np.concatenate([pcm, np.zeros(pad, np.int16)])


def locate(needle: np.ndarray, haystack: np.ndarray) -> tuple[int, float]:
    """Where ``needle`` best matches in ``haystack`` (FFT cross-correlation): the sample
    offset and the normalised correlation there (1.0 = identical shape)."""
    a = needle.astype(np.float64)
    b = haystack.astype(np.float64)
    n = a.size + b.size
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)[: b.size - a.size + 1]
    # normalise by the energy of each haystack window
    energy = np.concatenate(([0.0], np.cumsum(b * b)))
    window = np.sqrt(np.maximum(energy[a.size :] - energy[: -a.size], 1e-9))[: corr.size]
    score = corr / (window * np.sqrt(np.dot(a, a)))
    k = int(np.argmax(score))
    return k, float(score[k])


def sent_segments(rows, t0: float, *, resync_s: float = 0.1, merge_s: float = 0.06) -> list[tuple[float, float]]:
    """Where a sender's frames (``SendLog`` rows) belong on a recording's timeline that
    starts at ``t0``, by the stereo recorder's documented rule: on the sender's
    timestamp timeline, re-anchored on the send time when the two disagree by more than
    ``resync_s``. Runs closer than ``merge_s`` are merged (like ``tone_segments``)."""
    segments: list[list[float]] = []
    anchor = None
    for sent_at, pts, _ in rows:
        if anchor is None or abs(sent_at - (anchor[0] + (pts - anchor[1]) / SAMPLE_RATE)) > resync_s:
            anchor = (sent_at, pts)
        start = anchor[0] + (pts - anchor[1]) / SAMPLE_RATE - t0
        if segments and start - segments[-1][1] < merge_s:
            segments[-1][1] = max(segments[-1][1], start + 0.02)
        else:
            segments.append([start, start + 0.02])
    return [(a, b) for a, b in segments]


def assert_segments_match(got, expected, tol: float = 0.04) -> None:
    assert len(got) == len(expected), (got, expected)
    for (g0, g1), (e0, e1) in zip(got, expected):
        assert abs(g0 - e0) <= tol and abs(g1 - e1) <= tol, (got, expected)


class PtsRecorder:
    """A receive-side sink keeping each decoded frame at its stream position
    (``received.pts``), so frames a jitter buffer dropped leave silence instead of
    shifting everything after them."""

    def __init__(self, peer: MediaPeer) -> None:
        self._peer = peer
        self.frames: list[tuple[int, np.ndarray]] = []

    def write(self, pcm, sample_rate, channels=1) -> None:
        mono = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
        self.frames.append((self._peer.received.pts, mono))

    def close(self) -> None:
        pass

    @property
    def first_pts(self) -> int:
        return self.frames[0][0]

    @property
    def gaps(self) -> list[int]:
        """Stream positions where frames are missing."""
        return [a + FRAME_SAMPLES for (a, _), (b, _) in zip(self.frames, self.frames[1:]) if b - a != FRAME_SAMPLES]

    def timeline(self) -> np.ndarray:
        """Mono samples from the first frame's position on, gaps as silence."""
        first = self.first_pts
        end = max(p for p, _ in self.frames) + FRAME_SAMPLES - first
        out = np.zeros(end, dtype=np.int16)
        for pts, mono in self.frames:
            out[pts - first : pts - first + mono.size] = mono
        return out


# -- an OpusReceiver without sockets ------------------------------------------------------


def tone_packets(freq: float, seconds: float, settings: OpusSettings = OpusSettings()) -> list[bytes]:
    """Opus payloads (20 ms each) of a ``freq`` Hz tone at -10 dBFS."""
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    x = (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    enc = OpusEncoder(settings)
    return [bytes(enc.encode(x[i : i + FRAME_SAMPLES])) for i in range(0, x.size, FRAME_SAMPLES)]


class StubTransport:
    """Just enough of aiortc's RTCDtlsTransport for a receiver to start and stop."""

    state = "connected"
    _stats_id = "transport_test"

    def _register_rtp_receiver(self, receiver, parameters) -> None:
        pass

    def _unregister_rtp_receiver(self, receiver) -> None:
        pass

    async def _send_rtp(self, data: bytes) -> None:
        pass

    def _get_stats(self):
        return {}


async def started_receiver(rx, mime: str = "audio/opus"):
    """A real aiortc ``RTCRtpReceiver`` on a :class:`StubTransport`, taken over by ``rx``
    (a :class:`media.receiver.OpusReceiver`) and started with ``mime`` negotiated."""
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpReceiveParameters
    from aiortc.rtcrtpreceiver import RemoteStreamTrack, RTCRtpReceiver

    receiver = RTCRtpReceiver("audio", StubTransport())
    receiver._track = RemoteStreamTrack(kind="audio")
    rx.install(receiver)
    codec = RTCRtpCodecParameters(mimeType=mime, clockRate=48000 if "opus" in mime else 8000,
                                  channels=2 if "opus" in mime else 1, payloadType=111 if "opus" in mime else 0)
    await receiver.receive(RTCRtpReceiveParameters(codecs=[codec]))
    return receiver
