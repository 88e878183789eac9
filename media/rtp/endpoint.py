"""One plain-RTP audio stream: a UDP socket, offer/answer, send, receive, DTMF, stats.

::

    ep = RtpEndpoint(host="127.0.0.1", port_range=(40000, 40999))
    host, port = await ep.open()              # bound now: the SDP can be written
    offer = ep.create_offer()                 # → INVITE body
    ep.set_remote_answer(answer_sdp)          # ← 200 OK body: media flows
    # or, answering:  answer = ep.accept_offer(offer_sdp)
    ep.play(source) / ep.push_pcm(frame)      # what to send (48 kHz mono 20 ms frames)
    ep.add_sink(sink)  or  peer.play(ep.playout)   # what was received
    ep.on_dtmf(callback); await ep.send_dtmf("12#")
    reason = await ep.closed                  # "rtp timeout", or close(reason)

Sockets. RTP is bound on ``host`` at an even port of ``port_range`` (probed from a
random start; ``None``: a port the OS picks), RTCP on the next port (``rtcp=True``).
Every 5 s a sender report goes out (RFC 3550 §6.4.1, no report blocks); received RTCP
is counted and otherwise ignored.

Send. One subscriber on the loop's shared :class:`media.lean.FrameTicker` sends one
packet per 20 ms for every endpoint: the next item pushed (``push_pcm`` from a sink
tap, or ``push_payload``: an already-encoded payload, for Opus pass-through), else the
next frame of the played source, else encoded silence (``send_silence``; otherwise no
packet, and the next one carries the marker bit). Timestamps advance by 20 ms per tick
whether or not a packet went out; sequence numbers by one per packet sent. The first
packet of a talkspurt carries the marker. While the far side holds the call (it does
not want our audio: ``recvonly``/``inactive``/``c=0.0.0.0``) nothing is sent. DTMF
(:meth:`send_dtmf`) replaces the audio packets while an event is on (RFC 4733 §2.5:
marker on the first, duration growing by 20 ms, the end packet three times), with
the audio clock's timestamp of its first packet and the same sequence-number space.

Receive. The RTP socket is drained on the shared ticker's intake
(:class:`media.lean.PolledSocket`: each datagram with its kernel arrival time; where
the kernel does not stamp, the protocol's ``datagram_received``), everything inline (no
queue, no task): version and payload-type checks, the address check, telephone-event packets to
a :class:`media.dtmf.Rfc4733Decoder` (one :class:`~media.dtmf.DtmfEvent` per event, end
retransmissions deduplicated), audio packets to a :class:`media.jitterbuffer.
PlayoutBuffer`. :attr:`playout` (a :class:`~media.frames.Source`) decodes on demand,
one 20 ms 48 kHz frame per ``read``: played on a peer, the peer's paced track drives it;
with sinks added, the ticker does.

Symmetric RTP (``symmetric=True``, RFC 4961 practice for NAT'd phones): the first valid
RTP packet (negotiated payload type, parsable header) fixes the far side's address:
when it differs from the SDP's, our packets go there from then on. After that,
packets from any other address are dropped (``stats.packets_foreign``). Packets of a
new SSRC from the latched address are accepted as a new stream (a PBX switching the
media source, a transfer): the jitter buffer continues the timeline. A new remote
description (re-INVITE) unlatches. Without ``symmetric``, only the SDP address counts.

Inactivity: no valid RTP for ``inactivity_timeout_s`` while the far side should be
sending (``sendrecv``/``sendonly``) → :attr:`closed` resolves ``"rtp timeout"``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import numpy as np

from .. import frames as _frames
from ..dtmf import (
    END_PACKETS,
    DtmfError,
    DtmfEvent,
    Rfc4733Decoder,
    normalize_digits,
    pack_event,
)
from ..frames import FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE, Sink, Source
from ..jitterbuffer import CONCEAL, DISCARD, PLAY, STRETCH, PlayoutBuffer
from ..lean import FrameTicker, PolledSocket, native_destination, transport_socket
from ..opus import DEFAULT_SETTINGS, OpusSettings
from .. import rtpcore
from ..rtpseq import Unwrapper
from .codecs import Decoder, Encoder, RtpCodec, make_decoder, make_encoder
from .sdp import DEFAULT_CODECS, RemoteMedia, answer_offer, build_offer, parse_answer

__all__ = ["RtpEndpoint", "RtpPlayout", "RtpStats"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!BBHII")
_SR = struct.Struct("!BBHIIIIII")
#: Sender reports every this many 20 ms ticks (5 s).
_SR_TICKS = 250
_NTP_EPOCH = 2208988800


_SILENT = _frames.SILENT_FRAME


@dataclass(slots=True)
class RtpStats:
    """Counters of one endpoint (since it was opened)."""

    packets_sent: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    #: RFC 3550 A.3 cumulative loss: expected (from sequence numbers) - received.
    packets_lost: int = 0
    #: RFC 3550 A.8 interarrival jitter of audio packets, milliseconds.
    jitter_ms: float = 0.0
    #: Audio packets that came after their slot was played (dropped by the jitter buffer).
    packets_late: int = 0
    #: 20 ms frames played from packets / concealed.
    frames_played: int = 0
    frames_concealed: int = 0
    #: Dropped on arrival: from an address other than the latched one / not RTP v2 or
    #: malformed / a payload type not negotiated / before the remote description.
    packets_foreign: int = 0
    packets_invalid: int = 0
    packets_unknown_pt: int = 0
    packets_early: int = 0
    #: Frames pushed for sending but dropped (the push backlog was full: a clock drift).
    send_dropped: int = 0
    #: Ticks with nothing to send (no packet, ``send_silence=False``) / silence sent.
    silent_ticks: int = 0
    dtmf_sent: int = 0
    dtmf_received: int = 0
    rtcp_sent: int = 0
    rtcp_received: int = 0
    #: SSRC changes seen from the far side.
    ssrc_changes: int = 0

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["jitter_ms"] = round(self.jitter_ms, 3)
        return out


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple], None]) -> None:
        self.datagram_received = on_datagram  # the endpoint's method: one call per packet

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable etc.
        log.debug("rtp socket error: %r", exc)


class _RtcpProtocol(asyncio.DatagramProtocol):
    def __init__(self, stats: RtpStats) -> None:
        self.stats = stats

    def datagram_received(self, data: bytes, addr) -> None:
        self.stats.rtcp_received += 1

    def error_received(self, exc: Exception) -> None:
        pass


class RtpPlayout:
    """The received audio as a :class:`~media.frames.Source` (48 kHz mono, 20 ms frames):
    each :meth:`read` asks the jitter buffer what to play now and decodes it. Silence
    while nothing arrives; ``None`` once the endpoint is closed. After a read, ``packet``
    holds the frame's Opus payload when it is exactly that frame (pass-through: a
    :class:`~media.peer.MediaPeer` sends it without re-encoding), else ``None``."""

    sample_rate = SAMPLE_RATE
    channels = 1

    def __init__(self, endpoint: RtpEndpoint) -> None:
        self._ep = endpoint
        self._carry = np.zeros(0, dtype=PCM_DTYPE)
        self.packet: bytes | None = None
        self.ended = False

    def read(self) -> np.ndarray | None:
        self.packet = None
        if self.ended:
            return None
        ep = self._ep
        jb, dec = ep._jb, ep._decoder
        carry = self._carry
        if carry.size >= FRAME_SAMPLES:
            self._carry = carry[FRAME_SAMPLES:]
            return carry[:FRAME_SAMPLES]
        if jb is None or dec is None:
            return _SILENT
        now = ep._loop.time()
        while True:
            kind, payload, _ = jb.pop(now)
            if kind != DISCARD:
                break
            dec.decode(payload)
        pcm = None
        stats = ep.stats
        if kind == PLAY:
            pcm = dec.decode(payload)
            stats.frames_played += 1
        elif kind == CONCEAL or kind == STRETCH:
            pcm = dec.conceal()
            stats.frames_concealed += 1
        if pcm is None or pcm.size == 0:
            if not carry.size:
                return _SILENT
            pcm = np.zeros(FRAME_SAMPLES - carry.size, dtype=PCM_DTYPE)
        elif not carry.size and pcm.size == FRAME_SAMPLES:
            if kind == PLAY and ep._opus:
                self.packet = payload
            return pcm
        buf = np.concatenate([carry, pcm])
        if buf.size < FRAME_SAMPLES:
            buf = np.concatenate([buf, np.zeros(FRAME_SAMPLES - buf.size, dtype=PCM_DTYPE)])
        self._carry = buf[FRAME_SAMPLES:]
        return buf[:FRAME_SAMPLES]

    def close(self) -> None:
        """Called when a peer's play queue drops it; the endpoint goes on."""


