"""The call state machine: the only place a call's state changes.

A business-initiated call moves forward only::

    created -> offer_sent -> ringing -> accepted -> media_connected -> ended

``ended`` can be reached from any state and carries an :class:`EndReason` (plus the
provider's error, when there is one). Webhooks may arrive in any order, twice, or late:

* a ``connect`` answer that arrives before the HTTP response of our ``connect`` request
  is buffered by the :class:`~gateway.manager.CallManager` and applied once the call id is known;
* ``ACCEPTED`` may come before or after media is up; playback starts only when both
  are true (``media_connected``), so the user hears the first word;
* duplicates and events for ended calls change nothing.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from media.frames import Sink, Source
from media.peer import MediaError
from media.session import Dtmf, LocalMediaSession, MediaEvent, RecordingFailed, RecordSpec, Speech
from media.mix import Playback

from . import call_events as ev
from .errors import ProviderError
from .logs import bind_call_id
from .events import CallConnect, CallStatus, CallStatusKind, CallTerminate, Direction
from .providers.base import CallingProvider
from .redact import mask_phone


log = logging.getLogger(__name__)


class CallState(enum.StrEnum):
    CREATED = "created"
    OFFER_SENT = "offer_sent"
    RINGING = "ringing"
    ACCEPTED = "accepted"
    MEDIA_CONNECTED = "media_connected"
    ENDED = "ended"


_ORDER = {state: i for i, state in enumerate(CallState)}


class CapacityError(RuntimeError):
    """Too many live calls to take another one."""


class EndReason(enum.StrEnum):
    REJECTED = "rejected"
    USER_HANGUP = "user_hangup"
    BUSINESS_HANGUP = "business_hangup"
    RING_TIMEOUT = "ring_timeout"
    NOT_ANSWERED = "not_answered"
    MAX_DURATION = "max_duration"
    MEDIA_FAILURE = "media_failure"
    PROVIDER_ERROR = "provider_error"
    SHUTDOWN = "shutdown"
    #: An inbound call we did not take (policy, or over capacity).
    DECLINED = "declined"
    #: A call waiting for a permission request: the user declined, or did not answer.
    PERMISSION_DENIED = "permission_denied"
    PERMISSION_TIMEOUT = "permission_timeout"
    #: The voice bot ended the call, or could not be reached / broke its protocol / went idle.
    BOT_HANGUP = "bot_hangup"
    BOT_FAILURE = "bot_failure"


@dataclass(slots=True)
class InboundPlan:
    """What to do with an inbound call: play these sources, feed these sinks."""

    sources: list[Source] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    record: bool = False
    #: With ``record``: reject the call rather than answer it unrecorded when
    #: recording cannot start (low disk).
    record_required: bool = False
    biz_opaque_callback_data: str | None = None
    max_duration_s: float | None = None
    #: A voice bot that takes the call (:class:`gateway.bots.BotSpec`).
    bot: Any = None


#: Decides about an inbound call: a plan to answer it, or ``None`` to reject it.
InboundPolicy = Callable[[CallConnect], "InboundPlan | None"]


@dataclass(slots=True)
class TimelineEntry:
    """One :class:`~gateway.call_events.CallEvent` on the call's timeline, with when."""

    name: str
    at: float  # unix time
    elapsed_s: float  # since the call was created
    detail: dict = field(default_factory=dict)
    #: The typed event this entry records.
    event: ev.CallEvent | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        out = {
            "name": self.name,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.at)) + f".{int(self.at % 1 * 1000):03d}Z",
            "elapsed_s": round(self.elapsed_s, 3),
        }
        if self.detail:
            out.update(self.detail)
        return out


Listener = Callable[["Call", TimelineEntry], None]


