"""Synthetic sources: a sine tone and silence, in 20 ms int16 frames.

The tone is phase-continuous across frames and never drifts: sample *n* is always
``round(amplitude * 32767 * sin(2π · freq · n / rate))`` computed from the integer
sample index, never from an accumulated phase.

For any frequency whose waveform repeats within a bounded number of samples (every
integer frequency does: 440 Hz at 48 kHz repeats every 1200 samples) the whole repeat
cycle, rounded up to whole frames, is computed once, cached and shared by all sources
with the same parameters; :meth:`ToneSource.read` is then a slice, with no arithmetic
and no allocation. Other frequencies are synthesised per frame with preallocated
numpy buffers.

Frames returned by these sources may be read-only views of shared tables: treat them
as immutable (copy before modifying).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np

from ..frames import FRAME_MS, PCM_DTYPE, SAMPLE_RATE

__all__ = ["SilenceSource", "ToneSource"]

#: Largest precomputed tone table, in samples (384 KiB of int16, shared).
_MAX_TABLE_SAMPLES = 4 * SAMPLE_RATE
_FULL_SCALE = 32767


def _frame_len(sample_rate: int) -> int:
    if sample_rate <= 0 or sample_rate * FRAME_MS % 1000:
        raise ValueError(f"sample_rate must be a positive multiple of 50, got {sample_rate}")
    return sample_rate * FRAME_MS // 1000


def _total_samples(duration_s: float | None, sample_rate: int) -> int | None:
    if duration_s is None:
        return None
    if not math.isfinite(duration_s) or duration_s < 0:
        raise ValueError(f"duration_s must be >= 0 or None (endless), got {duration_s}")
    return round(duration_s * sample_rate)


@functools.lru_cache(maxsize=32)
def _tone_table(cycles_num: int, cycles_den: int, scale: float, frame_len: int) -> np.ndarray:
    """One exact repeat cycle of the tone, a whole number of frames long (read-only).

    ``cycles_num / cycles_den`` is the tone's frequency in cycles per sample, reduced;
    the waveform therefore repeats every ``cycles_den`` samples, and the table length
    is ``lcm(cycles_den, frame_len)`` so that frames never straddle its end.
    """
    length = math.lcm(cycles_den, frame_len)
    n = np.arange(length, dtype=np.int64)
    # Integer phase reduction: exact, whatever the table length.
    phase = (n * cycles_num % cycles_den).astype(np.float64) * (2 * np.pi / cycles_den)
    table = np.rint(np.sin(phase) * scale).astype(PCM_DTYPE)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=8)
def _silent_frame(frame_len: int) -> np.ndarray:
    frame = np.zeros(frame_len, dtype=PCM_DTYPE)
    frame.flags.writeable = False
    return frame


class ToneSource:
    """A sine tone as a :class:`~media.frames.Source` (mono).

    Args:
        freq_hz: frequency, ``0 <= freq_hz < sample_rate / 2``.
        duration_s: length in seconds, rendered as exactly
            ``round(duration_s * sample_rate)`` samples (the last frame zero-padded);
            ``None`` plays forever.
        amplitude: peak level as a fraction of full scale, 0..1.
        sample_rate: Hz, a multiple of 50.
    """

    channels = 1

    def __init__(
        self,
        freq_hz: float,
        duration_s: float | None,
        *,
        amplitude: float = 0.3,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        self._frame_len = _frame_len(sample_rate)
        if not (math.isfinite(freq_hz) and 0 <= freq_hz < sample_rate / 2):
            raise ValueError(f"freq_hz must be in [0, {sample_rate / 2}), got {freq_hz}")
        if not (math.isfinite(amplitude) and 0 <= amplitude <= 1):
            raise ValueError(f"amplitude must be in [0, 1], got {amplitude}")
        self.freq_hz = float(freq_hz)
        self.amplitude = float(amplitude)
        self.sample_rate = sample_rate
        self._total = _total_samples(duration_s, sample_rate)
        self._pos = 0  # samples emitted so far
        self._closed = False

        scale = amplitude * _FULL_SCALE
        cycles = Fraction(self.freq_hz) / sample_rate  # exact: floats are binary fractions
        self._table: np.ndarray | None = None
        self._offset = 0  # position in the table, a multiple of the frame length
        if math.lcm(cycles.denominator, self._frame_len) <= _MAX_TABLE_SAMPLES:
            self._table = _tone_table(cycles.numerator, cycles.denominator, scale, self._frame_len)
        else:
            # Per-frame synthesis; preallocated so the steady state allocates only the result.
            self._ramp = np.arange(self._frame_len) * (2 * np.pi * self.freq_hz / sample_rate)
            self._work = np.empty(self._frame_len, dtype=np.float64)
            self._scale = scale

    @property
    def duration_s(self) -> float | None:
        """Exact length in seconds (``None`` for an endless tone)."""
        return None if self._total is None else self._total / self.sample_rate

    def read(self) -> np.ndarray | None:
        """The next 20 ms frame (treat as read-only), or ``None`` once the tone is over."""
        if self._closed:
            return None
        n = self._frame_len
        remaining = n if self._total is None else self._total - self._pos
        if remaining <= 0:
            return None
        frame = self._next_frame()
        self._pos += n
        if remaining < n:
            padded = np.zeros(n, dtype=PCM_DTYPE)
            padded[:remaining] = frame[:remaining]
            return padded
        return frame

    def close(self) -> None:
        """End the tone. Idempotent."""
        self._closed = True

    def _next_frame(self) -> np.ndarray:
        n = self._frame_len
        if self._table is not None:
            frame = self._table[self._offset : self._offset + n]
            self._offset = (self._offset + n) % self._table.size
            return frame
        # Phase at the frame start from the integer sample index: no accumulated error.
        start_phase = 2 * np.pi * ((self.freq_hz * self._pos / self.sample_rate) % 1.0)
        work = self._work
        np.add(self._ramp, start_phase, out=work)
        np.sin(work, out=work)
        np.multiply(work, self._scale, out=work)
        np.rint(work, out=work)
        return work.astype(PCM_DTYPE)

    def __repr__(self) -> str:
        return (
            f"ToneSource({self.freq_hz:g}, {self.duration_s}, amplitude={self.amplitude:g}, "
            f"sample_rate={self.sample_rate})"
        )


class SilenceSource:
    """Digital silence as a :class:`~media.frames.Source` (mono).

    ``duration_s`` becomes ``round(duration_s * sample_rate)`` samples, delivered as
    whole frames (the last one is padded, with more silence); ``None`` is endless.
    Every frame is the same shared read-only zero array.
    """

    channels = 1

    def __init__(self, duration_s: float | None, sample_rate: int = SAMPLE_RATE) -> None:
        self._frame = _silent_frame(_frame_len(sample_rate))
        self.sample_rate = sample_rate
        self._total = _total_samples(duration_s, sample_rate)
        self._pos = 0
        self._closed = False

    @property
    def duration_s(self) -> float | None:
        """Exact length in seconds (``None`` when endless)."""
        return None if self._total is None else self._total / self.sample_rate

    def read(self) -> np.ndarray | None:
        """The next 20 ms of silence (read-only), or ``None`` at the end."""
        if self._closed or (self._total is not None and self._pos >= self._total):
            return None
        self._pos += self._frame.size
        return self._frame

    def close(self) -> None:
        """End the silence. Idempotent."""
        self._closed = True

    def __repr__(self) -> str:
        return f"SilenceSource({self.duration_s}, sample_rate={self.sample_rate})"
