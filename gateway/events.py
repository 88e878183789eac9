"""Typed WhatsApp calling webhook payloads.

Each class parses one object from a webhook ``value`` (see :mod:`gateway.webhooks`
for the envelope). Parsing is tolerant: unknown enum values become ``UNKNOWN``,
unix-second timestamps may be strings or ints, missing optional fields are
``None``. Phone fields can be absent when the user has a username (BSUID only).

Every event has a ``key`` for de-duplication: Meta retries failed deliveries
for up to 7 days, so the same event can arrive many times.
"""

from __future__ import annotations

import contextlib
import math
import re
import hashlib
import json
from collections.abc import Iterable, Mapping
import typing
from dataclasses import asdict, dataclass, fields as dataclass_fields
from enum import StrEnum
from typing import Any, Self, TypeAlias

from gateway.errors import ProviderError, WebhookFormatError, error_for
from gateway.numbers import is_bsuid, normalize_recipient

__all__ = [
    "CallConnect",
    "CallStatus",
    "CallStatusKind",
    "CallTerminate",
    "Direction",
    "TerminateStatus",
    "UnknownEvent",
    "CallArtifact",
    "WebhookError",
    "WebhookEvent",
    "WebhookFormatError",
    "from_wire",
    "to_wire",
]

EventKey: TypeAlias = tuple[str, str, str, int | None]


class _TolerantEnum(StrEnum):
    """String enum that maps unknown (or differently cased) values to ``UNKNOWN``."""

    @classmethod
    def _missing_(cls, value: object) -> _TolerantEnum:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.strip().upper():
                    return member
        return cls["UNKNOWN"]

    @classmethod
    def parse(cls, value: object) -> Self:
        """Like ``cls(value)``, but any non-string also gives ``UNKNOWN``."""
        return cls(value) if isinstance(value, str) else cls["UNKNOWN"]


class Direction(_TolerantEnum):
    """Who placed the call."""

    BUSINESS_INITIATED = "BUSINESS_INITIATED"
    USER_INITIATED = "USER_INITIATED"
    UNKNOWN = "UNKNOWN"


class CallStatusKind(_TolerantEnum):
    """``statuses[].status`` of a business-initiated call.

    ``ACCEPTED`` (the user picked up) typically arrives after media is already
    flowing; ``REJECTED`` is followed by a ``terminate`` webhook. There is no
    status for "not answered": such calls simply end with ``terminate``.
    """

    RINGING = "RINGING"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    UNKNOWN = "UNKNOWN"


class TerminateStatus(_TolerantEnum):
    """``status`` of a ``terminate`` event.

    References write ``COMPLETED``/``FAILED``, guides ``Completed``/``Failed``.
    """

    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"


_INT = re.compile(r"-?[0-9]{1,18}")
#: Integers beyond this (in either direction) are not believed (JSON's exact-integer range).
_MAX_INT = 2**53
#: Timestamps after 9999-12-31 are not believed (they would break every date later on).
MAX_TIMESTAMP = 253402300799


