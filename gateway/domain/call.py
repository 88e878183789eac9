"""The call as a pure state machine: inputs in, timeline entries and actions out.

A business-initiated call moves forward only::

    created -> offer_sent -> ringing -> accepted -> media_connected -> ended

and a user-initiated one ``created -> accepted -> media_connected -> ended``. ``ended`` is
reachable from any state and carries an :class:`EndReason` (plus the provider's error,
when there is one).

:class:`Call` does no I/O and holds no live object: it is fed *inputs* (the provider's
webhook payloads, what its legs report as their setup progresses, media and bot events,
timer expiries, API commands) by :meth:`Call.feed`, and answers with an ordered list of
*outputs*: :class:`TimelineEntry` (a typed :mod:`~gateway.domain.events` event, stamped)
and :class:`Action` (what whoever runs the call must now do: start or cancel a timer,
apply the answer, watch the media, start the audio, tear the call down). The call service
(:mod:`gateway.calls`) performs the actions and feeds back what happened, so every rule
about a call (which webhook moves it where, which timer ends it why, when playback may
start, whether a hang-up is a ``reject`` or a ``terminate``) is here and tested with a
clock and inputs alone.

Webhooks may come in any order, twice, or late: a state change that is not forward (in
:data:`TRANSITIONS`) changes nothing, a second ``connect`` answer is ignored, and once
the call is ending every provider event is ignored. Playback starts only when the call
is both accepted and its media is up (``media_connected``), so the user hears the first
word.
"""

from __future__ import annotations

import enum
import time
from datetime import datetime
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ProviderError, error_for
from ..events import CallConnect, CallStatus, CallStatusKind, CallTerminate, Direction
from ..redact import mask_phone
from . import events as ev

__all__ = [
    "Action", "AcceptSent", "AnswerMade", "ApplyAnswer", "BotJoined", "BotLeft", "Call",
    "CallState", "CancelTimer", "Clock", "Dialed", "DtmfIn", "DtmfOut", "End", "EndReason",
    "MediaLost", "MediaReady", "OfferMade", "Offered", "PermissionAsked", "PermissionGiven",
    "PreAcceptSent", "RecordingStopped", "SipJoined", "SipLeft", "SpeechIn", "StartAudio", "StartTimer",
    "SystemClock",
    "Teardown", "TerminateLate", "TimelineEntry", "TimerFired", "TornDown", "TRANSITIONS",
    "WatchMedia",
]


class CallState(enum.StrEnum):
    CREATED = "created"
    OFFER_SENT = "offer_sent"
    RINGING = "ringing"
    ACCEPTED = "accepted"
    MEDIA_CONNECTED = "media_connected"
    ENDED = "ended"


_ORDER = {state: i for i, state in enumerate(CallState)}

_S = CallState
#: The forward moves a call may make (``ended`` is reached from anywhere, through
#: :class:`End` and :class:`TornDown`). Anything else, a late or repeated status, is
#: ignored.
TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    _S.CREATED: frozenset({_S.OFFER_SENT, _S.ACCEPTED}),
    _S.OFFER_SENT: frozenset({_S.RINGING, _S.ACCEPTED}),
    _S.RINGING: frozenset({_S.ACCEPTED}),
    _S.ACCEPTED: frozenset({_S.MEDIA_CONNECTED}),
    _S.MEDIA_CONNECTED: frozenset(),
    _S.ENDED: frozenset(),
}


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
    #: The SIP party (IVR, PBX) hung up, or could not be reached / went silent.
    SIP_HANGUP = "sip_hangup"
    SIP_FAILURE = "sip_failure"
    #: The process running the call stopped (crashed, was killed); the next start
    #: finished the call at the provider.
    GATEWAY_RESTART = "gateway_restart"
    #: The instance running the call died (its lease ran out); another one finished it.
    INSTANCE_LOST = "instance_lost"


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(slots=True)
class TimelineEntry:
    """One :class:`~gateway.domain.events.CallEvent` on the call's timeline, with when."""

    name: str
    at: float  # unix time
    elapsed_s: float  # since the call was created
    detail: dict = field(default_factory=dict)
    #: The typed event this entry records.
    event: ev.CallEvent | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        seconds, ms = divmod(round(self.at * 1000), 1000)  # (rounded: it survives a parse back)
        out = {
            "name": self.name,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z",
            "elapsed_s": round(self.elapsed_s, 3),
        }
        if self.detail:
            out.update(self.detail)
        return out


