"""WavSink: bit-exact recording, channel mixing, counters and lifecycle."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from media.analysis import dominant_frequency, read_audio, tone_seconds
from media.frames import FRAME_SAMPLES, SAMPLE_RATE, Sink
from media.sinks import WavSink
from media.sources import FileSource, ToneSource


def read_wav(path: Path) -> tuple[np.ndarray, int, int]:
    """``(interleaved int16 samples, rate, channels)`` via the stdlib reader."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data.astype(np.int16), w.getframerate(), w.getnchannels()


@pytest.mark.parametrize("channels", [1, 2])
def test_round_trip_is_bit_exact(tmp_path: Path, channels: int) -> None:
    rng = np.random.default_rng(7)
    size = FRAME_SAMPLES * channels
    frames = [rng.integers(-32768, 32768, size, dtype=np.int16) for _ in range(50)]
    frames[0][:4] = [-32768, 32767, 0, -1]  # the extremes survive too
    path = tmp_path / "out.wav"
    sink = WavSink(path, channels=channels)
    assert isinstance(sink, Sink)
    for frame in frames:
        sink.write(frame, SAMPLE_RATE, channels)
    assert sink.frames_written == 50
    assert sink.samples_written == 50 * FRAME_SAMPLES
    assert sink.duration_s == pytest.approx(1.0)
    sink.close()

    data, rate, nch = read_wav(path)
    assert (rate, nch) == (SAMPLE_RATE, channels)
    np.testing.assert_array_equal(data, np.concatenate(frames))
    # And our own reader plays it back unchanged.
    source = FileSource(path, channels=channels)
    played = []
    while (frame := source.read()) is not None:
        played.append(frame)
    np.testing.assert_array_equal(np.concatenate(played), np.concatenate(frames))


def test_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "rec.wav"
    with WavSink(path) as sink:
        sink.write(np.zeros(FRAME_SAMPLES, np.int16), SAMPLE_RATE)
    assert read_wav(path)[0].size == FRAME_SAMPLES


def test_stereo_frames_are_averaged_into_a_mono_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    left = rng.integers(-32768, 32768, FRAME_SAMPLES, dtype=np.int16)
    right = rng.integers(-32768, 32768, FRAME_SAMPLES, dtype=np.int16)
    left[:3], right[:3] = [32767, -32768, 32767], [32767, -32768, -32768]  # no overflow
    stereo = np.stack([left, right], axis=1).reshape(-1)
    path = tmp_path / "mono.wav"
    with WavSink(path) as sink:
        sink.write(stereo, SAMPLE_RATE, channels=2)
        sink.write(stereo, SAMPLE_RATE, channels=2)
        assert sink.samples_written == 2 * FRAME_SAMPLES
    data, _, nch = read_wav(path)
    expected = (left.astype(np.int32) + right) // 2
    assert nch == 1
    np.testing.assert_array_equal(data, np.concatenate([expected, expected]))
    assert list(data[:3]) == [32767, -32768, -1]


def test_mono_frames_are_duplicated_into_a_stereo_file(tmp_path: Path) -> None:
    mono = np.arange(-480, 480, dtype=np.int16) * 30
    path = tmp_path / "st.wav"
    with WavSink(path, channels=2) as sink:
        sink.write(mono, SAMPLE_RATE, channels=1)
        assert sink.samples_written == FRAME_SAMPLES
    data, _, nch = read_wav(path)
    assert nch == 2
    np.testing.assert_array_equal(data[0::2], mono)
    np.testing.assert_array_equal(data[1::2], mono)


def test_other_channel_counts_go_through_mono(tmp_path: Path) -> None:
    three = np.array([300, 600, 900, -30, -60, -91], np.int16)  # 2 samples x 3 channels
    with WavSink(tmp_path / "m.wav") as mono, WavSink(tmp_path / "s.wav", channels=2) as stereo:
        mono.write(three, SAMPLE_RATE, channels=3)
        stereo.write(three, SAMPLE_RATE, channels=3)
    assert list(read_wav(tmp_path / "m.wav")[0]) == [600, -61]  # floor of the mean
    assert list(read_wav(tmp_path / "s.wav")[0]) == [600, 600, -61, -61]


def test_larger_frames_than_20ms_are_mixed_too(tmp_path: Path) -> None:
    stereo = np.tile(np.array([1000, 3000], np.int16), 5000)  # 5000 samples per channel
    path = tmp_path / "big.wav"
    with WavSink(path) as sink:
        sink.write(stereo, SAMPLE_RATE, channels=2)
    data = read_wav(path)[0]
    assert data.size == 5000 and (data == 2000).all()


def test_tone_recorded_and_read_back(tmp_path: Path) -> None:
    source = ToneSource(440, 1.0)
    path = tmp_path / "tone.wav"
    with WavSink(path) as sink:
        while (frame := source.read()) is not None:
            sink.write(frame, source.sample_rate, source.channels)
    x, rate = read_audio(path)
    assert rate == SAMPLE_RATE and x.size == SAMPLE_RATE
    assert dominant_frequency(x, rate) == pytest.approx(440, abs=0.5)
    assert tone_seconds(x, rate, 440) == pytest.approx(1.0)


def test_other_rates(tmp_path: Path) -> None:
    path = tmp_path / "wb.wav"
    with WavSink(path, sample_rate=16_000) as sink:
        sink.write(np.ones(320, np.int16), 16_000)
        with pytest.raises(ValueError, match="16000"):
            sink.write(np.ones(960, np.int16), SAMPLE_RATE)
        assert sink.duration_s == pytest.approx(0.02)
    data, rate, _ = read_wav(path)
    assert rate == 16_000 and data.size == 320


def test_rejects_bad_frames(tmp_path: Path) -> None:
    with WavSink(tmp_path / "x.wav") as sink:
        with pytest.raises(TypeError):
            sink.write(np.zeros(960, np.float32), SAMPLE_RATE)
        with pytest.raises(ValueError):
            sink.write(np.zeros(961, np.int16), SAMPLE_RATE, channels=2)
        assert sink.frames_written == 0
    with pytest.raises(ValueError):
        WavSink(tmp_path / "y.wav", channels=0)


def test_close_is_idempotent_and_later_writes_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.wav"
    sink = WavSink(path)
    sink.write(np.full(FRAME_SAMPLES, 5, np.int16), SAMPLE_RATE)
    sink.close()
    sink.close()
    assert sink.closed
    sink.write(np.full(FRAME_SAMPLES, 9, np.int16), SAMPLE_RATE)
    assert sink.frames_written == 1
    data = read_wav(path)[0]
    assert data.size == FRAME_SAMPLES and (data == 5).all()


def test_empty_recording_is_a_valid_wav(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    WavSink(path, channels=2).close()
    data, rate, nch = read_wav(path)
    assert (data.size, rate, nch) == (0, SAMPLE_RATE, 2)
