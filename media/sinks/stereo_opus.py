"""Both legs of a call in one Ogg/Opus file, aligned, as they went over the wire.

:class:`AlignedOpusRecorder` is the compressed sibling of
:class:`media.sinks.stereo.AlignedStereoRecorder`: left = the user, right = the
business, each channel an independent mono Opus stream (channel mapping family 1,
two uncoupled streams, RFC 7845). Each leg's packets are stored as they were received
or sent: nothing is decoded or encoded, so a call costs a few microseconds per packet
to record, and the file takes what the legs' Opus takes (~0.24 MB per minute and leg at
32 kbit/s) instead of 5.8 MB per minute and channel of 48 kHz PCM.

The file's timeline is 20 ms slots on the recorder's clock. A leg's packet is placed
the way :class:`~media.sinks.stereo.AlignedLeg` places a frame (:class:`Anchor`: by
its timestamp, re-anchored on its arrival time when the two disagree by more than
``resync_s``), rounded to a slot. A slot where a leg has no packet (loss, DTX, a
pause) holds a 20 ms silence packet on that channel, so gaps stay where they happened
and each Ogg packet carries both legs' audio for the same 20 ms.

Every stream of a multistream packet must have the same duration. A leg whose packets
are not 20 ms (rare: WhatsApp and browsers send 20 ms) is switched to transcoding for
the rest of the call: its packets are decoded and encoded again as 20 ms packets
(counted in :attr:`OpusLeg.transcoded`).

The per-packet part (anchoring, the slots, each commit's Ogg packets) is
:class:`OpusRing`; where the C core (:mod:`media.rtpcore`) was built, its twin of that
class does it, with the same results (the tests hold the two to each other).

Crash safety is that of :class:`~media.sinks.ogg.OggOpusWriter`: slots older than
``max_delay_s`` (0.3 s) are committed in whole pages every ``commit_s`` (0.2 s: a page
and a ``write`` per call five times a second); a killed process leaves a file that
plays up to its last page, at most ~0.5 s before the kill (:func:`repair_ogg` cuts a
torn one).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ..frames import FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE
from .. import rtpcore
from ..opus import DEFAULT_SETTINGS, OpusEncoder, OpusSettings, silence_packet
from ..receiver import OpusDecoder
from .ogg import OggOpusWriter, opus_packet_samples, self_delimited
from .stereo import Anchor, AnchoredLeg, TwoLegRecording, default_clock

__all__ = ["AlignedOpusRecorder", "OpusLeg", "OpusRing"]

#: TOC bytes of a one-frame (code 0) 20 ms packet: nearly every packet of a call, framed
#: here without parsing. (Its self-delimiting length is one byte below 253 bytes.)
_PLAIN_20MS = bytes(toc & 3 == 0 and opus_packet_samples(bytes((toc,))) == FRAME_SAMPLES for toc in range(256))
_LENGTH_BYTE = [bytes((n,)) for n in range(252)]


#: What :meth:`OpusRing.packet` did with a packet.
PLACED, PUT_BACK, DROPPED, NOT_PLAIN = 0, 1, 2, 3


class OpusRing:
    """The slots of an :class:`AlignedOpusRecorder`: where each leg's packets are placed,
    and the commit of whole slots to the file (the per-packet part).

    This is the reference; the C core (:mod:`media.rtpcore`, ``OpusRing``) has the same
    interface and results and is used where it was built. ``write(packets)`` receives
    each commit's Ogg packets (left + right, 20 ms each), oldest first.

    Per channel (0 = left, kept self-delimited, 1 = right): :meth:`packet` places a
    packet by its ``pts`` and arrival ``at`` (:class:`~media.sinks.stereo.Anchor`);
    :meth:`emit` appends one at the leg's end (a transcoded leg); :meth:`leg` reads
    ``(packets, late, dropped, end, first_at, resyncs)``."""

    def __init__(self, ring_len: int, max_delay: int, commit_chunk: int, resync_samples: int, t0: float,
                 silence_left: bytes, silence_right: bytes, plain: bytes,
                 write: Callable[[list[bytes]], None]) -> None:
        self.ring_len = ring_len
        self.max_delay = max_delay
        self.commit_chunk = commit_chunk
        self.resync_samples = resync_samples
        self.t0 = t0
        self.silence = (silence_left, silence_right)
        self.plain = plain
        self.write = write
        self.committed = 0
        self.filled = [0, 0]
        self._slots: tuple[list[bytes | None], list[bytes | None]] = ([None] * ring_len, [None] * ring_len)
        self._anchors = (Anchor(), Anchor())
        self._ends = [0, 0]
        self._packets = [0, 0]
        self._late = [0, 0]
        self._dropped = [0, 0]

    def leg(self, channel: int) -> tuple[int, int, int, int, float | None, int]:
        anchor = self._anchors[channel]
        return (self._packets[channel], self._late[channel], self._dropped[channel], self._ends[channel],
                anchor.first_at, anchor.resyncs)

    def set_end(self, channel: int, end: int) -> None:
        self._ends[channel] = end

    def arrived(self, at: float) -> int:
        """``at`` (the recorder's clock) as a position on its timeline, in samples."""
        return round((at - self.t0) * SAMPLE_RATE)

    def anchor_place(self, channel: int, pts: int | None, at: float, end: int) -> int:
        """The leg's anchor's target for a frame (see :meth:`Anchor.place`)."""
        return self._anchors[channel].place(pts, at, self.arrived(at), end, self.resync_samples)

    def packet(self, channel: int, payload: bytes, pts: int | None, at: float, stored: bytes | None = None) -> int:
        """Place one 20 ms packet. Without ``stored`` (what the slot is to hold: the
        packet, self-delimited on the left), only a one-frame 20 ms packet shorter than
        253 bytes is taken (framed here); anything else returns :data:`NOT_PLAIN`."""
        if stored is None:
            if not payload or not self.plain[payload[0]] or len(payload) >= 253:
                return NOT_PLAIN
            stored = payload[:1] + _LENGTH_BYTE[len(payload) - 1] + payload[1:] if channel == 0 else payload
        end = self._ends[channel]
        slot = (self.anchor_place(channel, pts, at, end * FRAME_SAMPLES) + FRAME_SAMPLES // 2) // FRAME_SAMPLES
        if slot >= end:
            self._ends[channel] = self._place(channel, slot, stored, at)
            self._packets[channel] += 1
            return PLACED
        if self._put_back(channel, slot, stored):  # reordered: into its slot
            self._packets[channel] += 1
            return PUT_BACK
        self._dropped[channel] += 1  # its slot is taken (a duplicate) or already written
        return DROPPED

    def emit(self, channel: int, stored: bytes, now: float) -> None:
        """Append ``stored`` at the leg's end."""
        self._ends[channel] = self._place(channel, self._ends[channel], stored, now)
        self._packets[channel] += 1

    def _place(self, channel: int, slot: int, payload: bytes, now: float) -> int:
        """Put ``payload`` in ``slot`` (clamped to the commit point); returns the next
        slot. ``now``: the clock's time (what is older than ``max_delay`` slots is committed)."""
        committed = self.committed
        if slot < committed:
            slot = committed
            self._late[channel] += 1
        ring_len = self.ring_len
        if slot - committed >= ring_len:
            self.commit(slot - ring_len + 1)
        self._slots[channel][slot % ring_len] = payload
        horizon = int((now - self.t0) * SAMPLE_RATE) // FRAME_SAMPLES - self.max_delay
        committed = self.committed
        if horizon - committed >= self.commit_chunk:
            self.commit(min(horizon, committed + ring_len))
        return slot + 1

    def _put_back(self, channel: int, slot: int, payload: bytes) -> bool:
        """Put a reordered packet into its slot if that is still open and empty."""
        if slot < self.committed:
            return False
        slots = self._slots[channel]
        i = slot % self.ring_len
        if slots[i] is not None:
            return False
        slots[i] = payload
        return True

    def commit(self, upto: int) -> None:
        """Hand the slots before ``upto`` to ``write`` (silence where a leg had none)."""
        begin = self.committed
        if upto <= begin:
            return
        ring_len = self.ring_len
        lefts, rights = self._slots
        silent_left, silent_right = self.silence
        packets = []
        for slot in range(begin, upto):
            i = slot % ring_len
            left, right = lefts[i], rights[i]
            if left is None:
                left = silent_left
                self.filled[0] += 1
            else:
                lefts[i] = None
            if right is None:
                right = silent_right
                self.filled[1] += 1
            else:
                rights[i] = None
            packets.append(left + right)
        self.committed = upto
        self.write(packets)


def _leg_field(index: int, doc: str) -> property:
    """A counter of the leg's, read from its recorder's ring (:meth:`OpusRing.leg`)."""
    return property(lambda leg: leg._rec._ring.leg(leg.channel)[index], doc=doc)


class OpusLeg(AnchoredLeg):
    """One channel of an :class:`AlignedOpusRecorder`."""

    def __init__(self, recorder: AlignedOpusRecorder, channel: int, name: str) -> None:
        self._rec = recorder
        self.channel = channel
        self.name = name
        #: Packets decoded and encoded again (not 20 ms long), and undecodable ones.
        self.transcoded = 0
        self.undecodable = 0
        self._decoder: OpusDecoder | None = None
        self._encoder: OpusEncoder | None = None
        self._carry = np.empty(0, dtype=PCM_DTYPE)
        self._closed = False

    packets = _leg_field(0, "Packets placed (transcoded ones count once per 20 ms packet made).")
    late = _leg_field(1, "Packets that came later than the commit point and were placed at it.")
    dropped = _leg_field(2, "Duplicates, and reordered packets whose slot was already written.")
    _end = _leg_field(3, "The slot after this leg's last packet.")
    first_at = _leg_field(4, "When its first packet came (the recorder's clock), or None.")
    resyncs = _leg_field(5, "How often it was placed again by its arrival times.")

    def write_packet(self, payload: bytes, pts: int | None, at: float | None) -> None:
        """Place one Opus packet: ``pts`` on the leg's own timeline (48 kHz samples) or
        ``None`` (then end to end); ``at`` on the recorder's clock (``None``: now)."""
        rec = self._rec
        if self._closed or rec.closed or not payload:
            return
        if at is None:
            at = rec.clock()
        if self._decoder is None:
            ring = rec._ring
            if ring.packet(self.channel, payload, pts, at) != NOT_PLAIN:
                return
            try:
                framed = self_delimited(payload)  # (also proves the packet well formed)
            except ValueError:
                self.undecodable += 1
                return
            if opus_packet_samples(payload) == FRAME_SAMPLES:
                ring.packet(self.channel, payload, pts, at, framed if self.channel == 0 else payload)
                return
        self._transcode(payload, pts, at)

    def lane_ring(self):
        """Where a lean sender (:mod:`media.lean`) may place this leg's packets itself,
        as :meth:`write_packet` would: the C core's ring (right channel, packets that
        pass through as they are); ``None`` once closed (nothing to place); ``False``
        otherwise (the left channel, a leg that transcodes, the Python ring)."""
        rec = self._rec
        if self._closed or rec.closed:
            return None
        core = rtpcore.core
        if self.channel != 1 or self._decoder is not None or core is None or type(rec._ring) is not core.OpusRing:
            return False
        return rec._ring

    def write_pcm(self, pcm: np.ndarray, pts: int | None, at: float | None) -> None:
        """Place a 20 ms mono 48 kHz frame, encoded here: for a leg that has no packets
        to pass through (audio that does not come from, or go to, RTP as Opus)."""
        if self._closed or self._rec.closed:
            return
        if self._encoder is None:
            self._encoder = OpusEncoder(self._rec.settings)
        packet = self._encoder.encode(pcm)
        if packet is not None:
            self.write_packet(bytes(packet), pts, at)

    def _transcode(self, payload: bytes, pts: int | None, at: float) -> None:
        rec = self._rec
        if self._decoder is None:
            self._decoder = OpusDecoder()
            if self._encoder is None:
                self._encoder = OpusEncoder(rec.settings)
        pcm = self._decoder.decode(payload)
        if pcm is None:
            self.undecodable += 1
            if not self.transcoded:
                self._decoder = None  # (nothing decoded yet: the leg stays passed through)
            return
        self.transcoded += 1
        ring = rec._ring
        carry = self._carry
        end = self._end * FRAME_SAMPLES + carry.size
        target = ring.anchor_place(self.channel, pts, at, end)
        # (a target before the end is appended, in order)
        if target - end >= FRAME_SAMPLES // 2:  # a gap: finish the partial frame, start anew
            if carry.size:
                self._emit(np.concatenate([carry, np.zeros(FRAME_SAMPLES - carry.size, dtype=PCM_DTYPE)]), at)
                carry = carry[:0]
            ring.set_end(self.channel, max(self._end, (target + FRAME_SAMPLES // 2) // FRAME_SAMPLES))
        carry = np.concatenate([carry, pcm]) if carry.size else pcm
        while carry.size >= FRAME_SAMPLES:
            self._emit(carry[:FRAME_SAMPLES], at)
            carry = carry[FRAME_SAMPLES:]
        self._carry = carry.copy()

    def _emit(self, frame: np.ndarray, at: float) -> None:
        packet = self._encoder.encode(frame)
        if packet is not None:
            packet = bytes(packet)
            self._rec._ring.emit(self.channel, self_delimited(packet) if self.channel == 0 else packet, at)

    def close(self) -> None:
        self._closed = True


class AlignedOpusRecorder(TwoLegRecording):
    """A two-leg Ogg/Opus file aligned on one clock (see the module docstring).

    Args:
        path: the Ogg file (mode 0600).
        clock: seconds on a monotonic clock (the event loop's by default); ``t0`` is
            read from it at construction.
        resync_s / max_delay_s / commit_s: as for
            :class:`~media.sinks.stereo.AlignedStereoRecorder` (``commit_s`` 0.2 s here).
        settings: the encoder for silence packets and for transcoded legs.
        comments: Vorbis comments for the OpusTags header.
    """

    RING_S = 0.6

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] | None = None,
        resync_s: float = 0.1,
        max_delay_s: float = 0.3,
        commit_s: float = 0.2,
        settings: OpusSettings = DEFAULT_SETTINGS,
        comments: dict[str, str] | None = None,
        left: str = "user",
        right: str = "business",
    ) -> None:
        if not 0 < max_delay_s + commit_s < self.RING_S:
            raise ValueError(f"max_delay_s + commit_s must stay under the {self.RING_S} s ring")
        self.clock = clock or default_clock()
        self.t0 = self.clock()
        self.settings = settings
        self.resync_samples = round(resync_s * SAMPLE_RATE)
        silence = silence_packet(settings)
        self._file = OggOpusWriter(path, channels=2, streams=2, flush_interval_s=3600, comments=comments)
        self.path = self._file.path
        # (the left leg's packets are kept self-delimited, ready to be followed by the right's)
        core = rtpcore.core
        ring = OpusRing if core is None else core.OpusRing
        self._ring = ring(round(self.RING_S * SAMPLE_RATE / FRAME_SAMPLES),
                          round(max_delay_s * SAMPLE_RATE / FRAME_SAMPLES),
                          max(1, round(commit_s * SAMPLE_RATE / FRAME_SAMPLES)),
                          self.resync_samples, self.t0, self_delimited(silence), silence, _PLAIN_20MS,
                          self._write)
        self.left = OpusLeg(self, 0, left)
        self.right = OpusLeg(self, 1, right)
        self.closed = False

    @property
    def filled(self) -> list[int]:
        """Slots where a leg had nothing and got silence, per channel."""
        return list(self._ring.filled)

    @property
    def duration_s(self) -> float:
        return self._ring.committed * FRAME_SAMPLES / SAMPLE_RATE

    def _write(self, packets: list[bytes]) -> None:
        """One commit's Ogg packets into the file, closing a page."""
        self._file.write_packets(packets, FRAME_SAMPLES)
        self._file.flush()

    def _commit(self, upto: int) -> None:
        self._ring.commit(upto)

    def _end(self) -> int:
        return max(self.left._end, self.right._end)