# -- inputs: what happened ---------------------------------------------------------------
# (the provider's webhook payloads, CallConnect / CallStatus / CallTerminate, are inputs too)


@dataclass(frozen=True, slots=True)
class OfferMade:
    """Outbound: our SDP offer exists."""


@dataclass(frozen=True, slots=True)
class Dialed:
    """Outbound: the provider took our ``connect`` and named the call."""

    wacid: str


@dataclass(frozen=True, slots=True)
class Offered:
    """Inbound: the user's offer arrived."""


@dataclass(frozen=True, slots=True)
class AnswerMade:
    """Inbound: our SDP answer exists."""


@dataclass(frozen=True, slots=True)
class PreAcceptSent:
    """Inbound: the provider took ``pre_accept``."""


@dataclass(frozen=True, slots=True)
class MediaReady:
    """ICE and DTLS are up."""


@dataclass(frozen=True, slots=True)
class AcceptSent:
    """Inbound: the provider took ``accept``."""


@dataclass(frozen=True, slots=True)
class MediaLost:
    """The media transport ended (the terminate webhook may still be on its way)."""

    reason: str


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: str


@dataclass(frozen=True, slots=True)
class End:
    """End the call: a hang-up, a failure, a refusal. ``notify`` tells the provider
    (``terminate``, or ``reject`` for an inbound call never accepted)."""

    reason: EndReason
    notify: bool = False
    error: ProviderError | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class TornDown:
    """Whoever runs the call finished the :class:`Teardown`: the call is over."""


@dataclass(frozen=True, slots=True)
class PermissionAsked:
    message_id: str | None


@dataclass(frozen=True, slots=True)
class PermissionGiven:
    pass


@dataclass(frozen=True, slots=True)
class BotJoined:
    protocol: str


@dataclass(frozen=True, slots=True)
class BotLeft:
    """The bot's leg ended: ``by`` is ``remote``, ``local`` or ``failure``."""

    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class SipJoined:
    """The SIP party answered and its audio is joined: ``target`` (masked), ``codec``."""

    target: str
    codec: str


@dataclass(frozen=True, slots=True)
class SipLeft:
    """The SIP party's leg ended: ``by`` is ``remote``, ``local`` or ``failure``."""

    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class DtmfIn:
    digit: str
    duration_ms: int
    source: str


@dataclass(frozen=True, slots=True)
class DtmfOut:
    digits: str


@dataclass(frozen=True, slots=True)
class SpeechIn:
    kind: str  # "start" or "stop"
    at_s: float
    level_dbfs: float


@dataclass(frozen=True, slots=True)
class RecordingStopped:
    code: str
    reason: str


# -- actions: what must be done ------------------------------------------------------------


class Action:
    """Base of what :meth:`Call.feed` asks of whoever runs the call."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StartTimer(Action):
    """Feed ``TimerFired(name)`` after ``delay_s`` (replaces a timer of that name)."""

    name: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class CancelTimer(Action):
    name: str


@dataclass(frozen=True, slots=True)
class ApplyAnswer(Action):
    """Outbound: apply the provider's SDP answer and bring media up."""

    sdp: str


@dataclass(frozen=True, slots=True)
class WatchMedia(Action):
    """Watch the media: feed ``MediaLost`` when the transport ends, ``End`` when audio stops."""


@dataclass(frozen=True, slots=True)
class StartAudio(Action):
    """Accepted and media up: play what is queued, join the other leg (a bot)."""


@dataclass(frozen=True, slots=True)
class Teardown(Action):
    """Close the call's legs and media, then tell the provider (``"terminate"``,
    ``"reject"`` or ``None``); feed :class:`TornDown` when done."""

    notify: str | None


@dataclass(frozen=True, slots=True)
class TerminateLate(Action):
    """The provider named the call after it had ended: terminate it there."""

    wacid: str


Output = TimelineEntry | Action


#: Which end reason each timer means.
_TIMER_REASONS = {"ring": EndReason.RING_TIMEOUT, "max_duration": EndReason.MAX_DURATION,
                  "media_grace": EndReason.MEDIA_FAILURE}


