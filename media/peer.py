"""One call's media: an aiortc peer connection that follows WhatsApp's SDP rules.

A :class:`MediaPeer` owns the peer connection, the outgoing paced track
(:class:`~media.track.OutboundAudioTrack`) and the receive path that hands the far
side's audio to sinks: :class:`~media.receiver.OpusReceiver` (adaptive jitter buffer,
loss concealment, Opus decoded on the event loop, a frame every 20 ms while RTP flows),
or aiortc's own track with ``PeerConfig(receive="aiortc")``. It is self-contained (no
gateway imports, no globals besides aiortc's), so a call's media can later move to a
worker process as a unit.

Offerer (business-initiated call)::

    peer = MediaPeer(PeerConfig())
    offer = await peer.create_offer()      # complete SDP: candidates inside, sha-256 only
    ...                                    # post it, receive the answer by webhook
    await peer.apply_answer(answer_sdp)    # works with an ICE-lite answerer
    await peer.media_up()                  # ICE + DTLS done; silence is already flowing

Answerer (an inbound call, or the sandbox's simulated phone)::

    answer = await peer.accept_offer(offer_sdp)
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from . import aiortc_hooks, ice, sdp as sdp_rules
from .dtmf import DtmfEvent, GoertzelDtmfDetector, PeerDtmf
from .frames import FRAME_MS, SAMPLE_RATE, Sink, Source
from .lean import LeanReceiver, LeanSender
from .opus import OpusSettings
from .receiver import OpusReceiver, aiortc_problems as receiver_problems
from .sinkset import SinkFault, SinkSet
from .taps import RtpTap
from .track import OutboundAudioTrack, Playback

log = logging.getLogger(__name__)


#: 20 ms frames per second (a frame's sample count times this is its rate).
_FRAMES_PER_S = 1000 // FRAME_MS


class MediaError(RuntimeError):
    """Media could not be set up or failed during the call."""


@dataclass(slots=True)
class IceServer:
    """A STUN or TURN server, e.g. ``IceServer("stun:stun.example.org:3478")`` or
    ``IceServer("turn:turn.example.org:3478?transport=udp", "user", "secret")``."""

    url: str
    username: str | None = None
    credential: str | None = None


@dataclass(slots=True)
class PeerConfig:
    ice_servers: list[IceServer] = field(default_factory=list)
    #: Addresses host candidates are gathered on; ``None`` = every interface.
    host_addresses: list[str] | None = None
    #: Upper bound for ICE gathering: STUN/TURN answers not in by then are given up and
    #: the SDP goes out with the candidates gathered (host ones at least).
    gather_timeout_s: float = 5.0
    #: Upper bound for ICE + DTLS after the remote description is applied.
    connect_timeout_s: float = 20.0
    #: Inclusive ``(low, high)`` UDP port range for every socket ICE binds (host
    #: candidates, TURN client); ``None`` = any port. A full range fails the offer or
    #: answer with a :class:`MediaError` caused by :class:`media.ice.PortRangeExhausted`.
    port_range: tuple[int, int] | None = None
    #: Public IP of a 1:1 NAT: written in place of the bound address in our host
    #: candidates (same IP version only) and ``c=``; the NAT must forward the same ports.
    advertised_address: str | None = None
    #: Also detect in-band DTMF tones in the received audio (Goertzel); digits are
    #: reported through ``on_dtmf`` with ``source="inband"``.
    inband_dtmf: bool = False
    #: How the outgoing audio is encoded (on the event loop, see media.opus); ``None``
    #: hands PCM to aiortc's encoder instead.
    opus: OpusSettings | None = field(default_factory=OpusSettings)
    #: How received audio is played: ``"wacall"`` (media.receiver: adaptive jitter
    #: buffer, loss concealment, decoding on the event loop, one frame per 20 ms while
    #: RTP flows) or ``"aiortc"`` (aiortc's jitter buffer and decoder thread).
    receive: str = "wacall"
    #: How RTP packets travel once DTLS is up: ``"lean"`` (media.lean: one shared 20 ms
    #: ticker sends every call's frames, straight to the socket) or ``"aiortc"`` (aiortc's
    #: per-call send loop; for comparison).
    rtp_path: str = "lean"

    def __post_init__(self) -> None:
        self.port_range = ice.validate_port_range(self.port_range)
        if self.receive not in ("wacall", "aiortc"):
            raise ValueError(f"receive must be 'wacall' or 'aiortc', got {self.receive!r}")
        if self.rtp_path not in ("lean", "aiortc"):
            raise ValueError(f"rtp_path must be 'lean' or 'aiortc', got {self.rtp_path!r}")
        if self.advertised_address is not None:
            ipaddress.ip_address(self.advertised_address)  # ValueError if not an IP


@dataclass(slots=True)
class ReceiveStats:
    frames: int = 0
    #: Stream timestamp (48 kHz samples, RTP-derived) of the frame the sinks are handed.
    pts: int | None = None

    @property
    def seconds(self) -> float:
        return self.frames * FRAME_MS / 1000


def _prefer_opus(transceiver) -> None:
    """Opus is the only audio codec WhatsApp takes (G.711 only when enabled in settings)."""
    codecs = RTCRtpSender.getCapabilities("audio").codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() == "audio/opus"])


class MediaPeer:
    def __init__(self, config: PeerConfig | None = None, *, label: str = "peer"):
        self.config = config or PeerConfig()
        self.label = label
        servers = [
            RTCIceServer(urls=s.url, username=s.username, credential=s.credential)
            for s in self.config.ice_servers
        ]
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.outbound = OutboundAudioTrack(opus=self.config.opus)
        self.received = ReceiveStats()
        #: The far side's Opus payloads before decoding (see media.taps).
        self.rtp_tap = RtpTap()
        self._sinks = SinkSet("receive", label=label, on_fault=self._sink_fault)
        self.outbound.sinks.label = label
        self.outbound.sinks.on_fault = self._sink_fault
        self.rtp_tap.label = label
        self.rtp_tap.on_fault = self._sink_fault
        self._fault_handlers: list[Callable[[SinkFault], None]] = []
        self._pump: asyncio.Task | None = None
        #: Our receive path (media.receiver), when PeerConfig.receive == "wacall".
        self._receiver: OpusReceiver | None = None
        #: Received RTP taken straight from the socket (media.lean) once media is up.
        self._lean_receiver: LeanReceiver | None = None
        self._connected = asyncio.Event()
        self._ended = asyncio.get_running_loop().create_future()
        self._closed = False
        #: The last RTP statistics read while the transport was up (see get_stats).
        self._last_rtp: dict | None = None
        self._pc.on("connectionstatechange", self._on_connection_state)
        self._pc.on("track", self._on_track)
        self._dtmf = PeerDtmf(label)
        if self.config.inband_dtmf:
            self._sinks.add(GoertzelDtmfDetector(self._dtmf.emit))

    # -- signalling ----------------------------------------------------------------------

    def _add_audio(self) -> None:
        transceiver = self._pc.addTransceiver(self.outbound, direction="sendrecv")
        _prefer_opus(transceiver)
        self._lean_send(transceiver)

    def _lean_send(self, transceiver) -> None:
        """Send our frames on the lean RTP path (media.lean), unless configured not to."""
        if self.config.rtp_path != "lean" or self.outbound.lean is not None:
            return
        lean = LeanSender(self.outbound, transceiver, dtmf=self._dtmf)
        aiortc_hooks.on_sender_start(transceiver.sender, lean.configure)
        self.outbound.lean = lean

    async def _local_sdp(self, description) -> str:
        config = self.config
        with ice.gathering(
            host_addresses=config.host_addresses,
            port_range=config.port_range,
            timeout=config.gather_timeout_s,
        ):
            try:
                # aioice gives up on STUN/TURN at gather_timeout_s; the grace is a backstop.
                await asyncio.wait_for(
                    self._pc.setLocalDescription(description),
                    config.gather_timeout_s + ice.GATHER_GRACE_S,
                )
                # setLocalDescription awaited gathering: the candidates are in this SDP.
                sdp = self._pc.localDescription.sdp
                if config.port_range is not None:
                    ice.check_host_ports(sdp_rules.host_candidates(sdp), config.port_range)
            except asyncio.TimeoutError as exc:
                raise MediaError(
                    f"ICE gathering did not finish within {config.gather_timeout_s:g} s"
                ) from exc
            except ice.PortRangeError as exc:
                raise MediaError(str(exc)) from exc
        if config.advertised_address is not None:
            sdp = sdp_rules.advertise_address(sdp, config.advertised_address)
        return self._dtmf.shape_local_sdp(sdp_rules.for_whatsapp(sdp), description.type)

    async def create_offer(self) -> str:
        """A WhatsApp-compatible offer with every candidate inside."""
        self._add_audio()
        return await self._local_sdp(await self._pc.createOffer())

    async def create_lite_offer(self) -> str:
        """An offer as an ICE-lite agent makes it (WhatsApp's relay calling a business):
        :meth:`create_offer`, with our ICE agent switched to the controlled role (a lite
        agent is never controlling). Mark the SDP ``a=ice-lite`` before sending it."""
        offer = await self.create_offer()
        for transceiver in self._pc.getTransceivers():  # checks start only after the answer
            aiortc_hooks.set_ice_controlling(transceiver, False)
        return offer

    async def _set_remote(self, remote_sdp: str, kind: str) -> None:
        try:
            sdp_rules.parse(remote_sdp)
            await self._pc.setRemoteDescription(RTCSessionDescription(remote_sdp, kind))
        except (ValueError, AssertionError) as exc:
            raise MediaError(f"cannot apply the SDP {kind}: {exc}") from exc
        self._dtmf.remote_description(remote_sdp, self._pc.getTransceivers())

    async def apply_answer(self, answer_sdp: str) -> None:
        """Apply the answer from the ``connect`` webhook (an ICE-lite answerer is fine)."""
        await self._set_remote(answer_sdp, "answer")

    async def accept_offer(self, offer_sdp: str) -> str:
        """Answer a remote offer (an inbound call, or a simulated phone)."""
        await self._set_remote(offer_sdp, "offer")
        transceivers = self._pc.getTransceivers()
        if not transceivers or transceivers[0].kind != "audio":
            raise MediaError("the offer has no audio section")
        transceivers[0].direction = "sendrecv"
        transceivers[0].sender.replaceTrack(self.outbound)
        _prefer_opus(transceivers[0])
        self._lean_send(transceivers[0])
        return await self._local_sdp(await self._pc.createAnswer())

    # -- media ---------------------------------------------------------------------------

    async def media_up(self, timeout: float | None = None) -> None:
        """Wait until ICE and DTLS are connected; raise :class:`MediaError` on failure."""
        timeout = self.config.connect_timeout_s if timeout is None else timeout
        waiter = asyncio.ensure_future(self._connected.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, self._ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if not self._connected.is_set():
            reason = self._ended.result() if self._ended.done() else f"no media within {timeout:g} s"
            raise MediaError(reason)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def is_up(self) -> bool:
        return self._connected.is_set() and not self._ended.done()

    @property
    def ended(self) -> asyncio.Future:
        """Resolves with a reason string when the transport fails or closes."""
        return self._ended

    def play(self, source: Source) -> Playback:
        return self.outbound.play(source)

    def clear(self) -> None:
        self.outbound.clear()

    def add_sink(self, sink: Sink) -> None:
        """Hand ``sink`` every received frame (see :mod:`media.sinkset`: a sink that
        raises is detached and reported through :meth:`on_sink_fault`). Frames are
        20 ms at 48 kHz, or lower when every reader says so: a sink with a ``pcm_rate``
        attribute (8000..48000, a divisor of 48 kHz) is content with that rate, and one
        with ``needs_pcm = False`` reads no audio (see :meth:`_pcm_rate`)."""
        self._sinks.add(sink)

    def on_sink_fault(self, callback: Callable[[SinkFault], None]) -> None:
        """Call ``callback(SinkFault)`` when a sink, outbound tap or RTP listener of
        this peer raised and was detached (the audio goes on)."""
        self._fault_handlers.append(callback)

    def _sink_fault(self, fault: SinkFault) -> None:
        for callback in self._fault_handlers:
            callback(fault)

    # -- DTMF (see media.dtmf) -----------------------------------------------------------

    @property
    def dtmf_payload_type(self) -> int | None:
        """The telephone-event/8000 payload type the remote SDP negotiated, or ``None``
        (then :meth:`send_dtmf` fails; digits are still received on PT 126)."""
        return self._dtmf.pt

    def on_dtmf(self, callback: Callable[[DtmfEvent], None]) -> Callable[[], None]:
        """Call ``callback(DtmfEvent)`` once per digit received, in order (RFC 4733,
        and in-band tones with ``PeerConfig.inband_dtmf``). Returns an unsubscriber."""
        return self._dtmf.subscribe(callback)

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> None:
        """Send ``digits`` (``0-9 * # A-D``) as RFC 4733 events on the audio stream,
        each ``duration_ms`` long (rounded up to 20 ms) followed by ``gap_ms`` of audio;
        returns once the last end packet is out. Audio is not sent during an event.
        Raises :class:`media.dtmf.DtmfError` when telephone-event was not negotiated or
        the call ends first, ``ValueError`` for bad arguments."""
        await self._dtmf.send(digits, duration_ms, gap_ms, self._ended)

    def remove_sink(self, sink: Sink) -> None:
        self._sinks.remove(sink)

    def add_outbound_sink(self, sink: Sink) -> None:
        """Tap what we send: ``sink`` gets every outgoing frame as it goes out (see
        :meth:`media.track.OutboundAudioTrack.add_sink`)."""
        self.outbound.add_sink(sink)

    def remove_outbound_sink(self, sink: Sink) -> None:
        self.outbound.remove_sink(sink)

    def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        log.debug("%s: connection %s", self.label, state)
        if state == "connected":
            self._connected.set()
            self._lean_receive()
        elif state in ("failed", "closed") and not self._ended.done():
            self._ended.set_result(f"transport {state}")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._pump is None and self._receiver is None:
            for transceiver in self._pc.getTransceivers():
                if transceiver.receiver.track is track:
                    if self.config.receive == "wacall":
                        self._install_receiver(transceiver.receiver, track)
                    # The tap observes the same receiver hook: it sees packets first.
                    self.rtp_tap.install(transceiver.receiver)
            if self._receiver is None:
                self._pump = asyncio.ensure_future(self._receive(track))

    def _lean_receive(self) -> None:
        """Take received RTP on the lean path (media.lean) once ICE and DTLS are up."""
        if self.config.rtp_path != "lean" or self._receiver is None or self._lean_receiver is not None:
            return
        transceivers = self._pc.getTransceivers()
        if not transceivers:
            return
        opus, dtmf = self._receiver, self._dtmf

        def payload_types() -> frozenset[int]:
            pts = opus.opus_payload_types
            return pts | {dtmf.receive_pt} if dtmf.receive_pt is not None else pts

        lean = LeanReceiver(transceivers[0], aiortc_hooks.receiver_hook(transceivers[0].receiver), dtmf, payload_types)
        if lean.install():
            self._lean_receiver = lean

    def _install_receiver(self, receiver, track: MediaStreamTrack) -> None:
        problems = receiver_problems(receiver)
        if problems:
            log.error("%s: aiortc internals changed, using aiortc's receive path: %s",
                      self.label, "; ".join(problems))
            return

        def fallback() -> None:  # no Opus negotiated: aiortc decodes
            if self._pump is None and not self._closed:
                self._pump = asyncio.ensure_future(self._receive(track))

        dtmf = self._dtmf
        self._receiver = OpusReceiver(
            self._deliver,
            on_fallback=fallback,
            events_received=lambda: dtmf.packets_received,
            label=self.label,
            pcm_rate=self._pcm_rate,
        )
        self._receiver.install(receiver)

    def _pcm_rate(self) -> int:
        """The rate the receive sinks want decoded audio at, 0 if none reads it (asked
        by the receiver every tick: a tick nobody reads is not decoded). Every sink
        reads it unless it says ``needs_pcm = False`` (the recorder when it only passes
        Opus through), at 48 kHz unless it says ``pcm_rate`` (a bot bridge at its wire
        rate, the speech detector at any): the highest rate any reader wants."""
        rate = 0
        for sink in self._sinks:
            if getattr(sink, "needs_pcm", True):
                wants = getattr(sink, "pcm_rate", SAMPLE_RATE)
                if wants >= SAMPLE_RATE:
                    return SAMPLE_RATE
                if wants > rate:
                    rate = wants
        return rate

    def _deliver(self, pcm: np.ndarray, pts: int | None) -> None:
        """One 20 ms mono frame from our receive path to the sinks (48 kHz unless every
        reader asked for less, see :meth:`_pcm_rate`)."""
        received = self.received
        received.frames += 1
        received.pts = pts
        self._sinks.write(pcm, pcm.size * _FRAMES_PER_S, 1)

    async def _receive(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray().reshape(-1)
                if pcm.dtype != np.int16:
                    raise MediaError(f"unexpected decoded sample format {frame.format.name}")
                channels = len(frame.layout.channels)
                self.received.frames += 1
                self.received.pts = frame.pts
                self._sinks.write(pcm, frame.sample_rate, channels)
        except MediaStreamError:
            pass

    async def get_stats(self) -> dict:
        """aiortc's RTP statistics for this call (see :mod:`media.stats`) plus pacing."""
        from .stats import collect

        self.outbound.settle()  # (what a lean sender sent ahead, counted to the frame)
        out = await collect(self._pc)
        if out["packets_sent"] or out["packets_received"] or out["candidate_pair"]:
            self._last_rtp = dict(out)
        elif self._last_rtp is not None:
            # the transport is gone (the far end hung up first: aiortc forgets its counters
            # and the candidate pair): the last numbers read while it was up
            out.update(self._last_rtp)
        out["pacing"] = self.outbound.stats.as_dict()
        out["received_seconds"] = round(self.received.seconds, 3)
        if self._receiver is not None and not self._receiver.fallback:
            out["playout"] = self._receiver.stats()
        return out

    def stats(self) -> dict:
        out = {
            "sent": self.outbound.stats.as_dict(),
            "received_seconds": round(self.received.seconds, 3),
        }
        if self._receiver is not None and not self._receiver.fallback:
            out["playout"] = self._receiver.stats()
        return out

    async def close(self) -> None:
        """Stop media, close sinks and the peer connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.outbound.stop()
        self._dtmf.close()
        if self._receiver is not None:
            self._receiver.close(flush=True)  # buffered audio reaches the sinks
        await self._pc.close()
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None
        for sink in self._sinks.clear():
            try:
                sink.close()
            except Exception:  # one sink failing to close must not keep the others open
                log.exception("%s: closing a sink failed", self.label)
        if not self._ended.done():
            self._ended.set_result("closed")
        self._release()

    def _release(self) -> None:
        """Drop what a closed peer no longer needs (codec contexts, buffers, callbacks
        registered on aiortc objects), so that whatever still refers to this peer
        keeps only its statistics alive."""
        self._pc.remove_all_listeners()
        self._fault_handlers = []
        if self._lean_receiver is not None:
            self._lean_receiver.uninstall()
            self._lean_receiver = None
        self.outbound.release()
        self.rtp_tap.release()
        self._dtmf.release()
        if self._receiver is not None:
            self._receiver.release()
