"""A two-channel recording with both legs aligned on one wall clock.

:class:`AlignedStereoRecorder` writes a stereo WAV (left = the user, right = the
business by convention) where every frame sits at the moment it was received or sent,
on the event loop's monotonic clock, counted from the recorder's start. Silence and
gaps stay where they happened: nothing received for two seconds is two seconds of
silence on that channel, while the other channel goes on.

Placement of a leg's frames (:class:`AlignedLeg`): a leg is a stream with its own
timeline (``pts``, in 48 kHz samples: RTP timestamps for what we receive, the frame
index for what we send). The first frame is placed at its time ``at``; later frames at
``anchor + (pts - anchor_pts)``, so packet jitter does not move audio around and a
timestamp gap (lost packets, DTX) becomes silence of the same length. When a frame's
``at`` and that prediction disagree by more than ``resync_s`` (the sender paused
without advancing its timestamps, or its clock drifts), the leg re-anchors at ``at``.
Frames without a ``pts`` are laid end to end, re-anchored the same way. ``at`` for
received audio is the arrival time of the frame's RTP packet (see
:mod:`media.taps`), not when aiortc's jitter buffer released it.

Frames land in a 0.45 s ring buffer (86 KB per call); whatever is older than
``max_delay_s`` (0.3 s: the playout buffer holds a frame 0.2 s at most, so a frame
reaches the recorder well within that of its arrival) or pushed out by newer audio is
committed to the file, at least every ``commit_s`` (0.1 s), and
the WAV header is updated on each commit (crash-safe like
:class:`media.sinks.wav.WavWriter`). A frame arriving later than ``max_delay_s`` is
placed at the commit point instead (it cannot go back in time).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import numpy as np

from ..frames import PCM_DTYPE, SAMPLE_RATE
from .meter import Levels
from .wav import WavWriter

__all__ = ["AlignedStereoRecorder", "AlignedLeg", "AnchoredLeg", "Anchor", "TwoLegRecording", "default_clock"]

_EMPTY_ACC = np.empty(0, dtype=np.int32)
_EMPTY_MONO = np.empty(0, dtype=PCM_DTYPE)


def default_clock() -> Callable[[], float]:
    """The running event loop's clock, else ``time.monotonic``."""
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        return time.monotonic


class Anchor:
    """Where a leg's next frame goes on a recording's timeline (see the module docstring).

    :meth:`place` returns the target position in samples: the first frame at its
    arrival, later ones at ``anchor + (pts - anchor_pts)``, re-anchored on arrival
    (``resyncs``) when the two disagree by more than ``limit``; frames without ``pts``
    at ``end`` (the leg's end so far) unless the clock says a gap happened. A target
    before ``end`` (a duplicate or reordered frame) is the caller's to resolve."""

    __slots__ = ("pos", "pts", "first_at", "resyncs")

    def __init__(self) -> None:
        self.pos: int | None = None
        self.pts: int | None = None
        self.first_at: float | None = None
        self.resyncs = 0

    def place(self, pts: int | None, at: float, arrived: int, end: int, limit: int) -> int:
        if self.pos is None:
            self.first_at = at
            target = max(arrived, 0)
            self.pos, self.pts = target, pts
        elif pts is not None and self.pts is not None:
            target = self.pos + (pts - self.pts)
            if abs(arrived - target) > limit:
                self.pos, self.pts = arrived, pts
                target = arrived
                self.resyncs += 1
        else:
            target = end
            if arrived - target > limit:
                target = arrived
                self.resyncs += 1
            self.pos, self.pts = target, pts
        return target


class AnchoredLeg:
    """A leg placed by an :class:`Anchor`: when its first frame came, how often it was
    placed again by its arrival times."""

    def __init__(self) -> None:
        self.anchor = Anchor()

    @property
    def first_at(self) -> float | None:
        return self.anchor.first_at

    @property
    def resyncs(self) -> int:
        return self.anchor.resyncs


