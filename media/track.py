"""The business's outgoing audio: a paced track that never goes quiet.

WhatsApp hangs up on a business side that sends no media (20 s at call start, 30 s
mid-call), so from the moment media is up this track yields a 20 ms frame every 20 ms:
the current playback's audio, or silence when nothing plays.

Pacing uses a drift-free clock: frame *n* is due at ``start + n * 20 ms`` on the event
loop's monotonic clock, so small scheduling delays never accumulate. Lateness and
underruns (the loop was too busy to keep up) are counted in :class:`PacingStats`.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
from dataclasses import dataclass

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .frames import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, Source, silence

FRAME_S = FRAME_MS / 1000
_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
#: Behind schedule by more than this many frames: resynchronise instead of bursting.
MAX_CATCH_UP_FRAMES = 5


@dataclass(slots=True)
class PacingStats:
    frames: int = 0
    silent_frames: int = 0
    late_frames: int = 0
    resyncs: int = 0
    max_late_ms: float = 0.0

    def as_dict(self) -> dict:
        return {
            "frames": self.frames,
            "silent_frames": self.silent_frames,
            "late_frames": self.late_frames,
            "resyncs": self.resyncs,
            "max_late_ms": round(self.max_late_ms, 2),
        }


class Playback:
    """One queued source. ``done`` resolves (to the seconds played) when it ends."""

    def __init__(self, source: Source):
        if source.sample_rate != SAMPLE_RATE:
            raise ValueError(f"sources must be {SAMPLE_RATE} Hz here, got {source.sample_rate}")
        self.source = source
        self.frames = 0
        self.started_at: float | None = None
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    @property
    def seconds(self) -> float:
        return self.frames * FRAME_S

    def _finish(self) -> None:
        self.source.close()
        if not self.done.done():
            self.done.set_result(self.seconds)


class OutboundAudioTrack(MediaStreamTrack):
    """An aiortc audio track fed by a queue of :class:`~media.frames.Source` objects."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: collections.deque[Playback] = collections.deque()
        self._start: float | None = None
        self._index = 0
        self.stats = PacingStats()
        self._silence = silence()
        self._mono = np.empty(FRAME_SAMPLES, dtype=np.int16)

    # -- playback control -------------------------------------------------------------

    def play(self, source: Source) -> Playback:
        """Queue ``source`` after whatever is playing; returns its :class:`Playback`."""
        playback = Playback(source)
        self._queue.append(playback)
        return playback

    def clear(self) -> None:
        """Stop the current playback and drop everything queued (barge-in)."""
        while self._queue:
            self._queue.popleft()._finish()

    @property
    def playing(self) -> bool:
        return bool(self._queue)

    @property
    def started(self) -> bool:
        """True once the first frame went out (media is flowing)."""
        return self._start is not None

    # -- aiortc side ------------------------------------------------------------------

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._wait_for_slot()
        pcm = self._next_pcm()
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._index * FRAME_SAMPLES
        frame.time_base = _TIME_BASE
        self._index += 1
        self.stats.frames += 1
        return frame

    def stop(self) -> None:
        self.clear()
        super().stop()

    async def _wait_for_slot(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._start is None:
            self._start = now
            return
        due = self._start + self._index * FRAME_S
        delay = due - now
        if delay > 0:
            await asyncio.sleep(delay)
            return
        late_ms = -delay * 1000
        if late_ms > 1.0:
            self.stats.late_frames += 1
            self.stats.max_late_ms = max(self.stats.max_late_ms, late_ms)
        if late_ms > MAX_CATCH_UP_FRAMES * FRAME_MS:
            # The loop stalled: start a new schedule rather than sending a burst.
            self.stats.resyncs += 1
            self._start = now - self._index * FRAME_S

    def _next_pcm(self) -> np.ndarray:
        while self._queue:
            playback = self._queue[0]
            pcm = playback.source.read()
            if pcm is None:
                self._queue.popleft()._finish()
                continue
            if playback.started_at is None:
                playback.started_at = asyncio.get_running_loop().time()
            playback.frames += 1
            if playback.source.channels == 2:
                # Downmix interleaved stereo into a reused buffer.
                np.right_shift(pcm[0::2], 1, out=self._mono)
                self._mono += pcm[1::2] >> 1
                return self._mono
            return pcm
        self.stats.silent_frames += 1
        return self._silence
