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
from ..opus import DEFAULT_SETTINGS, OpusEncoder, OpusSettings, silence_packet
from ..receiver import OpusDecoder
from .ogg import OggOpusWriter, opus_packet_samples, self_delimited
from .stereo import AnchoredLeg, TwoLegRecording, default_clock

__all__ = ["AlignedOpusRecorder", "OpusLeg"]

#: TOC bytes of a one-frame (code 0) 20 ms packet: nearly every packet of a call, framed
#: here without parsing. (Its self-delimiting length is one byte below 253 bytes.)
_PLAIN_20MS = frozenset(toc for toc in range(256) if toc & 3 == 0 and opus_packet_samples(bytes((toc,))) == FRAME_SAMPLES)
_LENGTH_BYTE = [bytes((n,)) for n in range(252)]


class OpusLeg(AnchoredLeg):
    """One channel of an :class:`AlignedOpusRecorder`."""

    def __init__(self, recorder: AlignedOpusRecorder, channel: int, name: str) -> None:
        super().__init__()
        self._rec = recorder
        self.channel = channel
        self.name = name
        #: Packets placed (transcoded ones count once per 20 ms packet made).
        self.packets = 0
        #: Packets that came later than the commit point and were placed at it.
        self.late = 0
        #: Duplicates, and reordered packets whose slot was already written.
        self.dropped = 0
        #: Packets decoded and encoded again (not 20 ms long), and undecodable ones.
        self.transcoded = 0
        self.undecodable = 0
        self._end = 0  # the slot after this leg's last packet
        self._decoder: OpusDecoder | None = None
        self._encoder: OpusEncoder | None = None
        self._carry = np.empty(0, dtype=PCM_DTYPE)
        self._closed = False

    def write_packet(self, payload: bytes, pts: int | None, at: float | None) -> None:
        """Place one Opus packet: ``pts`` on the leg's own timeline (48 kHz samples) or
        ``None`` (then end to end); ``at`` on the recorder's clock (``None``: now)."""
        rec = self._rec
        if self._closed or rec.closed or not payload:
            return
        if at is None:
            at = rec.clock()
        arrived = round((at - rec.t0) * SAMPLE_RATE)
        if self._decoder is None:
            if payload[0] in _PLAIN_20MS and len(payload) < 253:
                if self.channel == 0:
                    payload = payload[:1] + _LENGTH_BYTE[len(payload) - 1] + payload[1:]
            else:
                try:
                    framed = self_delimited(payload)  # (also proves the packet well formed)
                except ValueError:
                    self.undecodable += 1
                    return
                if opus_packet_samples(payload) != FRAME_SAMPLES:
                    self._transcode(payload, pts, at, arrived)
                    return
                if self.channel == 0:
                    payload = framed
            slot = (self.anchor.place(pts, at, arrived, self._end * FRAME_SAMPLES, rec.resync_samples)
                    + FRAME_SAMPLES // 2) // FRAME_SAMPLES
            if slot >= self._end:
                self._end = rec._place(self.channel, slot, payload, at)
                self.packets += 1
            elif rec._put_back(self.channel, slot, payload):  # reordered: into its slot
                self.packets += 1
            else:  # its slot is taken (a duplicate) or already written
                self.dropped += 1
            return
        self._transcode(payload, pts, at, arrived)

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

    def _transcode(self, payload: bytes, pts: int | None, at: float, arrived: int) -> None:
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
        carry = self._carry
        end = self._end * FRAME_SAMPLES + carry.size
        target = self.anchor.place(pts, at, arrived, end, rec.resync_samples)
        # (a target before the end is appended, in order)
        if target - end >= FRAME_SAMPLES // 2:  # a gap: finish the partial frame, start anew
            if carry.size:
                self._emit(np.concatenate([carry, np.zeros(FRAME_SAMPLES - carry.size, dtype=PCM_DTYPE)]), at)
                carry = carry[:0]
            self._end = max(self._end, (target + FRAME_SAMPLES // 2) // FRAME_SAMPLES)
        carry = np.concatenate([carry, pcm]) if carry.size else pcm
        while carry.size >= FRAME_SAMPLES:
            self._emit(carry[:FRAME_SAMPLES], at)
            carry = carry[FRAME_SAMPLES:]
        self._carry = carry.copy()

    def _emit(self, frame: np.ndarray, at: float) -> None:
        packet = self._encoder.encode(frame)
        if packet is not None:
            packet = bytes(packet)
            self._end = self._rec._place(self.channel, self._end,
                                         self_delimited(packet) if self.channel == 0 else packet, at)
            self.packets += 1

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
        self._max_delay = round(max_delay_s * SAMPLE_RATE / FRAME_SAMPLES)
        self._commit_chunk = max(1, round(commit_s * SAMPLE_RATE / FRAME_SAMPLES))
        self._ring_len = round(self.RING_S * SAMPLE_RATE / FRAME_SAMPLES)
        # (the left leg's packets are kept self-delimited, ready to be followed by the right's)
        self._slots: tuple[list[bytes | None], list[bytes | None]] = (
            [None] * self._ring_len, [None] * self._ring_len)
        self._committed = 0  # slots written to the file
        silence = silence_packet(settings)
        self._silence = (self_delimited(silence), silence)
        self._file = OggOpusWriter(path, channels=2, streams=2, flush_interval_s=3600, comments=comments)
        self.path = self._file.path
        self.left = OpusLeg(self, 0, left)
        self.right = OpusLeg(self, 1, right)
        #: Slots where a leg had nothing and got silence, per channel.
        self.filled = [0, 0]
        self.closed = False

    @property
    def duration_s(self) -> float:
        return self._committed * FRAME_SAMPLES / SAMPLE_RATE

    def _place(self, channel: int, slot: int, payload: bytes, now: float) -> int:
        """Put ``payload`` in ``slot`` (clamped to the commit point); returns the next
        slot. ``now``: the clock's time (what is older than ``max_delay_s`` is committed)."""
        committed = self._committed
        if slot < committed:
            slot = committed
            self.legs[channel].late += 1
        ring_len = self._ring_len
        if slot - committed >= ring_len:
            self._commit(slot - ring_len + 1)
        self._slots[channel][slot % ring_len] = payload
        horizon = int((now - self.t0) * SAMPLE_RATE) // FRAME_SAMPLES - self._max_delay
        committed = self._committed
        if horizon - committed >= self._commit_chunk:
            self._commit(min(horizon, committed + ring_len))
        return slot + 1

    def _put_back(self, channel: int, slot: int, payload: bytes) -> bool:
        """Put a reordered packet into its slot if that is still open and empty."""
        if slot < self._committed:
            return False
        slots = self._slots[channel]
        i = slot % self._ring_len
        if slots[i] is not None:
            return False
        slots[i] = payload
        return True

    def _commit(self, upto: int) -> None:
        begin = self._committed
        if upto <= begin:
            return
        ring_len = self._ring_len
        lefts, rights = self._slots
        silent_left, silent_right = self._silence
        write = self._file.write_packet
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
            write(left + right, FRAME_SAMPLES)
        self._committed = upto
        self._file.flush()

    def _end(self) -> int:
        return max(self.left._end, self.right._end)
