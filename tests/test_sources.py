"""FileSource, ToneSource and SilenceSource: frame shapes, and the signal they carry."""

from __future__ import annotations

import fractions
import math
import pickle
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from media.analysis import dominant_frequency, rms_dbfs, tone_seconds
from media.errors import MediaFileError
from media.frames import FRAME_SAMPLES, SAMPLE_RATE, Source
from media.sources import FileSource, SilenceSource, ToneSource

FIXTURES = Path(__file__).resolve().parent.parent / "gateway" / "assets"
FRAME_S = 0.02
ONE_FRAME = FRAME_S + 1e-9  # "within one frame", robust to float rounding


# -- helpers ---------------------------------------------------------------------------


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    n = np.arange(round(seconds * rate))
    return amplitude * np.sin(2 * np.pi * freq * n / rate)


def has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except Exception:
        return False
    return True


def encode(path: Path, x: np.ndarray, rate: int, codec: str) -> Path:
    """Encode float samples ``x`` (``(n,)`` mono or ``(n, 2)`` stereo) with PyAV."""
    x = x.reshape(len(x), -1)
    layout = {1: "mono", 2: "stereo"}[x.shape[1]]
    pcm = np.rint(np.clip(x, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        formats = [f.name for f in stream.codec_context.codec.audio_formats or []]
        stream.format = "s16" if not formats or "s16" in formats else formats[0]
        resampler = av.AudioResampler(format=stream.format, layout=layout, rate=rate)
        for start in range(0, len(pcm), 1024):
            block = pcm[start : start + 1024]
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = fractions.Fraction(1, rate)
            for f in resampler.resample(frame):
                container.mux(stream.encode(f))
        for f in resampler.resample(None):
            container.mux(stream.encode(f))
        container.mux(stream.encode(None))
    return path


def write_wav(path: Path, pcm: np.ndarray, rate: int, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return path


def drain(source: Source, limit: int = 100_000) -> list[np.ndarray]:
    """All frames of ``source``, checking each one's type and exact size."""
    size = source.sample_rate // 50 * source.channels
    frames = []
    while (frame := source.read()) is not None:
        assert frame.dtype == np.int16 and frame.shape == (size,)
        frames.append(frame)
        assert len(frames) < limit, "source does not end"
    return frames


def pcm_of(source: Source) -> np.ndarray:
    return np.concatenate(drain(source))


def to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float64) / 32768


# -- FileSource: formats ---------------------------------------------------------------

FORMATS = [
    ("wav", "pcm_s16le"),
    ("mp3", "libmp3lame"),
    ("flac", "flac"),
    ("ogg", "libopus"),
    ("m4a", "aac"),
]


@pytest.mark.parametrize(("ext", "codec"), FORMATS, ids=[f[0] for f in FORMATS])
def test_file_formats_play_the_right_tone_for_the_right_time(
    tmp_path: Path, ext: str, codec: str
) -> None:
    if not has_encoder(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder to make a .{ext} file")
    path = encode(tmp_path / f"tone.{ext}", sine(440, 1.0, SAMPLE_RATE), SAMPLE_RATE, codec)

    source = FileSource(path)
    assert isinstance(source, Source)
    assert (source.sample_rate, source.channels) == (SAMPLE_RATE, 1)
    assert source.duration_s == pytest.approx(1.0, abs=FRAME_S)
    frames = drain(source)
    x = to_float(np.concatenate(frames))

    assert abs(len(frames) * FRAME_S - 1.0) <= ONE_FRAME
    assert dominant_frequency(x, SAMPLE_RATE) == pytest.approx(440, abs=2)
    assert rms_dbfs(x) == pytest.approx(20 * math.log10(0.3 / math.sqrt(2)), abs=1.0)
    assert tone_seconds(x, SAMPLE_RATE, 440) == pytest.approx(1.0, abs=2 * FRAME_S)
    assert source.read() is None
    source.close()


def test_wav_plays_bit_exact_and_pads_the_last_frame(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pcm = rng.integers(-32768, 32768, size=48_000 + 500, dtype=np.int16)  # 50 frames + 500
    source = FileSource(write_wav(tmp_path / "noise.wav", pcm, SAMPLE_RATE))
    frames = drain(source)
    assert len(frames) == 51
    out = np.concatenate(frames)
    np.testing.assert_array_equal(out[: pcm.size], pcm)
    assert not out[pcm.size :].any()  # zero padding
    assert source.read() is None


def test_stereo_wav_plays_bit_exact_as_stereo(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    pcm = rng.integers(-32768, 32768, size=2 * 9600, dtype=np.int16)  # interleaved, 0.2 s
    source = FileSource(write_wav(tmp_path / "st.wav", pcm, SAMPLE_RATE, channels=2), channels=2)
    out = pcm_of(source)
    assert out.size == 2 * 9600 and out.size % (2 * FRAME_SAMPLES) == 0
    np.testing.assert_array_equal(out, pcm)


# -- FileSource: resampling and channel mixing -----------------------------------------


def test_16khz_file_is_resampled_to_48khz(tmp_path: Path) -> None:
    pcm = np.rint(sine(1000, 1.5, 16_000) * 32767).astype(np.int16)
    source = FileSource(write_wav(tmp_path / "wb.wav", pcm, 16_000))
    assert source.duration_s == pytest.approx(1.5)
    x = to_float(pcm_of(source))
    assert abs(x.size / SAMPLE_RATE - 1.5) <= FRAME_S
    assert dominant_frequency(x, SAMPLE_RATE) == pytest.approx(1000, abs=2)
    assert rms_dbfs(x[4800:-4800]) == pytest.approx(rms_dbfs(to_float(pcm)), abs=0.3)
    assert tone_seconds(x, SAMPLE_RATE, 1000) == pytest.approx(1.5, abs=2 * FRAME_S)


@pytest.fixture
def stereo_44k(tmp_path: Path) -> Path:
    """1.2 s at 44.1 kHz: 440 Hz on the left, 880 Hz on the right."""
    x = np.stack([sine(440, 1.2, 44_100), sine(880, 1.2, 44_100)], axis=1)
    codec = "flac" if has_encoder("flac") else "pcm_s16le"
    return encode(tmp_path / f"st44.{'flac' if codec == 'flac' else 'wav'}", x, 44_100, codec)


def test_44k_stereo_is_resampled_keeping_each_channel(stereo_44k: Path) -> None:
    source = FileSource(stereo_44k, channels=2)
    out = pcm_of(source)
    left, right = to_float(out[0::2]), to_float(out[1::2])
    assert abs(left.size / SAMPLE_RATE - 1.2) <= FRAME_S
    assert dominant_frequency(left, SAMPLE_RATE) == pytest.approx(440, abs=2)
    assert dominant_frequency(right, SAMPLE_RATE) == pytest.approx(880, abs=2)
    assert tone_seconds(left, SAMPLE_RATE, 440) == pytest.approx(1.2, abs=2 * FRAME_S)
    assert tone_seconds(right, SAMPLE_RATE, 880) == pytest.approx(1.2, abs=2 * FRAME_S)


def test_44k_stereo_is_downmixed_to_48k_mono(stereo_44k: Path) -> None:
    x = to_float(pcm_of(FileSource(stereo_44k)))
    assert abs(x.size / SAMPLE_RATE - 1.2) <= FRAME_S
    # Both tones survive the mix, with equal weight.
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    freqs = np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE)
    peak = lambda f: spectrum[np.abs(freqs - f) < 5].max()  # noqa: E731
    assert peak(440) == pytest.approx(peak(880), rel=0.05)
    assert tone_seconds(x, SAMPLE_RATE, 440, min_ratio=0.3) == pytest.approx(1.2, abs=2 * FRAME_S)


def test_mono_file_upmixed_to_stereo_and_other_output_rate(tmp_path: Path) -> None:
    pcm = np.rint(sine(500, 0.5, SAMPLE_RATE) * 32767).astype(np.int16)
    path = write_wav(tmp_path / "m.wav", pcm, SAMPLE_RATE)
    out = pcm_of(FileSource(path, channels=2))
    np.testing.assert_array_equal(out[0::2], out[1::2])
    np.testing.assert_array_equal(out[0::2][: pcm.size], pcm)

    source = FileSource(path, sample_rate=16_000)
    frames = drain(source)  # 320-sample frames
    x = to_float(np.concatenate(frames))
    assert len(frames) == 25
    assert dominant_frequency(x, 16_000) == pytest.approx(500, abs=2)


# -- FileSource: looping, laziness, lifecycle ------------------------------------------


def test_loop_is_seamless_and_repeats_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pcm = rng.integers(-20000, 20000, size=10_000, dtype=np.int16)  # not a frame multiple
    source = FileSource(write_wav(tmp_path / "l.wav", pcm, SAMPLE_RATE), loop=True)
    out = np.concatenate([source.read() for _ in range(40)])  # 38400 samples: 3.84 passes
    np.testing.assert_array_equal(out, np.resize(pcm, out.size))
    source.close()
    assert source.read() is None


def test_loop_of_a_lossy_file_repeats_the_same_audio() -> None:
    once = pcm_of(FileSource(FIXTURES / "business.ogg"))
    assert once.size == 150 * FRAME_SAMPLES  # 3.0 s exactly: no padding
    source = FileSource(FIXTURES / "business.ogg", loop=True)
    twice = np.concatenate([source.read() for _ in range(300)])
    np.testing.assert_array_equal(twice, np.concatenate([once, once]))


def test_decoding_is_lazy(tmp_path: Path) -> None:
    path = encode(tmp_path / "long.flac", sine(300, 30.0, SAMPLE_RATE), SAMPLE_RATE, "flac")
    source = FileSource(path)
    for _ in range(10):
        source.read()
    # Only what ten frames needed (plus one decoded chunk) has been decoded.
    assert source._pass_samples < SAMPLE_RATE // 2
    assert source.duration_s == pytest.approx(30.0)


def test_close_is_idempotent_and_ends_reading(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "c.wav", np.ones(4800, np.int16), SAMPLE_RATE)
    with FileSource(path) as source:
        assert source.read() is not None
    assert source.read() is None
    source.close()
    source.close()


def test_invalid_arguments(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "a.wav", np.zeros(960, np.int16), SAMPLE_RATE)
    with pytest.raises(ValueError):
        FileSource(path, sample_rate=11_025)
    with pytest.raises(ValueError):
        FileSource(path, channels=3)


# -- FileSource: errors ----------------------------------------------------------------


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileSource(tmp_path / "nope.ogg")


@pytest.mark.parametrize(
    "content", [b"", b"this is not audio at all\n" * 40], ids=["empty", "text"]
)
def test_unreadable_file_is_media_file_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.mp3"
    path.write_bytes(content)
    with pytest.raises(MediaFileError) as info:
        FileSource(path)
    assert isinstance(info.value, ValueError)
    assert "bad.mp3" in str(info.value) and info.value.reason
    assert info.value.path == str(path)


def test_file_without_audio_is_media_file_error(tmp_path: Path) -> None:
    path = tmp_path / "video.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(MediaFileError, match="no audio stream") as info:
        FileSource(path)
    assert "video.mkv" in str(info.value)


def test_directory_is_media_file_error(tmp_path: Path) -> None:
    with pytest.raises(MediaFileError, match="not a regular file"):
        FileSource(tmp_path)


def test_media_file_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(MediaFileError("x.ogg", "no audio stream")))
    assert (err.path, err.reason) == ("x.ogg", "no audio stream")
    assert str(err) == "cannot use media file 'x.ogg': no audio stream"


# -- fixtures --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "freq"), [("business.ogg", 1000), ("user.ogg", 600)])
def test_fixture_files(name: str, freq: float) -> None:
    path = FIXTURES / name
    assert path.stat().st_size < 32_000
    source = FileSource(path)
    assert source.duration_s == pytest.approx(3.0, abs=FRAME_S)
    x = to_float(pcm_of(source))
    assert abs(x.size / SAMPLE_RATE - 3.0) <= FRAME_S
    assert dominant_frequency(x, SAMPLE_RATE) == pytest.approx(freq, abs=2)
    assert tone_seconds(x, SAMPLE_RATE, freq) == pytest.approx(3.0, abs=2 * FRAME_S)
    assert rms_dbfs(x) == pytest.approx(20 * math.log10(0.3 / math.sqrt(2)), abs=0.5)


# -- ToneSource ------------------------------------------------------------------------


def reference_tone(
    freq: float, start: int, count: int, amplitude: float = 0.3, rate: int = SAMPLE_RATE
) -> np.ndarray:
    n = np.arange(start, start + count, dtype=np.float64)
    return np.rint(amplitude * 32767 * np.sin(2 * np.pi * freq * n / rate))


@pytest.mark.parametrize("freq", [440.0, 1000.0, 440.123, 997.3])
def test_tone_is_phase_continuous_across_frames(freq: float) -> None:
    source = ToneSource(freq, 2.0)
    assert isinstance(source, Source)
    out = pcm_of(source).astype(np.float64)
    assert out.size == 2 * SAMPLE_RATE
    # Identical (to 1 LSB of rounding) to the tone computed in one go: no phase jumps.
    assert np.abs(out - reference_tone(freq, 0, out.size)).max() <= 1
    # Sample-to-sample steps never exceed the sine's maximum slope.
    max_step = 0.3 * 32767 * 2 * np.pi * freq / SAMPLE_RATE + 2
    assert np.abs(np.diff(out)).max() <= max_step
    # No spurious energy: beyond 20 Hz from the tone there is only int16 rounding
    # noise (~-88 dB); one phase jump per frame would put energy far above -80 dB.
    power = np.abs(np.fft.rfft(out * np.blackman(out.size))) ** 2
    freqs = np.fft.rfftfreq(out.size, 1 / SAMPLE_RATE)
    spurious = power[np.abs(freqs - freq) > 20].sum() / power.sum()
    assert spurious < 1e-8
    assert dominant_frequency(to_float(out), SAMPLE_RATE) == pytest.approx(freq, abs=0.05)


@pytest.mark.parametrize("freq", [440.0, 440.123])
def test_endless_tone_does_not_drift(freq: float) -> None:
    source = ToneSource(freq, None, amplitude=0.5)
    assert source.duration_s is None
    skip = 30_000  # ten minutes of frames
    for _ in range(skip):
        assert source.read() is not None
    frame = source.read().astype(np.float64)
    assert np.abs(frame - reference_tone(freq, skip * FRAME_SAMPLES, FRAME_SAMPLES, 0.5)).max() <= 1


def test_tone_has_exact_length_and_zero_padded_end() -> None:
    source = ToneSource(1000, 0.995)  # 47760 samples: 49 frames + 720
    assert source.duration_s == pytest.approx(0.995)
    frames = drain(source)
    assert len(frames) == 50
    np.testing.assert_array_equal(frames[-1][:720], reference_tone(1000, 49 * 960, 720))
    assert not frames[-1][720:].any()
    assert source.read() is None


def test_tone_amplitude_rate_and_validation() -> None:
    out = pcm_of(ToneSource(1000, 0.1, amplitude=1.0))
    assert out.max() == 32767 and out.min() == -32767
    frames = drain(ToneSource(400, 0.1, sample_rate=16_000))
    assert len(frames) == 5 and frames[0].size == 320
    assert dominant_frequency(to_float(np.concatenate(frames)), 16_000) == pytest.approx(400, abs=1)
    for bad in [dict(freq_hz=24_000), dict(freq_hz=-1), dict(amplitude=1.5), dict(duration_s=-1)]:
        kwargs = dict(freq_hz=440, duration_s=1.0) | bad
        with pytest.raises(ValueError):
            ToneSource(kwargs.pop("freq_hz"), kwargs.pop("duration_s"), **kwargs)


def test_tone_close() -> None:
    source = ToneSource(440, None)
    assert source.read() is not None
    source.close()
    source.close()
    assert source.read() is None


# -- SilenceSource ---------------------------------------------------------------------


def test_silence() -> None:
    source = SilenceSource(0.05)
    assert isinstance(source, Source)
    frames = drain(source)
    assert len(frames) == 3 and not np.concatenate(frames).any()
    assert source.read() is None
    endless = SilenceSource(None, sample_rate=16_000)
    assert all(endless.read().shape == (320,) for _ in range(1000))
    endless.close()
    assert endless.read() is None
