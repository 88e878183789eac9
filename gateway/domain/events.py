"""Typed call events: what happened to a call, as data.

A :class:`~gateway.calls.Call` reports each step as one of these frozen dataclasses;
inside the process, subscribers pick the types they care about
(``manager.on(OfferSent, handler)``: the permission gate counts calls, telemetry counts
states) instead of matching strings. At the edge each event becomes a timeline entry and
a public event ``call.<name>`` whose JSON is the event's fields (``None`` fields left
out), exactly as documented in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

__all__ = [
    "Accepted", "AnswerCreated", "AnswerReceived", "BotConnected", "CallCreated", "CallEnded",
    "CallEvent", "DtmfReceived", "DtmfSent", "MediaConnected", "MediaUp", "OfferCreated",
    "OfferReceived", "OfferSent", "PermissionGranted", "PermissionRequested", "PreAccepted",
    "RecordingFailed", "Ringing", "SipConnected", "SpeechStarted", "SpeechStopped", "STATE_EVENTS",
]


@dataclass(frozen=True, slots=True)
class CallEvent:
    """Base of every call event. ``name`` is its public name (``call.<name>``)."""

    name: ClassVar[str] = ""
    #: The call state this event moves the call into, if it is a state change.
    state: ClassVar[str | None] = None

    def detail(self) -> dict[str, Any]:
        """The event's fields for the timeline and the public JSON (``None`` left out)."""
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None}


# -- states ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallCreated(CallEvent):
    name: ClassVar[str] = "created"
    state: ClassVar[str | None] = "created"


@dataclass(frozen=True, slots=True)
class OfferSent(CallEvent):
    """The provider took our ``connect`` and named the call."""

    name: ClassVar[str] = "offer_sent"
    state: ClassVar[str | None] = "offer_sent"
    wacid: str | None = None


@dataclass(frozen=True, slots=True)
class Ringing(CallEvent):
    name: ClassVar[str] = "ringing"
    state: ClassVar[str | None] = "ringing"
    provider_timestamp: str | None = None


@dataclass(frozen=True, slots=True)
class Accepted(CallEvent):
    name: ClassVar[str] = "accepted"
    state: ClassVar[str | None] = "accepted"
    provider_timestamp: str | None = None


@dataclass(frozen=True, slots=True)
class MediaConnected(CallEvent):
    """Accepted and media up: playback starts."""

    name: ClassVar[str] = "media_connected"
    state: ClassVar[str | None] = "media_connected"


@dataclass(frozen=True, slots=True)
class CallEnded(CallEvent):
    name: ClassVar[str] = "ended"
    state: ClassVar[str | None] = "ended"
    reason: str = ""
    #: The provider's error (``ProviderError.to_dict()``), when there is one.
    error: dict | None = None
    detail_text: str | None = None

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason}
        if self.error is not None:
            out["error"] = self.error
        if self.detail_text:
            out["detail"] = self.detail_text
        return out


STATE_EVENTS = (CallCreated, OfferSent, Ringing, Accepted, MediaConnected, CallEnded)


# -- setup steps -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OfferCreated(CallEvent):
    name: ClassVar[str] = "offer_created"


@dataclass(frozen=True, slots=True)
class OfferReceived(CallEvent):
    name: ClassVar[str] = "offer_received"


@dataclass(frozen=True, slots=True)
class AnswerCreated(CallEvent):
    name: ClassVar[str] = "answer_created"


@dataclass(frozen=True, slots=True)
class PreAccepted(CallEvent):
    name: ClassVar[str] = "pre_accepted"


@dataclass(frozen=True, slots=True)
class AnswerReceived(CallEvent):
    name: ClassVar[str] = "answer_received"


@dataclass(frozen=True, slots=True)
class MediaUp(CallEvent):
    """ICE and DTLS are up (silence is flowing)."""

    name: ClassVar[str] = "media_up"


@dataclass(frozen=True, slots=True)
class PermissionRequested(CallEvent):
    name: ClassVar[str] = "permission_requested"
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class PermissionGranted(CallEvent):
    name: ClassVar[str] = "permission_granted"


@dataclass(frozen=True, slots=True)
class BotConnected(CallEvent):
    name: ClassVar[str] = "bot_connected"
    protocol: str | None = None


@dataclass(frozen=True, slots=True)
class SipConnected(CallEvent):
    """The SIP party (an IVR, a PBX, a trunk) answered and its audio is joined."""

    name: ClassVar[str] = "sip_connected"
    target: str | None = None
    codec: str | None = None


# -- during the call ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DtmfReceived(CallEvent):
    name: ClassVar[str] = "dtmf"
    digit: str = ""
    duration_ms: int = 0
    source: str = "rfc4733"


@dataclass(frozen=True, slots=True)
class DtmfSent(CallEvent):
    name: ClassVar[str] = "dtmf_sent"
    digits: str = ""


@dataclass(frozen=True, slots=True)
class SpeechStarted(CallEvent):
    name: ClassVar[str] = "speech_start"
    audio_s: float = 0.0
    level_dbfs: float = 0.0


@dataclass(frozen=True, slots=True)
class SpeechStopped(CallEvent):
    name: ClassVar[str] = "speech_stop"
    audio_s: float = 0.0
    level_dbfs: float = 0.0


@dataclass(frozen=True, slots=True)
class RecordingFailed(CallEvent):
    """The recording stopped early (a full disk...); the call goes on."""

    name: ClassVar[str] = "recording_failed"
    error: dict | None = None