class CallHost(Protocol):
    """What a :class:`Call` needs from whoever runs it (the
    :class:`~gateway.manager.CallManager`): the provider, the media watchdog settings,
    and where its events and its end go. (So calls.py imports no manager.)"""

    provider: CallingProvider
    rtp_timeout_s: float
    media_end_grace_s: float

    def _notify(self, call: Call, entry: TimelineEntry) -> None: ...

    def _next_change(self, call: Call) -> asyncio.Future: ...

    def _forget_later(self, call: Call) -> None: ...


class Call:
    """One call and its media. Created by :class:`~gateway.manager.CallManager`."""

    def __init__(
        self,
        manager: CallHost,
        *,
        user: str,
        direction: Direction,
        media: LocalMediaSession,
        sources: Iterable[Source] = (),
        sinks: Iterable[Sink] = (),
        biz_opaque_callback_data: str | None = None,
        ring_timeout_s: float,
        max_duration_s: float,
        media_timeout_s: float,
        wacid: str | None = None,
        bot: Any = None,
    ):
        self.id = f"call_{secrets.token_hex(6)}"
        self.log = logging.LoggerAdapter(log, {"call_id": self.id})
        #: The WhatsApp user's number (callee of an outbound call, caller of an inbound one).
        self.user = user
        self.direction = direction
        #: The call's media (media.session); ``None`` once the call has ended.
        self.media: LocalMediaSession | None = media
        self.wacid: str | None = wacid
        self.biz_opaque_callback_data = biz_opaque_callback_data
        self.state = CallState.CREATED
        self.end_reason: EndReason | None = None
        self.error: ProviderError | None = None
        self.end_detail: str | None = None
        self.duration_s: float | None = None  # as reported by the provider's terminate
        self.timeline: list[TimelineEntry] = []
        self.sinks = list(sinks)
        self.playbacks: list[Playback] = []
        self._manager = manager
        self._pending_sources = list(sources)
        self._ring_timeout_s = ring_timeout_s
        self._max_duration_s = max_duration_s
        self._media_timeout_s = media_timeout_s
        self._answer_applied = False
        self._ending = False
        self._media_ready = False
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._created_mono = time.monotonic()
        self.connected_at: float | None = None
        self.ended_at: float | None = None
        self.finished = asyncio.Event()  # set once media and recordings are closed
        self.media_stats: dict = {}
        #: The recording's files by kind (``user_wav``, ``stereo_wav``, ``user_ogg``,
        #: ``sidecar``), kept after the call ends (when the recorder itself is let go).
        self.recording_files: dict[str, Path] = {}
        self._recordings: list[str] | None = None  # recording_paths() once ended
        #: What the far side's audio amounted to (frames received); kept after the end.
        self.received = media.received
        #: Seconds played to the user (set when the call ends).
        self.played_s = 0.0
        self.bot = bot  # gateway.bots.BotSpec
        #: The bot's leg (gateway.legs.BotLeg) once it joined; ``None`` after the end.
        self.bot_leg = None
        #: The SDP we sent (offer or answer), as the provider received it.
        self.local_sdp: str | None = None
        #: Digits received from the user, in order (RFC 4733 and, if enabled, in-band).
        self.dtmf_received: list[str] = []
        #: Why the recording stopped early (``{"code", "reason"}``), e.g. a full disk.
        self.recording_error: dict[str, str] | None = None
        media.subscribe(self._on_media)
        self._mark(ev.CallCreated())

    def _on_media(self, event: MediaEvent) -> None:
        """What the media session reports (transport end is awaited in _watch_transport)."""
        if isinstance(event, Dtmf):
            self._on_dtmf(event)
        elif isinstance(event, Speech):
            self._on_speech(event)
        elif isinstance(event, RecordingFailed):
            self._recording_failed({"code": event.code, "reason": event.reason})

    # -- bookkeeping ---------------------------------------------------------------------

    def _mark(self, event: ev.CallEvent) -> TimelineEntry:
        """Record ``event`` on the timeline and hand it to the manager's subscribers."""
        now = time.time()
        entry = TimelineEntry(event.name, now, time.monotonic() - self._created_mono, event.detail(), event)
        self.timeline.append(entry)
        self._manager._notify(self, entry)
        return entry

    def _advance(self, event: ev.CallEvent) -> bool:
        """Move forward to ``event.state`` (never back, never after the end begins)."""
        state = CallState(event.state)
        if self._ending or _ORDER[state] <= _ORDER[self.state]:
            return False
        self.state = state
        self._mark(event)
        self.log.info("call %s (%s): %s", self.id, self.wacid or "-", state.value)
        return True

    def _spawn(self, coro) -> asyncio.Task:
        with bind_call_id(self.id):  # the task's log lines carry this call's id
            task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_timer(self, name: str, delay: float, reason: EndReason) -> None:
        loop = asyncio.get_running_loop()
        self._timers[name] = loop.call_later(
            delay, lambda: self._spawn(self._end(reason, notify_provider=True))
        )

    def _cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle:
            handle.cancel()

    @property
    def ended(self) -> bool:
        return self.state is CallState.ENDED

    @property
    def media_up(self) -> bool:
        return self._media_ready

    def elapsed_until(self, name: str) -> float | None:
        """Seconds from creation to the first timeline entry called ``name``."""
        return next((e.elapsed_s for e in self.timeline if e.name == name), None)

    # -- outbound setup ------------------------------------------------------------------

    async def _dial(self, provider: CallingProvider) -> None:
        try:
            offer = await self.media.offer()  # (the session is let go only by _end)
        except MediaError as exc:
            await self._end(EndReason.MEDIA_FAILURE, detail=str(exc))
            return
        self.local_sdp = offer
        self._mark(ev.OfferCreated())
        try:
            wacid = await provider.connect(self.user, offer, self.biz_opaque_callback_data)
        except ProviderError as exc:
            await self._end(EndReason.PROVIDER_ERROR, error=exc)
            return
        self.wacid = wacid
        self._advance(ev.OfferSent(wacid=wacid))
        self._start_timer("ring", self._ring_timeout_s, EndReason.RING_TIMEOUT)

    # -- inbound setup -------------------------------------------------------------------

    async def _answer(self, provider: CallingProvider, offer: str) -> None:
        """pre_accept -> media up -> accept, with the same SDP answer both times
        (``sdp_type`` "answer", see the protocol notes). A failure before accept
        rejects the call; the caller hanging up meanwhile just ends it."""
        self._mark(ev.OfferReceived())
        if self.bot is not None:
            from .bots import BridgeUnavailable, probe

            try:
                await probe(self.bot)
            except BridgeUnavailable as exc:
                await self._end(EndReason.BOT_FAILURE, notify_provider=True, detail=str(exc))
                return
        media = self.media  # _end lets go of self.media while we wait
        try:
            answer = await media.answer(offer)
            self.local_sdp = answer
            self._mark(ev.AnswerCreated())
            await provider.pre_accept(self.wacid, answer)
            self._mark(ev.PreAccepted())
            await media.wait_up(self._media_timeout_s)
            if self.ended:
                return
            self._media_ready = True
            self._mark(ev.MediaUp())
            await provider.accept(self.wacid, answer, self.biz_opaque_callback_data)
        except (MediaError, ProviderError) as exc:
            if not self.ended:
                if isinstance(exc, ProviderError):
                    await self._end(EndReason.PROVIDER_ERROR, notify_provider=True, error=exc)
                else:
                    await self._end(EndReason.MEDIA_FAILURE, notify_provider=True, detail=str(exc))
            return
        if self._advance(ev.Accepted()):
            self._start_timer("max_duration", self._max_duration_s, EndReason.MAX_DURATION)
            self._spawn(self._watch_transport())
            self._spawn(self._watch_rtp())
            self._maybe_connected()

    # -- webhook events ------------------------------------------------------------------

    def handle(self, event) -> None:
        if self.ended or self._ending:
            self.log.debug("call %s: ignoring %s after the end", self.id, type(event).__name__)
            return
        if isinstance(event, CallConnect):
            self._on_connect(event)
        elif isinstance(event, CallStatus):
            self._on_status(event)
        elif isinstance(event, CallTerminate):
            self._on_terminate(event)

    def _on_connect(self, event: CallConnect) -> None:
        if self._answer_applied:
            return  # duplicate connect
        if not event.sdp:
            self._spawn(self._end(EndReason.MEDIA_FAILURE, notify_provider=True,
                                  detail="connect webhook without an SDP answer"))
            return
        self._answer_applied = True
        self._mark(ev.AnswerReceived())
        self._spawn(self._bring_media_up(event.sdp))

    async def _bring_media_up(self, answer: str) -> None:
        media = self.media  # _end lets go of self.media while we wait
        try:
            await media.apply_answer(answer)
            await media.wait_up(self._media_timeout_s)
        except MediaError as exc:
            await self._end(EndReason.MEDIA_FAILURE, notify_provider=True, detail=str(exc))
            return
        if self.ended:
            return
        self._media_ready = True
        self._mark(ev.MediaUp())
        self._spawn(self._watch_transport())
        self._spawn(self._watch_rtp())
        self._maybe_connected()

    async def _watch_rtp(self) -> None:
        """End the call when no audio arrives for ``rtp_timeout_s`` (a dead network
        leaves ICE and DTLS "connected" for a long time; silence from WhatsApp is still
        RTP, so a stall means the path is gone)."""
        timeout = self._manager.rtp_timeout_s
        received = self.received
        last_frames, last_change = received.frames, time.monotonic()
        while not (self.ended or self._ending):
            await asyncio.sleep(min(1.0, timeout / 4))
            frames = received.frames
            now = time.monotonic()
            if frames != last_frames:
                last_frames, last_change = frames, now
            elif now - last_change >= timeout:
                await self._end(EndReason.MEDIA_FAILURE, notify_provider=True,
                                detail=f"no audio received for {timeout:g} s")
                return

    async def _watch_transport(self) -> None:
        reason = await self.media.ended
        if self.ended or self._ending:
            return
        # When the user hangs up, media often stops a moment before the terminate
        # webhook arrives: give the webhook a grace period before calling it a failure.
        try:
            await self.wait_state(CallState.ENDED, self._manager.media_end_grace_s)
        except asyncio.TimeoutError:
            await self._end(EndReason.MEDIA_FAILURE, notify_provider=True, detail=reason)

    def _on_status(self, event: CallStatus) -> None:
        timestamp = event.timestamp or None
        if event.status is CallStatusKind.RINGING:
            self._advance(ev.Ringing(timestamp))
        elif event.status is CallStatusKind.ACCEPTED:
            if self._advance(ev.Accepted(timestamp)):
                self._cancel_timer("ring")
                self._start_timer("max_duration", self._max_duration_s, EndReason.MAX_DURATION)
                self._maybe_connected()
        elif event.status is CallStatusKind.REJECTED:
            self._spawn(self._end(EndReason.REJECTED))
        else:
            self.log.info("call %s: unknown status %r", self.id, event.raw_status)

    def _on_terminate(self, event: CallTerminate) -> None:
        self.duration_s = event.duration
        if self.direction is Direction.USER_INITIATED and not event.errors:
            self._spawn(self._end(EndReason.USER_HANGUP))
        elif event.errors:
            first = event.errors[0]
            from .errors import error_for

            error = error_for(first.code, first.message, details=first.details)
            self._spawn(self._end(EndReason.PROVIDER_ERROR, error=error))
        elif _ORDER[self.state] >= _ORDER[CallState.ACCEPTED]:
            self._spawn(self._end(EndReason.USER_HANGUP))
        else:
            self._spawn(self._end(EndReason.NOT_ANSWERED))

    def _maybe_connected(self) -> None:
        if self._media_ready and self.state is CallState.ACCEPTED:
            self.connected_at = time.monotonic()
            self._advance(ev.MediaConnected())
            for source in self._pending_sources:
                self.playbacks.append(self.media.play(source))
            self._pending_sources.clear()
            if self.bot is not None:
                self._spawn(self._run_bot())

    async def _run_bot(self) -> None:
        """Join the voice bot's leg to the user's media; when the bot hangs up (or
        fails), end the WhatsApp call."""
        from .bots import BridgeUnavailable
        from .legs import BotLeg

        if self.ended or self._ending:
            return
        self.bot_leg = leg = BotLeg(self.bot)
        parameters = {"wacall_call_id": self.id, "whatsapp_call_id": self.wacid or "",
                      "direction": self.direction.value, "user": "+" + self.user.lstrip("+")}
        try:
            await leg.join(self.media, call_id=self.id, parameters=parameters)
        except BridgeUnavailable as exc:
            await self._end(EndReason.BOT_FAILURE, notify_provider=True, detail=str(exc))
            return
        self._mark(ev.BotConnected(leg.protocol))
        end = await leg.ended()
        if self.ended or self._ending or end.by == "local":
            return
        ending = EndReason.BOT_HANGUP if end.by == "remote" else EndReason.BOT_FAILURE
        await self._end(ending, notify_provider=True, detail=f"bot: {end.reason}")

    def _on_speech(self, event) -> None:
        if not (self.ended or self._ending):
            kind = ev.SpeechStarted if event.kind == "start" else ev.SpeechStopped
            self._mark(kind(round(event.at_s, 3), round(event.level_dbfs, 1)))

    def _recording_failed(self, error: dict[str, str]) -> None:
        if self.recording_error is not None:
            return
        self.recording_error = error
        if not self.ended:
            self._mark(ev.RecordingFailed(error))

    def _on_dtmf(self, event) -> None:
        if self.ended or self._ending:
            return
        self.dtmf_received.append(event.digit)
        self._mark(ev.DtmfReceived(event.digit, event.duration_ms, event.source))

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> None:
        """Send DTMF digits to the user (RFC 4733 on the audio stream)."""
        if self.state is not CallState.MEDIA_CONNECTED:
            raise RuntimeError(f"call {self.id} is {self.state.value}, not media_connected")
        await self.media.send_dtmf(digits, duration_ms, gap_ms)
        self._mark(ev.DtmfSent(digits))

    # -- control -------------------------------------------------------------------------

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

    async def _next_change(self) -> None:
        await self._manager._next_change(self)

    async def wait_state(self, state: CallState, timeout: float | None = None) -> None:
        """Wait until the call reaches ``state`` (or a later one)."""

        async def wait() -> None:
            while _ORDER[self.state] < _ORDER[state]:
                await self._next_change()

        await asyncio.wait_for(wait(), timeout)

    async def hangup(self) -> None:
        """End the call from our side: ``terminate`` to the provider, close media."""
        await self._end(EndReason.BUSINESS_HANGUP, notify_provider=True)
        await self.finished.wait()

    async def wait_finished(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.finished.wait(), timeout)

    async def _end(
        self,
        reason: EndReason,
        *,
        notify_provider: bool = False,
        error: ProviderError | None = None,
        detail: str | None = None,
    ) -> None:
        if self.ended or self._ending:
            return
        self._ending = True
        was_accepted = _ORDER[self.state] >= _ORDER[CallState.ACCEPTED]
        self.end_reason = reason
        self.error = error
        self.end_detail = detail or (str(error) if error else None)
        self.ended_at = time.monotonic()
        for name in list(self._timers):
            self._cancel_timer(name)
        # Statistics first, media and recordings closed next, so that the "ended" entry
        # (and the event made from it) carries the statistics and finished files.
        await self.refresh_stats()
        if self.bot_leg is not None:
            try:  # the user hung up (or we did): the bot's leg hangs up (its stop message)
                await self.bot_leg.hangup(reason.value)
            except Exception:
                self.log.exception("call %s: stopping the bot failed", self.id)
        await self.media.close(recording_meta={"wacid": self.wacid}, media_stats=self.media_stats)
        for playback in self.playbacks:
            playback._finish()
        for source in self._pending_sources:
            source.close()
        self._pending_sources.clear()
        try:
            if notify_provider and self.wacid:
                provider = self._manager.provider
                # An inbound call we never accepted is rejected, anything else terminated.
                inbound_unaccepted = self.direction is Direction.USER_INITIATED and not was_accepted
                try:
                    if inbound_unaccepted:
                        await provider.reject(self.wacid)
                    else:
                        await provider.terminate(self.wacid)
                except ProviderError as exc:
                    self.log.warning("call %s: %s failed: %s", self.id,
                                "reject" if inbound_unaccepted else "terminate", exc)
        finally:
            self._release_media()
            self.state = CallState.ENDED
            self._mark(ev.CallEnded(reason.value, error.to_dict() if error is not None else None,
                                    detail or None))
            self.log.info("call %s (%s) ended: %s%s", self.id, self.wacid or "-", reason.value,
                     f" ({self.end_detail})" if self.end_detail else "")
            self.finished.set()
            self._manager._forget_later(self)

    def _release_media(self) -> None:
        """The call is over: keep what describes it (statistics, file paths, seconds
        played), let go of every media object (session, bridge, sources), so an ended
        call kept in the history holds no codec context, buffer or socket."""
        media = self.media
        if media is not None and not self.media_stats:
            self.media_stats = media.stats()
        self.media = None
        self._recordings = self.recording_paths()
        self.bot_leg = None
        self.sinks = []
        self.played_s = round(sum(p.seconds for p in self.playbacks), 3)
        self.playbacks = []

    async def refresh_stats(self) -> dict:
        """Read the media statistics now (kept after the call ends)."""
        if self.media is not None and not self.media.closed:
            try:
                self.media_stats = await asyncio.wait_for(self.media.get_stats(), 2.0)
            except (asyncio.TimeoutError, Exception):  # stats must never break a call
                self.log.debug("call %s: stats unavailable", self.id, exc_info=True)
        return self.media_stats

    def record_to(self, directory: Path) -> Path:
        """Record the call for QA in ``<directory>/<call id>/``: ``user.wav`` (what the
        user said), ``stereo.wav`` (left = user, right = business, aligned in wall-clock
        time so gaps stay where they happened), ``user.ogg`` (the user's Opus packets as
        received) and ``recording.json`` (durations, levels, media statistics). Files are
        0600 in a 0700 directory and stay playable if the process is killed."""
        self.recording_files = self.media.record(RecordSpec(
            str(Path(directory) / self.id), self.id, {"direction": self.direction.value, "wacid": self.wacid}))
        return self.recording_files["sidecar"].parent

    # -- reporting -----------------------------------------------------------------------

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
        connected = None
        if self.connected_at is not None:
            connected = round((self.ended_at or time.monotonic()) - self.connected_at, 3)
        return {
            "id": self.id,
            "wacid": self.wacid,
            "created_at": self.timeline[0].as_dict()["at"],
            "biz_opaque_callback_data": self.biz_opaque_callback_data,
            "direction": self.direction.value,
            "user": mask_phone(self.user),
            "state": self.state.value,
            "end_reason": self.end_reason.value if self.end_reason else None,
            "error": self.error.to_dict() if self.error else None,
            "detail": self.end_detail,
            "connected_seconds": connected,
            "provider_duration_s": self.duration_s,
            "timeline": [e.as_dict() for e in self.timeline],
            "recordings": self.recording_paths(),
            "dtmf_received": "".join(self.dtmf_received),
            "recording": self._recording_summary(),
            "media": self.media_stats or (self.media.stats() if self.media is not None else {}),
        }
