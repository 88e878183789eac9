"""A WhatsApp call's peer ⇄ a plain-RTP SIP party: :class:`RtpBridge`.

Same lifecycle as the bot bridges (:mod:`media.bridges.base`): ``start(peer, call_id=…,
parameters=…)``, :attr:`~RtpBridge.closed` (a reason string), ``stop(reason)``,
:attr:`~RtpBridge.stats`; and it is made from plain options, so an unstarted bridge
pickles into a media worker process (``__reduce__``, as ``Bridge`` does).

The two-step flow a SIP leg needs (the SDP must carry our port before the far end is
known)::

    bridge = RtpBridge(host="10.0.0.5", port_range=(40000, 40999), codecs=("PCMU", "opus"))
    await bridge.open()                          # binds the port now
    # we call out:   offer = bridge.create_offer()   ... bridge.set_remote_answer(answer)
    # we answer:     answer = bridge.accept_offer(offer)
    await bridge.start(peer, call_id=call.id)    # before or after the remote SDP
    reason = await bridge.closed                 # "rtp timeout", "call media ended (…)"
    await bridge.stop("sip bye")

``start`` opens the endpoint itself when ``open`` was not called. Audio flows once both
``start`` and the remote description happened, in either order.

Data path, all on the event loop:

* **WhatsApp → SIP**: a sink on the peer pushes each 48 kHz caller frame to the
  endpoint, which encodes it on its 20 ms tick. When the SIP side negotiated Opus and
  ``passthrough`` is on, the peer's RTP tap hands WhatsApp's Opus payloads to the
  endpoint as they are (no decode, no encode; the PCM sink then stands aside).
* **SIP → WhatsApp**: the endpoint's :attr:`~media.rtp.endpoint.RtpEndpoint.playout`
  is played on the peer; the peer's paced track reads (and so decodes) one frame per
  20 ms. With Opus, each frame played from a packet carries it as ``packet``, and the
  peer sends it without re-encoding.
* **DTMF**: WhatsApp digits (``peer.on_dtmf``) go out as RFC 4733 when negotiated, and
  to :meth:`RtpBridge.on_dtmf` subscribers always (a SIP leg without telephone-event
  sends them as SIP INFO). RFC 4733 digits from the SIP side, and
  :meth:`RtpBridge.receive_dtmf` (SIP INFO), go to WhatsApp with ``peer.send_dtmf``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtmf import DtmfError, DtmfEvent
from ..frames import FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE
from ..jitterbuffer import opus_samples
from .endpoint import RtpEndpoint
from .sdp import DEFAULT_CODECS, RemoteMedia

if TYPE_CHECKING:  # pragma: no cover
    from ..peer import MediaPeer
    from ..taps import RtpArrival
    from ..track import Playback

__all__ = ["RtpBridge"]

log = logging.getLogger(__name__)


class _CallerSink:
    """The sink on the peer: 48 kHz caller frames → the endpoint (mono)."""

    def __init__(self, bridge: RtpBridge) -> None:
        self._bridge = bridge
        self._mono = np.empty(FRAME_SAMPLES, dtype=np.int32)
        self.closed = False

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        bridge = self._bridge
        if self.closed or bridge._passthrough_active():
            return
        if sample_rate != SAMPLE_RATE or pcm.size != FRAME_SAMPLES * channels:
            return  # a MediaPeer delivers 48 kHz 20 ms frames
        if channels == 2:
            np.add(pcm[0::2], pcm[1::2], out=self._mono, dtype=np.int32)
            pcm = (self._mono >> 1).astype(PCM_DTYPE)
        bridge.endpoint.push_pcm(pcm)
        bridge.frames_to_rtp += 1

    @property
    def needs_pcm(self) -> bool:
        """Opus passed through to the SIP side reads no PCM (the receiver may skip
        decoding when no other sink does)."""
        return not self.closed and not self._bridge._passthrough_active()

    def close(self) -> None:
        self.closed = True


class RtpBridge:
    """One WhatsApp call ⇄ one plain-RTP stream (see the module docstring).

    Args:
        host, port_range, advertise_address, codecs, dtmf, symmetric, rtcp,
        send_silence, inactivity_timeout_s, jitter: the
            :class:`~media.rtp.endpoint.RtpEndpoint`'s (``inactivity_timeout_s``:
            no RTP for that long → ``closed`` resolves ``"rtp timeout"``).
        passthrough: with Opus on the SIP side, forward payloads without transcoding.
    """

    protocol = "rtp"

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
        passthrough: bool = True,
        jitter: dict | None = None,
    ) -> None:
        self.options: dict[str, Any] = {
            "host": host, "port_range": tuple(port_range) if port_range else None,
            "advertise_address": advertise_address, "codecs": tuple(codecs), "dtmf": dtmf, "symmetric": symmetric,
            "rtcp": rtcp, "send_silence": send_silence, "inactivity_timeout_s": inactivity_timeout_s,
            "passthrough": passthrough, "jitter": dict(jitter or {}) or None,
        }
        endpoint_options = {k: v for k, v in self.options.items() if k != "passthrough"}
        self.endpoint = RtpEndpoint(**endpoint_options, label="rtp-bridge")
        self.passthrough = passthrough
        self.call_id: str | None = None
        self.parameters: dict[str, Any] = {}
        self.peer: MediaPeer | None = None
        self.playback: Playback | None = None
        self.sink: _CallerSink | None = None
        #: ``"rtp"`` (timeout), ``"local"`` (stop / media ended) once closed.
        self.ended_by: str | None = None
        self.frames_to_rtp = 0
        self.payloads_passed = 0
        self.dtmf_to_rtp = 0
        self.dtmf_to_whatsapp = 0
        self.dtmf_failed = 0
        self._closed: asyncio.Future[str] | None = None
        self._started = False
        self._tap_active = False
        self._dtmf_callbacks: list[Callable[[DtmfEvent], None]] = []
        self._unsubscribe: list[Callable[[], None]] = []
        self._dtmf_lock: asyncio.Lock | None = None
        self._dtmf_tasks: set[asyncio.Task] = set()

    def __reduce__(self):
        """Pickled (for a media worker process) as its options: an unopened bridge."""
        if self._started or self.endpoint.local_address is not None:
            raise TypeError("only an unopened, unstarted RtpBridge can be sent to a media worker")
        return (functools.partial(RtpBridge, **self.options), ())

    # -- SDP (the SIP leg's two steps) ----------------------------------------------------

    async def open(self) -> tuple[str, int]:
        """Bind the RTP port now; returns ``(address for the SDP, port)``."""
        return await self.endpoint.open()

    def create_offer(self) -> str:
        return self.endpoint.create_offer()

    def accept_offer(self, offer: str) -> str:
        return self.endpoint.accept_offer(offer)

    def set_remote_answer(self, answer: str) -> RemoteMedia:
        return self.endpoint.set_remote_answer(answer)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def closed(self) -> asyncio.Future[str]:
        """Resolves with the reason the bridge ended (never raises)."""
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        return self._closed

    @property
    def running(self) -> bool:
        return self._started and not self.closed.done()

    async def start(self, peer: MediaPeer, *, call_id: str, parameters: dict | None = None) -> None:
        """Attach to ``peer`` (opening the endpoint if :meth:`open` was not called)."""
        if self._started:
            raise RuntimeError("a bridge is started once")
        self._started = True
        self.closed  # noqa: B018 - on this loop
        self.call_id = call_id
        self.parameters = dict(parameters or {})
        self.peer = peer
        self._dtmf_lock = asyncio.Lock()
        endpoint = self.endpoint
        await endpoint.open()
        if self.closed.done():
            endpoint.close(self.closed.result())
            return
        self.playback = peer.play(endpoint.playout)
        self.sink = _CallerSink(self)
        peer.add_sink(self.sink)
        tap = getattr(peer, "rtp_tap", None)
        if tap is not None and self.passthrough:
            tap.add_listener(self._on_caller_packet)
            self._unsubscribe.append(functools.partial(tap.remove_listener, self._on_caller_packet))
        self._unsubscribe.append(peer.on_dtmf(self._on_whatsapp_dtmf))
        self._unsubscribe.append(endpoint.on_dtmf(self._on_rtp_dtmf))
        endpoint.closed.add_done_callback(self._on_endpoint_closed)
        peer.ended.add_done_callback(self._on_media_ended)
        log.info("rtp bridge for call %s on %s:%d", call_id, *endpoint.local_address)

    async def stop(self, reason: str = "user hung up") -> str:
        """End the bridge (the SIP side hung up, or the call ends); returns the close
        reason (an earlier one if it had already ended)."""
        if not self._started:
            self._started = True
        self._close(reason, by="local")
        tasks = list(self._dtmf_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.closed.result()

    def _close(self, reason: str, *, by: str) -> None:
        closed = self.closed
        if closed.done():
            return
        self.ended_by = by
        closed.set_result(reason)
        log.info("rtp bridge for call %s closed: %s", self.call_id, reason)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        peer = self.peer
        if self.sink is not None:
            self.sink.close()
            if peer is not None:
                peer.remove_sink(self.sink)
        if peer is not None:
            peer.ended.remove_done_callback(self._on_media_ended)
        self.endpoint.closed.remove_done_callback(self._on_endpoint_closed)
        self.endpoint.close(reason)  # the playout then ends: the playback finishes

    def _on_endpoint_closed(self, fut: asyncio.Future) -> None:
        reason = fut.result()
        self._close(reason, by="rtp" if reason == "rtp timeout" else "local")

    def _on_media_ended(self, fut: asyncio.Future) -> None:
        reason = fut.result() if not fut.cancelled() else "cancelled"
        self._close(f"call media ended ({reason})", by="local")

    # -- audio ----------------------------------------------------------------------------

    def _passthrough_active(self) -> bool:
        return self._tap_active and self.endpoint._opus

    def _on_caller_packet(self, arrival: RtpArrival) -> None:
        endpoint = self.endpoint
        if not endpoint._opus or self.closed.done():
            return
        payload = arrival.payload
        if opus_samples(payload) != FRAME_SAMPLES:
            return  # only 20 ms packets map 1:1 onto our packets (WhatsApp sends those)
        self._tap_active = True
        endpoint.push_payload(payload)
        self.payloads_passed += 1

    # -- DTMF -----------------------------------------------------------------------------

    def on_dtmf(self, callback: Callable[[DtmfEvent], None]) -> Callable[[], None]:
        """``callback(DtmfEvent)`` for every digit the WhatsApp user presses (whether or
        not it also went out as RFC 4733: see :attr:`dtmf_negotiated`)."""
        self._dtmf_callbacks.append(callback)
        return functools.partial(self._dtmf_callbacks.remove, callback)

    @property
    def dtmf_negotiated(self) -> bool:
        """telephone-event was negotiated on the RTP side."""
        return self.endpoint.dtmf_negotiated

    def _on_whatsapp_dtmf(self, event: DtmfEvent) -> None:
        if not self.running:
            return
        if self.endpoint.dtmf_negotiated:
            try:
                fut = self.endpoint.queue_dtmf(event.digit, duration_ms=min(max(event.duration_ms, 40), 8000), gap_ms=0)
            except DtmfError as exc:
                log.debug("rtp bridge: %s", exc)
            else:
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
                self.dtmf_to_rtp += 1
        for callback in list(self._dtmf_callbacks):
            try:
                callback(event)
            except Exception:
                log.exception("rtp bridge: DTMF callback failed")

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> None:
        """Send ``digits`` toward the SIP side as RFC 4733 (``DtmfError`` if it was not
        negotiated: use SIP INFO then)."""
        await self.endpoint.send_dtmf(digits, duration_ms, gap_ms)
        self.dtmf_to_rtp += len(digits)

    def _on_rtp_dtmf(self, event: DtmfEvent) -> None:
        self.receive_dtmf(event.digit, event.duration_ms)

    def receive_dtmf(self, digit: str, duration_ms: int = 160) -> asyncio.Task | None:
        """A digit from the SIP side (RFC 4733, or SIP INFO): play it to the WhatsApp
        user as RFC 4733 on the peer. Digits go out one after another, in order."""
        if not self.running:
            return None
        task = asyncio.ensure_future(self._to_whatsapp(digit, min(max(duration_ms, 40), 8000)))
        self._dtmf_tasks.add(task)
        task.add_done_callback(self._dtmf_tasks.discard)
        return task

    async def _to_whatsapp(self, digit: str, duration_ms: int) -> None:
        async with self._dtmf_lock:
            if not self.running:
                return
            try:
                await self.peer.send_dtmf(digit, duration_ms=duration_ms, gap_ms=0)
                self.dtmf_to_whatsapp += 1
            except (DtmfError, ValueError) as exc:
                self.dtmf_failed += 1
                log.warning("rtp bridge for call %s: DTMF %r to WhatsApp failed: %s", self.call_id, digit, exc)

    # -- stats ----------------------------------------------------------------------------

    @property
    def stats(self) -> dict:
        """The endpoint's counters (:class:`~media.rtp.endpoint.RtpStats`), the jitter
        buffer's, and the bridge's own."""
        endpoint = self.endpoint
        out = endpoint.stats.as_dict()
        out["codec"] = endpoint.codec.name if endpoint.codec else None
        out["remote"] = "{}:{}".format(*endpoint.remote_addr) if endpoint.remote_addr else None
        out["latched"] = endpoint.latched
        out["jitter_buffer"] = endpoint._jb.stats.as_dict() if endpoint._jb is not None else None
        out.update(frames_to_rtp=self.frames_to_rtp, payloads_passed=self.payloads_passed, dtmf_to_rtp=self.dtmf_to_rtp,
                   dtmf_to_whatsapp=self.dtmf_to_whatsapp, dtmf_failed=self.dtmf_failed)
        return out