class Call:
    """One call's state and history, changed only by :meth:`feed`."""

    def __init__(
        self,
        call_id: str,
        *,
        user: str,
        direction: Direction,
        ring_timeout_s: float,
        max_duration_s: float,
        media_end_grace_s: float = 2.0,
        wacid: str | None = None,
        biz_opaque_callback_data: str | None = None,
        clock: Clock | None = None,
    ):
        self.id = call_id
        #: The WhatsApp user's number (callee of an outbound call, caller of an inbound one).
        self.user = user
        self.direction = direction
        self.wacid = wacid
        self.biz_opaque_callback_data = biz_opaque_callback_data
        self.ring_timeout_s = ring_timeout_s
        self.max_duration_s = max_duration_s
        self.media_end_grace_s = media_end_grace_s
        self.clock = clock or SystemClock()
        self.state = CallState.CREATED
        #: Set from the first :class:`End` on (the teardown is under way).
        self.ending = False
        self.end_reason: EndReason | None = None
        self.error: ProviderError | None = None
        self.end_detail: str | None = None
        self.duration_s: float | None = None  # as reported by the provider's terminate
        self.timeline: list[TimelineEntry] = []
        self.connected_at: float | None = None  # monotonic
        self.ended_at: float | None = None  # monotonic
        self.media_ready = False
        #: Digits received from the user, in order (RFC 4733 and, if enabled, in-band).
        self.dtmf_received: list[str] = []
        #: Why the recording stopped early (``{"code", "reason"}``), e.g. a full disk.
        self.recording_error: dict[str, str] | None = None
        self._answer_applied = False
        self._detail_given: str | None = None
        self._media_lost: str | None = None
        self._watching = False
        self._timers: set[str] = set()
        self._created_mono = self.clock.monotonic()
        self._out: list[Output] = []
        self._mark(ev.CallCreated())

    def restore(self, timeline: list[dict]) -> None:
        """Take the timeline of this call as an earlier process stored it (a call parked
        for a permission request, resumed after a restart): entries without typed events,
        times kept, the call's age counted from its first entry."""
        if self.state is not CallState.CREATED or len(self.timeline) != 1:
            raise RuntimeError("only a new call can take a stored timeline")
        restored = []
        for raw in timeline:
            at = datetime.fromisoformat(str(raw["at"]).replace("Z", "+00:00")).timestamp()
            detail = {k: v for k, v in raw.items() if k not in ("name", "at", "elapsed_s")}
            restored.append(TimelineEntry(str(raw["name"]), at, float(raw.get("elapsed_s", 0.0)), detail))
        if not restored or restored[0].name != "created":
            raise ValueError("a stored timeline starts with 'created'")
        self.timeline = restored
        self._created_mono = self.clock.monotonic() - (self.clock.time() - restored[0].at)

    # -- reading -------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.state is CallState.ENDED

    @property
    def accepted(self) -> bool:
        return self.reached(CallState.ACCEPTED)

    def reached(self, state: CallState) -> bool:
        return _ORDER[self.state] >= _ORDER[state]

    def elapsed_until(self, name: str) -> float | None:
        """Seconds from creation to the first timeline entry called ``name``."""
        return next((e.elapsed_s for e in self.timeline if e.name == name), None)

    def as_dict(self) -> dict:
        """The call as data (the public JSON, without what its media adds)."""
        connected = None
        if self.connected_at is not None:
            connected = round((self.ended_at or self.clock.monotonic()) - self.connected_at, 3)
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
        }

    # -- the machine ---------------------------------------------------------------------

    def feed(self, event: object) -> list[Output]:
        """Apply one input; return what it caused, in order."""
        self._out = []
        if not self.ended or type(event) is Dialed:  # (a call named after its end is terminated)
            handler = _HANDLERS.get(type(event))
            if handler is None:
                raise TypeError(f"a call takes no {type(event).__name__}")
            handler(self, event)
        out, self._out = self._out, []
        return out

    def _mark(self, event: ev.CallEvent) -> None:
        now = self.clock.time()
        entry = TimelineEntry(event.name, now, self.clock.monotonic() - self._created_mono, event.detail(), event)
        self.timeline.append(entry)
        self._out.append(entry)

    def _advance(self, event: ev.CallEvent) -> bool:
        """Move to ``event.state`` if :data:`TRANSITIONS` allows it (never after the end began)."""
        state = CallState(event.state)
        if self.ending or state not in TRANSITIONS[self.state]:
            return False
        self.state = state
        self._mark(event)
        return True

    def _timer(self, name: str, delay_s: float) -> None:
        self._timers.add(name)
        self._out.append(StartTimer(name, delay_s))

    def _cancel(self, name: str) -> None:
        if name in self._timers:
            self._timers.discard(name)
            self._out.append(CancelTimer(name))

    def _watch(self) -> None:
        if not self._watching:
            self._watching = True
            self._out.append(WatchMedia())

    def _maybe_connected(self) -> None:
        if self.media_ready and self.state is CallState.ACCEPTED:
            self.connected_at = self.clock.monotonic()
            self._advance(ev.MediaConnected())
            self._out.append(StartAudio())

    def _end(self, reason: EndReason, *, notify: bool = False, error: ProviderError | None = None,
             detail: str | None = None) -> None:
        if self.ending:
            return
        self.ending = True
        self.end_reason = reason
        self.error = error
        self.end_detail = detail or (str(error) if error else None)
        self._detail_given = detail or None
        self.ended_at = self.clock.monotonic()
        for name in sorted(self._timers):
            self._cancel(name)
        action = None
        if notify and self.wacid:
            # An inbound call we never accepted is rejected, anything else terminated.
            inbound_unaccepted = self.direction is Direction.USER_INITIATED and not self.accepted
            action = "reject" if inbound_unaccepted else "terminate"
        self._out.append(Teardown(action))

    # -- handlers (the table below maps each input type to one) ---------------------------

    def _on_end(self, event: End) -> None:
        self._end(event.reason, notify=event.notify, error=event.error, detail=event.detail)

    def _on_torn_down(self, event: TornDown) -> None:
        if not self.ending:
            raise RuntimeError(f"call {self.id}: torn down before it ended")
        self.state = CallState.ENDED
        self._mark(ev.CallEnded(self.end_reason.value, self.error.to_dict() if self.error is not None else None,
                                self._detail_given))

    def _on_offer_made(self, event: OfferMade) -> None:
        self._mark(ev.OfferCreated())

    def _on_dialed(self, event: Dialed) -> None:
        if self.direction is not Direction.BUSINESS_INITIATED:
            return
        self.wacid = event.wacid
        if self.ending:  # ended (hung up) while the connect request was in flight
            self._out.append(TerminateLate(event.wacid))
            return
        if self._advance(ev.OfferSent(wacid=event.wacid)):
            self._timer("ring", self.ring_timeout_s)

    def _on_offered(self, event: Offered) -> None:
        self._mark(ev.OfferReceived())

    def _on_answer_made(self, event: AnswerMade) -> None:
        self._mark(ev.AnswerCreated())

    def _on_pre_accept_sent(self, event: PreAcceptSent) -> None:
        self._mark(ev.PreAccepted())

    def _on_media_ready(self, event: MediaReady) -> None:
        if self.ending or self.media_ready:
            return
        self.media_ready = True
        self._mark(ev.MediaUp())
        if self.direction is Direction.USER_INITIATED and not self.accepted:
            return  # an inbound call is watched from our accept on
        self._watch()
        self._maybe_connected()

    def _on_accept_sent(self, event: AcceptSent) -> None:
        if self.direction is Direction.USER_INITIATED and self._advance(ev.Accepted()):
            self._timer("max_duration", self.max_duration_s)
            self._watch()
            self._maybe_connected()

    def _on_connect(self, event: CallConnect) -> None:
        if self.ending or self._answer_applied:
            return  # late, or a duplicate connect
        if not event.sdp:
            self._end(EndReason.MEDIA_FAILURE, notify=True, detail="connect webhook without an SDP answer")
            return
        self._answer_applied = True
        self._mark(ev.AnswerReceived())
        self._out.append(ApplyAnswer(event.sdp))

    def _on_status(self, event: CallStatus) -> None:
        if self.ending:
            return
        timestamp = event.timestamp or None
        if event.status is CallStatusKind.RINGING:
            self._advance(ev.Ringing(timestamp))
        elif event.status is CallStatusKind.ACCEPTED:
            if self._advance(ev.Accepted(timestamp)):
                self._cancel("ring")
                self._timer("max_duration", self.max_duration_s)
                self._maybe_connected()
        elif event.status is CallStatusKind.REJECTED:
            self._end(EndReason.REJECTED)

    def _on_terminate(self, event: CallTerminate) -> None:
        if self.ending:
            return
        self.duration_s = event.duration
        if event.errors:
            first = event.errors[0]
            self._end(EndReason.PROVIDER_ERROR, error=error_for(first.code, first.message, details=first.details))
        elif self.direction is Direction.USER_INITIATED or self.accepted:
            self._end(EndReason.USER_HANGUP)
        else:
            self._end(EndReason.NOT_ANSWERED)

    def _on_media_lost(self, event: MediaLost) -> None:
        # When the user hangs up, media often stops a moment before the terminate
        # webhook arrives: give the webhook a grace period before calling it a failure.
        if self.ending or self._media_lost is not None:
            return
        self._media_lost = event.reason
        self._timer("media_grace", self.media_end_grace_s)

    def _on_timer(self, event: TimerFired) -> None:
        if event.name not in self._timers:
            return  # cancelled meanwhile
        self._timers.discard(event.name)
        detail = self._media_lost if event.name == "media_grace" else None
        self._end(_TIMER_REASONS[event.name], notify=True, detail=detail)

    def _on_permission_asked(self, event: PermissionAsked) -> None:
        self._mark(ev.PermissionRequested(event.message_id))

    def _on_permission_given(self, event: PermissionGiven) -> None:
        if not self.ending:
            self._mark(ev.PermissionGranted())

    def _on_bot_joined(self, event: BotJoined) -> None:
        if not self.ending:
            self._mark(ev.BotConnected(event.protocol))

    def _on_bot_left(self, event: BotLeft) -> None:
        if self.ending or event.by == "local":
            return
        reason = EndReason.BOT_HANGUP if event.by == "remote" else EndReason.BOT_FAILURE
        self._end(reason, notify=True, detail=f"bot: {event.reason}")

    def _on_sip_joined(self, event: SipJoined) -> None:
        if not self.ending:
            self._mark(ev.SipConnected(event.target, event.codec))

    def _on_sip_left(self, event: SipLeft) -> None:
        if self.ending or event.by == "local":
            return
        reason = EndReason.SIP_HANGUP if event.by == "remote" else EndReason.SIP_FAILURE
        self._end(reason, notify=True, detail=f"sip: {event.reason}")

    def _on_dtmf_in(self, event: DtmfIn) -> None:
        if self.ending:
            return
        self.dtmf_received.append(event.digit)
        self._mark(ev.DtmfReceived(event.digit, event.duration_ms, event.source))

    def _on_dtmf_out(self, event: DtmfOut) -> None:
        self._mark(ev.DtmfSent(event.digits))

    def _on_speech(self, event: SpeechIn) -> None:
        if self.ending:
            return
        kind = ev.SpeechStarted if event.kind == "start" else ev.SpeechStopped
        self._mark(kind(round(event.at_s, 3), round(event.level_dbfs, 1)))

    def _on_recording_stopped(self, event: RecordingStopped) -> None:
        if self.recording_error is not None:
            return
        self.recording_error = {"code": event.code, "reason": event.reason}
        self._mark(ev.RecordingFailed(self.recording_error))


#: Input type -> handler. (State changes among them are checked against TRANSITIONS.)
_HANDLERS = {
    End: Call._on_end,
    TornDown: Call._on_torn_down,
    OfferMade: Call._on_offer_made,
    Dialed: Call._on_dialed,
    Offered: Call._on_offered,
    AnswerMade: Call._on_answer_made,
    PreAcceptSent: Call._on_pre_accept_sent,
    MediaReady: Call._on_media_ready,
    AcceptSent: Call._on_accept_sent,
    CallConnect: Call._on_connect,
    CallStatus: Call._on_status,
    CallTerminate: Call._on_terminate,
    MediaLost: Call._on_media_lost,
    TimerFired: Call._on_timer,
    PermissionAsked: Call._on_permission_asked,
    PermissionGiven: Call._on_permission_given,
    BotJoined: Call._on_bot_joined,
    BotLeft: Call._on_bot_left,
    SipJoined: Call._on_sip_joined,
    SipLeft: Call._on_sip_left,
    DtmfIn: Call._on_dtmf_in,
    DtmfOut: Call._on_dtmf_out,
    SpeechIn: Call._on_speech,
    RecordingStopped: Call._on_recording_stopped,
}
