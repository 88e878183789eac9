"""A call in progress: its state machine, its legs, its timers and tasks.

:class:`LiveCall` is what the call service hands out (``place_call`` returns one, webhooks
reach one by WhatsApp call id). It owns the I/O of one call and nothing else decides
anything: every step its legs report, every webhook, timer and media event is fed to the
pure :class:`~gateway.domain.call.Call`, and the actions that come back (start a timer,
apply the answer, watch the media, start the audio, tear down) are carried out here. The
call's timeline entries go to the service's subscribers (``on_entry``), its end to
``on_end``.

Durable: with a ``save`` function (the store), the call as data (:meth:`LiveCall.record`)
is saved after every change, and *before* each provider side effect the save is awaited
(intent first: the record says "offer created" before ``connect`` goes out, "ending,
terminate" before ``terminate``), so a process killed at any point leaves a record from
which the next start can finish the call at the provider.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from media.frames import Sink, Source
from media.mix import Playback
from media.peer import MediaError
from media.session import Dtmf, MediaEnded, MediaEvent, RecordingFailed, RecordSpec, Speech

from ..bots import BotTargetRefused, BridgeUnavailable, probe
from ..domain import call as dc
from ..domain.call import Call, CallState, EndReason, TimelineEntry
from ..errors import ProviderError, ProviderUnavailableError
from ..store.base import CallRecord
from ..events import CallConnect, CallStatus, CallStatusKind, CallTerminate, Direction
from ..logs import STORE_OUTAGE, bind_call_id
from ..numbers import display
from ..sip.spec import SipSpec
from .legs import BotLeg, SipContext, SipLeg, SipUnreachable, WhatsAppLeg, tagged

log = logging.getLogger("gateway.calls")

__all__ = ["Listener", "LiveCall"]

#: ``listener(call, entry)``: one timeline entry of one call.
Listener = Callable[["LiveCall", TimelineEntry], None]


def _known(name: str) -> property:
    """A read-only view of the state machine's ``name``."""
    return property(lambda self: getattr(self.state_machine, name))