class RtpEndpoint:
    """A plain-RTP audio endpoint (see the module docstring).

    Args:
        host: the address to bind (``127.0.0.1``, a NIC's address, ``0.0.0.0``).
        port_range: ``(low, high)`` inclusive; RTP gets an even port in it, RTCP the
            next one. ``None``: any free port (RTCP then on the next port if free).
        advertise_address: the address written in our SDP (default ``host``; required
            when ``host`` is a wildcard).
        codecs: what we offer / accept, in preference order.
        dtmf: offer / accept telephone-event.
        symmetric: latch onto the far side's real source address (see above).
        rtcp: bind the RTCP port and send sender reports.
        send_silence: send encoded silence when there is nothing to send (keeps NAT
            bindings and the far side's media timers alive).
        inactivity_timeout_s: ``None`` disables it.
        max_backlog_frames: frames ``push_pcm``/``push_payload`` may queue (oldest
            dropped beyond: the two clocks drifted).
        opus: encoder settings when we encode Opus.
        jitter: keyword arguments for the :class:`~media.jitterbuffer.PlayoutBuffer`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port_range: tuple[int, int] | None = None,
        advertise_address: str | None = None,
        codecs: Iterable[str] = DEFAULT_CODECS,
        dtmf: bool = True,
        symmetric: bool = True,
        rtcp: bool = True,
        send_silence: bool = True,
        inactivity_timeout_s: float | None = 30.0,
        max_backlog_frames: int = 5,
        opus: OpusSettings = DEFAULT_SETTINGS,
        jitter: dict | None = None,
        label: str = "rtp",
    ) -> None:
        if port_range is not None:
            low, high = port_range
            if not 1024 <= low < high <= 65535:
                raise ValueError(f"port_range must be (low, high) within 1024..65535, got {port_range}")
        if inactivity_timeout_s is not None and inactivity_timeout_s <= 0:
            raise ValueError("inactivity_timeout_s must be > 0 or None")
        self.host = host
        self.port_range = port_range
        self.advertise_address = advertise_address
        self.codecs = tuple(codecs)
        self.dtmf = dtmf
        self.symmetric = symmetric
        self.rtcp = rtcp
        self.send_silence = send_silence
        self.inactivity_timeout_s = inactivity_timeout_s
        self.max_backlog_frames = max_backlog_frames
        self.opus_settings = opus
        self.jitter_options = dict(jitter or {})
        self.label = label
        self.stats = RtpStats()
        #: What offer/answer settled (``None`` until then).
        self.remote: RemoteMedia | None = None
        #: Where our packets go: the SDP address, or the latched source address.
        self.remote_addr: tuple[str, int] | None = None
        self.latched = False
        self.local_address: tuple[str, int] | None = None
        self.playout = RtpPlayout(self)
        #: ``loop.time()`` of the last valid RTP packet (or of the remote description).
        self.last_rx = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: asyncio.Future[str] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._rtcp_transport: asyncio.DatagramTransport | None = None
        #: Where the C core (media.rtpcore) sends: (address, descriptor, C address), the
        #: descriptor ``None`` where it cannot (then the transport's own sendto).
        self._route: tuple | None = None
        self._polled: PolledSocket | None = None
        self._offer: str | None = None
        self._sdp_version = 0
        self._session_id = int.from_bytes(os.urandom(4), "big") >> 1
        # send
        self._encoder: Encoder | None = None
        self._audio_pt = -1
        self._ticks = 160
        self._ssrc = int.from_bytes(os.urandom(4), "big")
        self._seq = int.from_bytes(os.urandom(2), "big")
        self._ts_origin = int.from_bytes(os.urandom(4), "big")
        self._index = 0  # 20 ms frames since the remote was set (timestamp clock)
        self._marker = True
        self._backlog: collections.deque = collections.deque()
        self._source: Source | None = None
        self._ticker: FrameTicker | None = None
        self._tick_count = 0
        self._dtmf_queue: collections.deque[tuple] = collections.deque()
        self._dtmf_ts = 0
        # receive
        self._decoder: Decoder | None = None
        self._jb: PlayoutBuffer | None = None
        self._opus = False
        self._dtmf_pt = -1
        self._dtmf_decoder: Rfc4733Decoder | None = None
        self._dtmf_callbacks: list[Callable[[DtmfEvent], None]] = []
        self._sinks: list[Sink] = []
        self._rx_ssrc: int | None = None
        self._rx_seq = Unwrapper(16)
        self._rx_first = 0
        self._rx_count = 0
        self._rx_lost_before = 0
        self._jitter = 0.0
        self._last_transit: float | None = None
        self._rx_clock = 8000

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def closed(self) -> asyncio.Future[str]:
        """Resolves with the reason the endpoint stopped (``"rtp timeout"``, or what
        :meth:`close` was given)."""
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        return self._closed

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self.closed.done()

    @property
    def codec(self) -> RtpCodec | None:
        return self.remote.codec if self.remote is not None else None

    async def open(self) -> tuple[str, int]:
        """Bind the sockets (once); returns ``(address for the SDP, RTP port)``."""
        if self._transport is not None:
            return self.sdp_address, self.local_address[1]
        self._loop = loop = asyncio.get_running_loop()
        self.closed  # noqa: B018 - create it on this loop
        rtp_sock, rtcp_sock = self._bind()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self._datagram), sock=rtp_sock)
        polled = PolledSocket(self._transport, self._datagram)
        self._polled = polled if polled.start() else None  # (else: the protocol's callback)
        if rtcp_sock is not None:
            self._rtcp_transport, _ = await loop.create_datagram_endpoint(lambda: _RtcpProtocol(self.stats), sock=rtcp_sock)
        self.local_address = rtp_sock.getsockname()[:2]
        log.debug("%s: bound %s:%d", self.label, *self.local_address)
        return self.sdp_address, self.local_address[1]

    def _bind(self) -> tuple[socket.socket, socket.socket | None]:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        def bind(port: int) -> socket.socket | None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((self.host, port))
            except OSError:
                sock.close()
                return None
            sock.setblocking(False)
            return sock

        if self.port_range is None:
            rtp = bind(0)
            if rtp is None:
                raise OSError(f"cannot bind a UDP port on {self.host}")
            port = rtp.getsockname()[1]
            rtcp = bind(port + 1) if self.rtcp and port < 65535 else None
            return rtp, rtcp
        low, high = self.port_range
        first = low + (low & 1)
        evens = list(range(first, high + (0 if self.rtcp else 1), 2))
        if not evens:
            raise ValueError(f"no even port in {self.port_range}")
        start = random.randrange(len(evens))
        for port in evens[start:] + evens[:start]:
            rtp = bind(port)
            if rtp is None:
                continue
            if not self.rtcp:
                return rtp, None
            rtcp = bind(port + 1)
            if rtcp is not None:
                return rtp, rtcp
            rtp.close()
        raise OSError(f"no free RTP port pair in {low}..{high} on {self.host}")

    @property
    def sdp_address(self) -> str:
        address = self.advertise_address or self.host
        if address in ("0.0.0.0", "::", ""):
            raise ValueError("bound to a wildcard address: set advertise_address for the SDP")
        return address

    def close(self, reason: str = "closed") -> None:
        """Stop sending and receiving, release the sockets; idempotent."""
        if self._ticker is not None:
            self._ticker.remove(self._tick)
            self._ticker = None
        if self._dtmf_decoder is not None:
            for event in self._dtmf_decoder.flush():
                self._emit(event)
        for *_, owner, _, _ in self._dtmf_queue:
            if not owner.done():
                owner.set_exception(DtmfError("the RTP stream ended before the DTMF was sent"))
                owner.exception()
        self._dtmf_queue.clear()
        self.playout.ended = True
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                log.exception("%s: sink close failed", self.label)
        self._sinks = []
        if self._polled is not None:
            self._polled.stop(resume=False)
        for transport in (self._transport, self._rtcp_transport):
            if transport is not None:
                transport.close()
        if self._closed is None and self._loop is not None:
            self._closed = self._loop.create_future()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(reason)

    # -- offer / answer -------------------------------------------------------------------

    def create_offer(self) -> str:
        """Our SDP offer (after :meth:`open`); answer it with :meth:`set_remote_answer`."""
        self._need_open()
        self._offer = build_offer(self.sdp_address, self.local_address[1], self.codecs, dtmf=self.dtmf,
                                  session_id=self._session_id, version=self._next_version())
        return self._offer

    def set_remote_answer(self, answer: str) -> RemoteMedia:
        """The far side's answer to :meth:`create_offer`: media starts flowing.

        Raises: :class:`~media.rtp.sdp.RtpSdpError` subclasses."""
        if self._offer is None:
            raise RuntimeError("set_remote_answer needs create_offer first")
        remote = parse_answer(answer, self._offer)
        self.set_remote(remote)
        return remote

    def accept_offer(self, offer: str) -> str:
        """Answer the far side's offer (also a re-INVITE's): returns our answer SDP;
        media starts flowing. Raises :class:`~media.rtp.sdp.RtpSdpError` subclasses."""
        self._need_open()
        answer, remote = answer_offer(offer, self.sdp_address, self.local_address[1], self.codecs, dtmf=self.dtmf,
                                      session_id=self._session_id, version=self._next_version())
        self.set_remote(remote)
        return answer

    def _next_version(self) -> int:
        self._sdp_version += 1
        return self._sdp_version

    def _need_open(self) -> None:
        if self._transport is None:
            raise RuntimeError("open() the endpoint first (it binds the port the SDP names)")

    def set_remote(self, remote: RemoteMedia) -> None:
        """Apply a negotiated :class:`~media.rtp.sdp.RemoteMedia` (what the SDP helpers
        return): the codec, where to send, telephone-event. A new codec rebuilds the
        encoder, decoder and jitter buffer; the same one keeps them."""
        self._need_open()
        if self.closed.done():
            raise RuntimeError("the endpoint is closed")
        old = self.remote
        codec = remote.codec
        if old is None or old.codec != codec:
            self._encoder = make_encoder(codec, opus=self.opus_settings)
            self._decoder = make_decoder(codec)
            jb = PlayoutBuffer(clock_rate=codec.clock_rate, frame_samples=codec.ticks_per_frame, **self.jitter_options)
            decoder = self._decoder
            jb.samples_of = lambda payload, frame: decoder.samples(payload) or frame
            jb.events_hint = self._events_now
            self._jb = jb
            self._audio_pt = codec.payload_type
            self._ticks = codec.ticks_per_frame
            self._opus = codec.key == "opus"
            self._rx_clock = codec.clock_rate
            self._last_transit = None
        self._dtmf_pt = remote.dtmf_pt if remote.dtmf_pt is not None else -1
        if remote.dtmf_pt is not None and (self._dtmf_decoder is None or self._dtmf_decoder.clock_rate != remote.dtmf_rate):
            self._dtmf_decoder = Rfc4733Decoder(clock_rate=remote.dtmf_rate or 8000)
        address = (remote.address, remote.port)
        if old is None or (old.address, old.port) != address:
            self.remote_addr = address
            self.latched = False
        self.remote = remote
        self.last_rx = self._loop.time()
        if not remote.receives:
            self._marker = True
        if self._ticker is None:
            self._ticker = FrameTicker.current()
            self._ticker.add(self._tick)
        log.info("%s: %s with %s:%d (pt %d%s)%s", self.label, codec.name, remote.address, remote.port,
                 codec.payload_type, f", telephone-event {remote.dtmf_pt}" if remote.dtmf_pt is not None else "",
                 " on hold" if remote.hold else "")

    # -- what to send ---------------------------------------------------------------------

    def play(self, source: Source | None) -> None:
        """Send ``source``'s frames (48 kHz mono; read once per 20 ms) when nothing was
        pushed; ``None`` stops it. The source is closed when it ends or is replaced."""
        old, self._source = self._source, source
        if old is not None and old is not source:
            old.close()

    def push_pcm(self, pcm48: np.ndarray) -> None:
        """Queue one 20 ms frame (960 int16 samples, 48 kHz mono; copied)."""
        self._push(np.array(pcm48, dtype=PCM_DTYPE))

    def push_payload(self, payload: bytes) -> None:
        """Queue one encoded 20 ms payload of the negotiated codec (pass-through)."""
        self._push(bytes(payload))

    def _push(self, item) -> None:
        backlog = self._backlog
        if len(backlog) >= self.max_backlog_frames:
            backlog.popleft()
            self.stats.send_dropped += 1
        backlog.append(item)

    # -- what was received ----------------------------------------------------------------

    def add_sink(self, sink: Sink) -> None:
        """Deliver the received audio (48 kHz mono 20 ms frames, paced by the shared
        ticker) to ``sink``. Use either sinks or :attr:`playout` on a peer, not both."""
        self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def on_dtmf(self, callback: Callable[[DtmfEvent], None]) -> Callable[[], None]:
        """Call ``callback(DtmfEvent)`` for every RFC 4733 digit received; returns an
        unsubscribe function."""
        self._dtmf_callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._dtmf_callbacks:
                self._dtmf_callbacks.remove(callback)

        return unsubscribe

    def _emit(self, event: DtmfEvent) -> None:
        self.stats.dtmf_received += 1
        for callback in list(self._dtmf_callbacks):
            try:
                callback(event)
            except Exception:
                log.exception("%s: DTMF callback failed", self.label)

    def _events_now(self) -> bool:
        decoder = self._dtmf_decoder
        return decoder is not None and decoder.deadline is not None

    # -- DTMF out -------------------------------------------------------------------------

    @property
    def dtmf_negotiated(self) -> bool:
        return self.remote is not None and self.remote.dtmf_pt is not None

    def queue_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> asyncio.Future:
        """Queue ``digits`` as RFC 4733 events; the future resolves once the last end
        packet is out. Raises :class:`~media.dtmf.DtmfError` when telephone-event was
        not negotiated or the endpoint is closed; ``ValueError`` for bad arguments."""
        digits = normalize_digits(digits)
        if not 40 <= duration_ms <= 8000:
            raise ValueError(f"duration_ms must be 40..8000, got {duration_ms}")
        if not 0 <= gap_ms <= 10_000:
            raise ValueError(f"gap_ms must be 0..10000, got {gap_ms}")
        if self.closed.done():
            raise DtmfError("cannot send DTMF: the RTP stream has ended")
        if not self.dtmf_negotiated:
            raise DtmfError("cannot send DTMF: telephone-event (RFC 4733) was not negotiated")
        owner = self._loop.create_future()
        rate = self.remote.dtmf_rate or 8000
        per_packet = rate // 50
        packets = math.ceil(duration_ms / 20)
        gap = math.ceil(gap_ms / 20)
        queue = self._dtmf_queue
        for index, digit in enumerate(digits):
            code = "0123456789*#ABCD".index(digit)
            for k in range(packets - 1):
                queue.append((code, k == 0, False, (k + 1) * per_packet, owner, False, False))
            for k in range(END_PACKETS):
                done = k == END_PACKETS - 1
                last = done and index == len(digits) - 1
                queue.append((code, packets == 1 and k == 0, True, min(packets * per_packet, 0xFFFF), owner, done, last))
            if index < len(digits) - 1:
                for _ in range(gap):
                    queue.append((None, False, False, 0, owner, False, False))
        return owner

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> None:
        """:meth:`queue_dtmf` and wait until it is sent."""
        await self.queue_dtmf(digits, duration_ms, gap_ms)

    # -- the 20 ms tick -------------------------------------------------------------------

    def _tick(self, now: float, late: float, frames: int) -> None:
        for _ in range(frames):
            self._send_one()
        self._tick_count += 1
        sinks = self._sinks
        if sinks:
            read = self.playout.read
            for _ in range(frames):
                pcm = read()
                if pcm is None:
                    break
                for sink in sinks:
                    sink.write(pcm, SAMPLE_RATE, 1)
        decoder = self._dtmf_decoder
        if decoder is not None and decoder.deadline is not None:
            for event in decoder.expire(now):
                self._emit(event)
        remote = self.remote
        if self.inactivity_timeout_s is not None:
            if not remote.sends:
                self.last_rx = now
            elif now - self.last_rx >= self.inactivity_timeout_s:
                log.warning("%s: no RTP for %.1f s", self.label, self.inactivity_timeout_s)
                self.close("rtp timeout")
                return
        if self._rtcp_transport is not None and self._tick_count % _SR_TICKS == 0 and self.stats.packets_sent:
            self._send_sr()

    def _send_one(self) -> None:
        backlog = self._backlog
        item = backlog.popleft() if backlog else None
        if item is None and self._source is not None:
            item = self._source.read()
            if item is None:
                self._source.close()
                self._source = None
        timestamp = (self._ts_origin + self._index * self._ticks) & 0xFFFFFFFF
        self._index += 1
        remote = self.remote
        addr = self.remote_addr
        sending = remote.receives and addr is not None
        queue = self._dtmf_queue
        if queue:
            code, first, end, duration, owner, digit_done, last = queue.popleft()
            if digit_done:
                self.stats.dtmf_sent += 1
            if last and not owner.done():
                owner.set_result(None)
            if code is not None:
                if first:
                    self._dtmf_ts = timestamp
                if sending:
                    self._send(self._dtmf_pt, first, self._dtmf_ts, pack_event(code, end=end, duration=duration), addr)
                self._marker = True  # the audio after an event starts a talkspurt
                return
        if not sending:
            self._marker = True
            return
        encoder = self._encoder
        if isinstance(item, bytes):
            payload = item
        elif item is not None:
            payload = encoder.encode(item)
        elif self.send_silence:
            payload = encoder.silence()
            self.stats.silent_ticks += 1
        else:
            self.stats.silent_ticks += 1
            self._marker = True
            return
        marker = self._marker
        self._marker = False
        self._send(self._audio_pt, marker, timestamp, payload, addr)

    def _send(self, pt: int, marker: bool, timestamp: int, payload: bytes, addr) -> None:
        seq = self._seq
        self._seq = (seq + 1) & 0xFFFF
        core = rtpcore.core
        if core is not None:
            route = self._route
            if route is None or route[0] != addr:
                route = self._route = self._core_route(addr)
            if route[1] is not None:  # the C core: pack and send in one call
                header = _HEADER.pack(0x80, (0x80 if marker else 0) | pt, 0, 0, self._ssrc)
                try:
                    wire = core.send_rtp(route[1], route[2], 0, header, seq, timestamp, payload)
                except OSError as exc:  # pragma: no cover - e.g. unreachable network
                    log.debug("%s: send failed: %r", self.label, exc)
                    return
                if wire < 0:
                    self.stats.send_dropped += 1  # the kernel's buffer is full: lost, as on the wire
                    return
                self._sent(payload)
                return
        data = _HEADER.pack(0x80, (0x80 if marker else 0) | pt, seq, timestamp, self._ssrc) + payload
        try:
            self._transport.sendto(data, addr)
        except OSError as exc:  # pragma: no cover - e.g. unreachable network
            log.debug("%s: send failed: %r", self.label, exc)
            return
        self._sent(payload)

    def _sent(self, payload: bytes) -> None:
        stats = self.stats
        stats.packets_sent += 1
        stats.bytes_sent += len(payload)

    def _core_route(self, addr) -> tuple:
        """(``addr``, the RTP socket's descriptor, ``addr`` as the C core takes it), the
        descriptor ``None`` when the core cannot send there (no socket of ours, a name)."""
        return addr, *(native_destination(transport_socket(self._transport), addr) or (None, None))

    def _send_sr(self) -> None:
        remote = self.remote
        addr = self.remote_addr
        if addr is None or not remote.receives:
            return
        port = addr[1] if remote.rtcp_mux else addr[1] + 1
        ntp = int((time.time() + _NTP_EPOCH) * (1 << 32))
        ts = (self._ts_origin + self._index * self._ticks) & 0xFFFFFFFF
        stats = self.stats
        data = _SR.pack(0x80, 200, 6, self._ssrc, ntp >> 32, ntp & 0xFFFFFFFF, ts, stats.packets_sent & 0xFFFFFFFF,
                        stats.bytes_sent & 0xFFFFFFFF)
        transport = self._transport if remote.rtcp_mux else self._rtcp_transport
        try:
            transport.sendto(data, (addr[0], port))
            stats.rtcp_sent += 1
        except OSError:  # pragma: no cover
            pass

    # -- receive --------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr, at: float | None = None) -> None:
        """One datagram on the RTP port, which arrived ``at`` (loop clock; ``None``: now)."""
        stats = self.stats
        if len(data) < 12 or data[0] >> 6 != 2:
            stats.packets_invalid += 1
            return
        second = data[1]
        if 200 <= second <= 204:  # RTCP on the RTP port (rtcp-mux)
            stats.rtcp_received += 1
            return
        if self.remote is None:
            stats.packets_early += 1
            return
        pt = second & 0x7F
        audio = pt == self._audio_pt
        if not audio and pt != self._dtmf_pt:
            stats.packets_unknown_pt += 1
            return
        first = data[0]
        start = 12 + 4 * (first & 0x0F)
        if first & 0x10:
            if len(data) < start + 4:
                stats.packets_invalid += 1
                return
            start += 4 + 4 * int.from_bytes(data[start + 2:start + 4], "big")
        end = len(data) - (data[-1] if first & 0x20 else 0)
        if start > end:
            stats.packets_invalid += 1
            return
        addr = addr[:2]
        if addr != self.remote_addr:
            if not self.symmetric or self.latched:
                stats.packets_foreign += 1
                return
            log.info("%s: latched onto %s:%d (SDP said %s:%d)", self.label, addr[0], addr[1], *self.remote_addr)
            self.remote_addr = addr
        self.latched = True
        _, _, seq, timestamp, ssrc = _HEADER.unpack_from(data)
        payload = data[start:end]
        now = self._loop.time() if at is None else at
        self.last_rx = now
        stats.packets_received += 1
        stats.bytes_received += len(payload)
        # RFC 3550 A.3 loss over every packet of the stream (audio and events share it)
        if ssrc != self._rx_ssrc:
            if self._rx_ssrc is not None:
                stats.ssrc_changes += 1
                self._rx_lost_before = stats.packets_lost
            self._rx_ssrc = ssrc
            self._rx_seq = Unwrapper(16)
            self._rx_first = self._rx_seq.extend(seq)
            self._rx_count = 0
            self._last_transit = None
        else:
            self._rx_seq.extend(seq)
        self._rx_count += 1
        expected = self._rx_seq.newest - self._rx_first + 1
        stats.packets_lost = self._rx_lost_before + max(0, expected - self._rx_count)
        if audio:
            transit = now * self._rx_clock - timestamp
            last = self._last_transit
            if last is not None:
                d = transit - last
                d = (d + 2**31) % 2**32 - 2**31  # timestamps wrap
                self._jitter += (abs(d) - self._jitter) / 16
                stats.jitter_ms = self._jitter * 1000 / self._rx_clock
            self._last_transit = transit
            jb = self._jb
            jb.push(seq, timestamp, payload, now, ssrc)
            stats.packets_late = jb.stats.packets_late
        else:
            for event in self._dtmf_decoder.feed(payload, timestamp=timestamp, now=now, ssrc=ssrc):
                self._emit(event)
