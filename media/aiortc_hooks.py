"""Every private aiortc hook wacall relies on, in one module, installed in one order.

aiortc has no public API for what wacall needs on the media path: seeing received RTP
before it is decoded, playing it out ourselves, sending and receiving RFC 4733 events on
the audio stream. Each of those is one function here, on *instances* (the classes and
other peers are untouched), and :func:`problems` checks every internal they touch, so an
aiortc upgrade that moves one fails loudly, naming the internal and the version, instead
of silently during a call. Checked against aiortc 1.14–1.16.

Received RTP (``RTCRtpReceiver``): one wrapper per receiver (:class:`ReceiverHook`),
whatever uses it, in this order for each packet:

1. *observers* (``media.taps.RtpTap``) see every routed RTP packet and its arrival time;
2. the *consumer* (``media.receiver.OpusReceiver``) may take the packet (Opus audio it
   plays out itself); what it does not take goes on to aiortc;
3. *started* callbacks run after aiortc's ``receive(parameters)`` (codecs known).

DTLS transport (``RTCDtlsTransport``, shared by a peer's sender and receiver): DTMF wraps
``_handle_rtp_data`` (telephone-events leave the stream before aiortc parses RTP) and
``_send_rtp`` (events replace audio packets going out), with :func:`wrap_transport`.

Internals relied on (aiortc 1.16):

* ``RTCRtpReceiver._handle_rtp_packet(packet, arrival_time_ms)``: a coroutine the DTLS
  transport calls *through the instance* for each routed RTP packet; ``_enabled``;
* ``RTCRtpReceiver.receive(parameters)``: called through the instance once DTLS is up
  (it starts the decoder thread); ``__stop_decoder()`` stops that thread;
  ``__remote_streams`` (``{ssrc: StreamStatistics}``, what RTCP reports and
  ``getStats()`` read); ``__codecs`` (``{payload type: codec}``);
* ``aiortc.rtcrtpreceiver.StreamStatistics(clockrate).add(packet)``;
* ``RTCDtlsTransport._handle_rtp_data(data, arrival_time_ms)`` and ``_send_rtp(data)``;
* ``RTCRtpSender._ssrc``;
* the ICE connection behind a transceiver
  (``sender.transport.transport._connection``, an ``aioice.Connection``), its
  ``ice_controlling`` and its ``_nominated`` pairs (aioice).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiortc
from aiortc.rtcdtlstransport import State as _DtlsState
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.utils import uint16_gt

from . import rtpcore

_DTLS_CONNECTED = _DtlsState.CONNECTED

__all__ = [
    "AIORTC_VERSION",
    "ReceiverHook",
    "ice_connection",
    "nominated_pair",
    "problems",
    "receiver_codecs",
    "receiver_hook",
    "remote_streams",
    "sender_ssrc",
    "set_ice_controlling",
    "stop_decoder",
    "stream_statistics",
    "wrap_transport",
]

log = logging.getLogger(__name__)

AIORTC_VERSION = getattr(aiortc, "__version__", "unknown")

#: ``(method of RTCDtlsTransport, its parameters)`` that :func:`wrap_transport` wraps.
TRANSPORT_HOOKS = (
    ("_handle_rtp_data", ["self", "data", "arrival_time_ms"]),
    ("_send_rtp", ["self", "data"]),
)

_HOOK_ATTR = "_wacall_hook"


# -- checks --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _class_problems() -> tuple[str, ...]:
    try:
        from aiortc.rtcdtlstransport import RTCDtlsTransport
        from aiortc.rtcrtpreceiver import RTCRtpReceiver, StreamStatistics
    except ImportError as exc:  # pragma: no cover - aiortc layout changed
        return (f"cannot import aiortc internals: {exc}",)
    found = []
    fn = getattr(RTCRtpReceiver, "_handle_rtp_packet", None)
    if fn is None or not inspect.iscoroutinefunction(fn):
        found.append("RTCRtpReceiver._handle_rtp_packet is not a coroutine function any more")
    elif list(inspect.signature(fn).parameters) != ["self", "packet", "arrival_time_ms"]:
        found.append("RTCRtpReceiver._handle_rtp_packet parameters changed")
    if not inspect.iscoroutinefunction(getattr(RTCRtpReceiver, "receive", None)):
        found.append("RTCRtpReceiver.receive is not a coroutine function any more")
    if not callable(getattr(RTCRtpReceiver, "_RTCRtpReceiver__stop_decoder", None)):
        found.append("RTCRtpReceiver.__stop_decoder is missing")
    fresh = StreamStatistics(48000)
    missing = [n for n in ("base_seq", "max_seq", "cycles", "packets_received", "_clockrate", "_jitter_q4",
                           "_last_arrival", "_last_timestamp") if not hasattr(fresh, n)]
    if missing:  # what ArrivalStatistics keeps, and aiortc's RTCP reads
        found.append(f"StreamStatistics fields changed ({', '.join(missing)} missing)")
    for name, params in TRANSPORT_HOOKS:
        fn = getattr(RTCDtlsTransport, name, None)
        if fn is None or not inspect.iscoroutinefunction(fn):
            found.append(f"RTCDtlsTransport.{name} is not a coroutine function any more")
        elif list(inspect.signature(fn).parameters) != params:
            found.append(f"RTCDtlsTransport.{name} parameters changed: {list(inspect.signature(fn).parameters)}")
    return tuple(found)


def problems(*, receiver=None, sender=None, scope: str = "all") -> list[str]:
    """What is missing from the aiortc internals wacall relies on (empty: fine), each
    naming aiortc's version. ``receiver`` / ``sender``: instances to check as well.
    ``scope``: ``"receiver"`` (what the receive path and taps need), ``"transport"``
    (what DTMF needs: :func:`wrap_transport`, :func:`sender_ssrc`) or ``"all"``."""
    found = list(_class_problems())
    if scope != "all":
        transport = scope == "transport"
        found = [p for p in found if p.startswith("cannot import")
                 or p.startswith("RTCDtlsTransport") == transport]
    if receiver is not None and not isinstance(getattr(receiver, "_RTCRtpReceiver__remote_streams", None), dict):
        found.append("RTCRtpReceiver.__remote_streams is missing")
    if sender is not None and not isinstance(getattr(sender, "_ssrc", None), int):
        found.append("RTCRtpSender._ssrc is missing")
    return [f"{p} (aiortc {AIORTC_VERSION})" for p in found]


# -- received RTP ------------------------------------------------------------------------

Observer = Callable[[Any, float], None]
#: ``consumer(packet, at=None)``: ``at`` the packet's arrival (loop clock; ``None``: now).
Consumer = Callable[..., bool]


class ReceiverHook:
    """The one wrapper wacall puts on an ``RTCRtpReceiver`` (see the module docstring).

    Get it with :func:`receiver_hook`; add observers, set the consumer, add started
    callbacks, in any order: packets always reach observers first, then the consumer."""

    def __init__(self, receiver) -> None:
        self.observers: list[Observer] = []
        self.consumer: Consumer | None = None
        self.started: list[Callable[[Any], None]] = []
        original_handle = receiver._handle_rtp_packet
        #: aiortc's own handling of a routed packet (what neither observer nor consumer took).
        self.original = original_handle
        original_receive = receiver.receive
        loop = asyncio.get_running_loop()
        hook = self

        async def _handle_rtp_packet(packet, arrival_time_ms: int) -> None:
            if hook.observers:
                at = loop.time()
                for observe in hook.observers:
                    observe(packet, at)
            consumer = hook.consumer
            if consumer is None or not consumer(packet):
                await original_handle(packet, arrival_time_ms)

        async def receive(parameters) -> None:
            await original_receive(parameters)
            for started in list(hook.started):
                started(parameters)

        receiver._handle_rtp_packet = _handle_rtp_packet
        receiver.receive = receive


def receiver_hook(receiver) -> ReceiverHook:
    """The receiver's :class:`ReceiverHook`, installed on first use (before any packet)."""
    hook = receiver.__dict__.get(_HOOK_ATTR)
    if hook is None:
        hook = ReceiverHook(receiver)
        setattr(receiver, _HOOK_ATTR, hook)
    return hook