class LiveCall:
    """One call and its media, run by the call service."""

    def __init__(
        self,
        *,
        user: str,
        direction: Direction,
        leg: WhatsAppLeg,
        ring_timeout_s: float,
        max_duration_s: float,
        media_end_grace_s: float,
        rtp_timeout_s: float,
        on_entry: Listener,
        on_end: Callable[[LiveCall], None],
        sources: Iterable[Source] = (),
        sinks: Iterable[Sink] = (),
        biz_opaque_callback_data: str | None = None,
        bot: Any = None,
        save: Callable[[CallRecord], Awaitable[Any]] | None = None,
        owner: str | None = None,
        call_id: str | None = None,
        timeline: list[dict] | None = None,
        bot_policy: Any = None,
        lease_s: float | None = None,
        sip: Any = None,
        sip_context: SipContext | None = None,
    ):
        self._bot_policy = bot_policy
        #: A SIP party to join once the user picked up: a :class:`gateway.sip.spec.SipSpec`
        #: to dial, or a PBX's :class:`gateway.sip.IncomingCall` to answer (the SIP trunk).
        self.sip = sip
        self._sip_context = sip_context
        #: The SIP party's leg once it is dialled.
        self.sip_leg: SipLeg | None = None
        #: The SIP leg's RTP statistics, last read (kept after the end).
        self.sip_stats: dict = {}
        #: Several instances share the store: each save holds the call for this long.
        self.lease_s = lease_s
        call_id = call_id or f"call_{secrets.token_hex(6)}"
        self._save = save
        self._owner = owner
        self._dirty = False
        self._writer: asyncio.Task | None = None
        #: What the provider said to our hang-up (``terminate``/``reject``), once tried.
        self.provider_hangup: dict | None = None
        #: ``connect`` failed without an answer: the provider may have placed the call.
        self.connect_unknown = False
        #: A call parked for a permission request: how to place it again after a restart
        #: (the API request) and until when it may wait (unix time).
        self.recipe: dict | None = None
        self.permission_deadline: float | None = None
        self._teardown_action: str | None = None
        self.log = logging.LoggerAdapter(log, {"call_id": call_id})
        self._on_entry = on_entry
        self._on_end = on_end
        self._rtp_timeout_s = rtp_timeout_s
        self._waiters: list[asyncio.Future] = []
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._teardown: asyncio.Task | None = None
        self._watchers: list[asyncio.Task] = []
        #: The WhatsApp user's leg (provider signalling + media; its media is let go at the end).
        self.leg = leg
        self.sinks = list(sinks)
        self.playbacks: list[Playback] = []
        self._pending_sources = list(sources)
        self.finished = asyncio.Event()  # set once media and recordings are closed
        self.media_stats: dict = {}
        #: The recording's files by kind (``user_wav``, ``stereo_wav``, ``user_ogg``,
        #: ``sidecar``), kept after the call ends (when the recorder itself is let go).
        self.recording_files: dict[str, Path] = {}
        self._recordings: list[str] | None = None  # recording_paths() once ended
        #: What the far side's audio amounted to (frames received); kept after the end.
        self.received = leg.media.received
        #: Seconds played to the user (set when the call ends).
        self.played_s = 0.0
        #: WhatsApp's own recording asked for (:class:`gateway.recordings.ProviderRecording`).
        self.provider_recording = None
        #: WhatsApp's recording / transcript once delivered and verified: kind -> file path.
        self.provider_artifacts: dict[str, str] = {}
        self.bot = bot  # gateway.bots.BotSpec
        #: The bot's leg once it joined; ``None`` after the end.
        self.bot_leg: BotLeg | None = None
        self.state_machine = Call(call_id, user=user, direction=direction, wacid=leg.wacid,
                                  ring_timeout_s=ring_timeout_s, max_duration_s=max_duration_s,
                                  media_end_grace_s=media_end_grace_s,
                                  biz_opaque_callback_data=biz_opaque_callback_data)
        leg.call_id = call_id
        leg.media.call_id = call_id  # (a media worker's log lines carry it)
        leg.media.subscribe(self._on_media)
        if timeline is not None:  # resumed after a restart: its history, no second "created"
            self.state_machine.restore(timeline)
            self._changed()
        else:
            self._run(self.state_machine.timeline[0])  # "created"

    # -- what the state machine knows (read through: the Call is the one place it lives) --

    id = _known("id")
    user = _known("user")
    direction = _known("direction")
    wacid = _known("wacid")
    biz_opaque_callback_data = _known("biz_opaque_callback_data")
    state = _known("state")
    end_reason = _known("end_reason")
    error = _known("error")
    end_detail = _known("end_detail")
    duration_s = _known("duration_s")
    timeline = _known("timeline")
    connected_at = _known("connected_at")
    ended_at = _known("ended_at")
    dtmf_received = _known("dtmf_received")
    recording_error = _known("recording_error")
    ended = _known("ended")
    ending = _known("ending")
    media_up = _known("media_ready")

    @property
    def media(self):
        """The user's media session (:mod:`media.session`); ``None`` once the call ended."""
        return self.leg.media

    @property
    def local_sdp(self) -> str | None:
        """The SDP we sent (offer or answer), as the provider received it."""
        return self.leg.local_sdp

    def elapsed_until(self, name: str) -> float | None:
        return self.state_machine.elapsed_until(name)

    # -- feeding the machine, doing what it asks -------------------------------------------

    def feed(self, event: object) -> None:
        """Feed one input to the state machine and carry out what it asks."""
        for output in self.state_machine.feed(event):
            self._run(output)

    async def _settle(self, event: object) -> None:
        """Feed ``event``; if the call is being torn down, wait until it is over."""
        self.feed(event)
        teardown = self._teardown
        if teardown is not None and teardown is not asyncio.current_task():
            await asyncio.shield(teardown)

    def _run(self, output: object) -> None:
        if isinstance(output, TimelineEntry):
            if output.event is not None and output.event.state not in (None, "created", "ended"):
                self.log.info("call %s (%s): %s", self.id, self.wacid or "-", output.event.state)
            self._on_entry(self, output)
            self._changed()
            waiting, self._waiters = self._waiters, []
            for future in waiting:
                if not future.done():
                    future.set_result(None)
        elif isinstance(output, dc.StartTimer):
            self._cancel_timer(output.name)
            name = output.name
            self._timers[name] = asyncio.get_running_loop().call_later(
                output.delay_s, lambda: self._timer_fired(name))
        elif isinstance(output, dc.CancelTimer):
            self._cancel_timer(output.name)
        elif isinstance(output, dc.ApplyAnswer):
            self._spawn(self._steps(self.leg.bring_up(output.sdp), notify=True))
        elif isinstance(output, dc.WatchMedia):
            self._watchers = [self._spawn(self._watch_transport()), self._spawn(self._watch_rtp())]
        elif isinstance(output, dc.StartAudio):
            for source in self._pending_sources:
                self.playbacks.append(self.leg.media.play(source))
            self._pending_sources.clear()
            if self.bot is not None:
                self._spawn(self._run_bot())
            elif self.sip is not None:
                self._spawn(self._run_sip())
        elif isinstance(output, dc.Teardown):
            self._teardown_action = output.notify
            self._changed()
            self._teardown = self._spawn(self._tear_down(output.notify))
        elif isinstance(output, dc.TerminateLate):
            self.log.info("call %s: named %s after it ended; terminating it", self.id, output.wacid)
            self._spawn(self._terminate_late(output.wacid))
        else:  # pragma: no cover - a new action without a handler is a programming error
            raise TypeError(f"unknown call action {output!r}")

    #: How often a connected call's media statistics are read (the last reading is what a
    #: call keeps when the far end's hang-up takes the transport's counters with it).
    STATS_EVERY_S = 2.0

    def _timer_fired(self, name: str) -> None:
        self._timers.pop(name, None)
        with bind_call_id(self.id):
            self.feed(dc.TimerFired(name))

    def _cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle:
            handle.cancel()

    def _spawn(self, coro) -> asyncio.Task:
        with bind_call_id(self.id):  # the task's log lines carry this call's id
            task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _steps(self, steps: AsyncIterator[object], *, notify: bool) -> bool:
        step: object = None
        """Run a leg's setup procedure, feeding each step; stop when the call is ending.
        A failure ends the call (telling the provider when ``notify``). True when the
        procedure ran to its end."""
        try:
            async for step in steps:
                await self._settle(step)
                if self.state_machine.ending:
                    return False
                await self.flush()  # what happened is stored before the next provider request
        except ProviderUnavailableError as exc:
            if isinstance(step, dc.OfferMade) and not self.wacid:
                self.connect_unknown = True  # it may ring anyway: recognised by its tag later
            await self._settle(dc.End(EndReason.PROVIDER_ERROR, notify=notify, error=exc))
            return False
        except MediaError as exc:
            await self._settle(dc.End(EndReason.MEDIA_FAILURE, notify=notify, detail=str(exc)))
            return False
        except ProviderError as exc:
            await self._settle(dc.End(EndReason.PROVIDER_ERROR, notify=notify, error=exc))
            return False
        finally:
            await steps.aclose()
        return True

    # -- setup -----------------------------------------------------------------------------

    async def dial(self) -> None:
        """Outbound: offer and ``connect``; returns once the provider named the call or
        the call ended."""
        await self._steps(self.leg.dial(), notify=False)

    async def answer(self, offer: str) -> None:
        """Inbound: answer the user's offer (a failure before accept rejects the call;
        the caller hanging up meanwhile just ends it)."""
        self.feed(dc.Offered())
        if self.bot is not None:
            try:
                await probe(self.bot, policy=self._bot_policy)
            except (BridgeUnavailable, BotTargetRefused) as exc:
                await self._settle(dc.End(EndReason.BOT_FAILURE, notify=True, detail=str(exc)))
                return
        if self.state_machine.ending:
            return
        await self._steps(self.leg.answer(offer), notify=True)

    def handle(self, event: CallConnect | CallStatus | CallTerminate) -> None:
        """A provider webhook about this call."""
        if self.ended or self.state_machine.ending:
            self.log.debug("call %s: ignoring %s after the end", self.id, type(event).__name__)
            return
        if isinstance(event, CallStatus) and event.status not in (
                CallStatusKind.RINGING, CallStatusKind.ACCEPTED, CallStatusKind.REJECTED):
            self.log.info("call %s: unknown status %r", self.id, event.raw_status)
            return
        self.feed(event)

    # -- during the call -------------------------------------------------------------------

    def _on_media(self, event: MediaEvent) -> None:
        if isinstance(event, Dtmf):
            self.feed(dc.DtmfIn(event.digit, event.duration_ms, event.source))
        elif isinstance(event, Speech):
            self.feed(dc.SpeechIn(event.kind, event.at_s, event.level_dbfs))
        elif isinstance(event, RecordingFailed):
            self.feed(dc.RecordingStopped(event.code, event.reason))
        elif isinstance(event, MediaEnded):
            pass  # awaited by _watch_transport (only once the call is set up)

    async def _watch_rtp(self) -> None:
        """End the call when no audio arrives for ``rtp_timeout_s`` (a dead network
        leaves ICE and DTLS "connected" for a long time; silence from WhatsApp is still
        RTP, so a stall means the path is gone)."""
        timeout = self._rtp_timeout_s
        received = self.received
        last_frames, last_change = received.frames, time.monotonic()
        last_stats = last_change - self.STATS_EVERY_S  # (a first reading at the first wake-up)
        while not self.state_machine.ending:
            await asyncio.sleep(min(1.0, timeout / 4))
            frames = received.frames
            now = time.monotonic()
            if now - last_stats >= self.STATS_EVERY_S:  # (kept if the far end hangs up first)
                last_stats = now
                await self.refresh_stats()
            if frames != last_frames:
                last_frames, last_change = frames, now
            elif now - last_change >= timeout:
                await self._settle(dc.End(EndReason.MEDIA_FAILURE, notify=True,
                                          detail=f"no audio received for {timeout:g} s"))
                return

    async def _watch_transport(self) -> None:
        media = self.media
        if media is None:
            return
        reason = await media.ended
        self.feed(dc.MediaLost(reason))

    async def _run_bot(self) -> None:
        """Join the voice bot's leg to the user's media; when the bot hangs up (or
        fails), end the WhatsApp call."""
        if self.state_machine.ending:
            return
        self.bot_leg = leg = BotLeg(self.bot)
        parameters = {"wacall_call_id": self.id, "whatsapp_call_id": self.wacid or "",
                      "direction": self.direction.value, "user": display(self.user)}
        try:
            await leg.join(self.media, call_id=self.id, parameters=parameters)
        except BridgeUnavailable as exc:
            await self._settle(dc.End(EndReason.BOT_FAILURE, notify=True, detail=str(exc)))
            return
        self.feed(dc.BotJoined(leg.protocol))
        end = await leg.ended()
        await self._settle(dc.BotLeft(end.by, end.reason))

    async def _run_sip(self) -> None:
        """Dial (or answer) the SIP party and join it to the user's media; when it hangs
        up (or fails, or goes silent), end the WhatsApp call."""
        if self.state_machine.ending:
            return
        if self._sip_context is None:
            await self._settle(dc.End(EndReason.SIP_FAILURE, notify=True,
                                      detail="SIP is not set up on this gateway (WACALL_SIP_LISTEN)"))
            return
        spec, incoming = (self.sip, None) if isinstance(self.sip, SipSpec) else (None, self.sip)
        self.sip_leg = leg = SipLeg(self._sip_context, spec=spec, incoming=incoming)
        parameters = {"whatsapp_call_id": self.wacid or ""}
        try:
            await leg.join(self.media, call_id=self.id, parameters=parameters)
        except (SipUnreachable, MediaError, OSError, ValueError) as exc:
            await self._settle(dc.End(EndReason.SIP_FAILURE, notify=True, detail=str(exc)))
            return
        self.log.info("call %s: SIP party %s joined (%s)", self.id, leg.target, leg.codec)
        self.feed(dc.SipJoined(leg.target, str(leg.codec)))
        end = await leg.ended()
        await self._settle(dc.SipLeft(end.by, end.reason))

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> None:
        """Send DTMF digits to the user (RFC 4733 on the audio stream)."""
        if self.state is not CallState.MEDIA_CONNECTED:
            raise RuntimeError(f"call {self.id} is {self.state.value}, not media_connected")
        await self.media.send_dtmf(digits, duration_ms, gap_ms)
        self.feed(dc.DtmfOut(digits))

    def note_recording_failed(self, code: str, reason: str) -> None:
        self.feed(dc.RecordingStopped(code, reason))

    # -- control ---------------------------------------------------------------------------

    def play(self, source: Source) -> Playback | None:
        """Queue ``source``; it starts once the call is accepted and media is up."""
        if self.ended:
            source.close()
            raise RuntimeError(f"call {self.id} has ended")
        if self.state is CallState.MEDIA_CONNECTED:
            playback = self.media.play(source)
            self.playbacks.append(playback)
            return playback
        self._pending_sources.append(source)
        return None

    async def wait_playback(self) -> None:
        """Wait until everything queued so far has played (or the call ended)."""
        await self.wait_state(CallState.MEDIA_CONNECTED)
        pending = [p.done for p in self.playbacks]
        if pending:
            await asyncio.gather(*pending)

    async def wait_state(self, state: CallState, timeout: float | None = None) -> None:
        """Wait until the call reaches ``state`` (or a later one)."""

        async def wait() -> None:
            while not self.state_machine.reached(state):
                future = asyncio.get_running_loop().create_future()
                self._waiters.append(future)
                await future

        await asyncio.wait_for(wait(), timeout)

    async def hangup(self) -> None:
        """End the call from our side: ``terminate`` to the provider, close media."""
        await self.end(EndReason.BUSINESS_HANGUP, notify=True)
        await self.finished.wait()

    async def end(self, reason: EndReason, *, notify: bool = False, error: ProviderError | None = None,
                  detail: str | None = None) -> None:
        """End the call (no-op once it is ending) and wait for the teardown."""
        await self._settle(dc.End(reason, notify=notify, error=error, detail=detail))

    async def wait_finished(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.finished.wait(), timeout)

    # -- the end ---------------------------------------------------------------------------

    async def _tear_down(self, notify: str | None) -> None:
        """Statistics first, media and recordings closed next, so that the "ended" entry
        (and the event made from it) carries the statistics and finished files; the
        provider is told last."""
        for name in list(self._timers):
            self._cancel_timer(name)
        leg = self.leg
        try:
            await self.refresh_stats()
            if self.bot_leg is not None:
                try:  # the user hung up (or we did): the bot's leg hangs up (its stop message)
                    await self.bot_leg.hangup(self.end_reason.value)
                except Exception:
                    self.log.exception("call %s: stopping the bot failed", self.id)
            if self.sip_leg is not None:
                try:  # the SIP party gets its BYE (or CANCEL)
                    await self.sip_leg.hangup(self.end_reason.value)
                except Exception:
                    self.log.exception("call %s: hanging up the SIP party failed", self.id)
            await leg.media.close(recording_meta={"wacid": self.wacid}, media_stats=self.media_stats)
            for playback in self.playbacks:
                playback._finish()
            for source in self._pending_sources:
                source.close()
            self._pending_sources.clear()
            if notify is not None:
                await self.flush()  # "ending, terminate" is stored before terminate goes out
                self.provider_hangup = await leg.hangup(notify)
        finally:
            for watcher in self._watchers:  # (observers only: nothing to finish)
                if watcher is not asyncio.current_task():
                    watcher.cancel()
            self._release_media()
            self.feed(dc.TornDown())
            self.log.info("call %s (%s) ended: %s%s", self.id, self.wacid or "-", self.end_reason.value,
                          f" ({self.end_detail})" if self.end_detail else "")
            await self.flush()
            self.finished.set()
            self._on_end(self)

    async def _terminate_late(self, wacid: str) -> None:
        self.leg.wacid = wacid
        self._changed()
        self.provider_hangup = await self.leg.hangup("terminate")
        self._changed()

    # -- durable ---------------------------------------------------------------------------

    def record(self) -> CallRecord:
        """The call as data: the public summary plus what a restart needs to finish it."""
        sm = self.state_machine
        durable = {"ending": sm.ending, "teardown": self._teardown_action, "accepted": sm.accepted,
                   "connect_unknown": self.connect_unknown, "tag": tagged(self.id, None),
                   "recipe": self.recipe, "permission_deadline": self.permission_deadline}
        now = time.time()
        lease = now + self.lease_s if self.lease_s is not None and not sm.ended else None
        return CallRecord(id=sm.id, direction=sm.direction.value, user=sm.user, state=sm.state.value,
                          wacid=sm.wacid, owner=self._owner, lease_until=lease, created_at=sm.timeline[0].at,
                          updated_at=now, data=_json_safe({"call": self.summary(), "durable": durable}))

    def renew(self) -> None:
        """Save again, extending this instance's lease on the call."""
        if not self.ended:
            self._changed()

    def _changed(self) -> None:
        """Something worth storing changed: save soon (one writer per call, coalescing)."""
        if self._save is None:
            return
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self._save(self.record())
            except Exception as exc:  # a full disk or a broken store never breaks the call
                if STORE_OUTAGE.first():  # (one line per outage: a full disk fails them all)
                    self.log.error("could not store call %s (and maybe more): %s", self.id, exc)

    async def flush(self) -> None:
        """Wait until the call's latest state is stored."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def _release_media(self) -> None:
        """The call is over: keep what describes it (statistics, file paths, seconds
        played), let go of every media object (session, bridge, sources), so an ended
        call kept in the history holds no codec context, buffer or socket."""
        media = self.leg.media
        if media is not None and not self.media_stats:
            self.media_stats = media.stats()
        self.leg.media = None  # (the leg keeps what a late terminate needs: provider, call id)
        self._recordings = self.recording_paths()
        self.bot_leg = None
        self.sinks = []
        self.played_s = round(sum(p.seconds for p in self.playbacks), 3)
        self.playbacks = []

    async def refresh_stats(self) -> dict:
        """Read the media statistics now (kept after the call ends)."""
        media = self.media
        if media is not None and not media.closed:
            try:
                self.media_stats = await asyncio.wait_for(media.get_stats(), 2.0)
            except (asyncio.TimeoutError, Exception):  # stats must never break a call
                self.log.debug("call %s: stats unavailable", self.id, exc_info=True)
        leg = self.sip_leg
        if leg is not None and leg.party is not None and not leg.party.closed.done():
            try:
                self.sip_stats = await asyncio.wait_for(leg.party.get_stats(), 2.0)
            except (asyncio.TimeoutError, Exception):
                self.log.debug("call %s: SIP leg stats unavailable", self.id, exc_info=True)
        return self.media_stats

    def ask_provider_recording(self, spec) -> None:
        """Ask WhatsApp to record (and transcribe) the call itself
        (:class:`gateway.recordings.ProviderRecording`, sent on ``connect``/``accept``)."""
        self.provider_recording = spec
        self.leg.call_options = spec.fields() if spec is not None else None

    def record_to(self, directory: Path, format: str = "wav") -> Path:
        """Record the call for QA in ``<directory>/<call id>/``. ``format`` ``wav``:
        ``user.wav`` (what the user said), ``stereo.wav`` (left = user, right = business,
        aligned in wall-clock time so gaps stay where they happened), ``user.ogg`` (the
        user's Opus packets as received); ``opus``: ``stereo.ogg`` (both legs' Opus as
        they went over the wire, aligned the same way, nothing decoded); ``both``. And
        ``recording.json`` (durations, levels, media statistics). Files are 0600 in a
        0700 directory and stay playable if the process is killed."""
        self.recording_files = self.media.record(RecordSpec(
            str(Path(directory) / self.id), self.id,
            {"direction": self.direction.value, "wacid": self.wacid, "user": self.user}, format))
        return self.recording_files["sidecar"].parent

    # -- reporting -------------------------------------------------------------------------

    def recording_paths(self) -> list[str]:
        if self._recordings is not None:  # the call is over
            return list(self._recordings)
        paths = [str(s.path) for s in self.sinks if getattr(s, "path", None) is not None]
        paths += [str(p) for p in self.recording_files.values()]
        return paths

    def _recording_summary(self) -> dict | None:
        if not self.recording_files and self.recording_error is None:
            return None
        return {"files": {kind: str(path) for kind, path in self.recording_files.items()},
                "error": self.recording_error}

    def summary(self) -> dict:
        media = self.media
        out = {
            **self.state_machine.as_dict(),
            "recordings": self.recording_paths(),
            "dtmf_received": "".join(self.dtmf_received),
            "recording": self._recording_summary(),
            "media": self.media_stats or (media.stats() if media is not None else {}),
        }
        if self.provider_hangup is not None:
            out["provider_hangup"] = self.provider_hangup
        leg = self.sip_leg
        if leg is not None:
            out["sip"] = {"target": leg.target, "codec": leg.codec, "media": self.sip_stats}
        if self.provider_recording is not None:
            out["provider_recording"] = {**self.provider_recording.to_dict(),
                                         "artifacts": dict(self.provider_artifacts)}
        return out


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` and tuples as lists (JSON, strictly)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
