"""The lean RTP path: after the handshakes, packets skip aiortc's per-packet machinery.

aiortc stays in charge of what happens rarely — offer/answer, ICE checks and consent,
the DTLS handshake, RTCP — and of the keys: once DTLS is up, its SRTP sessions protect
and unprotect. What happens 50 times a second per call in each direction goes around it:

* **Sending** (:class:`LeanSender`): one :class:`FrameTicker` per event loop wakes every
  20 ms and, for every call, takes the next Opus payload from the outbound track (a
  pre-encoded prompt's packet, the cached silence packet, or one frame encoded now),
  writes it behind a prebuilt RTP header (sequence number and timestamp patched in
  place), lets DTMF swap it for a telephone-event packet, protects it and hands it to the
  nominated ICE pair's socket — no coroutine per call, no task hop, no ``RtpPacket``
  object. aiortc's RTP send loop for that track waits, idle, until the call ends.
  The counters aiortc's RTCP sender reports and ``getStats()`` reads (packets, octets,
  last RTP/NTP timestamp; the DTLS transport's bytes and packets) are kept as aiortc
  keeps them, so sender reports stay correct.

* **Receiving** (:class:`LeanReceiver`): the nominated pair's socket hands every
  datagram to a function of ours first. An SRTP packet of an audio or telephone-event
  payload type is unprotected, passed through DTMF (events leave the stream there),
  parsed into a small :class:`RtpView` and given to the RTP tap and our playout buffer
  at once — no STUN parse attempt, no queue, no task hop, no ``RtpPacket``. Everything
  else (STUN: ICE checks and consent; DTLS; RTCP; other payload types) goes on to aioice
  and aiortc as before. aiortc's receive statistics (what its receiver reports in RTCP)
  are kept by our playout as before; the DTLS transport's byte and packet counters here.

``PeerConfig(rtp_path="aiortc")`` keeps aiortc's own per-call loops (for comparison, and
for non-Opus codecs or a relayed (TURN) path, where the lean path steps aside).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import weakref
from collections.abc import Callable

from aiortc import clock
from aiortc.rtp import RtpPacket

from . import aiortc_hooks
from .clock import FRAME_S

__all__ = ["FrameTicker", "LeanReceiver", "LeanSender", "RtpView", "parse_rtp"]

log = logging.getLogger(__name__)

#: Behind by more than this many frames after a stall: drop the backlog (delay, not a burst).
MAX_CATCH_UP = 5
_SEQ_TS = struct.Struct("!HI")
_HEADER = struct.Struct("!BBHII")


class FrameTicker:
    """One 20 ms clock for every call on an event loop (see the module docstring).

    Subscribers are called as ``tick(now, late, frames)``: ``late`` is how far behind its
    schedule this tick runs (seconds), ``frames`` how many frames are due (1, more after
    a short stall: the backlog is sent back to back, up to :data:`MAX_CATCH_UP`; beyond
    that the schedule restarts now). Receivers (:mod:`media.receiver`) subscribe
    ``first``: a frame they deliver to a sender on the same loop (a bridge) goes out in
    the same tick. :attr:`next_due` is the schedule (the grid they align to)."""

    _per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FrameTicker] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.subscribers: list[Callable[[float, float, int], None]] = []
        self.ticks = 0
        self.resyncs = 0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._ticking = False
        self._ntp = 0
        self._ntp_tick = -1

    @classmethod
    def current(cls) -> FrameTicker:
        """The running loop's ticker."""
        return cls.of(asyncio.get_running_loop())

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> FrameTicker:
        """``loop``'s ticker."""
        ticker = cls._per_loop.get(loop)
        if ticker is None:
            ticker = cls._per_loop[loop] = cls(loop)
        return ticker

    @property
    def next_due(self) -> float | None:
        """When the next tick is due (loop clock; inside a tick: the one after it), or
        ``None`` while the ticker is idle (no subscriber)."""
        return self._due if self._handle is not None or self._ticking else None

    def ntp(self) -> int:
        """The NTP time (64-bit) of this tick, taken once per tick for every call's
        sender-report counters (aiortc's clock builds a ``datetime`` each time)."""
        if self._ntp_tick != self.ticks:
            self._ntp = clock.current_ntp_time()
            self._ntp_tick = self.ticks
        return self._ntp

    def add(self, subscriber: Callable[[float, float, int], None], *, first: bool = False,
            at: float | None = None) -> None:
        """Call ``subscriber`` every tick from the next one on; ``first``: before the
        subscribers already there. An idle ticker starts with its first tick due ``at``
        (loop clock; default: one frame from now)."""
        if first:
            self.subscribers.insert(0, subscriber)
        else:
            self.subscribers.append(subscriber)
        if self._handle is None and not self._ticking:
            self._due = self.loop.time() + FRAME_S if at is None else at
            self._handle = self.loop.call_at(self._due, self._tick)

    def remove(self, subscriber: Callable[[float, float, int], None]) -> None:
        try:
            self.subscribers.remove(subscriber)
        except ValueError:
            return
        if not self.subscribers and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = None
        self._ticking = True
        now = self.loop.time()
        late = now - self._due
        frames = 1
        if late >= FRAME_S:
            frames += int(late / FRAME_S)
            if frames > MAX_CATCH_UP:  # a long stall: start again from now
                self.resyncs += 1
                frames = 1
                self._due = now - FRAME_S
        self._due += frames * FRAME_S
        self.ticks += 1
        try:
            for tick in tuple(self.subscribers):
                try:
                    tick(now, late, frames)
                except Exception:  # noqa: BLE001 - one call's failure never stops the others
                    log.exception("a frame ticker subscriber failed; it stops, the other calls go on")
                    self.remove(tick)
        finally:
            self._ticking = False
            if self.subscribers and self._handle is None:
                self._handle = self.loop.call_at(self._due, self._tick)


