"""Signal analysis helpers, checked against synthetic signals with known answers."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import pytest

from media.analysis import (
    SILENCE_DBFS,
    active_seconds,
    dominant_frequency,
    read_audio,
    rms_dbfs,
    tone_seconds,
    tone_segments,
)
from media.errors import MediaFileError

RATE = 48_000
WINDOW_S = 0.02
FIXTURES = Path(__file__).resolve().parent.parent / "gateway" / "assets"


def tone(
    freq: float, seconds: float, amplitude: float = 0.3, rate: int = RATE, phase: float = 0.0
) -> np.ndarray:
    n = np.arange(round(seconds * rate))
    return amplitude * np.sin(2 * np.pi * freq * n / rate + phase)


def noise(seconds: float, dbfs: float, seed: int = 0, rate: int = RATE) -> np.ndarray:
    """White noise whose RMS level is ``dbfs``."""
    return np.random.default_rng(seed).standard_normal(round(seconds * rate)) * 10 ** (dbfs / 20)


def place(total_s: float, *parts: tuple[float, np.ndarray]) -> np.ndarray:
    """Silence of ``total_s`` with each ``(start_s, signal)`` added in."""
    x = np.zeros(round(total_s * RATE))
    for start, signal in parts:
        i = round(start * RATE)
        x[i : i + signal.size] += signal
    return x


# -- rms_dbfs ------------------------------------------------------------------------


def test_rms_dbfs_known_levels() -> None:
    assert rms_dbfs(tone(1000, 1.0, amplitude=1.0)) == pytest.approx(-3.0103, abs=0.005)
    sine_03 = 20 * math.log10(0.3 / math.sqrt(2))  # -13.47
    assert rms_dbfs(tone(1000, 1.0, amplitude=0.3)) == pytest.approx(sine_03, abs=0.005)
    assert rms_dbfs(noise(1.0, -30.0)) == pytest.approx(-30.0, abs=0.1)
    assert rms_dbfs(np.full(100, 0.5)) == pytest.approx(20 * math.log10(0.5))
    # int16 is scaled by 1/32768, so both representations agree.
    pcm = np.rint(tone(440, 0.5) * 32768).astype(np.int16)
    assert rms_dbfs(pcm) == pytest.approx(rms_dbfs(tone(440, 0.5)), abs=0.01)


def test_rms_dbfs_silence_is_finite_floor() -> None:
    assert rms_dbfs(np.zeros(960)) == SILENCE_DBFS
    assert rms_dbfs(np.zeros(0)) == SILENCE_DBFS
    assert rms_dbfs(np.zeros(960, np.int16)) == SILENCE_DBFS
    with pytest.raises(ValueError):
        rms_dbfs(np.zeros((2, 960)))


# -- dominant_frequency --------------------------------------------------------------


@pytest.mark.parametrize("freq", [123.4, 440.0, 1000.0, 3333.3, 7000.7])
def test_dominant_frequency_with_noise(freq: float) -> None:
    x = tone(freq, 1.0, phase=0.7) + noise(1.0, -23.0, seed=int(freq))  # SNR 10 dB
    assert dominant_frequency(x, RATE) == pytest.approx(freq, abs=0.1)


def test_dominant_frequency_short_signal_other_rate_and_dc() -> None:
    # 60 ms at 16 kHz: bins are 16.7 Hz wide, interpolation gets well inside one.
    assert dominant_frequency(tone(700, 0.06, rate=16_000), 16_000) == pytest.approx(700, abs=3)
    # A DC offset does not win.
    assert dominant_frequency(tone(440, 0.5) + 0.4, RATE) == pytest.approx(440, abs=0.5)
    # The louder of two tones wins.
    two_tones = tone(440, 0.5, 0.1) + tone(1500, 0.5, 0.3)
    assert dominant_frequency(two_tones, RATE) == pytest.approx(1500, abs=0.5)


def test_dominant_frequency_of_silence_is_zero() -> None:
    assert dominant_frequency(np.zeros(4800), RATE) == 0.0
    assert dominant_frequency(np.zeros(2), RATE) == 0.0


# -- tone_seconds --------------------------------------------------------------------


def test_tone_seconds_of_tone_in_noise() -> None:
    x = place(3.0, (0.5, tone(1000, 2.0)), (0.0, noise(3.0, -50.0, seed=1)))
    assert tone_seconds(x, RATE, 1000) == pytest.approx(2.0, abs=WINDOW_S)
    assert tone_seconds(x, RATE, 600) == 0.0  # a different tone is not there
    assert tone_seconds(x, RATE, 1100) == 0.0  # 100 Hz off: outside the ±75 Hz band
    assert tone_seconds(x, RATE, 1050) == pytest.approx(2.0, abs=WINDOW_S)  # inside it


def test_tone_seconds_ratio_and_level_floor() -> None:
    # Tone 12.5 dB above broadband noise: ~95 % of each window's energy is the tone.
    clear = tone(1000, 1.0) + noise(1.0, -26.0, seed=2)
    assert tone_seconds(clear, RATE, 1000) == pytest.approx(1.0, abs=WINDOW_S)
    # Noise 3 dB above the tone: the tone is a third of the energy, below min_ratio 0.5.
    buried = tone(1000, 1.0) + noise(1.0, -10.5, seed=3)
    assert tone_seconds(buried, RATE, 1000) == 0.0
    assert tone_seconds(buried, RATE, 1000, min_ratio=0.2) == pytest.approx(1.0, abs=WINDOW_S)
    # A pure tone at -53 dBFS is under the -45 dBFS floor, unless the floor is lowered.
    faint = tone(1000, 1.0, amplitude=0.003)
    assert tone_seconds(faint, RATE, 1000) == 0.0
    assert tone_seconds(faint, RATE, 1000, min_dbfs=-60) == pytest.approx(1.0)


def test_tone_seconds_of_silence_and_noise_is_zero() -> None:
    assert tone_seconds(np.zeros(RATE), RATE, 1000) == 0.0
    assert tone_seconds(noise(2.0, -10.0, seed=4), RATE, 1000) == 0.0
    assert tone_seconds(np.zeros(100), RATE, 1000) == 0.0  # shorter than a window


def test_tone_seconds_window_and_band_options() -> None:
    x = tone(440, 1.0, rate=16_000)
    assert tone_seconds(x, 16_000, 440, window_ms=40) == pytest.approx(1.0)
    assert tone_seconds(x, 16_000, 500, band_hz=70) == pytest.approx(1.0)
    assert tone_seconds(x, 16_000, 500, band_hz=20) == 0.0


def test_tone_seconds_handles_long_signals_in_blocks() -> None:
    # 50 s crosses several internal rFFT blocks; int16 input works the same.
    x = np.rint(place(50.0, (10.0, tone(600, 25.0))) * 32767).astype(np.int16)
    assert tone_seconds(x, RATE, 600) == pytest.approx(25.0, abs=WINDOW_S)
    assert tone_segments(x, RATE, 600) == [pytest.approx((10.0, 35.0), abs=WINDOW_S)]


# -- tone_segments -------------------------------------------------------------------


def test_tone_silence_tone_segments() -> None:
    # Boundaries deliberately off the 20 ms window grid.
    x = place(
        3.0,
        (0.311, tone(1000, 1.237 - 0.311)),
        (1.503, tone(1000, 2.489 - 1.503, phase=1.0)),
        (0.0, noise(3.0, -55.0, seed=5)),
    )
    segments = tone_segments(x, RATE, 1000)
    assert len(segments) == 2
    for (start, end), (want_start, want_end) in zip(segments, [(0.311, 1.237), (1.503, 2.489)]):
        assert start == pytest.approx(want_start, abs=WINDOW_S)
        assert end == pytest.approx(want_end, abs=WINDOW_S)
    assert tone_seconds(x, RATE, 1000) == pytest.approx(sum(e - s for s, e in segments))
    assert tone_segments(x, RATE, 600) == []


def test_short_gaps_are_merged_long_ones_are_not() -> None:
    x = place(2.0, (0.2, tone(1000, 0.5)), (0.74, tone(1000, 0.4)))  # 40 ms gap
    merged = tone_segments(x, RATE, 1000)
    assert len(merged) == 1
    assert merged[0] == pytest.approx((0.2, 1.14), abs=WINDOW_S)

    x = place(2.0, (0.2, tone(1000, 0.5)), (0.8, tone(1000, 0.4)))  # 100 ms gap
    split = tone_segments(x, RATE, 1000)
    assert len(split) == 2
    assert split[0][1] == pytest.approx(0.7, abs=WINDOW_S)
    assert split[1][0] == pytest.approx(0.8, abs=WINDOW_S)
    assert len(tone_segments(x, RATE, 1000, merge_gap_ms=150)) == 1


# -- active_seconds ------------------------------------------------------------------


def test_active_seconds() -> None:
    x = place(3.0, (0.5, noise(1.23, -20.0, seed=6)))
    assert active_seconds(x, RATE) == pytest.approx(1.23, abs=WINDOW_S)
    faint = tone(440, 1.0, amplitude=0.004)  # about -51 dBFS
    assert active_seconds(faint, RATE) == 0.0
    assert active_seconds(faint, RATE, threshold_dbfs=-60) == pytest.approx(1.0)
    assert active_seconds(np.zeros(RATE), RATE) == 0.0
    assert active_seconds(x, RATE, window_ms=100) == pytest.approx(1.23, abs=0.1)


# -- read_audio ----------------------------------------------------------------------


def write_wav(path: Path, pcm: np.ndarray, rate: int, channels: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return path


def test_read_audio_fixture() -> None:
    x, rate = read_audio(FIXTURES / "business.ogg")
    assert rate == RATE and x.dtype == np.float32 and x.ndim == 1
    assert x.size == 3 * RATE
    assert np.abs(x).max() <= 1.0
    assert dominant_frequency(x, rate) == pytest.approx(1000, abs=1)
    assert tone_seconds(x, rate, 1000) == pytest.approx(3.0, abs=WINDOW_S)


def test_read_audio_wav_scaling_rate_and_stereo_mix(tmp_path: Path) -> None:
    pcm = np.array([-32768, -16384, 0, 16384, 32767], np.int16)
    x, rate = read_audio(write_wav(tmp_path / "s.wav", pcm, 16_000, 1))
    assert rate == 16_000
    np.testing.assert_allclose(x, pcm / 32768, atol=1e-6)

    left = np.rint(tone(440, 1.0, 0.5) * 32767).astype(np.int16)
    right = np.rint(tone(880, 1.0, 0.5) * 32767).astype(np.int16)
    interleaved = np.stack([left, right], axis=1).reshape(-1)
    x, rate = read_audio(write_wav(tmp_path / "st.wav", interleaved, RATE, 2))
    assert x.size == RATE
    np.testing.assert_allclose(x, (left / 32768 + right / 32768) / 2, atol=1e-6)


def test_read_audio_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.ogg"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(MediaFileError, match="bad.ogg"):
        read_audio(bad)
