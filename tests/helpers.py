"""Small waits and ports shared by the tests (no sleeps as synchronisation: bounded polls)."""

import asyncio
import socket

import numpy as np

from media import analysis

TIMEOUT = 20


async def until(predicate, timeout: float = TIMEOUT, interval: float = 0.02) -> None:
    """Wait, at most ``timeout`` seconds, until ``predicate()`` is true."""

    async def poll():
        while not predicate():
            await asyncio.sleep(interval)

    await asyncio.wait_for(poll(), timeout)


async def drain(*peers, frames: int = 8, timeout: float = TIMEOUT) -> None:
    """Wait until each peer has received ``frames`` more frames: whatever was still in
    flight (encoder, network, the receiver's playout buffer) has arrived."""
    targets = [(p, p.received.frames + frames) for p in peers]
    await until(lambda: all(p.received.frames >= target for p, target in targets), timeout)


class Conditions:
    """Wait for conditions over some changing state without polling: the owner calls
    :meth:`changed` whenever the state changes; :meth:`until` returns once ``pred()``
    holds (checked then), or raises TimeoutError after ``timeout``."""

    def __init__(self) -> None:
        self._waiters: list[tuple[object, asyncio.Future]] = []

    def changed(self) -> None:
        for pred, fut in list(self._waiters):
            if not fut.done() and pred():
                fut.set_result(None)
                self._waiters.remove((pred, fut))

    async def until(self, pred, timeout: float = TIMEOUT) -> None:
        if pred():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        await asyncio.wait_for(fut, timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ToneEars:
    """A Sink for the far side's ears: keeps every frame (mono) and counts how many
    seconds carried ``freq_hz``; :meth:`hears` waits until enough did."""

    def __init__(self, freq_hz: float) -> None:
        self.freq_hz = freq_hz
        self.frames: list = []
        self.tone_s = 0.0
        self._waiters: list[tuple[float, asyncio.Future]] = []

    def write(self, pcm, sample_rate, channels=1) -> None:
        import numpy as np

        from media import analysis

        frame = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16) if channels > 1 else pcm.copy()
        self.frames.append(frame)
        self.tone_s += analysis.tone_seconds(frame, sample_rate, self.freq_hz)
        for want, fut in list(self._waiters):
            if self.tone_s >= want and not fut.done():
                fut.set_result(self.tone_s)

    def close(self) -> None:
        pass

    async def hears(self, seconds: float, timeout: float = TIMEOUT) -> float:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((seconds, fut))
        return await asyncio.wait_for(fut, timeout)

    @property
    def audio(self):
        import numpy as np

        return np.concatenate(self.frames) if self.frames else np.zeros(0, np.int16)


def tone_seconds(path, freq: float) -> float:
    """Seconds of ``freq`` in an audio file (see :func:`media.analysis.tone_seconds`)."""
    x, rate = analysis.read_audio(path)
    return analysis.tone_seconds(x, rate, freq)


def segments_frequency(x: np.ndarray, rate: int, freq: float) -> float | None:
    """The measured frequency of the windows of ``x`` where ``freq`` plays (None if absent)."""
    segments = analysis.tone_segments(x, rate, freq)
    if not segments:
        return None
    parts = [x[int(start * rate): int(end * rate)] for start, end in segments]
    return analysis.dominant_frequency(np.concatenate(parts), rate)


def tone_frequency(path, freq: float) -> float | None:
    """:func:`segments_frequency` of an audio file."""
    x, rate = analysis.read_audio(path)
    return segments_frequency(x, rate, freq)


def native_rtp_core():
    """media._rtpcore, the lean path's C core; skipped where it was not built (no C
    compiler), failed under CI (which installs one: the build must not skip it)."""
    import os

    import pytest

    from media import rtpcore

    if rtpcore.core is None:
        if os.environ.get("CI"):
            pytest.fail("media._rtpcore is not built (CI has a C compiler: the build must not skip it)")
        pytest.skip("media._rtpcore is not built here (no C compiler)")
    return rtpcore.core
