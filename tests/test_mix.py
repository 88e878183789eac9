"""media.mix: play queue with barge-in, mixer, tee, resampler stages (signal checks)."""

from __future__ import annotations

import numpy as np
import pytest

from media import analysis
from media.frames import FRAME_SAMPLES, SAMPLE_RATE
from media.mix import Mixer, PlayQueue, ResampledSink, ResampledSource, Tee
from media.sources.tone import SilenceSource, ToneSource


class Collect:
    def __init__(self):
        self.frames: list[tuple[np.ndarray, int, int]] = []
        self.closed = False

    def write(self, pcm, sample_rate, channels=1):
        self.frames.append((pcm.copy(), sample_rate, channels))

    def close(self):
        self.closed = True

    def signal(self) -> np.ndarray:
        return np.concatenate([f[0] for f in self.frames])


def drain(source, limit=10_000) -> np.ndarray:
    frames = []
    for _ in range(limit):
        frame = source.read()
        if frame is None:
            break
        frames.append(frame.copy())
    return np.concatenate(frames) if frames else np.zeros(0, np.int16)


class StereoTone:
    """Interleaved stereo: left and right tones at different frequencies."""

    channels = 2
    sample_rate = SAMPLE_RATE

    def __init__(self, left, right, seconds):
        self.l, self.r = ToneSource(left, seconds), ToneSource(right, seconds)

    def read(self):
        a, b = self.l.read(), self.r.read()
        if a is None:
            return None
        out = np.empty(2 * a.size, np.int16)
        out[0::2], out[1::2] = a, b
        return out

    def close(self):
        pass


# -- PlayQueue ----------------------------------------------------------------------------


async def test_queue_plays_in_order_and_resolves_each_playback():
    q = PlayQueue()
    first = q.play(ToneSource(500, 0.1))
    second = q.play(ToneSource(900, 0.1))
    out = drain(q)
    assert out.size == 10 * FRAME_SAMPLES
    assert analysis.tone_segments(out, SAMPLE_RATE, 500) == [(0.0, 0.1)]
    assert analysis.tone_segments(out, SAMPLE_RATE, 900) == [(0.1, 0.2)]
    assert first.done.result() == pytest.approx(0.1) and second.done.result() == pytest.approx(0.1)
    assert q.read() is None and not q  # empty, and still usable
    third = q.play(ToneSource(700, 0.04))
    assert analysis.dominant_frequency(drain(q), SAMPLE_RATE) == pytest.approx(700, abs=5)
    assert third.done.done()


async def test_clear_takes_effect_on_the_next_frame():
    q = PlayQueue()
    current = q.play(ToneSource(500, None))
    queued = q.play(ToneSource(900, 1.0))
    for _ in range(7):
        assert q.read() is not None
    q.clear()
    assert q.read() is None  # the very next frame: nothing plays
    assert current.done.result() == pytest.approx(7 * 0.02)
    assert queued.done.result() == 0.0


async def test_stereo_sources_are_downmixed():
    q = PlayQueue()
    q.play(StereoTone(500, 1500, 0.2))
    out = drain(q)
    assert out.size == 10 * FRAME_SAMPLES
    spectrum = np.abs(np.fft.rfft(out))
    freqs = np.fft.rfftfreq(out.size, 1 / SAMPLE_RATE)
    peaks = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert peaks == pytest.approx([500, 1500], abs=6)


# -- Mixer --------------------------------------------------------------------------------


def test_mixer_sums_sources_and_ends_with_the_longest():
    mixer = Mixer(ToneSource(440, 0.4, amplitude=0.3), ToneSource(1200, 0.2, amplitude=0.3))
    out = drain(mixer)
    assert out.size == 20 * FRAME_SAMPLES
    both, tail = out[: 10 * FRAME_SAMPLES], out[10 * FRAME_SAMPLES :]
    assert analysis.tone_seconds(both, SAMPLE_RATE, 440, min_ratio=0.4) == pytest.approx(0.2)
    assert analysis.tone_seconds(both, SAMPLE_RATE, 1200, min_ratio=0.4) == pytest.approx(0.2)
    assert analysis.tone_seconds(tail, SAMPLE_RATE, 440) == pytest.approx(0.2)
    assert analysis.tone_seconds(tail, SAMPLE_RATE, 1200) == 0
    # Exactly the sum where nothing clips.
    a, b = drain(ToneSource(440, 0.2, amplitude=0.3)), drain(ToneSource(1200, 0.2, amplitude=0.3))
    np.testing.assert_array_equal(both, a.astype(np.int32) + b)