class LeanSender:
    """Sends one outbound track's frames on the lean path (see the module docstring).

    Made by the peer for its audio transceiver; :meth:`configure` runs when aiortc
    starts the sender (the negotiated codec, mid and header extensions are known then),
    :meth:`usable` says whether the lean path applies, :meth:`run` sends until the call
    ends."""

    def __init__(self, track, transceiver, dtmf=None) -> None:
        self.track = track
        self.transceiver = transceiver
        self.dtmf = dtmf
        self.packets = 0
        self._header: bytearray | None = None
        self._seq = 0
        self._ts_origin = 0
        self._stopped: asyncio.Future | None = None
        #: Packets the kernel refused (socket buffer full): dropped, as UDP would.
        self.dropped = 0
        self._dtls = None
        self._sender = None
        self._connection = None
        self._nominated: dict = {}
        self._pair = None
        self._sock = None
        self._addr = None
        self._srtp = None
        self._ticker: FrameTicker | None = None
        self._why_not: str | None = "not configured"

    # -- set-up ---------------------------------------------------------------------------

    def configure(self, parameters) -> None:
        """aiortc is starting the sender with ``parameters``: build the RTP header."""
        codec = parameters.codecs[0] if parameters.codecs else None
        if codec is None or codec.mimeType.lower() != "audio/opus":
            self._why_not = f"codec {codec.mimeType if codec else None} (the lean path sends Opus)"
            return
        if self.track.opus is None:
            self._why_not = "the track sends PCM for aiortc to encode"
            return
        sender = self.transceiver.sender
        missing = aiortc_hooks.lean_send_problems(sender)
        if missing:
            self._why_not = "; ".join(missing)
            return
        template = RtpPacket(payload_type=codec.payloadType, sequence_number=0, timestamp=0,
                             ssrc=aiortc_hooks.sender_ssrc(sender), marker=1)
        template.extensions.mid = parameters.muxId
        self._header = bytearray(template.serialize(aiortc_hooks.sender_extensions_map(sender)))
        self._seq = int.from_bytes(os.urandom(2), "big")
        self._ts_origin = int.from_bytes(os.urandom(4), "big")
        self._why_not = None

    def usable(self) -> bool:
        """Whether this call's frames can go the lean way (else aiortc sends them)."""
        if self._why_not is None:
            dtls = self.transceiver.sender.transport
            connection = aiortc_hooks.ice_connection(self.transceiver)
            pair = aiortc_hooks.nominated_pair(self.transceiver)
            if getattr(dtls, "_tx_srtp", None) is None:
                self._why_not = "SRTP is not keyed"
            elif pair is None or not aiortc_hooks.plain_udp(pair):
                self._why_not = "the ICE pair is not plain UDP (a TURN relay)"
            else:
                self._dtls, self._connection, self._srtp = dtls, connection, dtls._tx_srtp
                self._nominated = aiortc_hooks.nominated_pairs(connection)
                self._sender = self.transceiver.sender
        if self._why_not is not None:
            log.debug("lean RTP path not used: %s", self._why_not)
        return self._why_not is None

    async def run(self) -> None:
        """Send from the shared ticker until :meth:`stop` or the transport closes."""
        self._stopped = asyncio.get_running_loop().create_future()
        self._ticker = FrameTicker.current()
        self._ticker.add(self._tick)
        try:
            await self._stopped
        finally:
            self._ticker.remove(self._tick)

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.remove(self._tick)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # -- per frame ------------------------------------------------------------------------

    def _tick(self, now: float, late: float, frames: int) -> None:
        dtls = self._dtls
        if not aiortc_hooks.dtls_connected(dtls):
            self.stop()
            return
        pair = self._nominated.get(1)
        if pair is not self._pair:
            if pair is None:
                self.stop()
                return
            self._pair, self._addr = pair, pair.remote_addr
            self._sock = aiortc_hooks.udp_socket(pair)
        track = self.track
        if self._sender.track is not track:
            return  # replaced (or removed) for now: nothing goes out, as with aiortc
        header = self._header
        protect = self._srtp.protect
        dtmf = self.dtmf
        origin = self._ts_origin
        for i in range(frames):
            track.paced(now, late - i * FRAME_S)
            payload = track.next_payload()
            seq = self._seq
            timestamp = (origin + track.sent_pts) & 0xFFFFFFFF
            _SEQ_TS.pack_into(header, 2, seq, timestamp)
            data = bytes(header) + payload
            owed = None
            if dtmf is not None:
                if dtmf.sending:
                    data, owed = dtmf.outgoing(data)
                else:
                    dtmf.passed(seq)
            if data is not None:
                protected = protect(data)
                self._send(protected, pair)
                aiortc_hooks.count_sent(self._sender, dtls, len(payload), len(protected), timestamp,
                                        self._ticker.ntp())
                self.packets += 1
            if owed is not None:
                dtmf.sent(owed)
            self._seq = (seq + 1) & 0xFFFF

    def _send(self, protected: bytes, pair) -> None:
        sock = self._sock
        if sock is None:
            pair.protocol.transport.sendto(protected, self._addr)
            return
        try:
            sock.sendto(protected, self._addr)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1  # the kernel's buffer is full: a datagram lost, as on the wire
        except OSError:
            # anything else (the socket closed under us...): the transport's own sendto
            # from now on, which reports errors to aioice as it always did
            self._sock = None
            pair.protocol.transport.sendto(protected, self._addr)


