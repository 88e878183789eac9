"""A failing sink never reaches the media path (media.sinkset), on a real call."""

import asyncio
import logging

import numpy as np
import pytest

from media.sinkset import SinkSet, fault_code
from media.sources.tone import ToneSource
from tests.helpers import ToneEars
from tests.media_call import call_pair

TIMEOUT = 20


class Broken:
    """A sink that raises on its ``after``-th frame (and would again)."""

    def __init__(self, after: int = 3, error: Exception | None = None) -> None:
        self.after, self.frames, self.closed = after, 0, False
        self.error = error or OSError(28, "No space left on device")

    def write(self, pcm, sample_rate, channels=1) -> None:
        self.frames += 1
        if self.frames >= self.after:
            raise self.error

    def close(self) -> None:
        self.closed = True


def test_a_raising_sink_is_detached_closed_and_reported_once(caplog):
    faults = []
    sinks = SinkSet("receive", label="t", on_fault=faults.append)
    broken, ears = Broken(after=2), ToneEars(1000)
    sinks.add(broken)
    sinks.add(ears)
    frame = np.zeros(960, dtype=np.int16)
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            sinks.write(frame, 48000, 1)
    assert broken.frames == 2 and broken.closed and broken not in sinks
    assert len(ears.frames) == 50  # the others go on, frame for frame
    assert [(f.sink, f.code, f.path) for f in faults] == [(broken, "disk_full", "receive")]
    assert len(caplog.records) == 1 and not caplog.records[0].exc_info  # an OSError: no traceback


def test_a_bug_in_a_sink_keeps_its_traceback_once(caplog):
    sinks = SinkSet("send")
    sinks.add(Broken(after=1, error=ValueError("bug")))
    with caplog.at_level(logging.WARNING):
        for _ in range(10):
            sinks.write(np.zeros(960, dtype=np.int16), 48000, 1)
    assert len(caplog.records) == 1 and caplog.records[0].exc_info
    assert fault_code(ValueError()) == "sink_error" and fault_code(OSError(5, "EIO")) == "io_error"


async def test_failing_sinks_on_both_paths_leave_the_audio_flowing():
    """An outbound tap that raises used to end aiortc's send loop (the user heard
    nothing more); an inbound sink that raises skipped the sinks after it."""
    faults = []
    async with call_pair() as (business, user):
        business.on_sink_fault(faults.append)
        business.add_outbound_sink(Broken(after=2))
        business.add_sink(Broken(after=2))
        business.rtp_tap.add_listener(lambda arrival: 1 / 0)
        user_hears, business_hears = ToneEars(1000), ToneEars(600)
        user.add_sink(user_hears)
        business.add_sink(business_hears)
        business.play(ToneSource(1000, 3.0))
        user.play(ToneSource(600, 3.0))
        await asyncio.gather(user_hears.hears(2.0, TIMEOUT), business_hears.hears(2.0, TIMEOUT))
        assert sorted(f.path for f in faults) == ["receive", "rtp", "send"]
        assert business.outbound.readyState == "live"


@pytest.mark.parametrize("kind", ["wav", "ogg"])
def test_aborted_files_play_up_to_the_fault(tmp_path, kind):
    """After a failed write, abort() leaves a file whose header matches what reached it."""
    import wave

    from media import analysis
    from media.sinks.ogg import OggOpusSink
    from media.sinks.wav import WavSink

    path = tmp_path / f"x.{kind}"
    sink = WavSink(path) if kind == "wav" else OggOpusSink(path)
    tone = ToneSource(1000, 3.0)
    for _ in range(100):  # 2 s
        sink.write(tone.read(), 48000, 1)
    sink.abort()  # what a failed write leads to: nothing more is written
    sink.write(tone.read(), 48000, 1)  # ignored
    if kind == "wav":
        with wave.open(str(path)) as w:
            assert w.getnframes() == 96000  # the flushed whole seconds
    x, rate = analysis.read_audio(path)
    assert analysis.tone_seconds(x, rate, 1000) >= 1.5