def test_mixer_saturates_instead_of_wrapping():
    loud = Mixer(ToneSource(500, 0.1, amplitude=1.0), ToneSource(500, 0.1, amplitude=1.0))
    out = drain(loud)
    single = drain(ToneSource(500, 0.1, amplitude=1.0))
    # Same sign as the input everywhere (no wrap-around), and clipped at full scale.
    assert np.all(np.sign(out) == np.sign(single))
    assert out.max() == 32767 and out.min() == -32768
    np.testing.assert_array_equal(out, np.clip(2 * single.astype(np.int32), -32768, 32767))


def test_mixer_gain_keep_and_endless():
    q = PlayQueue()  # empty: contributes nothing, but stays
    mixer = Mixer(endless=True)
    mixer.add(ToneSource(1000, 0.1, amplitude=0.5), gain=0.5)
    mixer.add(q, keep=True)
    out = drain(mixer, limit=8)
    assert out.size == 8 * FRAME_SAMPLES  # endless: silence after the tone
    assert np.abs(out[: 5 * FRAME_SAMPLES]).max() == pytest.approx(0.25 * 32767, rel=0.01)
    assert not out[5 * FRAME_SAMPLES :].any()
    assert mixer.inputs == [q]  # the ended tone was dropped, the kept queue stays


# -- Tee ----------------------------------------------------------------------------------


def test_tee_feeds_every_sink_the_same_frames():
    a, b = Collect(), Collect()
    tee = Tee(a, b)
    src = ToneSource(800, 0.1)
    while (f := src.read()) is not None:
        tee.write(f, SAMPLE_RATE, 1)
    tee.close()
    assert a.closed and b.closed
    np.testing.assert_array_equal(a.signal(), b.signal())
    assert analysis.dominant_frequency(a.signal(), SAMPLE_RATE) == pytest.approx(800, abs=2)


# -- resampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100])
def test_sources_at_other_rates_play_at_48k(rate):
    source = ResampledSource(ToneSource(1000, 0.5, sample_rate=rate))
    frames = []
    while (f := source.read()) is not None:
        assert f.size == FRAME_SAMPLES
        frames.append(f.copy())
    out = np.concatenate(frames)
    assert out.size / SAMPLE_RATE == pytest.approx(0.5, abs=0.021)
    assert analysis.dominant_frequency(out, SAMPLE_RATE) == pytest.approx(1000, abs=3)
    assert analysis.tone_seconds(out, SAMPLE_RATE, 1000) == pytest.approx(0.5, abs=0.041)


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100])
def test_sinks_at_other_rates_get_20ms_frames(rate):
    collect = Collect()
    sink = ResampledSink(collect, sample_rate=rate)
    src = ToneSource(1000, 0.5)
    while (f := src.read()) is not None:
        sink.write(f, SAMPLE_RATE, 1)
    sink.close()
    assert collect.closed
    assert {(f[0].size, f[1], f[2]) for f in collect.frames} == {(rate // 50, rate, 1)}
    out = collect.signal()
    assert out.size / rate == pytest.approx(0.5, abs=0.021)
    assert analysis.dominant_frequency(out, rate) == pytest.approx(1000, abs=3)


def test_resampled_sink_takes_stereo_frames():
    collect = Collect()
    sink = ResampledSink(collect, sample_rate=16000)
    src = StereoTone(600, 600, 0.2)
    while (f := src.read()) is not None:
        sink.write(f, SAMPLE_RATE, 2)
    sink.close()
    out = collect.signal()
    assert analysis.dominant_frequency(out, 16000) == pytest.approx(600, abs=3)


def test_silence_through_a_resampler_stays_silent():
    source = ResampledSource(SilenceSource(0.2, sample_rate=8000))
    assert not drain(source).any()
