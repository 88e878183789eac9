"""Level meter and energy-based speech start/stop detection (sinks).

:class:`LevelMeter` measures each frame (RMS and peak, dBFS: a full-scale sine reads
-3.01 dBFS like :func:`media.analysis.rms_dbfs`) and keeps running totals.

:class:`SpeechDetector` turns levels into :class:`SpeechEvent` s with hysteresis: speech
*starts* once the level stayed at or above ``start_dbfs`` for ``start_ms`` (60 ms), and
*stops* once it stayed below ``stop_dbfs`` for ``stop_ms`` (300 ms). Event times are
audio times (seconds of audio the detector has seen): ``at_s`` is where the speech
began (the first loud frame) or ended (the end of the last loud frame);
``detected_at_s`` is when the decision could be made (``at_s`` + the hold time).
Events go to callbacks and, optionally, an ``asyncio.Queue``.

Per frame the work is one float conversion into a preallocated block and one ``dot``
(the frame's energy); the peak is taken once per 60 ms block.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..frames import FRAME_MS

__all__ = ["Levels", "LevelMeter", "MeteredSource", "SpeechDetector", "SpeechEvent", "dbfs"]

SILENCE_DBFS = -120.0
_max = np.maximum.reduce  # without ndarray.max()'s Python-level wrapper
_min = np.minimum.reduce
_dot = np.dot
_copyto = np.copyto
#: Samples per block of :class:`Levels` (60 ms at 48 kHz, 11.5 kB): the peak is taken
#: per block.
BLOCK_SAMPLES = 2880
_FULL_SCALE_SQ = 32768.0 * 32768.0
_NO_BLOCK = np.empty(0, dtype=np.float32)


def dbfs(mean_square_int16: float) -> float:
    """dBFS of a mean square of int16 samples (floored at -120)."""
    if mean_square_int16 <= 0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 10 * math.log10(mean_square_int16 / _FULL_SCALE_SQ))


class Levels:
    """Running RMS / peak of int16 audio, one frame at a time, without allocating.

    Each frame is converted to float32 once, into a preallocated 60 ms block
    (:data:`BLOCK_SAMPLES`); :meth:`add` measures the frame's energy right there (one
    ``dot``), :meth:`accumulate` (for totals only) leaves it to the block. The peak is
    taken once per block (one ``max`` and one ``min`` over 60 ms instead of per frame).
    Reading :attr:`sum_sq`, :attr:`peak` or the dBFS values takes in the partial block
    first, so they are always exact."""

    __slots__ = ("_block", "_block_samples", "_used", "_counted", "_sum_sq", "_samples", "_peak", "last_ms")

    def __init__(self, block_samples: int = BLOCK_SAMPLES) -> None:
        self._block = _NO_BLOCK  # allocated by the first frame that is read (not for known levels)
        self._block_samples = block_samples
        self._used = 0  # samples in the block
        self._counted = 0  # of which their energy is in _sum_sq already
        self._sum_sq = 0.0
        self._samples = 0
        self._peak = 0
        #: Mean square of the last frame given to :meth:`add` (int16 units).
        self.last_ms = 0.0

    def add(self, pcm: np.ndarray) -> float:
        """Measure one frame; returns its mean square."""
        n = pcm.size
        if not n:
            return 0.0
        used = self._used
        end = used + n
        if end > self._block.size or self._counted != used:
            self._settle(n)
            used, end = 0, n
        f = self._block[used:end]
        _copyto(f, pcm, "unsafe")
        sq = float(_dot(f, f))
        self._counted = self._used = end
        self._sum_sq += sq
        self._samples += n
        self.last_ms = ms = sq / n
        return ms

    def accumulate(self, pcm: np.ndarray, known: tuple[float, int] | None = None) -> None:
        """Take one frame into the totals only (no per-frame value: cheaper);
        ``known``: its ``(sum of squares, peak)``, measured before (a prompt's frame),
        and then the samples are not read at all."""
        n = pcm.size
        if known is not None:
            self.add_known(known, n)
            return
        used = self._used
        end = used + n
        if end > self._block.size:
            self._settle(n)
            used, end = 0, n
        _copyto(self._block[used:end], pcm, "unsafe")
        self._used = end
        self._samples += n

    def add_known(self, known: tuple[float, int], samples: int) -> None:
        """Take ``samples`` samples into the totals by their ``(sum of squares, peak)``
        alone (measured before: a prompt's frames)."""
        sum_sq, peak = known
        self._sum_sq += sum_sq
        self._samples += samples
        if peak > self._peak:
            self._peak = peak

    def _settle(self, room: int = 0) -> None:
        """Fold the block into the totals and empty it (grown to ``room`` samples if smaller)."""
        used = self._used
        if used:
            counted = self._counted
            if counted != used:
                f = self._block[counted:used]
                self._sum_sq += float(_dot(f, f))
            f = self._block[:used]
            hi = float(_max(f))
            lo = -float(_min(f))
            peak = int(hi if hi > lo else lo)
            if peak > self._peak:
                self._peak = peak
            self._used = self._counted = 0
        if room > self._block.size:
            self._block = np.empty(max(room, self._block_samples), dtype=np.float32)

    @property
    def sum_sq(self) -> float:
        """Sum of the squared samples so far (int16 units)."""
        self._settle()
        return self._sum_sq

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def peak(self) -> int:
        """Largest absolute sample so far."""
        self._settle()
        return self._peak

    @property
    def rms_dbfs(self) -> float:
        return round(dbfs(self.sum_sq / self._samples), 2) if self._samples else SILENCE_DBFS

    @property
    def peak_dbfs(self) -> float:
        peak = self.peak
        if peak <= 0:
            return SILENCE_DBFS
        return round(20 * math.log10(peak / 32768.0), 2)

    def as_dict(self) -> dict:
        return {"rms_dbfs": self.rms_dbfs, "peak_dbfs": self.peak_dbfs, "peak": self.peak}


class LevelMeter:
    """A sink measuring each frame: ``level_dbfs`` (last frame's RMS), ``peak_dbfs``
    (last frame's peak), and overall ``levels``. ``on_level(level_dbfs)`` is called per
    frame when given."""

    def __init__(self, on_level: Callable[[float], None] | None = None) -> None:
        self.levels = Levels()
        self.on_level = on_level
        self.level_dbfs = SILENCE_DBFS
        self.frames = 0
        self._closed = False

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        if self._closed:
            return
        self.level_dbfs = dbfs(self.levels.add(pcm))
        self.frames += 1
        if self.on_level is not None:
            self.on_level(self.level_dbfs)

    @property
    def peak_dbfs(self) -> float:
        return self.levels.peak_dbfs

    def close(self) -> None:
        self._closed = True


class MeteredSource:
    """A :class:`~media.frames.Source` that measures what it plays with a :class:`LevelMeter`
    (``meter.level_dbfs`` is the level of the frame last read); everything else is the
    wrapped source's."""

    def __init__(self, source, meter: LevelMeter) -> None:
        self.source = source
        self.meter = meter

    def read(self):
        frame = self.source.read()
        if frame is not None:
            self.meter.write(frame, self.source.sample_rate, self.source.channels)
        return frame

    def __getattr__(self, name: str):
        source = self.__dict__.get("source")  # (not there while unpickling/copying)
        if source is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(source, name)

    def __repr__(self) -> str:
        return f"MeteredSource({self.source!r})"


@dataclass(frozen=True, slots=True)
class SpeechEvent:
    kind: Literal["start", "stop"]
    #: Audio time where speech began / ended (seconds since the detector's first frame).
    at_s: float
    #: Audio time at which the event was decided (``at_s`` plus the hold time).
    detected_at_s: float
    #: Level of the frame that decided it, dBFS.
    level_dbfs: float


class SpeechDetector:
    """Energy-based speech start/stop with hysteresis (a :class:`~media.frames.Sink`).

    Args:
        start_dbfs: a frame at or above this level counts towards a start.
        stop_dbfs: while speaking, a frame below this counts towards a stop
            (default ``start_dbfs - 6``).
        start_ms / stop_ms: how long the level must stay above / below.
        on_event: called with each :class:`SpeechEvent` (on the caller's thread).
        queue: an ``asyncio.Queue`` that also gets each event (dropped when full).

    Any frame rate does (frames are 20 ms; levels are mean squares): a peer whose other
    readers want less than 48 kHz (a bot at 16 kHz) decodes for it at :attr:`pcm_rate`.
    """

    #: The lowest rate it is content with: wideband, where speech has its energy.
    pcm_rate = 16_000

    def __init__(
        self,
        *,
        start_dbfs: float = -40.0,
        stop_dbfs: float | None = None,
        start_ms: float = 60,
        stop_ms: float = 300,
        on_event: Callable[[SpeechEvent], None] | None = None,
        queue: asyncio.Queue | None = None,
    ) -> None:
        self.start_dbfs = start_dbfs
        self.stop_dbfs = start_dbfs - 6 if stop_dbfs is None else stop_dbfs
        if self.stop_dbfs > self.start_dbfs:
            raise ValueError("stop_dbfs must not be above start_dbfs")
        self._start_ms_sq = 10 ** (self.start_dbfs / 10) * _FULL_SCALE_SQ
        self._stop_ms_sq = 10 ** (self.stop_dbfs / 10) * _FULL_SCALE_SQ
        self._start_frames = max(1, math.ceil(start_ms / FRAME_MS))
        self._stop_frames = max(1, math.ceil(stop_ms / FRAME_MS))
        self._callbacks: list[Callable[[SpeechEvent], None]] = [on_event] if on_event else []
        self.queue = queue
        self.levels = Levels()
        self.speaking = False
        self.events: list[SpeechEvent] = []
        self._frame = 0  # frames seen
        self._run = 0  # consecutive frames counting towards a change of state
        self._run_start = 0  # first frame of that run
        self._last_loud = 0  # last frame at/above the stop threshold while speaking
        self._closed = False

    def subscribe(self, callback: Callable[[SpeechEvent], None]) -> None:
        self._callbacks.append(callback)

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        if self._closed:
            return
        ms = self.levels.add(pcm)
        i = self._frame
        self._frame = i + 1
        frame_s = FRAME_MS / 1000
        if not self.speaking:
            if ms >= self._start_ms_sq:
                if self._run == 0:
                    self._run_start = i
                self._run += 1
                if self._run >= self._start_frames:
                    self.speaking = True
                    self._run = 0
                    self._last_loud = i
                    self._emit("start", self._run_start * frame_s, (i + 1) * frame_s, ms)
            else:
                self._run = 0
        else:
            if ms < self._stop_ms_sq:
                self._run += 1
                if self._run >= self._stop_frames:
                    self.speaking = False
                    self._run = 0
                    self._emit("stop", (self._last_loud + 1) * frame_s, (i + 1) * frame_s, ms)
            else:
                self._run = 0
                self._last_loud = i

    def _emit(self, kind: str, at_s: float, detected_at_s: float, ms: float) -> None:
        event = SpeechEvent(kind, round(at_s, 3), round(detected_at_s, 3), round(dbfs(ms), 1))
        self.events.append(event)
        for callback in self._callbacks:
            callback(event)
        if self.queue is not None:
            try:
                self.queue.put_nowait(event)
            except asyncio.QueueFull:
                pass

    def close(self) -> None:
        """Ends an ongoing utterance with a stop event at the last loud frame."""
        if self._closed:
            return
        self._closed = True
        if self.speaking:
            self.speaking = False
            frame_s = FRAME_MS / 1000
            self._emit("stop", (self._last_loud + 1) * frame_s, self._frame * frame_s, self.levels.last_ms)
