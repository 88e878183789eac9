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

  While what goes out is known ahead — a pre-encoded prompt's next packets, or the
  silence packet while nothing is queued — and nothing needs each frame as it goes (no
  DTMF event queued; the only outbound tap a recording whose stereo.ogg takes our
  packets as they are), the C core's ``Lane`` sends up to :data:`RUNWAY` frames on its
  own: per tick one call, no Python per frame, each packet also placed in stereo.ogg's
  business leg, the pacing measured as the track measures it. The Python side (the
  track's position and statistics, the playback, the counters above, the recording's
  levels) catches up once per runway, or at once when the queue, the taps or DTMF
  change (``OutboundAudioTrack.settle``): barge-in and a new prompt still take effect
  at the next frame. What is only checked once per runway: that the sender still has
  this track (``replaceTrack``) and that DTLS is still up (the lane sends on its own
  ``dup()`` of the socket, so a closed descriptor is never reused under it).

* **Receiving** (:class:`LeanReceiver`): the nominated pair's socket leaves the event
  loop's selector and is drained on the same ticker, first thing each tick
  (:class:`PolledSocket`; each datagram with the kernel's arrival time; one ``epoll``
  set per ticker says which sockets have any, :class:`SocketPoller`), so the
  process wakes 50 times a second instead of once per packet. An SRTP packet of an
  audio or telephone-event payload type is unprotected, passed through DTMF (events
  leave the stream there), parsed into a small :class:`RtpView` and given to the RTP
  tap and our playout buffer at once, with its arrival time — no STUN parse attempt,
  no queue, no task hop, no ``RtpPacket``. Everything else (STUN: ICE checks and
  consent; DTLS; RTCP; other payload types) goes on to aioice and aiortc as before.
  aiortc's receive statistics (what its receiver reports in RTCP) are kept by our
  playout from the arrival times; the DTLS transport's byte and packet counters here.

**The C core** (:mod:`media.rtpcore`, ``media/_rtpcore.c``, where the install built it):
the sender's patch-protect-``sendto`` is one call; the intake's drain is one call per
tick, which also unprotects and parses each call's audio and telephone-event packets
(:attr:`SocketPoller.routes`; the receiver takes them on in ``_parsed``). libsrtp and
its contexts stay pylibsrtp's (:class:`media.aiortc_hooks.FastSrtp` hands them over).
Without it the same steps run here in Python, with the same results.

``PeerConfig(rtp_path="aiortc")`` keeps aiortc's own per-call loops (for comparison, and
for non-Opus codecs or a relayed (TURN) path, where the lean path steps aside).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import struct
import sys
import time
import weakref
from collections.abc import Callable

from aiortc import clock
from aiortc.rtp import RtpPacket

from . import aiortc_hooks
from . import rtpcore
from .clock import FRAME_S
from .frames import FRAME_SAMPLES
from .track import PACING_BIN_S

__all__ = ["FrameTicker", "LeanReceiver", "LeanSender", "PolledSocket", "RtpView", "native_destination", "parse_rtp",
           "transport_socket"]

log = logging.getLogger(__name__)