class RtpView:
    """The fields of a received RTP packet the audio path reads (no header extensions)."""

    __slots__ = ("payload_type", "marker", "sequence_number", "timestamp", "ssrc", "payload")

    def __init__(self, payload_type: int, marker: int, sequence_number: int, timestamp: int, ssrc: int,
                 payload: bytes) -> None:
        self.payload_type = payload_type
        self.marker = marker
        self.sequence_number = sequence_number
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.payload = payload

    def __repr__(self) -> str:
        return (f"RtpView(pt={self.payload_type}, seq={self.sequence_number}, ts={self.timestamp}, "
                f"{len(self.payload)} B)")


def parse_rtp(data: bytes) -> RtpView:
    """Parse an RTP packet's fixed header, skip CSRCs, extension and padding; ``ValueError``
    when it is not RTP version 2 or its lengths do not add up."""
    if len(data) < 12:
        raise ValueError("an RTP packet has at least 12 bytes")
    first, second, seq, timestamp, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2:
        raise ValueError("not RTP version 2")
    start = 12 + 4 * (first & 0x0F)
    if first & 0x10:
        if len(data) < start + 4:
            raise ValueError("truncated RTP header extension")
        start += 4 + 4 * int.from_bytes(data[start + 2:start + 4], "big")
    end = len(data)
    if first & 0x20:
        end -= data[-1]
    if start > end:
        raise ValueError("RTP lengths do not add up")
    return RtpView(second & 0x7F, second >> 7, seq, timestamp, ssrc, data[start:end])


