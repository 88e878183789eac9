"""An adaptive playout jitter buffer for one received Opus stream (pure logic, no I/O).

:class:`PlayoutBuffer` takes RTP packets as they arrive (:meth:`~PlayoutBuffer.push`:
sequence number, RTP timestamp, payload, arrival time) and is asked once per 20 ms
playout tick what to play (:meth:`~PlayoutBuffer.pop`). It never looks at a clock:
every time is passed in, so it is deterministic and cheap to test. The tick clock, the
Opus decoder and the sinks live in :mod:`media.receiver`.

Timeline. Packets are ordered by sequence number (16-bit, unwrapped) and placed by
their RTP timestamp, mapped like :class:`media.taps.RtpTap` maps it: the first packet's
timestamp is 0 and wrap-arounds keep counting up (``pts``, 48 kHz units). The playout
cursor ``next_pts`` advances by each played packet's duration (read from its Opus TOC
byte) or by one 20 ms frame per tick without a packet, so the output keeps wall-clock
time. A slot without a packet is

* **concealed** (``CONCEAL``) when a packet is missing: lost, or late;
* **skipped** (``GAP``: the tick passes, no frame) when the sender sent no audio for it:
  the next packet buffered follows the last one played in sequence (every packet sent
  is accounted for, the timestamps jumped: DTX, or telephone-events that replaced the
  audio, see :mod:`media.dtmf`), or the caller's :attr:`~PlayoutBuffer.events_hint`
  says telephone-events are arriving instead of audio right now.

Delay. For every packet the *transit* ``arrival - pts / 48000`` is recorded; its
minimum over the last :attr:`window` packets is the fastest path, and a packet's delay
beyond it is its jitter. The target playout delay is the :attr:`quantile` (97 %) of
that jitter over the window plus :attr:`margin_s`, clamped to ``[min_delay_s,
max_delay_s]``; :attr:`initial_delay_s` (60 ms) holds until the window has
:attr:`warmup` packets. The current delay at a tick is ``now - next_pts / 48000 -
min transit``: the delay the slot being played has beyond the fastest packet. It is
steered into ``[target, target + 20 ms + hysteresis)`` one frame at a time:

* **grow** — when the slot to play is missing and the delay is below target, a
  concealed frame is played *without* advancing the cursor (``STRETCH``): a late packet
  then still makes it, and the delay grew by 20 ms;
* **shrink** — when the delay is a frame above that band and the next packet is
  buffered too, the packet due is decoded but not played (``DISCARD``), at most once
  per :attr:`shrink_interval_s`.

Loss. A slot still missing at its tick (delay at or above target) is concealed and the
cursor moves on; the packet, if it comes later, is *late* and dropped — unless it comes
before any later packet was played (every slot from its own on was concealed: a delay
spike, a sender stall, or a sender that paused without advancing its timestamps): then
playout goes back to it (*late kept*), which grows the delay by the slots concealed
instead of losing the audio (the shrink rule takes the extra delay back later). Duplicates (same sequence number within
the last 128) are dropped.

Start and stop. The first packet (or the first after a stop) starts playout
``target`` later (``start_at``); playout stops (``IDLE``) once nothing is buffered and
no packet arrived for :attr:`hold_s` (200 ms), so a dead network stops the frames.
A new SSRC, or a sequence-number jump confirmed by the next packet (RFC 3550 A.1), is a
new stream: the timeline goes on from where the old one was.

:class:`PlayoutBuffer` here is the reference. Where the C core (:mod:`media.rtpcore`)
was built, :func:`playout_buffer` gives the Opus receiver its twin, with the same
results (the tests run on both and hold one to the other) and its counters in C, copied
into the same :class:`JitterStats` whenever ``stats`` is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from . import rtpcore
from .rtpseq import serial_delta

__all__ = [
    "CONCEAL",
    "DISCARD",
    "GAP",
    "IDLE",
    "PLAY",
    "STRETCH",
    "JitterStats",
    "PlayoutBuffer",
    "opus_samples",
    "playout_buffer",
]

#: What :meth:`PlayoutBuffer.pop` asks the caller to do for this tick.
IDLE = 0  #: play nothing: playout stopped (or has not started)
PLAY = 1  #: decode ``payload`` and play it (``pts`` = its stream position)
CONCEAL = 2  #: a lost / late slot at ``pts``: play 20 ms of concealment
STRETCH = 3  #: delay grows: play 20 ms of concealment, nothing is skipped (``pts`` None)
DISCARD = 4  #: delay shrinks: decode ``payload`` (decoder state), drop it, pop again
GAP = 5  #: the sender sent no audio for the slot at ``pts``: the tick passes, no frame

_SEQ_MOD = 1 << 16
#: Sequence numbers remembered for duplicate detection.
_SEQ_WINDOW = 128
_SEQ_WINDOW_MASK = (1 << _SEQ_WINDOW) - 1
#: Delay differences below this are timer noise (the grow / shrink decisions ignore them).
_DELAY_SLACK_S = 0.001
#: A sequence-number jump this large (either way) is a restart if the next packet follows it.
_MAX_DROPOUT = 3000


def _toc_table() -> tuple[int, ...]:
    """Samples at 48 kHz of one Opus frame, by TOC config (RFC 6716 §3.1)."""
    out = []
    for config in range(32):
        if config < 12:  # SILK: 10, 20, 40, 60 ms
            out.append((480, 960, 1920, 2880)[config & 3])
        elif config < 16:  # Hybrid: 10, 20 ms
            out.append((480, 960)[config & 1])
        else:  # CELT: 2.5, 5, 10, 20 ms
            out.append((120, 240, 480, 960)[config & 3])
    return tuple(out)


_FRAME_OF_CONFIG = _toc_table()


def opus_samples(payload: bytes, default: int = 960) -> int:
    """Samples (48 kHz) an Opus packet decodes to, from its TOC byte; ``default`` for
    an empty or malformed packet."""
    if not payload:
        return default
    toc = payload[0]
    frame = _FRAME_OF_CONFIG[toc >> 3]
    code = toc & 3
    if code == 0:
        return frame
    if code < 3:
        return 2 * frame
    if len(payload) < 2 or not payload[1] & 0x3F:
        return default
    return frame * (payload[1] & 0x3F)


@dataclass(slots=True)
class JitterStats:
    """Counters of one :class:`PlayoutBuffer` (since it was created)."""

    #: Packets pushed (duplicates and late ones included).
    packets_received: int = 0
    #: Sequence numbers never received (RTP-style: expected - received, so a late
    #: packet is not lost; only sequence gaps count).
    packets_lost: int = 0
    #: Packets that came after their slot was played (or concealed): dropped.
    packets_late: int = 0
    #: Late packets played anyway, the delay growing instead (see the module docstring).
    packets_late_kept: int = 0
    packets_duplicate: int = 0
    #: Packets decoded and played.
    frames_played: int = 0
    #: 20 ms slots played as concealment (lost or late packet, stretch).
    frames_concealed: int = 0
    #: Of those, lost packets rebuilt from the in-band FEC of the packet after them
    #: (counted by the receiver that decodes).
    frames_fec: int = 0
    #: 20 ms slots the sender sent no audio for (``GAP``): no frame.
    frames_skipped: int = 0
    #: Concealed frames inserted to grow the delay (nothing skipped).
    frames_stretched: int = 0
    #: Packets decoded but not played, to shrink the delay.
    frames_discarded: int = 0
    #: Packets dropped because the buffer was full or far ahead of playout.
    packets_overflow: int = 0
    #: Times playout started (first packet, and after each stop).
    playouts: int = 0
    #: New streams (SSRC change, sequence restart).
    stream_restarts: int = 0
    #: The current target delay beyond the fastest packet, seconds.
    target_delay_s: float = 0.0
    #: The delay of the slot last played beyond the fastest packet, seconds.
    delay_s: float | None = None
    #: Jitter estimate: the ``quantile`` of packet delay beyond the fastest packet over
    #: the window, seconds.
    jitter_s: float = 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("target_delay_s", "delay_s", "jitter_s"):
            if out[key] is not None:
                out[key] = round(out[key], 4)
        return out


class PlayoutBuffer:
    """See the module docstring. All times in seconds on one monotonic clock."""

    def __init__(
        self,
        *,
        clock_rate: int = 48_000,
        frame_samples: int = 960,
        initial_delay_s: float = 0.06,
        min_delay_s: float = 0.02,
        max_delay_s: float = 0.2,
        margin_s: float = 0.005,
        quantile: float = 0.97,
        window: int = 200,
        warmup: int = 50,
        hysteresis_s: float = 0.01,
        shrink_interval_s: float = 0.25,
        hold_s: float = 0.2,
        capacity: int = 100,
    ) -> None:
        if not 0 < min_delay_s <= initial_delay_s <= max_delay_s:
            raise ValueError("need 0 < min_delay_s <= initial_delay_s <= max_delay_s")
        if not 0.5 <= quantile < 1 or window < 10 or not 1 <= warmup <= window:
            raise ValueError("bad quantile / window / warmup")
        self.clock_rate = clock_rate
        self.frame_samples = frame_samples
        self.frame_s = frame_samples / clock_rate
        self.initial_delay_s = initial_delay_s
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self.margin_s = margin_s
        self.quantile = quantile
        self.window = window
        self.warmup = warmup
        self.hysteresis_s = hysteresis_s
        self.shrink_interval_s = shrink_interval_s
        self.hold_s = hold_s
        self.capacity = capacity
        #: ``() -> bool``: the sender is sending telephone-events instead of audio right
        #: now (set by media.receiver from media.dtmf); empty slots are then skipped.
        self.events_hint: Callable[[], bool] | None = None
        #: ``(payload, frame_samples) -> int``: the RTP clock ticks a payload covers
        #: (Opus: from its TOC byte; :mod:`media.rtp` sets its own for G.711 / G.722).
        self.samples_of: Callable[[bytes, int], int] = opus_samples
        self.stats = JitterStats(target_delay_s=initial_delay_s)
        self.target_s = initial_delay_s
        #: When playout should start (a packet is buffered, playout is stopped), or None.
        self.start_at: float | None = None
        self._inv_rate = 1.0 / clock_rate
        self._packets: dict[int, tuple[bytes, int]] = {}  # pts -> (payload, extended seq)
        self._playing = False
        self._next = 0  # pts of the next slot to play (when playing)
        self._played_end: float = -math.inf  # end (pts) of the last packet played
        self._last_seq = 0  # extended sequence number of the last packet played
        self._run = 0  # slots concealed since then
        self._far_ahead = round((2 * max_delay_s + 0.1) * clock_rate)
        self._last_arrival = -math.inf
        self._last_shrink = -math.inf
        # stream (sequence / timestamp unwrapping)
        self._ssrc: int | None = None
        self._seq_hi = 0  # extended sequence number of the newest packet
        self._seq_first = 0
        self._seq_mask = 0  # bit k: seq_hi - k was received
        self._unique = 0  # distinct packets of this stream
        self._lost_before = 0  # lost in earlier streams
        self._bad_seq: int | None = None
        self._ts_hi = 0  # raw RTP timestamp of the newest packet
        self._pts_hi = 0  # its pts
        # transit (arrival - pts / rate) of the last `window` packets
        self._transit: list[float] = [0.0] * window
        self._transit_n = 0
        self._transit_i = 0
        self._transit_min = math.inf
        self._since_estimate = 0

    # -- state -------------------------------------------------------------------------

    @property
    def playing(self) -> bool:
        return self._playing

    @property
    def next_pts(self) -> int | None:
        """Stream position of the next slot to play (``None`` unless playing)."""
        return self._next if self._playing else None

    def __len__(self) -> int:
        return len(self._packets)

    def delay(self, now: float) -> float | None:
        """The delay the slot due at ``now`` has beyond the fastest packet."""
        if not self._playing or self._transit_min == math.inf:
            return None
        return now - self._next * self._inv_rate - self._transit_min

    # -- arrivals ----------------------------------------------------------------------

    def push(self, seq: int, timestamp: int, payload: bytes, now: float, ssrc: int = 0) -> bool:
        """A packet arrived at ``now``: 16-bit ``seq``, 32-bit RTP ``timestamp``.
        Returns whether it was kept for playout (False: duplicate, late, overflow)."""
        stats = self.stats
        stats.packets_received += 1
        if ssrc != self._ssrc or self._ssrc is None:
            self._new_stream(seq, timestamp, ssrc)
            pts, ext = self._pts_hi, self._seq_hi
        else:
            # The newest sequence number and a window of those before it say what came;
            # timestamps are unwrapped relative to the newest packet's (within ±2^31).
            delta = serial_delta(seq, self._seq_hi, 16)
            if delta > _MAX_DROPOUT or delta < -_MAX_DROPOUT:
                # A stray packet from far away, or the sender restarted its sequence:
                # believe the jump when the next packet follows it (RFC 3550 A.1).
                if not self._confirm_jump(seq):
                    stats.packets_late += 1
                    return False
                self._new_stream(seq, timestamp, ssrc)
                pts, ext = self._pts_hi, self._seq_hi
            elif delta > 0:
                ext = self._seq_hi = self._seq_hi + delta
                self._seq_mask = ((self._seq_mask << delta) | 1) & _SEQ_WINDOW_MASK
                dts = serial_delta(timestamp, self._ts_hi, 32)
                self._ts_hi = timestamp
                pts = self._pts_hi = self._pts_hi + dts
            else:
                back = -delta
                if back >= _SEQ_WINDOW:
                    stats.packets_late += 1  # older than anything we remember
                    return False
                if (self._seq_mask >> back) & 1:
                    stats.packets_duplicate += 1
                    return False
                self._seq_mask |= 1 << back
                ext = self._seq_hi - back
                dts = serial_delta(timestamp, self._ts_hi, 32)
                pts = self._pts_hi + dts
            self._bad_seq = None
        self._unique += 1
        stats.packets_lost = self._lost_before + max(0, self._seq_hi - self._seq_first + 1 - self._unique)
        self._last_arrival = now
        transit = now - pts * self._inv_rate
        packets = self._packets
        if self._playing:
            if pts < self._next:
                if pts >= self._played_end:
                    # Every slot from this packet's on was concealed (a delay spike, a
                    # sender stall, a sender pause without a timestamp jump): nothing
                    # after it was played yet, so go back and play it.
                    stats.packets_late_kept += 1
                    self._run = int(pts - self._played_end) // self.frame_samples
                    self._next = pts
                else:
                    stats.packets_late += 1
                    self._add_transit(transit)
                    self._estimate()  # react now: lateness means the delay is too short
                    return False
            elif pts - self._next > self._far_ahead:
                # The sender jumped its timestamps: start over from this packet.
                stats.packets_overflow += len(packets)
                packets.clear()
                self._playing = False
                self._reset_transit()
        elif pts < self._played_end:
            stats.packets_late += 1  # its slot was played before playout stopped
            return False
        elif self.start_at is None and abs(transit - self._transit_min) > self.max_delay_s:
            # Playout restarts after a pause that moved the timeline (e.g. a sender that
            # stopped without advancing its timestamps): old transits mean nothing now.
            self._reset_transit()
        self._add_transit(transit)
        if pts in packets:
            stats.packets_duplicate += 1
            return False
        packets[pts] = (payload, ext)
        if len(packets) > self.capacity:
            packets.pop(min(packets))
            stats.packets_overflow += 1
        if not self._playing and self.start_at is None:
            self.start_at = now + self.target_s
        return True

    def _confirm_jump(self, seq: int) -> bool:
        """RFC 3550 A.1: a big jump is believed when the next packet follows it."""
        if self._bad_seq == seq:
            self._bad_seq = None
            return True
        self._bad_seq = (seq + 1) & (_SEQ_MOD - 1)
        return False

    def _new_stream(self, seq: int, timestamp: int, ssrc: int) -> None:
        """First packet of a stream: its pts continues the timeline; its sequence
        numbers continue the extended ones (so old and new never mix)."""
        if self._ssrc is not None:
            self.stats.stream_restarts += 1
            self._lost_before += max(0, self._seq_hi - self._seq_first + 1 - self._unique)
            base = self._pts_hi + self.frame_samples
            if self._packets:
                base = max(base, max(self._packets) + self.frame_samples)
            if self._playing:
                base = max(base, self._next)
            elif self._played_end > base:
                base = int(self._played_end)
            # above every old extended number, and equal to `seq` in the low 16 bits
            ext = (((self._seq_hi >> 16) + 2) << 16) + seq
            self._reset_transit()  # transits of the old stream mean nothing for the new one
        else:
            base = 0
            ext = seq
        self._ssrc = ssrc
        self._seq_hi = self._seq_first = ext
        self._seq_mask = 1
        self._unique = 0
        self._bad_seq = None
        self._ts_hi = timestamp
        self._pts_hi = base

    # -- delay estimate ----------------------------------------------------------------

    def _add_transit(self, transit: float) -> None:
        i = self._transit_i
        self._transit[i] = transit
        self._transit_i = i + 1 if i + 1 < self.window else 0
        if self._transit_n < self.window:
            self._transit_n += 1
        if transit < self._transit_min:
            self._transit_min = transit
        self._since_estimate += 1
        if self._since_estimate >= 16:
            self._estimate()

    def _reset_transit(self) -> None:
        self._transit_n = self._transit_i = 0
        self._transit_min = math.inf
        self._since_estimate = 0

    def _estimate(self) -> None:
        """Window minimum, jitter quantile and target delay from the recent transits."""
        self._since_estimate = 0
        n = self._transit_n
        if not n:
            return
        values = sorted(self._transit[:n]) if n < self.window else sorted(self._transit)
        low = values[0]
        jitter = values[int(self.quantile * (n - 1) + 0.5)] - low
        self._transit_min = low
        target = jitter + self.margin_s
        if n < self.warmup:
            target = max(target, self.initial_delay_s)
        target = min(max(target, self.min_delay_s), self.max_delay_s)
        self.target_s = target
        stats = self.stats
        stats.jitter_s = jitter
        stats.target_delay_s = target

    # -- playout -----------------------------------------------------------------------

    def pop(self, now: float) -> tuple[int, bytes | None, int | None]:
        """What to do at the tick due at ``now``: ``(kind, payload, pts)``, kind one
        of :data:`IDLE`, :data:`PLAY`, :data:`CONCEAL`, :data:`STRETCH`, :data:`GAP`,
        :data:`DISCARD` (then call again for the same tick)."""
        packets = self._packets
        if not self._playing:
            start = self.start_at
            if start is None:
                return _IDLE
            if not packets:
                self.start_at = None
                return _IDLE
            if now < start - 1e-6:
                return _IDLE
            self.start_at = None
            self._playing = True
            first = self._next = min(packets)
            self._played_end = first
            self._last_seq = packets[first][1] - 1
            self._run = 0
            self._last_shrink = now
            self.stats.playouts += 1
        nxt = self._next
        entry = packets.pop(nxt, None)
        delay = now - nxt * self._inv_rate - self._transit_min
        stats = self.stats
        stats.delay_s = delay
        if entry is not None:
            return self._play(entry, nxt, delay, now)
        frame = self.frame_samples
        if packets:
            head = min(packets)
            if head < nxt + frame:  # a packet off the 20 ms grid: play it now
                return self._play(packets.pop(head), head, delay, now)
            if packets[head][1] - self._last_seq - 1 <= self._run:
                # Every packet sent before `head` is here or concealed already: the
                # sender sent no audio for this slot.
                self._next = nxt + frame
                stats.frames_skipped += 1
                return GAP, None, nxt
        elif now - self._last_arrival > self.hold_s:
            self._playing = False  # nothing for a while: stop
            stats.delay_s = None
            return _IDLE
        elif self.events_hint is not None and self.events_hint():
            self._next = nxt + frame
            stats.frames_skipped += 1
            return GAP, None, nxt
        stats.frames_concealed += 1
        if delay < self.target_s - _DELAY_SLACK_S:
            stats.frames_stretched += 1
            return STRETCH, None, None
        self._next = nxt + frame
        self._run += 1
        return CONCEAL, None, nxt

    def peek(self, pts: int) -> bytes | None:
        """The payload buffered for stream position ``pts``, if any (left in place)."""
        entry = self._packets.get(pts)
        return None if entry is None else entry[0]

    def _play(self, entry: tuple[bytes, int], pts: int, delay: float, now: float) -> tuple[int, bytes, int]:
        payload, self._last_seq = entry
        following = pts + self.samples_of(payload, self.frame_samples)
        self._next = self._played_end = following
        self._run = 0
        stats = self.stats
        if (
            delay >= self.target_s + self.frame_s + self.hysteresis_s
            and now - self._last_shrink >= self.shrink_interval_s
            and following in self._packets
        ):
            self._last_shrink = now
            stats.frames_discarded += 1
            return DISCARD, payload, pts
        stats.frames_played += 1
        return PLAY, payload, pts

    def drain(self) -> list[tuple[int, bytes | None, int]]:
        """Everything still buffered, as the ticks would play it (``PLAY``, ``CONCEAL``
        and ``GAP`` slots), at once: the stream is ending and what arrived must not be
        lost. Playout stops."""
        packets = self._packets
        out: list[tuple[int, bytes | None, int]] = []
        if packets:
            stats = self.stats
            if not self._playing:
                self._next = min(packets)
                self._last_seq = packets[self._next][1] - 1
                self._run = 0
            nxt = self._next
            frame = self.frame_samples
            while packets:
                entry = packets.pop(nxt, None)
                if entry is None:
                    head = min(packets)
                    if head < nxt + frame:
                        nxt = head
                        continue
                    if packets[head][1] - self._last_seq - 1 <= self._run:
                        out.append((GAP, None, nxt))
                        stats.frames_skipped += 1
                    else:
                        out.append((CONCEAL, None, nxt))
                        stats.frames_concealed += 1
                        self._run += 1
                    nxt += frame
                else:
                    payload, self._last_seq = entry
                    out.append((PLAY, payload, nxt))
                    stats.frames_played += 1
                    nxt += self.samples_of(payload, frame)
                    self._played_end = nxt
                    self._run = 0
            self._next = nxt
        self._playing = False
        self.start_at = None
        return out


_IDLE = (IDLE, None, None)


def playout_buffer(**options) -> PlayoutBuffer:
    """A :class:`PlayoutBuffer` for an Opus stream (keyword ``options`` as its): the C
    core's twin where it was built (:mod:`media.rtpcore`; same results, the tests hold
    the two to each other), else this module's."""
    core = rtpcore.core
    if core is None:
        return PlayoutBuffer(**options)
    return core.PlayoutBuffer(JitterStats(), **options)  # (its counters, target included, are copied in on read)