def stop_decoder(receiver) -> None:
    """Stop aiortc's decoder thread (we decode; the remote track then yields nothing)."""
    receiver._RTCRtpReceiver__stop_decoder()


def remote_streams(receiver) -> dict:
    """aiortc's per-SSRC ``StreamStatistics`` of ``receiver`` (fed by whoever decodes)."""
    return receiver._RTCRtpReceiver__remote_streams


def stream_statistics(clockrate: int) -> ArrivalStatistics:
    return ArrivalStatistics(clockrate)


class ArrivalStatistics(StreamStatistics):
    """aiortc's per-SSRC receive statistics (what its RTCP receiver reports and
    ``getStats()`` read), told when each packet arrived instead of reading the clock
    when it is counted: a packet read from the socket up to a tick later (the polled
    lean path) still counts at its arrival. ``add(packet, at)``: ``at`` in seconds on
    any steady clock (only differences count), ``None``: the wall clock now."""

    def add(self, packet, at: float | None = None) -> None:
        seq = packet.sequence_number
        in_order = self.max_seq is None or uint16_gt(seq, self.max_seq)
        self.packets_received += 1
        if self.base_seq is None:
            self.base_seq = seq
        if not in_order:
            return
        if self.max_seq is not None and seq < self.max_seq:
            self.cycles += 1 << 16  # the sequence number wrapped
        self.max_seq = seq
        # RFC 3550 A.8 interarrival jitter, in timestamp units, ×16 (aiortc's fixed point)
        arrival = int((time.time() if at is None else at) * self._clockrate)
        timestamp = packet.timestamp
        if timestamp != self._last_timestamp and self.packets_received > 1:
            transit_change = abs((arrival - self._last_arrival) - (timestamp - self._last_timestamp))
            self._jitter_q4 += transit_change - ((self._jitter_q4 + 8) >> 4)
        self._last_arrival = arrival
        self._last_timestamp = timestamp