def _int(value: Any) -> int | None:
    """Ints or ASCII digit strings within ±2**53; anything else (``Infinity``, ``1e400``,
    ``"١٢٣"``, ``True``, objects) is ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not _INT.fullmatch(text):
            return None
        value = int(text)
    elif not isinstance(value, int):
        return None
    return value if -_MAX_INT <= value <= _MAX_INT else None


def _timestamp(value: Any) -> int | None:
    """Unix seconds between 1970 and 9999, else ``None``."""
    seconds = _int(value)
    return seconds if seconds is not None and 0 <= seconds <= MAX_TIMESTAMP else None


def _user(value: Any, what: str) -> str:
    """A WhatsApp user: E.164 digits or a BSUID, or :class:`WebhookFormatError`."""
    if not isinstance(value, str) or not value:
        raise WebhookFormatError(f"{what} is missing")
    try:
        return normalize_recipient(value)
    except ValueError:
        raise WebhookFormatError(f"{what} is not a phone number or a BSUID") from None


def _bsuid(value: Any) -> str | None:
    """A business-scoped user id field (``*_user_id``), normalised; anything else: ``None``."""
    return normalize_recipient(value) if is_bsuid(value) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value != "" else None


def _call_id(d: Mapping[str, Any], what: str) -> str:
    if not isinstance(d, Mapping):
        raise WebhookFormatError(f"{what} must be an object, got {type(d).__name__}")
    call_id = d.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise WebhookFormatError(f"{what} has no 'id'")
    return call_id


@dataclass(frozen=True, slots=True)
class WebhookError:
    """One entry of ``value.errors[]`` (sent next to failed ``terminate`` events)."""

    code: int | None
    message: str
    details: str | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WebhookError:
        if not isinstance(d, Mapping):
            return cls(None, str(d), None)
        data = d.get("error_data")
        details = data.get("details") if isinstance(data, Mapping) else None
        message = _str(d.get("message")) or _str(d.get("title")) or ""
        return cls(_int(d.get("code")), message, _str(details) or _str(d.get("details")))

    def as_error(self) -> ProviderError:
        """The matching :class:`ProviderError` (with meaning and resolution)."""
        return error_for(self.code, self.message or None, details=self.details)


def _sdp_from(d: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``session.{sdp,sdp_type}``, else legacy ``connection.webrtc.sdp``."""
    session = d.get("session")
    if isinstance(session, Mapping) and _str(session.get("sdp")):
        kind = _str(session.get("sdp_type"))
        return session["sdp"], kind.lower() if kind else None
    connection = d.get("connection")
    webrtc = connection.get("webrtc") if isinstance(connection, Mapping) else None
    legacy = webrtc.get("sdp") if isinstance(webrtc, Mapping) else None
    if isinstance(legacy, str) and legacy.lstrip().startswith("{"):
        with contextlib.suppress(ValueError):
            legacy = json.loads(legacy)
    if isinstance(legacy, Mapping):
        kind = _str(legacy.get("type")) or _str(legacy.get("sdp_type"))
        return _str(legacy.get("sdp")), kind.lower() if kind else None
    return _str(legacy), None


@dataclass(frozen=True, slots=True)
class CallConnect:
    """``calls[]`` with ``event: "connect"``.

    ``USER_INITIATED``: an incoming call with the user's SDP offer; pre_accept /
    accept (or reject) within ~30-60 s. ``BUSINESS_INITIATED``: Meta's SDP answer
    to our ``connect`` (not yet "user answered"; that is ``ACCEPTED``). It may
    arrive before our ``connect`` HTTP call returns.

    When only a raw legacy SDP is present, ``sdp_type`` is inferred from the
    direction (answer for business-initiated, offer for user-initiated).
    """

    call_id: str
    direction: Direction
    from_: str | None
    to: str | None
    timestamp: int | None
    sdp: str | None
    sdp_type: str | None
    biz_opaque_callback_data: str | None
    phone_number_id: str | None
    #: The user's business-scoped id (``from_user_id`` of a user's call, ``to_user_id`` of ours).
    user_id: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, phone_number_id: str | None = None) -> CallConnect:
        call_id = _call_id(d, "connect call")
        direction = Direction.parse(d.get("direction"))
        sdp, sdp_type = _sdp_from(d)
        if sdp and sdp_type is None:
            sdp_type = {Direction.BUSINESS_INITIATED: "answer",
                        Direction.USER_INITIATED: "offer"}.get(direction)
        user_id = _bsuid(d.get("to_user_id") if direction is Direction.BUSINESS_INITIATED else d.get("from_user_id"))
        return cls(call_id, direction, _str(d.get("from")), _str(d.get("to")),
                   _timestamp(d.get("timestamp")), sdp, sdp_type,
                   _str(d.get("biz_opaque_callback_data")), phone_number_id, user_id)

    @property
    def key(self) -> EventKey:
        return ("connect", self.call_id, "", self.timestamp)


