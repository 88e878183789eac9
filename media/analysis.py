"""Signal checks on recorded or synthetic audio: levels, pitch and where a tone plays.

Used by the tests, the demo's call summary and (later) live meters. Everything works
on mono sample arrays: float in [-1, 1], or int16, which is scaled by 1/32768.
Per-window measurements reshape the signal into ``(windows, window_len)`` and do one
vectorised pass (one 2-D rFFT for the spectral checks, in bounded blocks so a long
recording does not need gigabytes); a trailing partial window is ignored.

Levels are dBFS relative to a full-scale *square* wave: a full-scale sine reads
-3.01 dBFS. Silence reads :data:`SILENCE_DBFS` rather than minus infinity, so results
stay finite (and JSON-friendly).
"""

from __future__ import annotations

import os

import numpy as np

from .sources.file import decoded_chunks

__all__ = [
    "read_channels",
    "SILENCE_DBFS",
    "active_seconds",
    "dominant_frequency",
    "read_audio",
    "rms_dbfs",
    "tone_seconds",
    "tone_segments",
]

#: What :func:`rms_dbfs` reports for digital silence (and the floor for anything quieter).
SILENCE_DBFS = -120.0
#: Windows per rFFT block in the spectral checks (20 ms windows: 20 s of audio).
_BLOCK_WINDOWS = 1000


def read_audio(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Decode a whole file to mono float32 in [-1, 1]; returns ``(samples, rate)``.

    Any format PyAV decodes; the native sample rate is kept, channels are averaged.

    Raises:
        FileNotFoundError: no such file.
        MediaFileError: PyAV cannot open or decode it, or it has no audio stream.
    """
    planar, rate = read_channels(path)
    mono = planar[0] if planar.shape[0] == 1 else planar.mean(axis=0, dtype=np.float32)
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False), rate


def read_channels(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Decode a whole file to float32, one row per channel (``(channels, samples)``);
    returns ``(planar, rate)``. Raises like :func:`read_audio`."""
    rate, channels, decoded = decoded_chunks(path, "fltp")
    chunks = list(decoded)
    if not chunks:
        return np.zeros((max(1, channels), 0), dtype=np.float32), rate
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate


def rms_dbfs(x: np.ndarray) -> float:
    """RMS level of ``x`` in dBFS (full-scale sine = -3.01); :data:`SILENCE_DBFS` for
    silence or an empty array."""
    x = _as_float(x)
    if x.size == 0:
        return SILENCE_DBFS
    mean_square = float(np.dot(x, x)) / x.size
    return _db(mean_square)


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    """The strongest frequency in ``x``, in Hz (0.0 for silence).

    Hann window and one rFFT over the whole signal, refined between bins by parabolic
    interpolation on the log magnitude (accurate to a small fraction of a bin, i.e. of
    ``rate / len(x)`` Hz). The mean is removed first so DC never wins.
    """
    x = _as_float(x)
    if x.size < 4:
        return 0.0
    x = (x - x.mean()) * np.hanning(x.size)
    mag = np.abs(np.fft.rfft(x))
    k = int(np.argmax(mag[1:])) + 1
    if mag[k] <= 0:
        return 0.0
    offset = 0.0
    if k < mag.size - 1:
        a, b, c = np.log(mag[k - 1 : k + 2] + 1e-30)
        denom = a - 2 * b + c
        if denom < 0:
            offset = float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))
    return (k + offset) * rate / x.size


def active_seconds(
    x: np.ndarray, rate: int, *, threshold_dbfs: float = -40.0, window_ms: float = 20
) -> float:
    """Seconds of ``window_ms`` windows whose RMS level is at least ``threshold_dbfs``."""
    windows, n = _windows(_as_float(x), rate, window_ms)
    if windows.shape[0] == 0:
        return 0.0
    mean_square = np.einsum("ij,ij->i", windows, windows, dtype=np.float64) / n
    active = mean_square >= 10 ** (threshold_dbfs / 10)
    return int(np.count_nonzero(active)) * n / rate