def receiver_codecs(receiver) -> dict:
    """``{payload type: codec}`` negotiated for ``receiver`` (empty before ``receive``)."""
    return getattr(receiver, "_RTCRtpReceiver__codecs", None) or {}


def receiver_enabled(receiver) -> bool:
    return bool(receiver._enabled)


# -- DTLS transport and sender ---------------------------------------------------------------


def wrap_transport(transport, name: str, hook: Callable[..., Awaitable[Any]]) -> None:
    """Route ``transport.<name>(*args)`` (one of :data:`TRANSPORT_HOOKS`) through
    ``hook(original, *args)`` on this instance; wraps any earlier instance wrapper."""
    original = getattr(transport, name)

    @functools.wraps(original)
    async def wrapper(*args, **kwargs):
        return await hook(original, *args, **kwargs)

    setattr(transport, name, wrapper)


def sender_ssrc(sender) -> int:
    return sender._ssrc


def ice_connection(transceiver):
    """The ``aioice.Connection`` carrying ``transceiver``'s media, or ``None`` (no
    transport yet, or aiortc moved it)."""
    transport = getattr(transceiver.sender, "transport", None)
    return getattr(getattr(transport, "transport", None), "_connection", None)


def set_ice_controlling(transceiver, controlling: bool) -> None:
    """Set the ICE role before checks start (an ICE-lite offerer's far side is always
    controlled; aiortc makes every offerer controlling)."""
    ice_connection(transceiver).ice_controlling = controlling