@dataclass(frozen=True, slots=True)
class CallTerminate:
    """``calls[]`` with ``event: "terminate"``: the call ended, for any reason.

    ``start_time``, ``end_time`` and ``duration`` (seconds) are present only if
    the call was picked up. ``errors`` holds the change's ``errors[]`` (failed
    calls only). A ``statuses[]`` entry ``TERMINATE`` is parsed into this class
    with ``status=UNKNOWN``.
    """

    call_id: str
    direction: Direction
    from_: str | None
    to: str | None
    timestamp: int | None
    status: TerminateStatus
    start_time: int | None
    end_time: int | None
    duration: int | None
    biz_opaque_callback_data: str | None
    errors: tuple[WebhookError, ...]
    phone_number_id: str | None

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        *,
        phone_number_id: str | None = None,
        errors: Iterable[Mapping[str, Any]] = (),
    ) -> CallTerminate:
        call_id = _call_id(d, "terminate call")
        own = d.get("errors")
        all_errors = [*(own if isinstance(own, list) else ()), *errors]
        return cls(call_id, Direction.parse(d.get("direction")), _str(d.get("from")),
                   _str(d.get("to")), _timestamp(d.get("timestamp")),
                   TerminateStatus.parse(d.get("status")), _timestamp(d.get("start_time")),
                   _timestamp(d.get("end_time")), _int(d.get("duration")),
                   _str(d.get("biz_opaque_callback_data")),
                   tuple(WebhookError.from_dict(e) for e in all_errors), phone_number_id)

    @classmethod
    def from_status(
        cls,
        d: Mapping[str, Any],
        *,
        phone_number_id: str | None = None,
        errors: Iterable[Mapping[str, Any]] = (),
    ) -> CallTerminate:
        """Build from a ``statuses[]`` entry whose status is ``TERMINATE``."""
        call_id = _call_id(d, "status")
        return cls(call_id, Direction.UNKNOWN, None, _str(d.get("recipient_id")),
                   _timestamp(d.get("timestamp")), TerminateStatus.UNKNOWN, None, None, None,
                   _str(d.get("biz_opaque_callback_data")),
                   tuple(WebhookError.from_dict(e) for e in errors), phone_number_id)

    @property
    def key(self) -> EventKey:
        return ("terminate", self.call_id, self.status.value, self.timestamp)


