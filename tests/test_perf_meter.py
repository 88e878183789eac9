"""Issue 16: the level meter, speech detector and recorder levels measure in one float
pass per frame (peaks per 100 ms block) and give the numbers they gave before: checked
against a straightforward float64 reference of the old per-frame arithmetic, on tones."""

from __future__ import annotations

import math

import numpy as np
import pytest

from media.frames import SAMPLE_RATE
from media.sinks.meter import Levels, LevelMeter, SpeechDetector, dbfs
from media.sinks.wav import WavSink
from media.sources.tone import SilenceSource, ToneSource


def frames_of(*sources) -> list[np.ndarray]:
    out = []
    for source in sources:
        while (f := source.read()) is not None:
            out.append(f)
    return out


def reference(frames: list[np.ndarray]) -> tuple[list[float], float, int]:
    """The old arithmetic: per frame mean square; running sum of squares and peak."""
    per_frame, total, peak = [], 0.0, 0
    for f in frames:
        x = f.astype(np.float64)
        sq = float(np.dot(x, x))
        per_frame.append(sq / f.size)
        total += sq
        peak = max(peak, int(np.max(np.abs(f.astype(np.int32)))))
    return per_frame, total, peak


def signal() -> list[np.ndarray]:
    return frames_of(SilenceSource(0.3), ToneSource(1000, 0.5, amplitude=0.5), SilenceSource(0.1),
                     ToneSource(300, 0.33, amplitude=0.05), ToneSource(440, 0.21, amplitude=1.0))


def test_levels_match_the_reference_frame_by_frame_and_in_total():
    frames = signal()
    per_frame, total, peak = reference(frames)
    levels = Levels()
    for f, expected in zip(frames, per_frame):
        assert levels.add(f) == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert levels.last_ms == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert levels.samples == sum(f.size for f in frames)
    assert levels.sum_sq == pytest.approx(total, rel=1e-5)
    assert levels.peak == peak == 32767
    assert levels.rms_dbfs == round(dbfs(total / levels.samples), 2)
    assert levels.peak_dbfs == round(20 * math.log10(peak / 32768), 2)


def test_accumulated_totals_equal_measured_ones_and_reads_mid_block_are_exact():
    frames = signal()
    _, total, peak = reference(frames)
    measured, accumulated = Levels(), Levels()
    for i, f in enumerate(frames):
        measured.add(f)
        accumulated.accumulate(f)
        if i == 27:  # a read in the middle of a 100 ms block takes the partial block in
            _, part_total, part_peak = reference(frames[:28])
            assert accumulated.sum_sq == pytest.approx(part_total, rel=1e-5)
            assert accumulated.peak == part_peak
    assert accumulated.as_dict() == measured.as_dict()
    assert accumulated.sum_sq == pytest.approx(total, rel=1e-5) and accumulated.peak == peak


def test_odd_frame_sizes_and_a_negative_full_scale_peak():
    levels = Levels()
    big = np.full(7000, -32768, dtype=np.int16)  # more than a block, the int16 minimum
    levels.add(np.array([1, -2, 3], dtype=np.int16))
    levels.accumulate(big)
    levels.add(np.zeros(0, dtype=np.int16))
    assert levels.peak == 32768 and levels.peak_dbfs == 0.0
    assert levels.samples == 7003
    assert levels.sum_sq == pytest.approx(14 + 7000 * 32768.0**2, rel=1e-6)


def test_meter_and_detector_give_the_reference_numbers_on_tones():
    frames = signal()
    per_frame, _, _ = reference(frames)
    seen = []
    meter = LevelMeter(on_level=seen.append)
    for f in frames:
        meter.write(f, SAMPLE_RATE)
    assert seen == pytest.approx([dbfs(m) for m in per_frame], abs=1e-4)
    assert meter.peak_dbfs == pytest.approx(0.0, abs=0.01)
    # the detector decides on the same per-frame values: its events are the reference's
    detector = SpeechDetector()
    for f in frames:
        detector.write(f, SAMPLE_RATE)
    detector.close()
    threshold = 10 ** (-40 / 10) * 32768.0**2
    loud = [m >= threshold for m in per_frame]
    first = loud.index(True)
    assert [(e.kind, e.at_s, e.detected_at_s) for e in detector.events] == [
        ("start", round(first * 0.02, 3), round((first + 3) * 0.02, 3)),
        ("stop", round(len(frames) * 0.02, 3), round(len(frames) * 0.02, 3)),
    ]


def test_wav_header_follows_every_second_and_the_data_every_flush(tmp_path):
    import wave

    path = tmp_path / "user.wav"
    sink = WavSink(path, flush_interval_s=0.1, header_interval_s=1.0)
    frames = frames_of(ToneSource(500, 1.5))
    for f in frames[:60]:  # 1.2 s
        sink.write(f, SAMPLE_RATE)
    # the data reached the file in 100 ms chunks; the header says the first second
    assert path.stat().st_size == 44 + 2 * int(1.2 * SAMPLE_RATE)
    with wave.open(str(path)) as w:
        assert w.getnframes() == SAMPLE_RATE
    sink.flush()  # an explicit flush brings the header up to date
    with wave.open(str(path)) as w:
        assert w.getnframes() == int(1.2 * SAMPLE_RATE)
    for f in frames[60:]:
        sink.write(f, SAMPLE_RATE)
    sink.close()
    with wave.open(str(path)) as w:
        assert w.getnframes() == int(1.5 * SAMPLE_RATE)
