"""DTMF for a call: RFC 4733 telephone-events in and out, in-band tones in and out.

aiortc knows nothing about ``telephone-event``: it does not negotiate it, drops incoming
packets whose payload type has no codec, and has no way to send them. This module adds
it around a :class:`~media.peer.MediaPeer` without forking aiortc:

* **SDP** — text work in :mod:`media.sdp` (:func:`~media.sdp.add_telephone_event`,
  :func:`~media.sdp.telephone_event_pt`): our offers carry ``telephone-event/8000``
  (PT 126 unless taken), our answers carry it when the remote offer did, and the PT is
  learned from the remote description. WhatsApp uses 8000 Hz only, and PT 126 even when
  the SDP leaves it out, so we *receive* on 126 when nothing was negotiated.
* **Receive** — :class:`Rfc4733Decoder` turns the repeated update/end packets of each
  event into exactly one :class:`DtmfEvent` per event timestamp, in order, with its
  duration; an event whose end packets were all lost is reported when the next event
  starts or after :attr:`Rfc4733Decoder.timeout_s` without packets.
* **Send** — :meth:`PeerDtmf.send` (``MediaPeer.send_dtmf``) sends each digit on the
  audio SSRC by *substituting* the audio packets aiortc sends every 20 ms: a packet due
  while an event is on keeps its sequence number (and header extensions) but gets the
  telephone-event payload type, the event's timestamp and the RFC 4733 payload. So
  sequence numbers stay one gap-free space shared with the audio, timestamps stay on the
  audio clock, the event is paced by the audio clock, and no audio is sent while an
  event is on. The first packet carries the marker bit; updates grow the duration by
  20 ms; the end packet goes out three times (E bit, same duration).
* **In band** — :class:`GoertzelDtmfDetector` (a :class:`~media.frames.Sink`) finds
  dual tones in decoded audio; :class:`DtmfToneSource` (a :class:`~media.frames.Source`)
  plays them.

Timing: the event timestamp is the RTP timestamp of the first substituted audio packet
(48 kHz Opus clock) while the duration field counts 8 kHz telephone-event ticks, as
libwebrtc does when telephone-event/8000 rides along Opus.

aiortc internals relied on, all reached through :mod:`media.aiortc_hooks` (checked by
:func:`aiortc_problems` when a peer is wired, and by ``tests/test_dtmf.py``, which also
checks the call sites in aiortc's source):

1. ``RTCDtlsTransport._handle_rtp_data(data, arrival_time_ms)`` — a coroutine the
   transport calls through ``self.`` with each decrypted RTP packet (never RTCP) before
   routing it to a receiver. We wrap it *on the instance* and keep telephone-event
   packets (the router would drop them: their PT is registered for no receiver).
2. ``RTCDtlsTransport._send_rtp(data)`` — a coroutine every RTP/RTCP packet of the
   transceiver goes through, unencrypted, via ``self.transport._send_rtp``
   (``RTCRtpSender._run_rtp`` sends one packet per 20 ms audio frame). We wrap it on the
   instance to substitute packets; encryption happens inside the original.
3. ``RTCRtpSender._ssrc`` — the audio SSRC (also what aiortc's router keys on).

Side effects: aiortc's receiver never sees telephone-event packets, so the audio
packets after them are renumbered to close the sequence gap (otherwise its jitter buffer
stalls then drops buffered audio, and its RTCP reports count the events as lost); our
receiver reports therefore name a highest sequence number behind the sender's by the
number of telephone-event packets received. aiortc keeps a history of sent packets for
NACKs: a retransmission of a sequence number we substituted is dropped rather than
resent as audio (aiortc does not negotiate NACK for audio anyway).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import aiortc_hooks, sdp as sdp_rules
from .rtpseq import newer, serial_delta
from .frames import FRAME_MS, PCM_DTYPE, SAMPLE_RATE

__all__ = [
    "DTMF_DIGITS",
    "DtmfError",
    "DtmfEvent",
    "DtmfToneSource",
    "GoertzelDtmfDetector",
    "PeerDtmf",
    "Rfc4733Decoder",
    "TelephoneEvent",
    "aiortc_problems",
    "pack_event",
    "unpack_event",
]

log = logging.getLogger(__name__)

#: The 16 DTMF digits, indexed by their RFC 4733 event code (0-15).
DTMF_DIGITS = "0123456789*#ABCD"
_EVENT_OF = {digit: code for code, digit in enumerate(DTMF_DIGITS)}
#: RFC 4733 clock rate on WhatsApp.
CLOCK_RATE = sdp_rules.DTMF_CLOCK_RATE
#: telephone-event ticks per 20 ms packet.
TICKS_PER_PACKET = CLOCK_RATE * FRAME_MS // 1000
#: Times the end packet of an event is sent (RFC 4733 §2.5.1.4).
END_PACKETS = 3
#: Volume field we send: -10 dBm0.
DEFAULT_VOLUME = 10
#: Largest duration the 16-bit field holds at 8 kHz, in whole 20 ms packets.
MAX_DURATION_MS = 0xFFFF // TICKS_PER_PACKET * FRAME_MS

# Row / column frequencies and the keypad they index.
_ROWS = (697.0, 770.0, 852.0, 941.0)
_COLS = (1209.0, 1336.0, 1477.0, 1633.0)
_KEYPAD = ("123A", "456B", "789C", "*0#D")


class DtmfError(RuntimeError):
    """DTMF cannot be sent (not negotiated, media not wired, or the call ended)."""


@dataclass(frozen=True, slots=True)
class DtmfEvent:
    """One digit received. ``at`` is the monotonic clock (``time.monotonic``, the event
    loop's clock) when it began: first packet (RFC 4733) or first tone block (in band)."""

    digit: str
    duration_ms: int
    source: Literal["rfc4733", "inband"]
    at: float


def normalize_digits(digits: str) -> str:
    """Upper-case ``digits`` and check each is one of :data:`DTMF_DIGITS`."""
    if not isinstance(digits, str) or not digits:
        raise ValueError("digits must be a non-empty string")
    out = digits.upper()
    bad = sorted({d for d in out if d not in _EVENT_OF})
    if bad:
        raise ValueError(f"not DTMF digits: {''.join(bad)!r} (allowed: {DTMF_DIGITS})")
    return out


# -- RFC 4733 payload ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """One RFC 4733 event block: ``duration`` is in clock ticks (8 kHz here)."""

    event: int
    end: bool
    volume: int
    duration: int

    @property
    def digit(self) -> str | None:
        return DTMF_DIGITS[self.event] if self.event < len(DTMF_DIGITS) else None


def pack_event(event: int, *, end: bool = False, volume: int = DEFAULT_VOLUME, duration: int = 0) -> bytes:
    """The 4-byte RFC 4733 payload: event, E|R|volume, duration."""
    if not 0 <= event <= 255 or not 0 <= volume <= 63 or not 0 <= duration <= 0xFFFF:
        raise ValueError(f"telephone-event out of range: {event=} {volume=} {duration=}")
    return struct.pack("!BBH", event, (0x80 if end else 0) | volume, duration)


def unpack_event(payload: bytes) -> TelephoneEvent:
    """Read the first event block of an RFC 4733 payload. Raises ``ValueError``."""
    if len(payload) < 4:
        raise ValueError(f"telephone-event payload is {len(payload)} bytes, need 4")
    event, flags, duration = struct.unpack_from("!BBH", payload)
    return TelephoneEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


#: A timestamp at most this far behind the newest event's is a late packet; further
#: back (about 22 s at 48 kHz) it is taken as the sender's timestamps restarting.
_MAX_LATE_TICKS = 1 << 20


def _late(timestamp: int, newest: int) -> bool:
    return 0 < -serial_delta(timestamp, newest, 32) <= _MAX_LATE_TICKS


@dataclass(slots=True)
class _Pending:
    key: tuple[int, int]
    digit: str
    duration: int
    at: float
    last_seen: float


class Rfc4733Decoder:
    """Received telephone-event packets in, one :class:`DtmfEvent` per event out.

    Events are keyed by ``(ssrc, RTP timestamp)``: every packet of one event carries the
    same timestamp, so repeated updates and the three end packets yield one digit. A
    digit is reported when its first end packet arrives; if all end packets are lost,
    when a newer event starts or :meth:`expire` runs ``timeout_s`` after its last
    packet. Packets of events already reported, or older than the pending one, are
    ignored. Pure and synchronous: the caller passes the clock.
    """

    def __init__(self, *, clock_rate: int = CLOCK_RATE, timeout_s: float = 0.5, history: int = 64):
        self.clock_rate = clock_rate
        self.timeout_s = timeout_s
        self._pending: _Pending | None = None
        self._done: collections.deque[tuple[int, int]] = collections.deque(maxlen=history)
        self._last: tuple[int, int] | None = None  # newest key seen (ssrc, ts)

    @property
    def deadline(self) -> float | None:
        """When :meth:`expire` would report the pending event, if any."""
        return None if self._pending is None else self._pending.last_seen + self.timeout_s

    def feed(self, payload: bytes, *, timestamp: int, now: float, ssrc: int = 0) -> list[DtmfEvent]:
        try:
            block = unpack_event(payload)
        except ValueError:
            return []
        digit = block.digit
        key = (ssrc, timestamp)
        if digit is None or key in self._done:
            return []
        last = self._last
        if last is not None and last[0] == ssrc and key != last and _late(timestamp, last[1]):
            return []  # a reordered packet of an older event
        self._last = key
        out: list[DtmfEvent] = []
        pending = self._pending
        if pending is not None and pending.key != key:
            out.append(self._finish())
            pending = None
        if pending is None:
            pending = self._pending = _Pending(key, digit, 0, now, now)
        pending.duration = max(pending.duration, block.duration)
        pending.last_seen = now
        if block.end:
            out.append(self._finish())
        return out

    def expire(self, now: float) -> list[DtmfEvent]:
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            return [self._finish()]
        return []

    def flush(self) -> list[DtmfEvent]:
        """Report the pending event now (the call is ending)."""
        return [self._finish()] if self._pending is not None else []

    def _finish(self) -> DtmfEvent:
        pending = self._pending
        assert pending is not None
        self._pending = None
        self._done.append(pending.key)
        duration_ms = round(pending.duration * 1000 / self.clock_rate)
        return DtmfEvent(pending.digit, duration_ms, "rfc4733", pending.at)


# -- RTP bytes -------------------------------------------------------------------------


def _rtp_header_length(data: bytes) -> int:
    """Length of an RTP packet's header (fixed part, CSRCs, extension). ``ValueError``
    if ``data`` is not a well-formed RTP version 2 packet."""
    if len(data) < 12 or data[0] >> 6 != 2:
        raise ValueError("not an RTP packet")
    length = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10:
        if len(data) < length + 4:
            raise ValueError("truncated RTP header extension")
        length += 4 + 4 * int.from_bytes(data[length + 2 : length + 4], "big")
    if len(data) < length:
        raise ValueError("truncated RTP header")
    return length


def _rtp_payload(data: bytes) -> bytes:
    start = _rtp_header_length(data)
    end = len(data)
    if data[0] & 0x20:  # padding: the last byte counts it
        end -= data[-1]
    if end < start:
        raise ValueError("bad RTP padding")
    return data[start:end]


def _substitute(audio: bytes, *, payload_type: int, marker: bool, timestamp: int, payload: bytes) -> bytes:
    """``audio``'s header (version, sequence number, SSRC, CSRCs, extensions) with
    another payload type, marker, timestamp and payload; padding dropped."""
    header = bytearray(audio[: _rtp_header_length(audio)])
    header[0] &= 0xDF
    header[1] = (0x80 if marker else 0) | payload_type
    header[4:8] = timestamp.to_bytes(4, "big")
    return bytes(header) + payload


def _is_rtcp(data: bytes) -> bool:
    return len(data) >= 2 and 192 <= data[1] <= 223  # RFC 5761 §4


# -- aiortc wiring ---------------------------------------------------------------------

def aiortc_problems(sender=None) -> list[str]:
    """What is missing from the aiortc internals this module relies on (empty: fine).
    ``sender``: an ``RTCRtpSender`` instance to check as well."""
    return aiortc_hooks.problems(sender=sender, scope="transport")


class _Tick:
    """What to do with one outgoing 20 ms audio packet while DTMF is queued."""

    __slots__ = ("event", "first", "end", "duration", "event_id", "owner", "last")

    def __init__(self, event, first, end, duration, event_id, owner, last=False):
        self.event: int | None = event  # None: let the audio packet through (a gap)
        self.first: bool = first
        self.end: bool = end
        self.duration: int = duration
        self.event_id: int = event_id
        self.owner: asyncio.Future = owner
        self.last: bool = last  # resolve ``owner`` once this packet is out


class _RxStream:
    """Receive state of one SSRC."""

    __slots__ = ("high", "taken", "recent")

    def __init__(self) -> None:
        self.high: int | None = None  # newest sequence number seen
        self.taken = 0  # telephone-event packets taken out (in order)
        self.recent: collections.deque[int] = collections.deque(maxlen=512)


class PeerDtmf:
    """The DTMF side of one :class:`~media.peer.MediaPeer` (used through its
    ``send_dtmf``, ``on_dtmf`` and ``dtmf_payload_type``)."""

    def __init__(self, label: str = "peer", *, end_timeout_s: float = 0.5) -> None:
        self.label = label
        #: Negotiated telephone-event/8000 payload type (remote description), or None.
        self.pt: int | None = None
        #: The payload type put in our last offer.
        self.offered_pt: int | None = None
        self.problem: str | None = None
        self._other_pts: set[int] = set()
        self._callbacks: list[Callable[[DtmfEvent], None]] = []
        self._decoder = Rfc4733Decoder(timeout_s=end_timeout_s)
        self._timer: asyncio.TimerHandle | None = None
        self._sender = None
        self._ssrc: bytes | None = None
        self._send_transport = None
        self._receive_transport = None
        self._ticks: collections.deque[_Tick] = collections.deque()
        self._event_ts = 0
        self._current_event: int | None = None
        self._event_ids = 0
        self._last_seq: int | None = None
        self._replaced: collections.deque[int] = collections.deque(maxlen=256)
        # Receive side, per SSRC: telephone-event packets taken out of the audio
        # sequence space (see _close_gap).
        self._rx: dict[int, _RxStream] = {}  # by SSRC
        self._closed = False
        # Counters (also show the hooks are live).
        self.rtp_sent = 0
        self.rtp_received = 0
        #: Called when digits are queued (a lean sender sending ahead stops for them).
        self.on_queued: Callable[[], None] | None = None
        self.packets_sent = 0
        self.packets_received = 0
        self.events_sent = 0
        self.events_received = 0

    # -- SDP ---------------------------------------------------------------------------

    def shape_local_sdp(self, sdp: str, kind: str) -> str:
        """Add telephone-event to our offer, or to our answer when the offer had it."""
        if kind == "offer":
            sdp = sdp_rules.add_telephone_event(sdp, self.offered_pt or sdp_rules.TELEPHONE_EVENT_PT)
            self.offered_pt = sdp_rules.telephone_event_pt(sdp)
        elif self.pt is not None:
            sdp = sdp_rules.add_telephone_event(sdp, self.pt)
        return sdp

    def remote_description(self, sdp: str, transceivers) -> None:
        """Learn the payload type from an applied remote offer or answer, and wire the
        audio transceiver's transport (once per transport)."""
        self.pt = sdp_rules.telephone_event_pt(sdp)
        audio = sdp_rules.parse(sdp).audio
        self._other_pts = set(audio.formats if audio else ()) - {self.pt}
        transceiver = next((t for t in transceivers if t.kind == "audio"), None)
        if transceiver is not None:
            self._attach(transceiver)

    @property
    def receive_pt(self) -> int | None:
        """The payload type telephone-events are taken from: the negotiated one, else
        126 (WhatsApp uses it even when the SDP leaves telephone-event out) unless
        another codec has it."""
        if self.pt is not None:
            return self.pt
        pt = sdp_rules.TELEPHONE_EVENT_PT
        return None if pt in self._other_pts else pt

    # -- hooks -------------------------------------------------------------------------

    def _attach(self, transceiver) -> None:
        sender, receiver = transceiver.sender, transceiver.receiver
        problems = aiortc_problems(sender)
        if problems:
            self.problem = "aiortc internals changed: " + "; ".join(problems)
            log.error("%s: DTMF disabled, %s", self.label, self.problem)
            return
        self._sender = sender
        self._ssrc = aiortc_hooks.sender_ssrc(sender).to_bytes(4, "big")
        if receiver.transport is not self._receive_transport:
            self._receive_transport = receiver.transport
            aiortc_hooks.wrap_transport(receiver.transport, "_handle_rtp_data", self._hooked_handle_rtp_data)
        if sender.transport is not self._send_transport:
            self._send_transport = sender.transport
            aiortc_hooks.wrap_transport(sender.transport, "_send_rtp", self._hooked_send_rtp)

    async def _hooked_handle_rtp_data(self, original, data: bytes, arrival_time_ms: int) -> None:
        data = self.incoming(data)
        if data is not None:
            await original(data, arrival_time_ms=arrival_time_ms)

    def incoming(self, data: bytes) -> bytes | None:
        """A received RTP packet (clear) as the audio path should see it: ``None`` when it
        was a telephone-event (taken here), renumbered when events were taken before it."""
        self.rtp_received += 1
        if len(data) < 12:
            return data
        return self._incoming(data, int.from_bytes(data[8:12], "big"), int.from_bytes(data[2:4], "big"),
                              data[1] & 0x7F)

    def incoming_parsed(self, data: bytes, packet) -> bytes | None:
        """:meth:`incoming` for a packet parsed already (``packet``: its header fields,
        a :class:`media.lean.RtpView`)."""
        self.rtp_received += 1
        return self._incoming(data, packet.ssrc, packet.sequence_number, packet.payload_type)

    def _incoming(self, data: bytes, ssrc: int, seq: int, pt: int) -> bytes | None:
        rx = self._rx
        stream = rx.get(ssrc)
        if stream is None:
            if len(rx) >= 8:
                rx.pop(next(iter(rx)))
            stream = rx[ssrc] = _RxStream()
        high = stream.high
        newest = high is None or ((seq - high + 0x8000) & 0xFFFF) > 0x8000  # (newer(seq, high, 16))
        if newest:
            stream.high = seq
        if pt == self.receive_pt:
            if newest:
                stream.taken += 1
                stream.recent.append(seq)
            self._on_telephone_event(data)
            return None  # aiortc has no receiver for this payload type: it would drop it
        if stream.taken:
            data = self._close_gap(stream, data, seq, newest)
        return data

    @staticmethod
    def _close_gap(stream: _RxStream, data: bytes, seq: int, newest: bool) -> bytes:
        """Renumber an audio packet as if the telephone-event packets before it were
        not in the stream: aiortc's jitter buffer would take their sequence numbers for
        lost audio (stalling, then dropping buffered frames) and its RTCP reports would
        count them lost. Only telephone-event packets that arrived in order are taken
        out, so a reordered one leaves a one-packet gap, never a duplicate."""
        taken = stream.taken
        if not newest:  # a late audio packet: only events before it count
            taken -= sum(1 for d in stream.recent if newer(d, seq, 16))
        if not taken:
            return data
        return data[:2] + ((seq - taken) & 0xFFFF).to_bytes(2, "big") + data[4:]

    def _on_telephone_event(self, data: bytes) -> None:
        try:
            payload = _rtp_payload(data)
        except ValueError:
            return
        self.packets_received += 1
        now = time.monotonic()
        events = self._decoder.feed(
            payload,
            timestamp=int.from_bytes(data[4:8], "big"),
            ssrc=int.from_bytes(data[8:12], "big"),
            now=now,
        )
        for event in events:
            self.events_received += 1
            self.emit(event)
        self._schedule_expiry()

    def _schedule_expiry(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self._decoder.deadline
        if deadline is not None and not self._closed:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        for event in self._decoder.expire(time.monotonic()):
            self.events_received += 1
            self.emit(event)
        self._schedule_expiry()

    async def _hooked_send_rtp(self, original, data: bytes) -> None:
        data, tick = self.outgoing(data)
        if data is None:
            return
        try:
            await original(data)
        except Exception as exc:
            if tick is not None and tick.event is not None and not tick.owner.done():
                tick.owner.set_exception(DtmfError(f"sending DTMF failed: {exc}"))
            raise
        self.sent(tick)

    def outgoing(self, data: bytes) -> tuple[bytes | None, _Tick | None]:
        """An RTP or RTCP packet (clear) on its way out, as it should go (``None``: drop
        it), and the DTMF tick it carries: pass that to :meth:`sent` once it is out."""
        ssrc = self._ssrc
        if ssrc is not None and len(data) >= 12 and data[8:12] == ssrc and not _is_rtcp(data):
            self.rtp_sent += 1
            return self._outgoing(data)
        return data, None

    @property
    def sending(self) -> bool:
        """Whether an event is queued for our audio packets to carry (else :meth:`passed`
        is all a sender that owns its sequence numbers owes us per packet)."""
        return bool(self._ticks)

    def passed(self, seq: int, packets: int = 1) -> None:
        """Our audio packets up to ``seq`` (``packets`` of them) went out untouched (the
        lean path's cheap :meth:`outgoing` while :attr:`sending` is false)."""
        self.rtp_sent += packets
        self._last_seq = seq

    def sent(self, tick: _Tick | None) -> None:
        if tick is not None and tick.last and not tick.owner.done():
            tick.owner.set_result(None)

    def _outgoing(self, data: bytes) -> tuple[bytes | None, _Tick | None]:
        """Our audio packet ``data`` as it should go out (None: drop it), and the tick
        it carried."""
        seq = int.from_bytes(data[2:4], "big")
        if self._last_seq is not None and not newer(seq, self._last_seq, 16):
            # aiortc resending from its history: never resend audio over a DTMF packet.
            return (None if seq in self._replaced else data), None
        self._last_seq = seq
        if not self._ticks or (data[1] & 0x7F) == self.pt:
            return data, None
        tick = self._ticks.popleft()
        if tick.event is None:
            return data, tick
        if tick.first:
            self._event_ts = int.from_bytes(data[4:8], "big")
            self._current_event = tick.event_id
            self.events_sent += 1
        self._replaced.append(seq)
        self.packets_sent += 1
        payload = pack_event(tick.event, end=tick.end, duration=tick.duration)
        out = _substitute(
            data, payload_type=self.pt, marker=tick.first, timestamp=self._event_ts, payload=payload
        )
        return out, tick

    # -- API ---------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[DtmfEvent], None]) -> Callable[[], None]:
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def emit(self, event: DtmfEvent) -> None:
        log.debug("%s: DTMF %s (%s, %d ms)", self.label, event.digit, event.source, event.duration_ms)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                log.exception("%s: DTMF callback failed", self.label)

    async def send(self, digits: str, duration_ms: int, gap_ms: int, ended: asyncio.Future) -> None:
        """Queue ``digits`` and wait until the last end packet is out (see
        ``MediaPeer.send_dtmf``)."""
        digits = normalize_digits(digits)
        if not (40 <= duration_ms <= MAX_DURATION_MS):
            raise ValueError(f"duration_ms must be 40..{MAX_DURATION_MS}, got {duration_ms}")
        if not 0 <= gap_ms <= 10_000:
            raise ValueError(f"gap_ms must be 0..10000, got {gap_ms}")
        if self.problem:
            raise DtmfError(f"DTMF is unavailable: {self.problem}")
        if self.pt is None:
            raise DtmfError(
                "cannot send DTMF: the remote SDP did not negotiate telephone-event/8000 (RFC 4733)"
                if self._sender is not None
                else "cannot send DTMF before the remote description is applied"
            )
        if self._closed or ended.done():
            raise DtmfError("cannot send DTMF: the call's media has ended")
        owner = asyncio.get_running_loop().create_future()
        packets = math.ceil(duration_ms / FRAME_MS)
        gap = math.ceil(gap_ms / FRAME_MS)
        for index, digit in enumerate(digits):
            self._event_ids += 1
            code, event_id = _EVENT_OF[digit], self._event_ids
            for k in range(packets - 1):
                self._ticks.append(_Tick(code, k == 0, False, (k + 1) * TICKS_PER_PACKET, event_id, owner))
            for k in range(END_PACKETS):
                first, last = packets == 1 and k == 0, index == len(digits) - 1 and k == END_PACKETS - 1
                duration = packets * TICKS_PER_PACKET
                self._ticks.append(_Tick(code, first, True, duration, event_id, owner, last))
            for _ in range(gap):
                self._ticks.append(_Tick(None, False, False, 0, event_id, owner))
        if self.on_queued is not None:
            self.on_queued()
        try:
            await asyncio.wait({owner, ended}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._drop(owner)
            raise
        if owner.done() and owner.exception() is None:
            return
        self._drop(owner)
        if owner.done():
            raise owner.exception()
        raise DtmfError(f"the call's media ended before the DTMF was sent ({ended.result()})")

    def _drop(self, owner: asyncio.Future) -> None:
        """Forget ``owner``'s ticks except the rest of an event already started (its
        end packets must still go out, or the far side hears a stuck digit)."""
        current = self._current_event
        self._ticks = collections.deque(
            t for t in self._ticks if t.owner is not owner or (t.event_id == current and t.event is not None)
        )
        if not owner.done():
            owner.cancel()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for event in self._decoder.flush():
            self.events_received += 1
            self.emit(event)
        for tick in self._ticks:
            if not tick.owner.done():
                tick.owner.set_exception(DtmfError("the call's media ended before the DTMF was sent"))
                tick.owner.exception()  # retrieved: no "never retrieved" warning
        self._ticks.clear()

    def release(self) -> None:
        """After :meth:`close`: forget subscribers and aiortc objects (the hooks on
        the call's transports go with them)."""
        self.close()
        self._callbacks = []
        self._sender = self._send_transport = self._receive_transport = None
        self._rx.clear()


# -- in-band tones ---------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _dft_basis(sample_rate: int, length: int) -> np.ndarray:
    """``(length, 16)``: cosines then sines of the 8 DTMF frequencies."""
    t = np.arange(length, dtype=np.float64) / sample_rate
    arg = 2 * np.pi * t[:, None] * np.asarray(_ROWS + _COLS)[None, :]
    basis = np.concatenate([np.cos(arg), np.sin(arg)], axis=1).astype(np.float32)
    basis.flags.writeable = False
    return basis


class GoertzelDtmfDetector:
    """In-band DTMF detection: a :class:`~media.frames.Sink` reporting
    :class:`DtmfEvent` (``source="inband"``) through ``on_digit`` and :attr:`events`.

    Audio (any rate that is a multiple of 50 Hz, channels averaged) is cut into
    ``block_ms`` blocks and each block's power at the 8 DTMF frequencies is measured
    in one matrix product: the single-bin DFT at each exact frequency, i.e. what a
    Goertzel filter computes, for every frequency and block at once. A block holds a
    digit when:

    * the strongest row and column tones are each at least ``min_level_dbfs`` (per-tone
      RMS, dBFS as in :mod:`media.analysis`: a full-scale sine is -3 dBFS);
    * the twist is within limits: row louder than column by at most
      ``max_normal_twist_db``, column louder by at most ``max_reverse_twist_db``;
    * each is the clear winner of its group, ``min_peak_ratio_db`` above the runner-up;
    * together they hold at least ``min_tone_fraction`` of the block's energy (speech,
      music and noise spread theirs).

    A digit is reported once, when it ends (``min_off_ms`` without it, or another
    digit), if it lasted ``min_on_ms``; its duration is the blocks it was seen in. A
    single missed block inside a tone is bridged; two equal digits need a gap of
    ``min_off_ms`` to count twice.
    """

    #: DTMF's tones are under 1.7 kHz: a peer whose other readers want less than
    #: 48 kHz decodes at 8 kHz for it (see :meth:`media.peer.MediaPeer.add_sink`).
    pcm_rate = 8000

    def __init__(
        self,
        on_digit: Callable[[DtmfEvent], None] | None = None,
        *,
        block_ms: int = FRAME_MS,
        min_level_dbfs: float = -36.0,
        max_normal_twist_db: float = 8.0,
        max_reverse_twist_db: float = 6.0,
        min_peak_ratio_db: float = 8.0,
        min_tone_fraction: float = 0.7,
        min_on_ms: int = 40,
        min_off_ms: int = 40,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_digit = on_digit
        self.block_ms = block_ms
        self.min_level = 10 ** (min_level_dbfs / 10)
        self.normal_twist = 10 ** (max_normal_twist_db / 10)
        self.reverse_twist = 10 ** (max_reverse_twist_db / 10)
        self.peak_ratio = 10 ** (min_peak_ratio_db / 10)
        self.min_tone_fraction = min_tone_fraction
        self.min_on_blocks = max(1, math.ceil(min_on_ms / block_ms))
        self.min_off_blocks = max(1, math.ceil(min_off_ms / block_ms))
        self.clock = clock
        self.events: list[DtmfEvent] = []
        self._rate: int | None = None
        self._buffer = np.zeros(0, dtype=np.float32)
        self._digit: str | None = None
        self._on = 0
        self._off = 0
        self._at = 0.0
        self._closed = False

    @property
    def digits(self) -> str:
        return "".join(e.digit for e in self.events)

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        if self._closed or pcm.size == 0:
            return
        if sample_rate * self.block_ms % 1000:
            raise ValueError(f"sample rate {sample_rate} does not fit {self.block_ms} ms blocks")
        if sample_rate != self._rate:
            self._rate, self._buffer = sample_rate, self._buffer[:0]
        x = np.asarray(pcm, dtype=np.float32)
        if channels > 1:
            x = x.reshape(-1, channels).mean(axis=1)
        x = x * (1 / 32768)
        if self._buffer.size:
            x = np.concatenate([self._buffer, x])
        length = sample_rate * self.block_ms // 1000
        count = x.size // length
        self._buffer = x[count * length :].copy()
        if count:
            for digit in self._classify(x[: count * length].reshape(count, length), sample_rate):
                self._step(digit)

    def _classify(self, blocks: np.ndarray, sample_rate: int) -> list[str | None]:
        n = blocks.shape[1]
        proj = blocks @ _dft_basis(sample_rate, n)  # (blocks, 16)
        power = (proj[:, :8] ** 2 + proj[:, 8:] ** 2) * (2.0 / (n * n))  # mean square per tone
        energy = np.einsum("ij,ij->i", blocks, blocks) / n
        rows, cols = power[:, :4], power[:, 4:]
        ri, ci = rows.argmax(axis=1), cols.argmax(axis=1)
        idx = np.arange(len(blocks))
        r, c = rows[idx, ri], cols[idx, ci]
        r2 = np.partition(rows, 2, axis=1)[:, 2]  # runner-up of 4
        c2 = np.partition(cols, 2, axis=1)[:, 2]
        ok = (r >= self.min_level) & (c >= self.min_level)
        ok &= (r <= c * self.normal_twist) & (c <= r * self.reverse_twist)
        ok &= (r >= r2 * self.peak_ratio) & (c >= c2 * self.peak_ratio)
        ok &= (r + c) >= energy * self.min_tone_fraction
        return [_KEYPAD[i][j] if good else None for i, j, good in zip(ri.tolist(), ci.tolist(), ok.tolist())]

    def _step(self, digit: str | None) -> None:
        if digit is not None and digit == self._digit:
            self._on += 1
            self._off = 0
            return
        if self._digit is not None:
            if digit is None:
                self._off += 1
                if self._off < self.min_off_blocks:
                    return
            self._finish()
        if digit is not None:
            self._digit, self._on, self._off, self._at = digit, 1, 0, self.clock()

    def _finish(self) -> None:
        if self._digit is not None and self._on >= self.min_on_blocks:
            event = DtmfEvent(self._digit, self._on * self.block_ms, "inband", self._at)
            self.events.append(event)
            if self.on_digit is not None:
                self.on_digit(event)
        self._digit, self._on, self._off = None, 0, 0

    def close(self) -> None:
        if not self._closed:
            self._finish()
            self._closed = True


class DtmfToneSource:
    """Plays ``digits`` as in-band dual tones: a :class:`~media.frames.Source` of 20 ms
    int16 frames, ``None`` at the end.

    Each digit is ``duration_ms`` of its row + column sines (each at ``level_dbfs``
    RMS, dBFS as in :mod:`media.analysis`; 2 ms raised-cosine edges), digits are
    separated by ``gap_ms`` of silence, and the last frame is padded with silence.
    Frames are read-only views of one precomputed signal.
    """

    def __init__(
        self,
        digits: str,
        *,
        duration_ms: int = 100,
        gap_ms: int = 100,
        level_dbfs: float = -13.0,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        self.digits = normalize_digits(digits)
        if duration_ms <= 0 or gap_ms < 0:
            raise ValueError("duration_ms must be > 0 and gap_ms >= 0")
        if level_dbfs > -9.03:
            raise ValueError("level_dbfs above -9 dBFS per tone would clip (two tones add up)")
        if sample_rate <= 0 or sample_rate * FRAME_MS % 1000:
            raise ValueError(f"sample_rate must be a positive multiple of 50, got {sample_rate}")
        self.sample_rate = sample_rate
        self.channels = 1
        self._frame = sample_rate * FRAME_MS // 1000
        tone_n = round(duration_ms * sample_rate / 1000)
        gap_n = round(gap_ms * sample_rate / 1000)
        amplitude = math.sqrt(2) * 10 ** (level_dbfs / 20) * 32767
        t = np.arange(tone_n) / sample_rate
        ramp_n = min(round(0.002 * sample_rate), tone_n // 2)
        envelope = np.ones(tone_n)
        if ramp_n:
            ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp_n) / ramp_n)
            envelope[:ramp_n] = ramp
            envelope[tone_n - ramp_n :] = ramp[::-1]
        parts = []
        for index, digit in enumerate(self.digits):
            row = next(i for i, keys in enumerate(_KEYPAD) if digit in keys)
            col = _KEYPAD[row].index(digit)
            tone = np.sin(2 * np.pi * _ROWS[row] * t) + np.sin(2 * np.pi * _COLS[col] * t)
            parts.append(np.rint(amplitude * envelope * tone))
            if index < len(self.digits) - 1:
                parts.append(np.zeros(gap_n))
        signal = np.concatenate(parts)
        signal = np.concatenate([signal, np.zeros(-signal.size % self._frame)]).astype(PCM_DTYPE)
        signal.flags.writeable = False
        self._signal = signal
        self._pos = 0
        self._closed = False

    @property
    def duration_s(self) -> float:
        return self._signal.size / self.sample_rate

    def read(self) -> np.ndarray | None:
        if self._closed or self._pos >= self._signal.size:
            return None
        frame = self._signal[self._pos : self._pos + self._frame]
        self._pos += self._frame
        return frame

    def close(self) -> None:
        self._closed = True