@dataclass(frozen=True, slots=True)
class CallStatus:
    """``statuses[]`` entry of a business-initiated call (RINGING/ACCEPTED/REJECTED).

    ``raw_status`` keeps the provider's spelling, also for ``UNKNOWN``.
    """

    call_id: str
    status: CallStatusKind
    raw_status: str
    timestamp: int | None
    recipient_id: str | None
    biz_opaque_callback_data: str | None
    phone_number_id: str | None
    #: The user's business-scoped id (``recipient_user_id``).
    user_id: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, phone_number_id: str | None = None) -> CallStatus:
        call_id = _call_id(d, "status")
        raw = d.get("status")
        raw = raw if isinstance(raw, str) else ""
        return cls(call_id, CallStatusKind.parse(raw), raw, _timestamp(d.get("timestamp")),
                   _str(d.get("recipient_id")), _str(d.get("biz_opaque_callback_data")),
                   phone_number_id, _bsuid(d.get("recipient_user_id")))

    @property
    def key(self) -> EventKey:
        return ("status", self.call_id, self.raw_status.upper(), self.timestamp)


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """Anything not parsed yet: another ``calls[]`` event or another webhook field.

    ``field`` is the change's field; ``kind`` the call ``event`` name, or the
    field name for non-call changes; ``raw`` the untouched object.
    """

    field: str
    kind: str
    raw: dict[str, Any]
    phone_number_id: str | None = None

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        *,
        phone_number_id: str | None = None,
        field: str = "calls",
        kind: str | None = None,
    ) -> UnknownEvent:
        raw = dict(d) if isinstance(d, Mapping) else {"value": d}
        return cls(field, kind or _str(raw.get("event")) or field, raw, phone_number_id)

    @property
    def call_id(self) -> str | None:
        return _str(self.raw.get("id"))

    @property
    def key(self) -> EventKey:
        digest = hashlib.sha256(
            json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()
        return ("unknown", f"{self.field}:{self.kind}", digest,
                _timestamp(self.raw.get("timestamp")))


class PermissionResponse(_TolerantEnum):
    GRANTED = "GRANTED"
    REJECTED = "REJECTED"
    REVOKED = "REVOKED"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class PermissionReply:
    """The user's answer to a call-permission request, in either provider shape.

    * Meta: a ``messages`` webhook whose message is ``interactive`` of type
      ``call_permission_reply`` (``response`` accept/reject, ``is_permanent``,
      ``expiration_timestamp``, ``response_source`` user_action/automatic,
      ``context.id`` = the request's ``wamid``, or the ``wacid`` of the user's call for
      a callback grant). An automatic reject is the revoke after unanswered calls.
    * 360dialog: a flat ``{"event": "call_permission_status", "status":
      "GRANTED|REJECTED|REVOKED", "recipient": ...}`` object.
    """

    user: str
    response: PermissionResponse
    permanent: bool = False
    expires_at: int | None = None
    source: str = "user_action"
    context_id: str | None = None
    message_id: str | None = None
    timestamp: int | None = None
    phone_number_id: str | None = None
    #: The user's business-scoped id (``from_user_id``), when the webhook carried one.
    user_id: str | None = None

    @classmethod
    def from_message(cls, d: Mapping[str, Any], *, phone_number_id: str | None = None) -> PermissionReply:
        reply = (d.get("interactive") or {}).get("call_permission_reply") or {}
        response = str(reply.get("response", "")).lower()
        source = _str(reply.get("response_source")) or "user_action"
        if response == "accept":
            kind = PermissionResponse.GRANTED
        elif response == "reject":
            kind = PermissionResponse.REVOKED if source == "automatic" else PermissionResponse.REJECTED
        else:
            kind = PermissionResponse.UNKNOWN
        context = d.get("context") if isinstance(d.get("context"), Mapping) else {}
        user_id = _bsuid(d.get("from_user_id"))
        # (a user who adopted a username may come without a phone number: the BSUID then)
        user = _user(d.get("from") or user_id, "call_permission_reply 'from'")
        return cls(user, kind, bool(reply.get("is_permanent")), _timestamp(reply.get("expiration_timestamp")),
                   source, _str(context.get("id")), _str(d.get("id")), _timestamp(d.get("timestamp")),
                   phone_number_id, user_id)

    @classmethod
    def from_d360(cls, d: Mapping[str, Any]) -> PermissionReply:
        user = _user(_str(d.get("recipient")) or _str(d.get("wa_id")) or _str(d.get("from")),
                     "call_permission_status 'recipient'")
        return cls(user, PermissionResponse.parse(str(d.get("status", "")).upper()),
                   bool(d.get("is_permanent", False)), _timestamp(d.get("expiration_timestamp")),
                   "user_action", None, _str(d.get("id")), _timestamp(d.get("timestamp")), None)

    @property
    def call_id(self) -> None:
        return None

    @property
    def key(self) -> EventKey:
        return ("permission", self.user, f"{self.response.value}:{self.message_id or self.context_id}",
                self.timestamp)


@dataclass(frozen=True, slots=True)
class MessageStatus:
    """Delivery status of a message we sent (``sent``, ``delivered``, ``read``, ``failed``),
    from the ``messages`` field; a permission request counts from its delivery."""

    message_id: str
    status: str
    recipient: str | None
    timestamp: int | None
    errors: tuple[WebhookError, ...] = ()
    phone_number_id: str | None = None
    #: The recipient's business-scoped id (``recipient_user_id``).
    user_id: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, phone_number_id: str | None = None) -> MessageStatus:
        errors = tuple(WebhookError.from_dict(e) for e in d.get("errors") or [] if isinstance(e, Mapping))
        return cls(str(d["id"]), str(d.get("status", "")).lower(), _str(d.get("recipient_id")),
                   _timestamp(d.get("timestamp")), errors, phone_number_id, _bsuid(d.get("recipient_user_id")))

    @property
    def call_id(self) -> None:
        return None

    @property
    def key(self) -> EventKey:
        return ("message_status", self.message_id, self.status, self.timestamp)