def nominated_pair(transceiver):
    """aioice's nominated candidate pair of component 1 (RTP), or ``None``."""
    nominated = getattr(ice_connection(transceiver), "_nominated", None) or {}
    return nominated.get(1)


def nominated_pairs(connection) -> dict:
    """aioice's ``{component: nominated pair}`` of ``connection``: the same dict for the
    connection's life (aioice fills and clears it in place)."""
    return connection._nominated


# -- the lean send path (media.lean) ---------------------------------------------------

#: RTCRtpSender's private counters that its RTCP sender reports and getStats() read.
_SENDER_COUNTERS = ("_RTCRtpSender__packet_count", "_RTCRtpSender__octet_count",
                    "_RTCRtpSender__rtp_timestamp", "_RTCRtpSender__ntp_timestamp")
_DTLS_COUNTERS = ("_RTCDtlsTransport__tx_bytes", "_RTCDtlsTransport__tx_packets")


def lean_send_problems(sender) -> list[str]:
    """What the lean send path needs from this started-to-be sender and its transport."""
    found = [f"RTCRtpSender.{name.split('__')[-1]}" for name in _SENDER_COUNTERS if not hasattr(sender, name)]
    if not hasattr(sender, "_RTCRtpSender__rtp_header_extensions_map"):
        found.append("RTCRtpSender.__rtp_header_extensions_map")
    transport = getattr(sender, "transport", None)
    found += [f"RTCDtlsTransport.{name.split('__')[-1]}" for name in _DTLS_COUNTERS if not hasattr(transport, name)]
    if not hasattr(transport, "_tx_srtp") or not hasattr(transport, "_state"):
        found.append("RTCDtlsTransport._tx_srtp/_state")
    return [f"{p} is missing (aiortc {AIORTC_VERSION})" for p in found]


def on_sender_start(sender, callback: Callable[[Any], None]) -> None:
    """Call ``callback(parameters)`` when aiortc starts ``sender`` (``send(parameters)``:
    codecs, mid and header extensions negotiated), before its send loop starts."""
    original = sender.send

    @functools.wraps(original)
    async def send(parameters) -> None:
        callback(parameters)
        await original(parameters)

    sender.send = send


def sender_extensions_map(sender):
    return sender._RTCRtpSender__rtp_header_extensions_map


def dtls_connected(transport) -> bool:
    return transport is not None and transport._state is _DTLS_CONNECTED


def plain_udp(pair) -> bool:
    """Whether a candidate pair sends straight on its UDP socket (not through TURN)."""
    from aioice.ice import StunProtocol

    return type(pair.protocol) is StunProtocol and hasattr(pair.protocol.transport, "sendto")


def count_sent(sender, transport, payload_bytes: int, wire_bytes: int, rtp_timestamp: int, ntp: int,
               packets: int = 1) -> None:
    """Account RTP packets sent around aiortc, as its own send loop does (``packets`` of
    them, ``payload_bytes`` and ``wire_bytes`` in all, the last at ``rtp_timestamp``)."""
    sender._RTCRtpSender__packet_count += packets
    sender._RTCRtpSender__octet_count += payload_bytes
    sender._RTCRtpSender__rtp_timestamp = rtp_timestamp
    sender._RTCRtpSender__ntp_timestamp = ntp
    transport._RTCDtlsTransport__tx_bytes += wire_bytes
    transport._RTCDtlsTransport__tx_packets += packets


def lean_receive_problems(transport) -> list[str]:
    found = [name for name in ("_RTCDtlsTransport__rx_bytes", "_RTCDtlsTransport__rx_packets", "_rx_srtp",
                               "_rtp_header_extensions_map") if not hasattr(transport, name)]
    return [f"RTCDtlsTransport.{n.split('__')[-1]} is missing (aiortc {AIORTC_VERSION})" for n in found]


def count_received(transport, wire_bytes: int) -> None:
    """Account one datagram received around aiortc, as its DTLS transport does."""
    transport._RTCDtlsTransport__rx_bytes += wire_bytes
    transport._RTCDtlsTransport__rx_packets += 1


