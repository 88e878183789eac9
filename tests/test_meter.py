"""Level meter and speech start/stop detection on tone bursts (offline and in a call)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from media.frames import FRAME_SAMPLES, SAMPLE_RATE
from media.sinks.meter import LevelMeter, SpeechDetector, SpeechEvent
from media.sources.tone import SilenceSource, ToneSource
from media_call import TIMEOUT, FrameGate, SendLog, call_pair


def feed(sink, *sources, channels=1):
    for source in sources:
        while (f := source.read()) is not None:
            if channels == 2:
                f = np.repeat(f, 2)
            sink.write(f, SAMPLE_RATE, channels)


def test_levels_of_known_signals():
    meter = LevelMeter()
    feed(meter, ToneSource(1000, 0.2, amplitude=1.0))
    assert meter.level_dbfs == pytest.approx(-3.01, abs=0.05)
    assert meter.peak_dbfs == pytest.approx(0.0, abs=0.01)
    quiet = LevelMeter()
    feed(quiet, ToneSource(1000, 0.2, amplitude=0.01))
    assert quiet.level_dbfs == pytest.approx(-43.0, abs=0.1)
    assert quiet.levels.rms_dbfs == pytest.approx(-43.0, abs=0.1)
    silent = LevelMeter()
    feed(silent, SilenceSource(0.1))
    assert silent.level_dbfs == -120.0 and silent.peak_dbfs == -120.0


def test_speech_start_and_stop_follow_tone_bursts():
    seen: list[SpeechEvent] = []
    detector = SpeechDetector(on_event=seen.append)
    feed(
        detector,
        SilenceSource(0.5),
        ToneSource(300, 1.0),  # speech 0.5 .. 1.5
        SilenceSource(0.2),  # a pause shorter than 300 ms: still speaking
        ToneSource(300, 0.6),  # .. 2.3
        SilenceSource(1.0),
        ToneSource(300, 0.04),  # a 40 ms click: not speech
        SilenceSource(0.5),
        ToneSource(300, 0.5),  # 3.84 .. 4.34, cut off by the end of the stream
        channels=2,
    )
    detector.close()
    assert [(e.kind, e.at_s) for e in seen] == [
        ("start", pytest.approx(0.5, abs=0.1)),
        ("stop", pytest.approx(2.3, abs=0.1)),
        ("start", pytest.approx(3.84, abs=0.1)),
        ("stop", pytest.approx(4.34, abs=0.1)),
    ]
    # The decisions come after the hold times: 60 ms to start, 300 ms to stop.
    assert seen[0].detected_at_s - seen[0].at_s == pytest.approx(0.06, abs=0.001)
    assert seen[1].detected_at_s - seen[1].at_s == pytest.approx(0.30, abs=0.001)
    assert seen == detector.events


def test_hysteresis_between_start_and_stop_levels():
    detector = SpeechDetector(start_dbfs=-30, stop_dbfs=-45)
    feed(detector, ToneSource(300, 0.2, amplitude=0.1))  # about -23 dBFS: starts
    feed(detector, ToneSource(300, 1.0, amplitude=0.01))  # about -43 dBFS: keeps going
    assert detector.speaking
    feed(detector, ToneSource(300, 0.4, amplitude=0.001))  # about -63 dBFS: stops
    assert not detector.speaking
    assert [e.kind for e in detector.events] == ["start", "stop"]
    assert detector.events[1].at_s == pytest.approx(1.2, abs=0.021)


async def test_speech_events_in_a_call_match_the_tone_burst():
    queue: asyncio.Queue = asyncio.Queue()
    async with call_pair() as (business, user):
        detector = SpeechDetector(queue=queue)
        gate = FrameGate(business)
        business.add_sink(detector)
        business.add_sink(gate)
        log = SendLog(user.outbound)
        user.add_outbound_sink(log)
        await gate.reached(5)
        user.play(SilenceSource(0.3))
        burst = user.play(ToneSource(440, 0.8))
        start = await asyncio.wait_for(queue.get(), TIMEOUT)
        stop = await asyncio.wait_for(queue.get(), TIMEOUT)
        assert burst.done.done()
    # Stream time of the burst as sent, relative to the first frame the detector saw.
    rows = log.of(burst)
    begin = (rows[0][1] - gate.first_pts) / SAMPLE_RATE
    end = (rows[-1][1] + FRAME_SAMPLES - gate.first_pts) / SAMPLE_RATE
    assert (start.kind, stop.kind) == ("start", "stop")
    assert start.at_s == pytest.approx(begin, abs=0.1)
    assert stop.at_s == pytest.approx(end, abs=0.1)


def test_a_metered_source_measures_what_it_plays_and_crosses_to_a_worker():
    import pickle

    from media.sinks.meter import LevelMeter, MeteredSource
    from media.sources.tone import ToneSource

    meter = LevelMeter()
    source = MeteredSource(ToneSource(1000, 0.1, amplitude=0.5), meter)
    assert source.sample_rate == 48000 and source.channels == 1  # the wrapped source's
    while source.read() is not None:
        pass
    assert meter.frames == 5 and -10 < meter.level_dbfs < -6  # a sine at 0.5: about -9 dBFS
    copy = pickle.loads(pickle.dumps(MeteredSource(ToneSource(1000, 0.04), LevelMeter())))
    assert copy.read() is not None and copy.meter.frames == 1
