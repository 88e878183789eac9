"""The call service (:class:`CallManager`): places calls, answers inbound ones, routes
webhook events, and runs each call (:class:`~gateway.calls.live.LiveCall`: its state
machine, legs, timers and tasks).

Calls are routed by their WhatsApp call id (``wacid.…``). Events for an id not known yet
are buffered for a while: the ``connect`` answer can beat the HTTP response of our
``connect`` request. Before a business-initiated call is placed, the permission gate
(:mod:`gateway.gatekeeper`) and the voice bot, if any (:mod:`gateway.bots`), are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from media.frames import Sink, Source
from media.peer import MediaError, PeerConfig
from media.session import LocalMediaSession, MediaSession

from ..bots import BotPolicy, BotSpec, probe
from ..permissions import PermissionState
from ..disk import DiskGuard
from ..domain import events as ev
from ..domain.call import Dialed, EndReason, PermissionAsked, PermissionGiven, TimelineEntry
from ..errors import ProviderError
from ..events import CallArtifact, CallConnect, CallTerminate, Direction, from_wire, to_wire
from ..recordings import Recordings, verify_sha256
from ..providers.base import CallingProvider
from ..redact import mask_phone
from ..store.base import CallRecord, CallStore, VersionConflict
from ..sip.spec import SipSpec
from .legs import SipContext, SipUnreachable, WhatsAppLeg, tag_of
from .live import Listener, LiveCall
from .plans import InboundPlan, InboundPolicy

__all__ = ["CallManager", "CapacityError"]

log = logging.getLogger(__name__)


class CapacityError(RuntimeError):
    """Too many live calls to take another one."""


class CallManager:
    """Places calls, routes webhook events to them by WhatsApp call id, buffers early ones."""

    #: How long events for a not-yet-known call id are kept (the answer can beat the
    #: HTTP response of ``connect``).
    EARLY_EVENT_TTL_S = 60.0
    MAX_EARLY_EVENTS = 1000

    def __init__(
        self,
        provider: CallingProvider,
        *,
        peer_config: PeerConfig | None = None,
        ring_timeout_s: float = 60.0,
        max_duration_s: float = 3600.0,
        media_end_grace_s: float = 2.0,
        rtp_timeout_s: float = 15.0,
        max_calls: int = 100,
        recordings_dir: Path | None = None,
        inbound_policy: InboundPolicy | None = None,
        speech_events: bool = False,
        recording_format: str = "wav",
        gate: Any = None,
        permission_wait_s: float = 3600.0,
        history: int = 1000,
        disk: DiskGuard | None = None,
        store: CallStore | None = None,
        owner: str | None = None,
        on_recovered: Callable[[dict, dict], None] | None = None,
        hangup_attempts: int | None = None,
        hangup_pause_s: float | None = None,
        lease_s: float | None = None,
    ):
        #: With a store shared by several instances: how long a save holds a call for this
        #: instance (renewed every third of it); a call whose lease ran out is taken over.
        self.lease_s = lease_s
        #: Called with the seconds from another instance forwarding a message to this one.
        self.on_routed: Callable[[float], None] | None = None
        #: Called with ``(call id, outcome)`` when WhatsApp's own recording or transcript of
        #: a call was kept (``file``, ``size``) or refused (``error``).
        self.on_artifact: Callable[[str, dict], None] | None = None
        self._tasks: set[asyncio.Task] = set()
        #: How a hang-up at the provider is retried (attempts, first pause; doubling).
        self.hangup_attempts = hangup_attempts
        self.hangup_pause_s = hangup_pause_s
        #: Where bots may be (``WACALL_BOT_ALLOW``; :class:`gateway.bots.BotPolicy`).
        self.bot_policy: BotPolicy | None = None
        #: SIP legs' user agent and RTP options (``None``: no SIP on this gateway).
        self.sip_context: SipContext | None = None
        #: Makes a call's media session: in this process (default) or a media worker's
        #: (:meth:`media.pool.WorkerPool.session`); raises :class:`MediaError` when it cannot.
        self.media_sessions: Callable[..., MediaSession] = LocalMediaSession
        #: Calls being admitted right now (capacity is reserved for them).
        self._admitting = 0
        #: Play names -> sources (the media library), to resume parked calls after a restart.
        self.sources_for: Callable[[list[str]], list[Source]] | None = None
        self.provider = provider
        #: Where calls are kept (durable calls: :mod:`gateway.store`); ``None``: memory only.
        self.store = store
        #: This instance's name on the calls it runs.
        self.owner = owner
        #: Called with ``(call JSON, ended entry JSON)`` for each call a previous process
        #: left live and :meth:`reconcile` finished (telemetry emits its ``call.ended``).
        self.on_recovered = on_recovered
        #: The permission gate (:class:`gateway.gatekeeper.Gatekeeper`), if any.
        self.gate = gate
        self.permission_wait_s = permission_wait_s
        self.max_calls = max_calls
        self.speech_events = speech_events
        #: The files of a QA recording (``WACALL_RECORDING_FORMAT``: wav, opus or both).
        self.recording_format = recording_format
        self.recordings_dir = Path(recordings_dir) if recordings_dir else Path("wacall-data/recordings")
        #: The recordings on disk (WhatsApp's artifacts are kept there too).
        self.recordings = Recordings(self.recordings_dir)
        self.inbound_policy: InboundPolicy = inbound_policy or (lambda event: InboundPlan())
        self.media_end_grace_s = media_end_grace_s
        self.rtp_timeout_s = rtp_timeout_s
        self.peer_config = peer_config or PeerConfig()
        self.ring_timeout_s = ring_timeout_s
        self.max_duration_s = max_duration_s
        self.closing = False
        #: Free space in the data dir (recordings are refused below its reserve).
        self.disk = disk
        if history < 0:
            raise ValueError("history must be zero or more")
        #: Ended calls kept in memory (for ``GET /v1/calls``, late events, inspection);
        #: an ended call holds only data (its media was let go when it ended).
        self.history = history
        #: Live calls and the last ``history`` ended ones, oldest first.
        self.calls: OrderedDict[str, LiveCall] = OrderedDict()
        self._live: dict[str, LiveCall] = {}
        self._ended: deque[LiveCall] = deque()
        self._by_wacid: dict[str, LiveCall] = {}
        self._early: OrderedDict[str, list[tuple[float, Any]]] = OrderedDict()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(call, entry)`` on every timeline entry; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def on(self, *types: type[ev.CallEvent], handler: Callable[[LiveCall, ev.CallEvent], None]) -> Callable[[], None]:
        """Call ``handler(call, event)`` for each call event of one of ``types``
        (:mod:`gateway.domain.events`); returns an unsubscribe."""

        def listener(call: LiveCall, entry: TimelineEntry) -> None:
            if isinstance(entry.event, types):
                handler(call, entry.event)

        return self.subscribe(listener)

    def _notify(self, call: LiveCall, entry: TimelineEntry) -> None:
        for listener in list(self._listeners):
            try:
                listener(call, entry)
            except Exception:
                log.exception("call listener failed")

    def _new_call(self, *, user: str, direction: Direction, wacid: str | None = None,
                  sources: Iterable[Source] = (), sinks: Iterable[Sink] = (),
                  biz_opaque_callback_data: str | None = None, ring_timeout_s: float | None = None,
                  max_duration_s: float | None = None, bot: Any = None, call_id: str | None = None,
                  timeline: list[dict] | None = None, sip: Any = None) -> LiveCall:
        sinks = tuple(sinks)
        label = f"call to {mask_phone(user)}" if direction is Direction.BUSINESS_INITIATED \
            else f"call from {mask_phone(user)}"
        try:
            media = self.media_sessions(self.peer_config, label=label, sinks=sinks, speech=self.speech_events)
        except MediaError as exc:  # (no media worker running right now: this call's media stays here)
            log.warning("%s: %s; its media runs in the main process", label, exc)
            media = LocalMediaSession(self.peer_config, label=label, sinks=sinks, speech=self.speech_events)
        leg = self._leg(media, user=user, wacid=wacid, biz_opaque_callback_data=biz_opaque_callback_data,
                        media_timeout_s=self.peer_config.connect_timeout_s)
        return LiveCall(
            user=user, direction=direction, leg=leg, sources=sources, sinks=sinks,
            biz_opaque_callback_data=biz_opaque_callback_data,
            ring_timeout_s=ring_timeout_s or self.ring_timeout_s,
            max_duration_s=max_duration_s or self.max_duration_s,
            media_end_grace_s=self.media_end_grace_s, rtp_timeout_s=self.rtp_timeout_s,
            on_entry=self._notify, on_end=self._forget_later, bot=bot, bot_policy=self.bot_policy,
            save=self.store.save_call if self.store is not None else None, owner=self.owner,
            call_id=call_id, timeline=timeline, lease_s=self.lease_s, sip=sip, sip_context=self.sip_context,
        )

    async def place_call(
        self,
        to: str,
        *,
        sources: Iterable[Source] = (),
        sinks: Iterable[Sink] = (),
        biz_opaque_callback_data: str | None = None,
        ring_timeout_s: float | None = None,
        max_duration_s: float | None = None,
        record: bool | str = False,
        bot: Any = None,
        if_no_permission: str = "fail",
        permission_request: Any = None,
        permission_wait_s: float | None = None,
        recipe: dict | None = None,
        provider_recording: Any = None,
        sip: Any = None,
    ) -> LiveCall:
        """Place a business-initiated call. Returns once the provider answered the
        ``connect`` request (the call is then ``offer_sent``) or the call failed (then it
        is ``ended`` with ``call.error``/``call.end_reason`` saying why).

        ``record`` adds a WAV recording of the user's audio at
        ``<recordings_dir>/<call id>/user.wav``. Raises :class:`CapacityError` when
        ``max_calls`` calls are live.

        With a permission gate, a call the rules forbid is refused here, before any
        network call, with the provider's error (138006, 138010, 138012 and
        ``retry_at``). ``if_no_permission="request"`` instead parks the call, sends a
        permission request (``permission_request``) and dials once the user grants it;
        a decline or no answer within ``permission_wait_s`` ends it. ``recipe`` (the
        API request, JSON) lets a parked call be resumed after a restart. ``sip`` (a
        :class:`gateway.sip.spec.SipSpec`, or a PBX's INVITE) joins a SIP party once the
        user picked up; a target that does not answer OPTIONS means no call."""
        if if_no_permission not in ("fail", "request"):
            raise ValueError("if_no_permission must be 'fail' or 'request'")
        # Capacity is taken now, before the first await: every call counts from its
        # creation (parked ones too), and concurrent requests cannot all slip through.
        if self.closing or self._occupied() >= self.max_calls:
            for source in sources:
                source.close()
            raise CapacityError(f"{self.max_calls} calls are live; try again when one ends")
        self._admitting += 1
        tracked = False
        try:
            # one decision about this user at a time (here, and across instances sharing
            # the ledger): the rules are checked and the call placed and counted before
            # the next dial of the same user is checked
            async with self.gate.deciding(to) if self.gate is not None else contextlib.nullcontext():
                park = await self._admit(to, record=record, bot=bot, sip=sip, if_no_permission=if_no_permission)
                call = self._new_call(user=to, direction=Direction.BUSINESS_INITIATED, sources=sources,
                                      sinks=sinks, biz_opaque_callback_data=biz_opaque_callback_data,
                                      ring_timeout_s=ring_timeout_s, max_duration_s=max_duration_s, bot=bot,
                                      sip=sip)
                call.ask_provider_recording(provider_recording)
                if record:
                    call.record_to(self.recordings_dir, self._format(record))
                if park:
                    try:
                        message_id = await self.gate.request(to, permission_request)
                    except ProviderError:
                        await call.end(EndReason.PROVIDER_ERROR)
                        raise
                self._track(call)
                tracked = True
                self._admitting -= 1
                if park:
                    wait_s = permission_wait_s or self.permission_wait_s
                    call.recipe, call.permission_deadline = recipe, time.time() + wait_s
                    call.feed(PermissionAsked(message_id))
                    call._spawn(self._dial_when_granted(call, wait_s))
                    return call
                await self._dial(call)
                return call
        except BaseException:
            if not tracked:  # refused: nothing placed, nothing left open (close is idempotent)
                self._admitting -= 1
                for source in sources:
                    source.close()
            raise

    def _occupied(self) -> int:
        """Calls that count against ``max_calls``: live (parked included) and being admitted."""
        return len(self._live) + self._admitting

    async def _admit(self, to: str, *, record: bool, bot: Any, if_no_permission: str, sip: Any = None) -> bool:
        """May a call to ``to`` be placed now? Raises the refusal (low disk for a
        recording, bot unreachable, the permission rules, capacity); returns ``True``
        when the call must first wait for a permission request to be answered."""
        if record and self.disk is not None:
            self.disk.check_recording()  # LowDiskError
        if bot is not None:  # no bot, no call: probe it before anything is placed
            await probe(bot, policy=self.bot_policy)
        if isinstance(sip, SipSpec):  # no IVR, no call (a PBX's INVITE is there already)
            if self.sip_context is None:
                raise SipUnreachable("SIP is not set up on this gateway (set WACALL_SIP_LISTEN)")
            await self.sip_context.probe(sip)
        park = False
        if self.gate is not None:
            try:
                await self.gate.check_call(to)
            except ProviderError as exc:
                if if_no_permission != "request" or exc.code not in (138006, 138010):
                    raise
                park = True
        if self.closing:
            raise CapacityError("the gateway is shutting down")
        return park

    async def _dial(self, call: LiveCall) -> None:
        call.log.info("call %s: dialing %s", call.id, mask_phone(call.user))
        await call.dial()
        if call.wacid:
            self._by_wacid[call.wacid] = call
            for _, event in self._early.pop(call.wacid, []):
                call.handle(event)

    async def _dial_when_granted(self, call: LiveCall, wait_s: float) -> None:
        if self.gate.ledger.status(self.gate.key(call.user)).status is PermissionState.GRANTED:
            granted: bool | None = True  # (granted while no one was waiting: a restart)
        else:
            granted = await self.gate.wait_for_reply(call.user, wait_s)
        if call.ending:
            return
        if granted is None:
            await call.end(EndReason.PERMISSION_TIMEOUT,
                           detail=f"no answer to the permission request within {wait_s:g} s")
            return
        if not granted:
            await call.end(EndReason.PERMISSION_DENIED, detail="the user declined the permission request")
            return
        call.feed(PermissionGiven())
        async with self.gate.deciding(call.user):  # (as in place_call: check, place, count)
            try:
                await self.gate.check_call(call.user)
            except ProviderError as exc:
                await call.end(EndReason.PROVIDER_ERROR, error=exc)
                return
            await self._dial(call)

    async def handle_event(self, event) -> None:
        """Dispatch target for the webhook receiver."""
        call_id = getattr(event, "call_id", None)
        if not call_id:
            return
        if isinstance(event, CallArtifact):
            self._spawn(self._artifact(event))  # (downloaded now: its URL lives minutes)
            return
        call = self._by_wacid.get(call_id)
        if call is not None:
            call.handle(event)
            return
        owner = tag_of(getattr(event, "biz_opaque_callback_data", None))
        if self.store is not None:
            record = await self.store.call_by_wacid(call_id)
            if record is None and owner is not None and owner not in self.calls:
                by_tag = await self.store.get_call(owner)  # (its wacid may not be stored yet)
                record = by_tag if by_tag is not None and by_tag.wacid in (None, call_id) else None
            if record is not None and self._runs_elsewhere(record):
                await self._forward(record.owner, {"kind": "event", "event": to_wire(event)})
                return
            if record is not None and record.wacid == call_id and record.id not in self.calls:
                # a call an earlier process ran (and the restart finished): a redelivered
                # connect must not start a second session, late events change nothing
                log.info("webhook for %s, a call that ended before this process started: ignored", call_id)
                return
        if owner is not None and await self._placed_after_all(owner, call_id, event):
            return
        call = self._by_wacid.get(call_id)  # (named while we looked it up in the store)
        if call is not None:
            call.handle(event)
            return
        if isinstance(event, CallConnect) and event.direction is Direction.USER_INITIATED:
            self._inbound(event)
            return
        self._buffer_early(call_id, event)

    # -- WhatsApp's own recording and transcript -------------------------------------------

    async def _artifact(self, event: CallArtifact) -> None:
        """Download, verify (sha256) and keep a recording or transcript WhatsApp made of
        one of our calls, beside wacall's own files; tell :attr:`on_artifact`."""
        call = self._by_wacid.get(event.call_id)
        meta: dict[str, Any] = {}
        if call is not None:
            call_id = call.id
            meta = {"direction": call.direction.value, "wacid": call.wacid, "user": call.user}
            try:  # (the call's own recorder writes its last sidecar first)
                await asyncio.wait_for(call.finished.wait(), 30)
            except asyncio.TimeoutError:
                pass
        else:
            record = await self.store.call_by_wacid(event.call_id) if self.store is not None else None
            if record is None:
                log.warning("%s for unknown call %s: ignored", event.kind, event.call_id)
                return
            if self._runs_elsewhere(record) and self.routes:
                await self._forward(record.owner, {"kind": "event", "event": to_wire(event)})
                return
            call_id = record.id
            meta = {"direction": record.direction, "wacid": record.wacid, "user": record.user}
        outcome: dict[str, Any] = {"kind": event.kind, "media_id": event.media_id}
        try:
            data = await self.provider.download(event.url)
            if not verify_sha256(data, event.sha256):
                raise ValueError(f"its sha256 is not the one announced ({len(data)} bytes downloaded)")
            path = await asyncio.to_thread(self.recordings.store_artifact, call_id, event.kind, data, meta)
        except (ProviderError, ValueError, OSError) as exc:
            outcome["error"] = str(exc)
            log.warning("call %s: WhatsApp's %s refused: %s", call_id, event.kind, exc, extra={"call_id": call_id})
        else:
            outcome.update(file=path.name, size=len(data))
            if call is not None:
                call.provider_artifacts[event.kind] = path.name
            log.info("call %s: WhatsApp's %s kept (%d bytes, sha256 verified)", call_id, event.kind, len(data),
                     extra={"call_id": call_id})
        if self.on_artifact is not None:
            self.on_artifact(call_id, outcome)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- several instances: the one that runs a call gets its webhooks and commands ----------

    @property
    def routes(self) -> bool:
        """Several instances share the store (and it can carry messages between them)."""
        return self.lease_s is not None and hasattr(self.store, "send")

    def _runs_elsewhere(self, record: CallRecord) -> bool:
        return (self.routes and not record.ended and record.owner not in (None, self.owner)
                and record.lease_until is not None and record.lease_until > time.time())

    async def _forward(self, instance: str, message: dict) -> None:
        message = {**message, "from": self.owner, "sent_at": time.time()}
        await self.store.send(instance, message)
        log.debug("forwarded %s to instance %s", message["kind"], instance)

    async def route_inbox(self) -> None:
        """Handle what other instances forward to this one, forever: webhooks for our
        calls and API commands (hang up)."""
        after = "0"
        while True:
            try:
                messages = await self.store.receive(self.owner, after, block_ms=1000)
            except Exception as exc:  # (Redis away for a moment)
                log.warning("reading this instance's inbox failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for entry_id, message in messages:
                after = entry_id
                try:
                    await self._on_message(message)
                except Exception:
                    log.exception("a forwarded %s failed", message.get("kind"))
            await self.store.received(self.owner, [entry_id for entry_id, _ in messages])

    async def _on_message(self, message: dict) -> None:
        if "sent_at" in message and self.on_routed is not None:
            self.on_routed(time.time() - float(message["sent_at"]))
        if message.get("kind") == "event":
            await self.handle_event(from_wire(message["event"]))
        elif message.get("kind") == "hangup":
            call = self.calls.get(str(message.get("call_id")))
            if call is not None and not call.ending:
                call._spawn(call.hangup())

    async def hang_up_elsewhere(self, call_id: str, timeout: float = 20.0) -> dict | None:
        """Hang up a call another instance runs: ask it, then wait until it is stored ended.
        ``None`` when no other instance runs it."""
        record = await self.store.get_call(call_id) if self.store is not None else None
        if record is None or not self._runs_elsewhere(record):
            return None
        await self._forward(record.owner, {"kind": "hangup", "call_id": call_id})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = await self.store.get_call(call_id)
            if record is None or record.ended:
                break
            await asyncio.sleep(0.05)
        return dict(record.data.get("call") or {}) if record is not None else None

    def _inbound(self, event: CallConnect) -> None:
        """A user calls the business: answer per policy (in the background: the webhook
        must be acknowledged quickly) or reject."""
        if not event.sdp or (event.sdp_type or "offer") != "offer":
            log.warning("inbound call %s: connect without an SDP offer, ignored", event.call_id)
            return
        plan = None
        if self.closing or self._occupied() >= self.max_calls:
            log.warning("inbound call %s: over capacity (%d live), rejecting", event.call_id, self.max_calls)
        else:
            try:
                plan = self.inbound_policy(event)
            except Exception:
                log.exception("inbound policy failed for %s; rejecting", event.call_id)
        call = self._new_call(
            user=event.from_ or event.user_id or "", direction=Direction.USER_INITIATED, wacid=event.call_id,
            sources=plan.sources if plan else (), sinks=plan.sinks if plan else (),
            biz_opaque_callback_data=plan.biz_opaque_callback_data if plan else None,
            max_duration_s=plan.max_duration_s if plan else None, bot=plan.bot if plan else None,
            sip=plan.sip if plan else None,
        )
        call.ask_provider_recording(plan.provider_recording if plan else None)
        self._track(call)
        self._by_wacid[call.wacid] = call
        call.log.info("call %s (%s): inbound from %s", call.id, call.wacid, mask_phone(event.from_))
        if plan is None:
            call._spawn(call.end(EndReason.DECLINED, notify=True))
            return
        if plan.record:
            if self.disk is not None and self.disk.low:
                if plan.record_required:
                    log.warning("inbound call %s: recording required but the disk is low, rejecting",
                                event.call_id)
                    call._spawn(call.end(EndReason.DECLINED, notify=True,
                                         detail="low disk: recording is required and cannot start"))
                    return
                call.note_recording_failed("low_disk",
                                           "the data dir is below WACALL_MIN_FREE_MB: answered unrecorded")
            else:
                call.record_to(self.recordings_dir, self.recording_format)
        call._spawn(call.answer(event.sdp))

    def _format(self, record: bool | str) -> str:
        """The recording format a call's ``record`` asks for: its own, or the configured one."""
        return record if isinstance(record, str) else self.recording_format

    def _leg(self, media: MediaSession | None, **kwargs: Any) -> WhatsAppLeg:
        leg = WhatsAppLeg(self.provider, media, **kwargs)
        if self.hangup_attempts is not None:
            leg.hangup_attempts = self.hangup_attempts
        if self.hangup_pause_s is not None:
            leg.hangup_pause_s = self.hangup_pause_s
        return leg

    async def _placed_after_all(self, call_id: str, wacid: str, event) -> bool:
        """A webhook tagged with one of our calls, under a provider id we never got: its
        ``connect`` outcome was unknown (timeout, connection lost) yet the provider placed
        it. If that call has ended, terminate this one at the provider; ``False`` when the
        call is still dialing (the event is early: buffer it)."""
        call = self.calls.get(call_id)
        if call is not None:
            if not call.ended or call.wacid:
                return False
            log.warning("call %s: the provider placed it after all (%s); terminating it", call_id, wacid)
            self._by_wacid[wacid] = call
            call.feed(Dialed(wacid))  # an ended call named late: terminated at the provider
            return True
        if self.store is None:
            return False
        record = await self.store.get_call(call_id)
        if record is None or not record.ended or record.wacid:
            return False
        log.warning("call %s (ended before this process): the provider placed it after all (%s); "
                    "terminating it", call_id, wacid)
        hangup = None
        if not isinstance(event, CallTerminate):
            hangup = await self._leg(None, user=record.user, wacid=wacid).hangup("terminate")
        call_json = {**record.data.get("call", {}), "wacid": wacid}
        if hangup is not None:
            call_json["provider_hangup"] = hangup
        await self.store.save_call(record.changed(wacid=wacid, data={**record.data, "call": call_json}))
        return True

    async def reconcile(self) -> int:
        """Finish every call a previous process left live (killed, crashed): terminate it
        at the provider (``reject`` for an inbound call never accepted), with retries, and
        store it ended (``gateway_restart``, or the end it was already on its way to).
        Returns how many there were."""
        if self.store is None:
            return 0
        finished = await self._take_over_live()
        # and ended calls whose hang-up the provider never confirmed: try again
        unconfirmed = [r for r in await self.store.recent_calls(self.UNCONFIRMED_LOOKBACK)
                       if r.ended and r.wacid and r.id not in self.calls
                       and (r.data.get("call") or {}).get("provider_hangup", {}).get("confirmed") is False]
        await asyncio.gather(*(self._hang_up_again(r) for r in unconfirmed))
        return finished + len(unconfirmed)

    async def _take_over_live(self) -> int:
        """The live calls no process runs any more: parked ones wait again here, the
        others are finished at the provider."""
        records = [r for r in await self.store.live_calls() if r.id not in self.calls]
        if self.lease_s is not None:  # shared: only ours (a previous run) and the orphaned
            records = [r for r in records if await self._claim(r)]
        parked = [r for r in records if self._resumable(r)]
        for record in parked:
            try:
                self._resume_parked(record)
            except Exception as exc:  # (e.g. a file to play is gone): finished like the others
                log.warning("call %s: cannot resume waiting for permission: %s", record.id, exc)
                self.calls.pop(record.id, None)
                self._live.pop(record.id, None)
            else:
                records.remove(record)
        if records:
            log.warning("finishing %d call(s) left live by a previous process", len(records))
        await asyncio.gather(*(self._finish_left_live(r) for r in records))
        return len(records) + len(parked)

    #: How many of the newest stored calls are checked for an unconfirmed hang-up at startup.
    UNCONFIRMED_LOOKBACK = 1000

    async def _hang_up_again(self, record: CallRecord) -> None:
        call_json = dict(record.data.get("call") or {})
        how = call_json["provider_hangup"].get("action") or "terminate"
        hangup = await self._leg(None, user=record.user, wacid=record.wacid).hangup(how)
        log.info("call %s (%s): %s at the provider after a restart: %s", record.id, record.wacid, how,
                 "confirmed" if hangup["confirmed"] else "still not confirmed")
        call_json["provider_hangup"] = hangup
        await self.store.save_call(record.changed(data={**record.data, "call": call_json}))

    def _resumable(self, record: CallRecord) -> bool:
        durable = record.data.get("durable") or {}
        return (self.gate is not None and record.state == "created" and not record.wacid
                and not durable.get("ending") and isinstance(durable.get("recipe"), dict)
                and isinstance(durable.get("permission_deadline"), (int, float)))

    def _resume_parked(self, record: CallRecord) -> None:
        """A call that was waiting for the user's answer to a permission request when the
        process stopped: waits again, for what is left of its time, under the same id."""
        durable, call_json = record.data["durable"], record.data.get("call") or {}
        recipe = durable["recipe"]
        bot = BotSpec.from_dict(recipe["bot"]) if recipe.get("bot") else None
        sip = SipSpec.from_dict(recipe["sip"]) if recipe.get("sip") else None
        sources = self.sources_for(recipe.get("play") or []) if self.sources_for else []
        call = self._new_call(user=record.user, direction=Direction.BUSINESS_INITIATED, sources=sources,
                              biz_opaque_callback_data=call_json.get("biz_opaque_callback_data"),
                              ring_timeout_s=recipe.get("ring_timeout_s"),
                              max_duration_s=recipe.get("max_duration_s"), bot=bot, sip=sip,
                              call_id=record.id, timeline=list(call_json.get("timeline") or []))
        call.recipe, call.permission_deadline = recipe, float(durable["permission_deadline"])
        if recipe.get("record"):
            call.record_to(self.recordings_dir, self._format(recipe["record"]))
        self._track(call)
        left = max(0.0, call.permission_deadline - time.time())
        log.info("call %s: waiting again for the permission request's answer (%.0f s left)", call.id, left)
        call._spawn(self._dial_when_granted(call, left))

    async def _claim(self, record: CallRecord) -> bool:
        """Make ``record`` (a live call not run here) ours, if its owner is us (an earlier
        run) or its lease ran out; atomically, so of two instances only one gets it."""
        now = time.time()
        if record.owner != self.owner and record.lease_until is not None and record.lease_until > now:
            return False
        try:
            await self.store.save_call(record.changed(owner=self.owner, lease_until=now + (self.lease_s or 0)),
                                       expected_version=record.version)
        except VersionConflict:
            return False  # someone else was quicker (or the owner renewed)
        if record.owner != self.owner:
            log.warning("call %s (%s): its instance %s stopped renewing it; taking it over",
                        record.id, record.wacid or "-", record.owner)
        return True

    async def keep_leases(self) -> None:
        """Renew our calls' leases and take over calls whose instance died, forever
        (runs when several instances share the store)."""
        period = max(0.5, (self.lease_s or 10.0) / 3)
        while True:
            for call in list(self._live.values()):
                call.renew()
            try:
                await self._take_over_live()
            except Exception as exc:  # (Redis away for a moment: next round)
                log.warning("taking over orphaned calls failed: %s", exc)
            await asyncio.sleep(period)

    async def _finish_left_live(self, record: CallRecord) -> None:
        durable = dict(record.data.get("durable") or {})
        call_json = dict(record.data.get("call") or {})
        hangup = None
        if record.wacid:
            inbound_unaccepted = (record.direction == Direction.USER_INITIATED.value
                                  and not durable.get("accepted"))
            how = "reject" if inbound_unaccepted else "terminate"
            hangup = await self._leg(None, user=record.user, wacid=record.wacid).hangup(how)
        lost = record.owner not in (None, self.owner)
        reason = (call_json.get("end_reason") if durable.get("ending") else None) or (
            EndReason.INSTANCE_LOST if lost else EndReason.GATEWAY_RESTART).value
        detail = call_json.get("detail") or (
            f"instance {record.owner} stopped during the call; {self.owner} finished it" if lost
            else "the gateway stopped during the call; finished at the next start")
        now = time.time()
        entry = TimelineEntry("ended", now, max(0.0, now - record.created_at), {"reason": reason, "detail": detail})
        call_json.update(state="ended", end_reason=reason, detail=detail,
                         timeline=[*call_json.get("timeline", []), entry.as_dict()])
        if hangup is not None:
            call_json["provider_hangup"] = hangup
        await self.store.save_call(record.changed(state="ended", owner=self.owner, lease_until=None,
                                                  data={"call": call_json, "durable": {**durable, "ending": True}}))
        log.info("call %s (%s): finished after a restart (%s)", record.id, record.wacid or "-", reason)
        if self.on_recovered is not None:
            self.on_recovered(call_json, entry.as_dict())

    async def stored_call(self, call_id: str) -> dict | None:
        """A call's JSON from the store (a call an earlier process ran)."""
        if self.store is None:
            return None
        record = await self.store.get_call(call_id)
        return dict(record.data.get("call") or {}) if record is not None else None

    async def stored_calls(self, limit: int) -> list[tuple[str, dict]]:
        """The newest stored calls (this process's and earlier ones'): the user's number
        (whole, for filtering) and the call's JSON."""
        if self.store is None:
            return []
        return [(r.user, dict(r.data.get("call") or {})) for r in await self.store.recent_calls(limit)]

    def _buffer_early(self, call_id: str, event) -> None:
        now = time.monotonic()
        while self._early:
            first = next(iter(self._early.values()))
            if now - first[0][0] <= self.EARLY_EVENT_TTL_S and len(self._early) < self.MAX_EARLY_EVENTS:
                break
            dropped, _ = self._early.popitem(last=False)
            log.info("dropping early events for unknown call %s", dropped)
        self._early.setdefault(call_id, []).append((now, event))
        log.debug("buffered %s for not-yet-known call %s", type(event).__name__, call_id)

    def _track(self, call: LiveCall) -> None:
        self.calls[call.id] = call
        self._live[call.id] = call

    def _forget_later(self, call: LiveCall) -> None:
        """``call`` ended: it leaves the live map and joins the capped history."""
        if self._live.pop(call.id, None) is None:
            return
        self._ended.append(call)
        while len(self._ended) > self.history:
            old = self._ended.popleft()
            self.calls.pop(old.id, None)
            if old.wacid and self._by_wacid.get(old.wacid) is old:
                del self._by_wacid[old.wacid]

    def get(self, call_id: str) -> LiveCall | None:
        return self.calls.get(call_id) or self._by_wacid.get(call_id)

    @property
    def live_calls(self) -> list[LiveCall]:
        return list(self._live.values())

    async def shutdown(self) -> None:
        """Hang up every live call through the provider and close their media."""
        self.closing = True
        await asyncio.gather(
            *(c.end(EndReason.SHUTDOWN, notify=True) for c in self.live_calls),
            return_exceptions=True,
        )
        if self._tasks:  # (artifacts being downloaded: a little time, then they are let go)
            _, pending = await asyncio.wait(set(self._tasks), timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