#: Behind by more than this many frames after a stall: drop the backlog (delay, not a burst).
MAX_CATCH_UP = 5
#: Frames a lane is loaded with at most (see ``LeanSender._load``): how often, while a
#: prompt or silence plays, the Python side of a call catches up (200 ms).
#: ``WACALL_RTP_LANE=0`` turns the lane off (every frame through Python, as before it:
#: to compare, or to rule it out); so does 0 here, from the next frame on.
RUNWAY_FRAMES = 10
RUNWAY = 0 if os.environ.get("WACALL_RTP_LANE", "1").strip().lower() in ("0", "false", "no", "off") else RUNWAY_FRAMES
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
        # (weakly: the per-loop table holds the ticker, and a ticker that held its loop
        # would keep every closed loop of the process alive)
        self._loop = weakref.ref(loop)
        self.subscribers: list[Callable[[float, float, int], None]] = []
        #: Run before every subscriber: the lean receivers draining their sockets, so
        #: what arrived since the last tick is in the playout buffers when they play.
        self.intake: list[Callable[[float, float, int], None]] = []
        self.ticks = 0
        self.resyncs = 0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._ticking = False
        #: Taken once at the start of each tick, for every call in it: the NTP time
        #: (64-bit; aiortc's clock builds a ``datetime`` each time) for the senders'
        #: report counters, and ``time.time()`` minus the loop's clock for the
        #: receivers (kernel arrival stamps are wall-clock times).
        self.ntp_time = 0
        self.wall_offset = 0.0
        #: The polled sockets' :class:`SocketPoller`, once one was started.
        self.poller: SocketPoller | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop()

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

    def add(self, subscriber: Callable[[float, float, int], None], *, first: bool = False,
            at: float | None = None, intake: bool = False) -> None:
        """Call ``subscriber`` every tick from the next one on; ``first``: before the
        subscribers already there; ``intake``: before all of them (see :attr:`intake`).
        An idle ticker starts with its first tick due ``at`` (loop clock; default: one
        frame from now)."""
        if intake:
            self.intake.append(subscriber)
        elif first:
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
            try:
                self.intake.remove(subscriber)
            except ValueError:
                return
        if not self.subscribers and not self.intake and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = None
        self._ticking = True
        now = self.loop.time()
        self.wall_offset = time.time() - now
        self.ntp_time = clock.current_ntp_time()
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
            for tick in (*self.intake, *self.subscribers):
                try:
                    tick(now, late, frames)
                except Exception:  # noqa: BLE001 - one call's failure never stops the others
                    log.exception("a frame ticker subscriber failed; it stops, the other calls go on")
                    self.remove(tick)
        finally:
            self._ticking = False
            if (self.subscribers or self.intake) and self._handle is None:
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
        #: For the C core (:mod:`media.rtpcore`): the socket's descriptor, the
        #: address as a C struct, the SRTP context; ``None`` where it does not apply.
        self._native: tuple[int, bytes, int] | None = None
        self._ticker: FrameTicker | None = None
        self._why_not: str | None = "not configured"
        #: The C core's lane (sending ahead, see :meth:`_load`) and, while it is loaded,
        #: ``(playback, taps)`` of what it sends.
        self._lane = None
        self._runway: tuple | None = None
        #: Of :attr:`packets`, those the lane sent.
        self.lane_frames = 0
        #: The playback whose frames the track could not tell ahead (not asked again).
        self._refused = None
        if dtmf is not None:
            dtmf.on_queued = self.interrupt

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
                self._dtls, self._connection = dtls, connection
                self._srtp = aiortc_hooks.fast_srtp(dtls._tx_srtp)
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
        self._close_lane()
        self._refused = None
        if self._ticker is not None:
            self._ticker.remove(self._tick)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # -- per frame ------------------------------------------------------------------------

    def _tick(self, now: float, late: float, frames: int) -> None:
        if self._runway is not None:  # (the lane is loaded)
            sent = self._lane.send(now, late, frames, self._ticker.ntp_time)
            if sent == frames:
                return
            frames -= sent
            late -= sent * FRAME_S
            self._settle()
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
            self._sock = transport_socket(pair.protocol.transport)
            self._native = self._native_route()
            self._new_lane()
        track = self.track
        if self._sender.track is not track:
            return  # replaced (or removed) for now: nothing goes out, as with aiortc
        header = self._header
        protect = self._srtp.protect
        dtmf = self.dtmf
        origin = self._ts_origin
        core = rtpcore.core
        native = self._native if core is not None else None
        lane = self._lane if native is not None else None
        i = 0
        while i < frames:
            if lane is not None and self._load(lane):
                sent = lane.send(now, late - i * FRAME_S, frames - i, self._ticker.ntp_time)
                i += sent
                if i >= frames:
                    return
                self._settle()
                if self._lane is None:  # (the lane's socket failed: the Python path from here)
                    lane = native = None
                if sent:
                    continue
            track.paced(now, late - i * FRAME_S)
            i += 1
            payload = track.next_payload()
            seq = self._seq
            timestamp = (origin + track.sent_pts) & 0xFFFFFFFF
            if native is not None and (dtmf is None or not dtmf.sending):
                # the C core: patch, protect and send in one call
                try:
                    wire = core.send_rtp(native[0], native[1], native[2], header, seq, timestamp, payload)
                except OSError:
                    native = self._native = lane = None  # the socket's trouble: the Python path reports it
                    self._close_lane()
                else:
                    if dtmf is not None:
                        dtmf.passed(seq)
                    if wire < 0:
                        self.dropped += 1  # the kernel's buffer is full: a datagram lost, as on the wire
                    aiortc_hooks.count_sent(self._sender, dtls, len(payload), abs(wire), timestamp,
                                            self._ticker.ntp_time)
                    self.packets += 1
                    self._seq = (seq + 1) & 0xFFFF
                    continue
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
                                        self._ticker.ntp_time)
                self.packets += 1
            if owed is not None:
                dtmf.sent(owed)
            self._seq = (seq + 1) & 0xFFFF

    # -- the lane: sending ahead in C ------------------------------------------------------

    def _new_lane(self) -> None:
        """A lane on the current pair's socket (see :meth:`_load`), where the C core
        was built and the pair's route is native; none otherwise."""
        self._close_lane()
        native = self._native
        core = rtpcore.core
        if native is None or core is None or self._header is None:
            return
        try:
            self._lane = core.Lane(native[0], native[1], native[2], bytes(self._header),
                                   len(self.track.stats._hist), PACING_BIN_S, self._ts_origin)
        except OSError as exc:
            log.debug("no lane for this call's sends: %s", exc)

    def _close_lane(self) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            if self._runway is not None:
                self._settle(lane)
            lane.close()

    def _load(self, lane) -> bool:
        """Load ``lane`` with what the next frames will be, when they are known ahead
        (a pre-encoded prompt, silence: :meth:`OutboundAudioTrack.runway`) and nothing
        needs them one by one as they go: no DTMF event queued, and every outbound tap
        content with its packets placed in a stereo.ogg ring by the lane
        (``lane_ring()``: see :class:`media.sinks.recorder.CallRecorder`). Up to
        :data:`RUNWAY` frames: what ``send`` then sends with no Python per frame; the
        counters catch up in :meth:`_settle`, when the runway ends or anything changes
        (:meth:`interrupt`)."""
        track = self.track
        head = track.queue.head
        if head is not None and head is self._refused:
            return False
        dtmf = self.dtmf
        if dtmf is not None and dtmf.sending:
            return False
        ring = None
        taps = []
        for tap in track.sinks:
            lane_ring = getattr(tap, "lane_ring", None)
            if lane_ring is None:
                return False
            try:
                found = lane_ring()
            except Exception as exc:  # noqa: BLE001 - as a tap's write raising: detached
                track.sinks.detach(tap, exc)
                return False
            if found is False or (found is not None and ring is not None):
                return False
            ring = found if found is not None else ring
            taps.append(tap)
        runway = track.runway(RUNWAY)
        if runway is None:
            if head is not None and head.started_at is not None:
                self._refused = head  # (its frames are not known ahead: a bot's, a tone's...)
            return False
        packets, start, count, repeat, playback = runway
        loaded = lane.load(packets, start, count, repeat, self._seq, track._index * FRAME_SAMPLES, track._last_sent,
                           ring)
        if not loaded:
            return False
        self._runway = (playback, taps)
        return True

    def interrupt(self) -> None:
        """Stop sending ahead now and bring the track, its taps and the counters up to
        date (the queue, the taps or DTMF change; the track calls this)."""
        if self._runway is not None:
            self._settle()

    def _settle(self, lane=None) -> None:
        """The runway ends (what is left of it is not sent) and what the lane sent since
        it was loaded goes into the Python objects: as if each frame had gone through
        the track and :meth:`_tick` one by one."""
        lane = lane or self._lane
        lane.flush()
        (sent, payload_bytes, wire_bytes, dropped, late_frames, underruns, max_late_ms, max_interval_ms,
         last_sent, payload, ntp, seq, error, send_errno) = lane.take(self.track.stats._hist)
        playback, taps = self._runway
        self._runway = None
        if sent:
            level = self.track.lane_frames(sent, playback, payload, last_sent, late_frames, underruns,
                                           max_late_ms, max_interval_ms)
            self.packets += sent
            self.lane_frames += sent
            self.dropped += dropped
            self._seq = seq
            aiortc_hooks.count_sent(self._sender, self._dtls, payload_bytes, wire_bytes,
                                    (self._ts_origin + self.track.sent_pts) & 0xFFFFFFFF, ntp, sent)
            if self.dtmf is not None:
                self.dtmf.passed((seq - 1) & 0xFFFF, sent)
            for tap in taps:
                try:
                    tap.lane_sent(sent, level, error)
                except Exception as exc:  # noqa: BLE001 - a tap's fault is isolated, as in SinkSet.write
                    self.track.sinks.detach(tap, exc)
        if send_errno:
            log.debug("lane: sendto failed (errno %d): the Python path sends", send_errno)
            self._native = None
            self._close_lane()

    def _native_route(self) -> tuple[int, bytes, int] | None:
        """What the C core needs to send on the current pair, or ``None`` (not built,
        no socket of ours, no SRTP context it can use, an address it cannot parse)."""
        address = getattr(self._srtp, "address", None)
        destination = native_destination(self._sock, self._addr)
        return None if address is None or destination is None else (*destination, address)

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