@dataclass(frozen=True, slots=True)
class CallArtifact:
    """``calls[]`` with ``event: "call_recording_available"`` or
    ``"call_transcription_available"``: WhatsApp's own recording (Ogg/Opus) or transcript
    (JSON) of a call, to download from ``url`` (authenticated, valid about 5 minutes) and
    check against ``sha256`` (base64 of the digest)."""

    call_id: str
    kind: str  # "recording" or "transcription"
    media_id: str | None
    sha256: str
    mime_type: str | None
    url: str
    timestamp: int | None = None
    phone_number_id: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, phone_number_id: str | None = None) -> CallArtifact:
        call_id = _call_id(d, "call artifact")
        if d.get("event") == "call_recording_available":
            kind, holder = "recording", d.get("call_recording")
            item = holder.get("audio") if isinstance(holder, Mapping) else None
        else:
            kind, holder = "transcription", d.get("call_transcript")
            item = holder.get("document") if isinstance(holder, Mapping) else None
        if not isinstance(item, Mapping):
            raise WebhookFormatError(f"{d.get('event')} has no {'audio' if kind == 'recording' else 'document'}")
        url, digest = _str(item.get("url")), _str(item.get("sha256"))
        if url is None or not url.startswith(("https://", "http://")) or len(url) > 4096:
            raise WebhookFormatError(f"{d.get('event')}: url is missing or not http(s)")
        if digest is None or len(digest) > 128:
            raise WebhookFormatError(f"{d.get('event')}: sha256 is missing")
        return cls(call_id, kind, _str(item.get("id")), digest, _str(item.get("mime_type")), url,
                   _timestamp(d.get("timestamp")), phone_number_id)

    @property
    def key(self) -> EventKey:
        return ("artifact", self.call_id, f"{self.kind}:{self.media_id or self.sha256}", self.timestamp)


WebhookEvent: TypeAlias = (CallConnect | CallTerminate | CallStatus | PermissionReply | MessageStatus
                           | CallArtifact | UnknownEvent)


# -- the wire: events passed between instances -----------------------------------------------

_WIRE_TYPES = {cls.__name__: cls for cls in (CallConnect, CallTerminate, CallStatus, UnknownEvent,
                                              PermissionReply, MessageStatus, CallArtifact)}


def to_wire(event: WebhookEvent) -> dict[str, Any]:
    """A parsed webhook event as JSON data (for the instance that owns its call)."""
    return {"type": type(event).__name__, "fields": asdict(event)}


def from_wire(data: Mapping[str, Any]) -> WebhookEvent:
    """The event :func:`to_wire` made; enum fields and errors typed again."""
    cls = _WIRE_TYPES[data["type"]]
    hints = typing.get_type_hints(cls)
    values = dict(data["fields"])
    for f in dataclass_fields(cls):
        hint = hints[f.name]
        for option in typing.get_args(hint) or (hint,):
            if isinstance(option, type) and issubclass(option, StrEnum) and values.get(f.name) is not None:
                values[f.name] = option(values[f.name])
                break
    if cls is CallTerminate:
        values["errors"] = tuple(WebhookError(**e) for e in values.get("errors") or ())
    return cls(**values)