def tone_seconds(
    x: np.ndarray,
    rate: int,
    freq_hz: float,
    *,
    window_ms: float = 20,
    min_ratio: float = 0.5,
    min_dbfs: float = -45.0,
    band_hz: float | None = None,
) -> float:
    """Seconds of windows where a tone at ``freq_hz`` dominates.

    A ``window_ms`` window counts when its RMS level is at least ``min_dbfs`` and at
    least ``min_ratio`` of its (Hann-windowed) spectral energy lies within ``band_hz``
    of ``freq_hz``. The default band is ±1.5 FFT bins (``1500 / window_ms`` Hz: ±75 Hz
    for 20 ms windows), which holds ~98 % or more of a Hann-windowed tone's energy
    wherever it falls between bins, so a pure tone scores ~1.0, white noise scores
    about ``2 * band_hz / (rate / 2)``, and a tone 100 Hz away scores under 0.2.
    """
    mask, n = _tone_mask(x, rate, freq_hz, window_ms, min_ratio, min_dbfs, band_hz)
    return int(np.count_nonzero(mask)) * n / rate


def tone_segments(
    x: np.ndarray,
    rate: int,
    freq_hz: float,
    *,
    window_ms: float = 20,
    min_ratio: float = 0.5,
    min_dbfs: float = -45.0,
    band_hz: float | None = None,
    merge_gap_ms: float = 60,
) -> list[tuple[float, float]]:
    """``(start_s, end_s)`` of each run of tone windows (as in :func:`tone_seconds`).

    Runs separated by a gap shorter than ``merge_gap_ms`` are merged into one segment.
    Boundaries are window edges, so they are accurate to one window.
    """
    mask, n = _tone_mask(x, rate, freq_hz, window_ms, min_ratio, min_dbfs, band_hz)
    if not mask.any():
        return []
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # exclusive window indices
    max_gap = merge_gap_ms * rate / 1000
    segments: list[tuple[int, int]] = [(int(starts[0]), int(ends[0]))]
    for s, e in zip(starts[1:].tolist(), ends[1:].tolist()):
        if (s - segments[-1][1]) * n < max_gap:
            segments[-1] = (segments[-1][0], e)
        else:
            segments.append((s, e))
    return [(s * n / rate, e * n / rate) for s, e in segments]


# -- helpers ---------------------------------------------------------------------------


def _as_float(x: np.ndarray) -> np.ndarray:
    """``x`` as a 1-D float array in [-1, 1] (int16 scaled by 1/32768; floats as is)."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D mono signal, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / np.float32(-np.iinfo(x.dtype).min)
    if x.dtype not in (np.float32, np.float64):
        return x.astype(np.float64)
    return x


def _db(mean_square: float) -> float:
    if mean_square <= 10 ** (SILENCE_DBFS / 10):
        return SILENCE_DBFS
    return float(10 * np.log10(mean_square))


def _windows(x: np.ndarray, rate: int, window_ms: float) -> tuple[np.ndarray, int]:
    """View ``x`` as ``(count, n)`` whole windows of ``window_ms`` (tail dropped)."""
    n = int(round(rate * window_ms / 1000))
    if n < 2:
        raise ValueError(f"window_ms={window_ms} is too short at {rate} Hz")
    count = x.size // n
    return x[: count * n].reshape(count, n), n


def _tone_mask(
    x: np.ndarray,
    rate: int,
    freq_hz: float,
    window_ms: float,
    min_ratio: float,
    min_dbfs: float,
    band_hz: float | None,
) -> tuple[np.ndarray, int]:
    """Boolean per-window "the tone dominates" mask and the window length."""
    windows, n = _windows(_as_float(x), rate, window_ms)
    mask = np.zeros(windows.shape[0], dtype=bool)
    if band_hz is None:
        band_hz = 1.5 * rate / n  # ±1.5 bins: the bulk of the Hann main lobe
    freqs = np.fft.rfftfreq(n, 1 / rate)
    in_band = np.abs(freqs - freq_hz) <= band_hz
    hann = np.hanning(n).astype(windows.dtype)
    min_mean_square = 10 ** (min_dbfs / 10)
    for lo in range(0, windows.shape[0], _BLOCK_WINDOWS):
        block = windows[lo : lo + _BLOCK_WINDOWS]
        power = np.abs(np.fft.rfft(block * hann, axis=1)) ** 2
        total = power.sum(axis=1)
        band = power[:, in_band].sum(axis=1)
        loud = np.einsum("ij,ij->i", block, block, dtype=np.float64) / n >= min_mean_square
        mask[lo : lo + block.shape[0]] = loud & (band >= min_ratio * total) & (total > 0)
    return mask, n
