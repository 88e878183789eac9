"""The one 20 ms frame clock (media.clock) the sender and the playout pace on."""

import pytest

from media.clock import FRAME_S, FrameClock


def test_frames_are_due_on_a_drift_free_schedule():
    clock = FrameClock(resync_after_s=0.1)
    assert not clock.started
    clock.begin(10.0)
    assert clock.due(0) == 10.0 and clock.due(50) == pytest.approx(11.0)
    assert clock.late(3, 10.055) == pytest.approx(-0.005)  # early by 5 ms
    assert clock.late(3, 10.1) == pytest.approx(0.04) and clock.resyncs == 0  # 40 ms late: catch up


def test_a_stall_restarts_the_schedule_instead_of_a_burst():
    clock = FrameClock(resync_after_s=3 * FRAME_S)
    clock.begin(0.0)
    assert clock.late(10, 0.5) == pytest.approx(0.3)  # 300 ms late: beyond 60 ms
    assert clock.resyncs == 1
    assert clock.due(10) == pytest.approx(0.5) and clock.due(11) == pytest.approx(0.52)
