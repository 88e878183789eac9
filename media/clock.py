"""The 20 ms frame clock every sender and receiver paces on.

Frame *n* of a stream is due at ``start + n × 20 ms`` on the event loop's monotonic
clock, so small scheduling delays never accumulate (no drift). When the loop stalls and
a frame is more than ``resync_after_s`` late, the schedule restarts with that frame due
*now*: the stall becomes delay instead of a burst of catch-up frames. The outbound track
(:mod:`media.track`, sending) and the playout (:mod:`media.receiver`, receiving) each
keep one, with the tolerance their side needs.
"""

from __future__ import annotations

from .frames import FRAME_MS

__all__ = ["FRAME_S", "FrameClock"]

FRAME_S = FRAME_MS / 1000


class FrameClock:
    """A drift-free schedule of frames (see the module docstring)."""

    __slots__ = ("period_s", "resync_after_s", "start", "resyncs")

    def __init__(self, *, resync_after_s: float, period_s: float = FRAME_S) -> None:
        self.period_s = period_s
        self.resync_after_s = resync_after_s
        #: When frame 0 is (or was) due; ``None`` before :meth:`begin`.
        self.start: float | None = None
        #: Times the schedule restarted after a stall.
        self.resyncs = 0

    @property
    def started(self) -> bool:
        return self.start is not None

    def begin(self, at: float) -> None:
        """Start a schedule: frame 0 is due ``at``."""
        self.start = at

    def due(self, n: int) -> float:
        return self.start + n * self.period_s

    def late(self, n: int, now: float) -> float:
        """How late frame ``n`` is at ``now`` (negative: early). Beyond
        ``resync_after_s``, the schedule restarts with frame ``n`` due ``now``."""
        late = now - (self.start + n * self.period_s)
        if late > self.resync_after_s:
            self.resyncs += 1
            self.start = now - n * self.period_s
        return late