def receive_extensions_map(transport):
    return transport._rtp_header_extensions_map


# Checked once at import: a changed aiortc is named here, not discovered mid-call.
for _problem in problems():
    log.warning("%s: wacall falls back to aiortc's own path where it can", _problem)


# -- SRTP ------------------------------------------------------------------------------------

#: Room pylibsrtp keeps for the tag and MKI that protecting appends.
_SRTP_TRAILER = 16 + 128
_SRTP_BUFFER = 2048


class FastSrtp:
    """Protect and unprotect RTP with one ``pylibsrtp.Session``'s libsrtp context,
    without pylibsrtp's per-packet allocation.

    ``Session.protect`` makes a new C ``int`` for the length on every call, which on
    this machine is most of its 4.2 µs; this calls the same libsrtp function on the
    same context with one buffer: in C (:mod:`media.rtpcore`, which is also handed
    :attr:`address` to protect while it sends), or through cffi with one kept length
    and buffer (1.5 µs). Errors raise ``pylibsrtp.Error`` as pylibsrtp does.
    Internals: ``Session._srtp`` (the ``srtp_t *``) and ``pylibsrtp._binding``;
    :func:`fast_srtp` returns the session itself where they are missing. Not
    thread-safe (one buffer), as the event loop needs none."""

    __slots__ = ("session", "address", "protect", "unprotect", "_ctx", "_cdata", "_buffer", "_length", "_error")

    def __init__(self, session) -> None:
        import pylibsrtp
        from pylibsrtp._binding import ffi, lib

        self.session = session  # keeps the context alive
        self._ctx = session._srtp[0]
        self._error = pylibsrtp.Error
        #: The ``srtp_t`` as an integer (what :mod:`media.rtpcore` takes).
        self.address = int(ffi.cast("uintptr_t", self._ctx))
        if _bind_core(ffi, lib, pylibsrtp.Error):
            self.protect = functools.partial(rtpcore.core.srtp, self.address, True)
            self.unprotect = functools.partial(rtpcore.core.srtp, self.address, False)
            return
        self._cdata = ffi.new("char[]", _SRTP_BUFFER)
        self._buffer = ffi.buffer(self._cdata)
        self._length = ffi.new("int *")
        self.protect = functools.partial(self._run, lib.srtp_protect, _SRTP_TRAILER)
        self.unprotect = functools.partial(self._run, lib.srtp_unprotect, 0)

    def _run(self, function, room: int, data: bytes) -> bytes:
        n = len(data)
        if n > _SRTP_BUFFER - room:
            raise self._error("packet is too long")
        buffer, length = self._buffer, self._length
        buffer[0:n] = data
        length[0] = n
        status = function(self._ctx, self._cdata, length)
        if status:
            raise self._error(f"libsrtp status {status}")
        return buffer[0 : length[0]]


_core_bound = False


def _bind_core(ffi, lib, error) -> bool:
    """Hand libsrtp's functions (pylibsrtp's own copy) to the C core, once; whether it runs."""
    global _core_bound
    if rtpcore.core is None:
        return False
    if not _core_bound:
        address = functools.partial(ffi.cast, "uintptr_t")
        rtpcore.core.bind_srtp(int(address(ffi.addressof(lib, "srtp_protect"))),
                               int(address(ffi.addressof(lib, "srtp_unprotect"))), error)
        _core_bound = True
    return True


def fast_srtp(session):
    """A :class:`FastSrtp` for ``session`` (a ``pylibsrtp.Session``), or the session
    itself if pylibsrtp's internals are not what :class:`FastSrtp` needs."""
    try:
        return FastSrtp(session)
    except (ImportError, AttributeError, TypeError) as exc:
        log.debug("pylibsrtp internals missing (%s): its own protect/unprotect are used", exc)
        return session
