"""Streaming integer-ratio resamplers for the bridges (48 kHz ⇄ 8/12/16/24 kHz), numpy only.

WhatsApp's audio is 48 kHz; bots speak 8 kHz (Twilio, AudioSocket), 16 or 24 kHz. All of
these divide 48 kHz, so a polyphase FIR does the job exactly:

* every call of :meth:`Decimator.process` with ``n * factor`` samples returns exactly
  ``n`` samples, and :meth:`Interpolator.process` with ``n`` samples returns exactly
  ``n * factor``: no internal buffering, so sample positions (marks, timestamps) stay
  exact and nothing is held back between frames;
* the filter history carries across calls, so 20 ms frames join without clicks;
* one low-pass prototype per factor: Kaiser-windowed sinc, 60 dB stop band, transition
  band ±7.5 % of the low rate around its Nyquist frequency (8 kHz: pass to 3.4 kHz,
  stop from 4.6 kHz; what folds back lands above 3.4 kHz). About 25 taps per phase;
  group delay ≈ 12 low-rate samples' worth (1.5 ms at 8 kHz, 0.5 ms at 24 kHz).

Per 20 ms frame this is one small float32 matrix product (8 kHz: 160 × 150 for the
decimator, 160 × 25 × 6 for the interpolator), a few tens of microseconds.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["Decimator", "Interpolator", "lowpass"]

_STOPBAND_DB = 60.0
_TRANSITION = 0.15  # full transition width as a fraction of the low rate


@functools.lru_cache(maxsize=16)
def lowpass(factor: int) -> np.ndarray:
    """The prototype low-pass at the high rate for ``factor`` (read-only, float64, unit DC
    gain, length a multiple of ``factor``)."""
    if factor < 2:
        raise ValueError(f"factor must be >= 2, got {factor}")
    width = 2 * math.pi * _TRANSITION / factor  # rad/sample at the high rate
    taps = math.ceil((_STOPBAND_DB - 7.95) / (2.285 * width)) + 1
    taps = -(-taps // factor) * factor
    beta = 0.1102 * (_STOPBAND_DB - 8.7)
    n = np.arange(taps) - (taps - 1) / 2
    cutoff = 0.5 / factor  # cycles/sample: the low rate's Nyquist frequency
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, beta)
    h /= h.sum()
    h.flags.writeable = False
    return h


def _to_int16(y: np.ndarray) -> np.ndarray:
    np.rint(y, out=y)
    np.minimum(y, 32767, out=y)
    np.maximum(y, -32768, out=y)
    return y.astype(np.int16)


_scratch = threading.local()


def _rows(shape: tuple[int, ...]) -> np.ndarray:
    """The contiguous copy target for windows of ``shape``: one per shape and thread,
    shared by every resampler (it holds nothing between calls; 96 kB for a 48 → 16 kHz
    decimator's 20 ms frame, which one per call would cost each call)."""
    cache = getattr(_scratch, "rows", None)
    if cache is None:
        cache = _scratch.rows = {}
    rows = cache.get(shape)
    if rows is None:
        rows = cache[shape] = np.empty(shape, dtype=np.float32)
    return rows


class _Work:
    """Buffers for one input length: ``ext`` = history + input; ``windows`` a view of
    it (built once: ``sliding_window_view`` itself costs more than the filtering);
    ``shape`` of the contiguous copy of it that BLAS multiplies (it cannot take the
    overlapping strided view; copy + gemv is several times faster than numpy's
    fallback loop; the copy target is shared, :func:`_rows`); ``out``."""

    __slots__ = ("ext", "windows", "shape", "out")

    def __init__(self, hist: int, n: int, width: int, step: int, start: int, out: tuple[int, ...]):
        self.ext = np.zeros(hist + n, dtype=np.float32)
        self.windows = sliding_window_view(self.ext, width)[start::step]
        self.shape = self.windows.shape
        self.out = np.empty(out, dtype=np.float32)


class Decimator:
    """High rate → low rate by an integer ``factor`` (e.g. 6 for 48 kHz → 8 kHz)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor
        h = lowpass(factor)
        self._taps = h.size
        self._hrev = np.ascontiguousarray(h[::-1], dtype=np.float32)
        self._hist = np.zeros(h.size - 1, dtype=np.float32)
        self._work: _Work | None = None

    def reset(self) -> None:
        self._hist.fill(0)

    def process(self, x: np.ndarray) -> np.ndarray:
        """``x``: int16 samples, a multiple of ``factor`` long → a new int16 array."""
        L = self.factor
        n = x.size
        if n % L:
            raise ValueError(f"input length {n} is not a multiple of {L}")
        w = self._work
        if w is None or w.ext.size != self._hist.size + n:
            # Output m sees the taps ending at input sample m*L + L-1.
            w = self._work = _Work(self._hist.size, n, self._taps, L, L - 1, (n // L,))
        h = self._hist.size
        ext = w.ext
        ext[:h] = self._hist
        ext[h:] = x
        rows = _rows(w.shape)
        np.copyto(rows, w.windows)
        np.dot(rows, self._hrev, out=w.out)
        self._hist[:] = ext[n:]
        return _to_int16(w.out)


class Interpolator:
    """Low rate → high rate by an integer ``factor`` (e.g. 6 for 8 kHz → 48 kHz)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor
        h = lowpass(factor) * factor  # zero-stuffing loses 1/factor of the energy
        per_phase = h.size // factor
        self._per_phase = per_phase
        # phases[j, p] = h[(J-1-j)*L + p]: window column j (oldest → newest) times the
        # tap that applies to it for output phase p.
        self._phases = np.ascontiguousarray(h.reshape(per_phase, factor)[::-1], dtype=np.float32)
        self._hist = np.zeros(per_phase - 1, dtype=np.float32)
        self._work: _Work | None = None
        self._quiet = True

    @property
    def quiet(self) -> bool:
        """True when the filter holds no signal: zero input now gives exact zeros."""
        return self._quiet

    def reset(self) -> None:
        self._hist.fill(0)
        self._quiet = True

    def process(self, x: np.ndarray) -> np.ndarray:
        """``x``: int16 samples → a new int16 array, ``factor`` times as long."""
        n = x.size
        w = self._work
        if w is None or w.ext.size != self._hist.size + n:
            w = self._work = _Work(self._hist.size, n, self._per_phase, 1, 0, (n, self.factor))
        h = self._hist.size
        ext = w.ext
        ext[:h] = self._hist
        ext[h:] = x
        rows = _rows(w.shape)
        np.copyto(rows, w.windows)
        np.matmul(rows, self._phases, out=w.out)
        self._hist[:] = ext[n:]
        self._quiet = not self._hist.any()
        return _to_int16(w.out.reshape(-1))