class TwoLegRecording:
    """The end of a recording of two aligned legs (``left``, ``right``): :meth:`flush`,
    :meth:`close` and :meth:`abort` over a subclass's ``_commit(upto)``, ``_end()``
    (where the legs end, in ``_commit``'s unit) and ``_file`` (its writer)."""

    closed = False
    left: AnchoredLeg
    right: AnchoredLeg

    @property
    def legs(self) -> tuple:
        return self.left, self.right

    def _commit(self, upto: int) -> None:
        raise NotImplementedError

    def _end(self) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        """Commit everything placed so far (e.g. before reading the file)."""
        self._commit(self._end())

    def close(self) -> None:
        """Commit both legs to their end and close the file. Idempotent."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            self._file.close()

    def abort(self) -> None:
        """Close without writing more (after a write failed): the file keeps what
        reached the disk, playable (see its writer's ``abort``)."""
        self.closed = True
        self._file.abort()


class AlignedLeg(AnchoredLeg):
    """One channel of an :class:`AlignedStereoRecorder`; also a plain Sink (frames
    without timing are placed end to end, re-anchored on the recorder's clock)."""

    def __init__(self, recorder: AlignedStereoRecorder, channel: int, name: str) -> None:
        super().__init__()
        self._rec = recorder
        self.channel = channel
        self.name = name
        self.levels = Levels()
        self.frames = 0
        self.samples = 0  # samples of audio written (not counting silence inserted)
        self._pos = 0  # next free sample position on the common timeline
        self._acc = _EMPTY_ACC  # (grown by the first multi-channel frame)
        self._mono = _EMPTY_MONO
        self._closed = False

    @property
    def end_s(self) -> float:
        """Where this leg's audio ends on the recording's timeline, in seconds."""
        return self._pos / self._rec.sample_rate

    # Sink protocol --------------------------------------------------------------------

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        self.write_timed(pcm, sample_rate, channels, None, None)

    def close(self) -> None:
        self._closed = True

    # ----------------------------------------------------------------------------------

    def write_timed(
        self,
        pcm: np.ndarray,
        sample_rate: int,
        channels: int,
        pts: int | None,
        at: float | None,
        level: tuple[float, int] | None = None,
    ) -> None:
        """Place one frame: ``pts`` on the leg's own timeline (samples at the
        recording's rate) or ``None``; ``at`` on the recorder's clock (``None``: now);
        ``level``: the frame's ``(sum of squares, peak)`` when known (mono frames)."""
        rec = self._rec
        if self._closed or rec.closed:
            return
        rate = rec.sample_rate
        if sample_rate != rate:
            raise ValueError(f"the stereo recording is {rate} Hz, got {sample_rate} Hz")
        mono = pcm.reshape(-1) if channels == 1 else self._to_mono(pcm, channels)
        n = mono.size
        if at is None:
            at = rec.clock()
        target = self.anchor.place(pts, at, round((at - rec.t0) * rate), self._pos, rec.resync_samples)
        if target < self._pos:
            target = self._pos  # overlap (duplicate / reordered): keep the audio, append
        self.levels.accumulate(mono, level if channels == 1 else None)
        self.frames += 1
        self.samples += n
        self._pos = rec._place(self.channel, target, mono)

    def _to_mono(self, pcm: np.ndarray, channels: int) -> np.ndarray:
        if channels == 1:
            return pcm.reshape(-1)
        count = pcm.size // channels
        if count > self._acc.size:
            self._acc = np.empty(count, dtype=np.int32)
            self._mono = np.empty(count, dtype=PCM_DTYPE)
        acc = self._acc[:count]
        np.add(pcm[0::channels], pcm[1::channels], out=acc, dtype=np.int32)
        for c in range(2, channels):
            acc += pcm[c::channels]
        np.floor_divide(acc, channels, out=acc) if channels != 2 else np.right_shift(acc, 1, out=acc)
        mono = self._mono[:count]
        np.copyto(mono, acc, casting="unsafe")
        return mono


class AlignedStereoRecorder(TwoLegRecording):
    """A stereo WAV of two legs aligned on one clock (see the module docstring).

    Args:
        path: the WAV file (mode 0600).
        clock: seconds on a monotonic clock; the event loop's by default. ``t0`` (the
            recording's time zero) is read from it at construction.
        resync_s: disagreement between a leg's timestamps and its arrival times beyond
            which the leg re-anchors on arrival times.
        max_delay_s: how late a frame may arrive and still be placed where it belongs.
        commit_s: audio is written (and the header updated) in chunks of at least this.
    """

    RING_S = 0.45

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sample_rate: int = SAMPLE_RATE,
        clock: Callable[[], float] | None = None,
        resync_s: float = 0.1,
        max_delay_s: float = 0.3,
        commit_s: float = 0.1,
        left: str = "user",
        right: str = "business",
    ) -> None:
        if not 0 < max_delay_s + commit_s < self.RING_S:
            raise ValueError(f"max_delay_s + commit_s must stay under the {self.RING_S} s ring")
        self.sample_rate = sample_rate
        self.clock = clock or default_clock()
        self.t0 = self.clock()
        self.resync_samples = round(resync_s * sample_rate)
        self._max_delay = round(max_delay_s * sample_rate)
        self._commit_chunk = round(commit_s * sample_rate)
        self._ring_len = round(self.RING_S * sample_rate)
        self._ring = np.zeros((self._ring_len, 2), dtype=PCM_DTYPE)
        self._columns = (self._ring[:, 0], self._ring[:, 1])
        self._committed = 0  # samples (per channel) written to the file
        # committed chunks go straight to the file (append_direct): no buffer to hold
        self._file = WavWriter(path, sample_rate=sample_rate, channels=2, flush_interval_s=0.0)
        self.path = self._file.path
        self.left = AlignedLeg(self, 0, left)
        self.right = AlignedLeg(self, 1, right)
        self.closed = False

    @property
    def duration_s(self) -> float:
        return self._committed / self.sample_rate

    def _place(self, channel: int, pos: int, mono: np.ndarray) -> int:
        """Write ``mono`` at ``pos`` (clamped to the commit point); returns its end."""
        committed = self._committed
        if pos < committed:
            pos = committed
        n = mono.size
        end = pos + n
        ring_len = self._ring_len
        if end - committed > ring_len:
            self._commit(end - ring_len)
        start = pos % ring_len
        stop = start + n
        column = self._columns[channel]  # (a preallocated strided view of the ring)
        if stop <= ring_len:
            column[start:stop] = mono
        else:
            first = ring_len - start
            column[start:] = mono[:first]
            column[: n - first] = mono[first:]
        # Commit what is older than max_delay on the clock, in chunks.
        committed = self._committed
        horizon = round((self.clock() - self.t0) * self.sample_rate) - self._max_delay
        if horizon - committed >= self._commit_chunk:
            self._commit(min(horizon, committed + ring_len))
        return end

    def _commit(self, upto: int) -> None:
        begin = self._committed
        if upto <= begin:
            return
        ring_len = self._ring_len
        while begin < upto:
            start = begin % ring_len
            count = min(upto - begin, ring_len - start)
            rows = self._ring[start : start + count]
            self._file.append_direct(rows.reshape(-1))
            rows.fill(0)
            begin += count
        self._committed = upto

    def _end(self) -> int:
        return max(self.left._pos, self.right._pos)