class LeanReceiver:
    """Takes one call's received RTP on the lean path (see the module docstring).

    ``payload_types()`` says which payload types to take (Opus and telephone-event as
    negotiated); ``hook`` is the receiver's :class:`media.aiortc_hooks.ReceiverHook`
    (tap observers first, then our playout as the consumer); ``dtmf`` the peer's
    :class:`media.dtmf.PeerDtmf`."""

    def __init__(self, transceiver, hook, dtmf, payload_types: Callable[[], frozenset[int]]) -> None:
        self.transceiver = transceiver
        self.hook = hook
        self.dtmf = dtmf
        self.payload_types = payload_types
        self.packets = 0
        self._protocol = None
        self._original = None
        self._pts: frozenset[int] = frozenset()
        self._dtls = None
        self._loop = asyncio.get_running_loop()

    def install(self) -> bool:
        """Once ICE and DTLS are up: receive on the lean path (``False``: it does not apply)."""
        pair = aiortc_hooks.nominated_pair(self.transceiver)
        dtls = self.transceiver.receiver.transport
        if self._protocol is not None or pair is None or not aiortc_hooks.plain_udp(pair):
            return False
        if aiortc_hooks.lean_receive_problems(dtls):
            log.warning("lean receive path not used: %s", "; ".join(aiortc_hooks.lean_receive_problems(dtls)))
            return False
        self._dtls = dtls
        self._protocol = protocol = pair.protocol
        self._original = protocol.datagram_received
        protocol.datagram_received = self._datagram_received
        return True

    def uninstall(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.__dict__.get("datagram_received") == self._datagram_received:
            del protocol.datagram_received
        self._original = None
        self.hook = self.dtmf = None

    def _datagram_received(self, data: bytes, addr) -> None:
        if len(data) >= 12 and 127 < data[0] < 192:
            pt = data[1] & 0x7F
            pts = self._pts
            if pt not in pts:
                pts = self._pts = self.payload_types()
            if pt in pts and self._dtls._rx_srtp is not None:
                self._rtp(data)
                return
        self._original(data, addr)

    def _rtp(self, data: bytes) -> None:
        dtls = self._dtls
        try:
            plain = dtls._rx_srtp.unprotect(data)
        except Exception:  # noqa: BLE001 - pylibsrtp.Error: dropped, as aiortc drops it
            return
        aiortc_hooks.count_received(dtls, len(data))
        self.packets += 1
        dtmf = self.dtmf
        if dtmf is not None:
            plain = dtmf.incoming(plain)
            if plain is None:
                return
        try:
            packet = parse_rtp(plain)
        except ValueError:
            return
        hook = self.hook
        if hook is None:
            return
        if hook.observers:
            at = self._loop.time()
            for observe in hook.observers:
                observe(packet, at)
        consumer = hook.consumer
        if consumer is None or not consumer(packet):
            # not ours to play: aiortc handles it as it would have (its own packet object)
            try:
                full = RtpPacket.parse(plain, aiortc_hooks.receive_extensions_map(dtls))
            except ValueError:
                return
            asyncio.ensure_future(hook.original(full, clock.current_ms()))