class PolledSocket:
    """A UDP transport's socket read on the :class:`FrameTicker`'s intake instead of by
    the event loop's selector (the lean receive path's, see :class:`LeanReceiver`).

    :meth:`start` asks the kernel to stamp each datagram's arrival (``SO_TIMESTAMPNS``:
    Linux), pauses the transport's reading and drains the socket every tick (through
    the ticker's :class:`SocketPoller`): ``deliver(data, addr, at)`` for each datagram,
    ``at`` its arrival on the loop's clock. Errors the socket reports go to the transport's protocol, as asyncio's own
    reader sends them. If ``deliver`` raises, polling stops for good: the transport
    reads again (its protocol's callback then gets the datagrams) and ``on_stop`` is
    called, so nothing is left unread."""

    def __init__(self, transport, deliver: Callable[[bytes, object, float], None], *,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.deliver = deliver
        self.on_stop = on_stop
        self.datagrams = 0
        self._sock: socket.socket | None = None
        self._poller: SocketPoller | None = None
        self._fd = -1

    @property
    def running(self) -> bool:
        return self._poller is not None

    def start(self) -> bool:
        """Poll from the next tick on (``False``: this socket cannot be: left as it was)."""
        sock = transport_socket(self.transport)
        if sock is None or not _stamp_arrivals(sock):
            return False
        self._sock = sock
        self._fd = sock.fileno()
        self.transport.pause_reading()
        self._poller = SocketPoller.of(FrameTicker.of(asyncio.get_running_loop()))
        self._poller.add(self)
        return True

    def stop(self, *, resume: bool = True) -> None:
        """Stop polling; ``resume``: the transport reads by itself again (unless closing)."""
        if self._poller is not None:
            self._poller.remove(self)
            self._poller = None
            if resume and not self.transport.is_closing():
                self.transport.resume_reading()
        self._sock = None

    def _read(self, now: float, offset: float) -> None:
        """Read and deliver one datagram (the poller said the socket has one)."""
        if self.transport.is_closing():
            self.stop(resume=False)
            return
        try:
            data, ancillary, flags, addr = self._sock.recvmsg(_MAX_DATAGRAM, _STAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # as asyncio's own reader reports it
            self.transport.get_protocol().error_received(exc)
            return
        if flags & _MSG_TRUNC:
            return  # larger than anything a media peer sends after the handshakes
        at = now
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == _SCM_TIMESTAMPNS and len(raw) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(raw)
                at = sec + nsec * 1e-9 - offset
        self._received(data, addr, at)

    def _received(self, data: bytes, addr, at: float) -> None:
        """One datagram read (here, or by the C core's drain): deliver it."""
        self.datagrams += 1
        try:
            self.deliver(data, addr, at)
        except Exception:
            self.failed()

    def failed(self) -> None:
        """Delivering raised (inside an ``except``): log it, stop polling for good, the
        transport reads by callback from now on."""
        log.exception("polled socket: delivering a datagram failed; the socket is read by callback from now on")
        self.stop(resume=True)
        if self.on_stop is not None:
            self.on_stop()

    def _failed(self, errno: int) -> None:
        """The C core's drain got an error from this socket: to the protocol, as asyncio reports it."""
        self.transport.get_protocol().error_received(OSError(errno, os.strerror(errno)))


class SocketPoller:
    """The polled sockets of one :class:`FrameTicker`, read on its intake.

    One ``epoll`` set holds them all. Each tick asks it which have datagrams waiting
    (one system call) and reads one datagram from each of those, then asks again,
    until none has any or :data:`MAX_DRAIN` rounds went by (a flood on one socket
    cannot hold the loop). Reading each socket until it says "empty" would cost a
    failing ``recvmsg`` (a system call and an exception) per socket and tick: 8 µs
    against 5 µs per socket here. The epoll descriptor exists while sockets do."""

    def __init__(self, ticker: FrameTicker) -> None:
        self.ticker = ticker
        self._epoll: select.epoll | None = None
        self._sockets: dict[int, PolledSocket] = {}
        #: For the C core: descriptor -> (SRTP context, payload types as 128 flag bytes,
        #: the :class:`LeanReceiver`) whose SRTP packets it unprotects and parses itself.
        self.routes: dict[int, tuple[int, bytes, object]] = {}

    @classmethod
    def of(cls, ticker: FrameTicker) -> SocketPoller:
        """``ticker``'s poller (kept on the ticker)."""
        if ticker.poller is None:
            ticker.poller = cls(ticker)
        return ticker.poller

    def __len__(self) -> int:
        return len(self._sockets)

    def add(self, polled: PolledSocket) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            self.ticker.add(self._poll, intake=True)
        fd = polled._fd
        stale = self._sockets.pop(fd, None)
        self.routes.pop(fd, None)
        if stale is not None:  # (that descriptor was closed and reused: epoll forgot it)
            stale._poller = None
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)
        self._sockets[fd] = polled

    def remove(self, polled: PolledSocket) -> None:
        fd = polled._fd
        if self._sockets.get(fd) is not polled:
            return
        del self._sockets[fd]
        self.routes.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # (closed already: the kernel dropped it from the set)
        if not self._sockets:
            self.ticker.remove(self._poll)
            self._epoll.close()
            self._epoll = None

    def route(self, polled: PolledSocket, srtp: int, payload_types: frozenset[int], owner) -> None:
        """Let the C core unprotect and parse ``polled``'s SRTP packets of
        ``payload_types`` with the context at ``srtp``, for ``owner._parsed``."""
        if self._sockets.get(polled._fd) is polled:
            flags = bytes(pt in payload_types for pt in range(128))
            self.routes[polled._fd] = (srtp, flags, owner)

    def unroute(self, polled: PolledSocket) -> None:
        if self._sockets.get(polled._fd) is polled:
            self.routes.pop(polled._fd, None)

    def _poll(self, now: float, late: float, frames: int) -> None:
        offset = self.ticker.wall_offset
        sockets = self._sockets
        core = rtpcore.core
        if core is not None:
            # the C core reads every waiting datagram (up to MAX_DRAIN rounds) in one call,
            # and unprotects and parses the routed sockets' RTP
            if self._epoll is None:
                return
            routes = self.routes
            if routes:
                others, parsed = core.drain(self._epoll.fileno(), MAX_DRAIN, offset, now, routes)
                for owner, plain, packet, wire, at in parsed:
                    try:
                        owner._parsed(plain, packet, wire, at)
                    except Exception:
                        owner._failed()
            else:
                others = core.drain(self._epoll.fileno(), MAX_DRAIN, offset, now)
            for fd, data, addr, at in others:
                polled = sockets.get(fd)
                if polled is None:
                    continue
                if polled.transport.is_closing():
                    polled.stop(resume=False)
                elif data is None:
                    polled._failed(addr)
                else:
                    polled._received(data, addr, at)
            return
        for _ in range(MAX_DRAIN):
            epoll = self._epoll
            if epoll is None:
                return
            ready = epoll.poll(0)
            if not ready:
                return
            for fd, _events in ready:
                polled = sockets.get(fd)
                if polled is not None:
                    polled._read(now, offset)


class LeanReceiver:
    """Takes one call's received RTP on the lean path (see the module docstring).

    ``payload_types()`` says which payload types to take (Opus and telephone-event as
    negotiated); ``hook`` is the receiver's :class:`media.aiortc_hooks.ReceiverHook`
    (tap observers first, then our playout as the consumer); ``dtmf`` the peer's
    :class:`media.dtmf.PeerDtmf`.

    **Polled** (where the kernel stamps arrivals: Linux): the pair's
    socket is a :class:`PolledSocket`, drained on the shared ticker's intake right
    before the playout it feeds, each datagram with its kernel arrival time, so the
    jitter buffer and the RTCP jitter see when a packet arrived, not when it was read.
    No wake-up, callback or handle per packet. STUN, DTLS and RTCP read this way go on
    to aioice unchanged, up to 20 ms later (consent and RTCP have seconds). Elsewhere,
    or after a failure, packets come from the socket's callback as they arrive."""

    def __init__(self, transceiver, hook, dtmf, payload_types: Callable[[], frozenset[int]]) -> None:
        self.transceiver = transceiver
        self.hook = hook
        self.dtmf = dtmf
        self.payload_types = payload_types
        self.packets = 0
        self._protocol = None
        self._original = None
        self._polled: PolledSocket | None = None
        self._pts: frozenset[int] = frozenset()
        self._dtls = None
        self._rx_srtp: tuple | None = None  # (the DTLS transport's session, its FastSrtp)
        self._loop = asyncio.get_running_loop()

    @property
    def polled(self) -> bool:
        """Whether the socket is being drained on the ticker (see the class docstring)."""
        return self._polled is not None and self._polled.running

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
        polled = PolledSocket(protocol.transport, self._datagram_received, on_stop=self._by_callback)
        if polled.start():
            self._polled = polled
            self._route()
        else:
            self._by_callback()
        return True

    def _route(self) -> None:
        """Have the C core unprotect and parse this call's audio and telephone-event
        packets as it drains the socket (where it runs and can use the SRTP context)."""
        polled = self._polled
        if polled is None or polled._poller is None:
            return
        if self._dtls._rx_srtp is None:
            polled._poller.unroute(polled)
            return
        address = getattr(self._fast_rx(), "address", None)
        self._pts = self.payload_types()
        if address is None:
            polled._poller.unroute(polled)
        else:
            polled._poller.route(polled, address, self._pts, self)

    def _failed(self) -> None:
        """Handling a packet the C core routed here raised (inside an ``except``)."""
        if self._polled is not None:
            self._polled.failed()

    def _by_callback(self) -> None:
        if self._protocol is not None:
            self._protocol.datagram_received = self._datagram_received

    def uninstall(self) -> None:
        polled, self._polled = self._polled, None
        if polled is not None:
            polled.stop()  # (which takes its route away too)
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.__dict__.get("datagram_received") == self._datagram_received:
            del protocol.datagram_received
        self._original = None
        self.hook = self.dtmf = None

    def _datagram_received(self, data: bytes, addr, at: float | None = None) -> None:
        if len(data) >= 12 and 127 < data[0] < 192:
            pt = data[1] & 0x7F
            pts = self._pts
            if pt not in pts:
                pts = self._pts = self.payload_types()
                if pt in pts:
                    self._route()  # (negotiated since: the C core takes them from now on)
            if pt in pts and self._dtls._rx_srtp is not None:
                self._rtp(data, self._loop.time() if at is None else at)
                return
        original = self._original
        if original is not None:
            original(data, addr)

    def _fast_rx(self):
        """The FastSrtp of the DTLS transport's current receive session (made again
        when the keys change)."""
        session = self._dtls._rx_srtp
        srtp = self._rx_srtp
        if srtp is None or srtp[0] is not session:
            srtp = self._rx_srtp = (session, aiortc_hooks.fast_srtp(session))
        return srtp[1]

    def _rtp(self, data: bytes, at: float) -> None:
        try:
            plain = self._fast_rx().unprotect(data)
        except Exception:  # noqa: BLE001 - pylibsrtp.Error: dropped, as aiortc drops it
            return
        self._clear(plain, None, len(data), at)

    def _parsed(self, plain: bytes, packet: RtpView | None, wire: int, at: float) -> None:
        """An SRTP packet of ours the C core unprotected (``plain``) and parsed
        (``packet``, ``None`` if not RTP), ``wire`` bytes long: as :meth:`_rtp` goes on."""
        polled = self._polled
        if polled is None:
            return  # (uninstalled while the tick was being handed out)
        if self._rx_srtp is None or self._dtls._rx_srtp is not self._rx_srtp[0]:
            self._route()  # (new keys: this one was unprotected with the old; the next is not)
            return
        polled.datagrams += 1
        self._clear(plain, packet, wire, at)

    def _clear(self, plain: bytes, packet: RtpView | None, wire: int, at: float) -> None:
        """A packet of ours unprotected (``plain``, ``wire`` bytes long on the wire):
        counted, through DTMF, parsed (unless ``packet`` is that already), then to the
        taps first and our playout; what that does not take goes to aiortc."""
        aiortc_hooks.count_received(self._dtls, wire)
        self.packets += 1
        dtmf = self.dtmf
        if dtmf is not None:
            clear = dtmf.incoming(plain) if packet is None else dtmf.incoming_parsed(plain, packet)
            if clear is None:
                return
            if clear is not plain:  # renumbered (telephone-events were taken before it): parsed again
                plain, packet = clear, None
        if packet is None:
            core = rtpcore.core
            try:
                packet = parse_rtp(plain) if core is None else core.parse_rtp(plain)
            except ValueError:
                return
        hook = self.hook
        if hook is None:
            return
        for observe in hook.observers:
            observe(packet, at)
        consumer = hook.consumer
        if consumer is None or not consumer(packet, at):
            self._to_aiortc(plain, hook)

    def _to_aiortc(self, plain: bytes, hook) -> None:
        """Not ours to play: aiortc handles it as it would have (its own packet object)."""
        try:
            full = RtpPacket.parse(plain, aiortc_hooks.receive_extensions_map(self._dtls))
        except ValueError:
            return
        asyncio.ensure_future(hook.original(full, clock.current_ms()))


#: Datagrams read per call and tick at most (the rest wait for the next tick): a flood
#: cannot hold the loop.
MAX_DRAIN = 64
_MAX_DATAGRAM = 8192
_MSG_TRUNC = int(socket.MSG_TRUNC)  # (an IntFlag: its & runs Python code)
_SCM_TIMESTAMPNS = getattr(socket, "SCM_TIMESTAMPNS", 35)  # Linux; SO_TIMESTAMPNS has the same value
_TIMESPEC = struct.Struct("@qq")
_STAMP_SPACE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0


def transport_socket(transport) -> socket.socket | None:
    """The UDP socket under an asyncio datagram transport (the lean path writes to and
    reads from it directly), or ``None`` (closed, or not what it was: then the
    transport's own ``sendto`` and callback are used)."""
    sock = getattr(transport, "_sock", None)
    return sock if isinstance(sock, socket.socket) and sock.type == socket.SOCK_DGRAM else None


def native_destination(sock: socket.socket | None, addr) -> tuple[int, bytes] | None:
    """``(descriptor, addr as a C struct)``: where the C core's ``send_rtp`` sends from
    ``sock`` to ``addr``; ``None`` without the core, without a socket of ours, or when
    ``addr`` is not an IP address (then the transport's own ``sendto``)."""
    core = rtpcore.core
    if core is None or sock is None:
        return None
    try:
        return sock.fileno(), core.sockaddr(tuple(addr))
    except (ValueError, TypeError, OSError):
        return None


def _stamp_arrivals(sock: socket.socket) -> bool:
    """Ask the kernel to stamp each datagram's arrival (nanoseconds, wall clock): Linux."""
    if not _STAMP_SPACE or not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_TIMESTAMPNS", _SCM_TIMESTAMPNS), 1)
    except OSError:
        return False
    return True
