"""WhatsApp webhook intake: signature check, envelope parsing, de-duplication.

Meta (and Cloud-API BSPs such as 360dialog, which forward Meta's envelope)
POST ``{"object": ..., "entry": [{"changes": [{"field", "value"}]}]}``. One POST
can hold several entries, changes and calls, so everything is iterated. Failed
deliveries are retried for up to 7 days: answer 200 quickly and de-duplicate.

Every POST is authenticated on its raw bytes before anything is parsed
(:mod:`gateway.webhook_auth`: Meta's ``X-Hub-Signature-256``, 360dialog's
``x-360dialog-signature``, or a custom header set on the webhook URL).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from gateway.errors import WebhookFormatError
from gateway.events import (
    CallConnect,
    CallStatus,
    CallTerminate,
    MessageStatus,
    PermissionReply,
    UnknownEvent,
    CallArtifact,
    WebhookEvent,
)
from gateway.logs import STORE_OUTAGE
from gateway.redact import mask_phone
from gateway.webhook_auth import WebhookAuth, matches_hmac

__all__ = [
    "EventDeduper",
    "WebhookFormatError",
    "parse_webhook",
    "verify_signature",
    "webhook_routes",
]

log = logging.getLogger(__name__)

Dispatch = Callable[[WebhookEvent], Awaitable[Any]]


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise WebhookFormatError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise WebhookFormatError(f"{where} must be an object, got {type(value).__name__}")
    return value


def parse_webhook(payload: Any, *, skipped: list[str] | None = None) -> list[WebhookEvent]:
    """Turn a decoded webhook body into typed events, in document order.

    Per ``calls`` change: ``calls[]`` first (connect, terminate, others as
    :class:`UnknownEvent`), then ``statuses[]``; ``errors[]`` is attached to
    the change's terminate events (or reported as an ``UnknownEvent`` of kind
    ``errors`` when there is none). Other fields become ``UnknownEvent``.

    Raises :class:`WebhookFormatError` when the envelope is malformed (not an object,
    no ``entry`` list of ``changes`` lists of objects with a ``field`` and a ``value``
    object). A malformed *event* inside a good envelope raises too, unless ``skipped``
    is given: then it is left out, described in ``skipped``, and the others are parsed.
    """
    body = _object(payload, "webhook payload")
    if body.get("event") == "call_permission_status":  # 360dialog's flat permission event
        return _guard(skipped, "call_permission_status", lambda: [PermissionReply.from_d360(body)])
    if "entry" not in body:
        raise WebhookFormatError("webhook payload has no 'entry' list")
    events: list[WebhookEvent] = []
    for i, entry in enumerate(_list(body["entry"], "'entry'")):
        entry = _object(entry, f"entry[{i}]")
        for j, change in enumerate(_list(entry.get("changes"), f"entry[{i}].changes")):
            where = f"entry[{i}].changes[{j}]"
            change = _object(change, where)
            field = change.get("field")
            if not isinstance(field, str) or not field:
                raise WebhookFormatError(f"{where} has no 'field'")
            value = _object(change.get("value"), f"{where}.value")
            if field == "calls":
                events.extend(_parse_calls_value(value, where, skipped))
            elif field == "messages":
                events.extend(_parse_messages_value(value, where, skipped))
            else:
                events.extend(_guard(skipped, where, lambda: [UnknownEvent.from_dict(
                    value, field=field, kind=field, phone_number_id=_pnid(value))]))
    return events


def _guard(skipped: list[str] | None, where: str, parse) -> list[WebhookEvent]:
    """``parse()``; a malformed event raises :class:`WebhookFormatError`, or, with a
    ``skipped`` list, is noted there and left out."""
    try:
        return parse()
    except Exception as exc:  # whatever a hostile event does to a parser stays here
        problem = f"{where}: {exc}" if isinstance(exc, WebhookFormatError) else \
            f"{where}: malformed ({type(exc).__name__})"
        if skipped is None:
            if isinstance(exc, WebhookFormatError):
                raise
            raise WebhookFormatError(problem) from None
        skipped.append(problem)
        return []


def _each(value: Mapping[str, Any], name: str, where: str, skipped: list[str] | None,
          parse: Callable[[Any, str], list[WebhookEvent]]) -> list[WebhookEvent]:
    """``parse(item, path)`` for each item of the list ``value[name]``, each guarded."""
    out: list[WebhookEvent] = []
    for k, item in enumerate(_items(value, name, where, skipped)):
        path = f"{where}.value.{name}[{k}]"
        out.extend(_guard(skipped, path, lambda: parse(item, path)))
    return out


def _with_id(item: Any, path: str) -> Mapping[str, Any]:
    """``item`` as an object with a non-empty string ``id``, or :class:`WebhookFormatError`."""
    item = _object(item, path)
    if not isinstance(item.get("id"), str) or not item["id"]:
        raise WebhookFormatError(f"{path} has no 'id'")
    return item


def _items(value: Mapping[str, Any], name: str, where: str, skipped: list[str] | None) -> list[Any]:
    """``value[name]`` as a list (absent: empty); not a list: a malformed event."""
    found = _guard(skipped, where, lambda: [_list(value.get(name), f"{where}.value.{name}")])
    return found[0] if found else []


def _pnid(value: Mapping[str, Any]) -> str | None:
    meta = value.get("metadata")
    pnid = meta.get("phone_number_id") if isinstance(meta, Mapping) else None
    return str(pnid) if isinstance(pnid, (str, int)) and not isinstance(pnid, bool) else None


def _parse_calls_value(value: Mapping[str, Any], where: str, skipped: list[str] | None) -> list[WebhookEvent]:
    pnid = _pnid(value)
    errors = _items(value, "errors", where, skipped)
    out: list[WebhookEvent] = []

    def one_call(call: Any, path: str) -> list[WebhookEvent]:
        call = _with_id(call, path)
        event = call.get("event")
        if event == "connect":
            return [CallConnect.from_dict(call, phone_number_id=pnid)]
        if event == "terminate":
            return [CallTerminate.from_dict(call, phone_number_id=pnid, errors=errors)]
        if event in ("call_recording_available", "call_transcription_available"):
            return [CallArtifact.from_dict(call, phone_number_id=pnid)]
        return [UnknownEvent.from_dict(call, phone_number_id=pnid, field="calls")]

    def one_status(status: Any, path: str) -> list[WebhookEvent]:
        status = _with_id(status, path)
        raw = status.get("status")
        if isinstance(raw, str) and raw.strip().upper() == "TERMINATE":
            return [CallTerminate.from_status(status, phone_number_id=pnid, errors=errors)]
        return [CallStatus.from_dict(status, phone_number_id=pnid)]

    out.extend(_each(value, "calls", where, skipped, one_call))
    out.extend(_each(value, "statuses", where, skipped, one_status))
    if errors and not any(isinstance(e, CallTerminate) for e in out):
        out.extend(_guard(skipped, f"{where}.value.errors", lambda: [UnknownEvent.from_dict(
            {"errors": errors}, phone_number_id=pnid, field="calls", kind="errors")]))
    return out


def _parse_messages_value(value: Mapping[str, Any], where: str, skipped: list[str] | None) -> list[WebhookEvent]:
    """Permission replies and message delivery statuses; other messages stay unknown."""
    pnid = _pnid(value)
    out: list[WebhookEvent] = []
    bad_before = len(skipped) if skipped is not None else 0

    def one_message(message: Any, path: str) -> list[WebhookEvent]:
        message = _object(message, path)
        interactive = message.get("interactive")
        if isinstance(interactive, Mapping) and interactive.get("type") == "call_permission_reply":
            return [PermissionReply.from_message(message, phone_number_id=pnid)]
        return [UnknownEvent.from_dict(message, phone_number_id=pnid, field="messages", kind=_kind_of(message))]

    def one_status(status: Any, path: str) -> list[WebhookEvent]:
        return [MessageStatus.from_dict(_with_id(status, path), phone_number_id=pnid)]

    out.extend(_each(value, "messages", where, skipped, one_message))
    out.extend(_each(value, "statuses", where, skipped, one_status))
    if not out and (skipped is None or len(skipped) == bad_before):  # (a change with nothing we know)
        out.extend(_guard(skipped, where, lambda: [UnknownEvent.from_dict(
            value, phone_number_id=pnid, field="messages", kind="messages")]))
    return out


def _kind_of(message: Mapping[str, Any]) -> str:
    kind = message.get("type")
    return f"message:{kind}" if isinstance(kind, str) else "message"


def verify_signature(body: bytes, header: str | None, app_secret: str) -> bool:
    """Check Meta's ``X-Hub-Signature-256`` header against the raw body."""
    return matches_hmac(app_secret, body, header)


class EventDeduper:
    """Remembers the last ``max_keys`` event keys (LRU) to drop redelivered events."""

    def __init__(self, max_keys: int = 10000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self._keys: OrderedDict[tuple[Any, ...], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def seen(self, event: WebhookEvent) -> bool:
        """True if ``event`` was seen before; otherwise remember it and return False."""
        key = event.key
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        self._keys[key] = None
        if len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return False


def _bad_request(code: str, message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def event_kind(event: WebhookEvent) -> str:
    """A short label for metrics: connect, status, terminate, or the unknown event's kind."""
    if isinstance(event, CallConnect):
        return "connect"
    if isinstance(event, CallStatus):
        return "status"
    if isinstance(event, CallTerminate):
        return "terminate"
    if isinstance(event, PermissionReply):
        return "permission"
    if isinstance(event, MessageStatus):
        return "message_status"
    if isinstance(event, CallArtifact):
        return event.kind
    return event.kind


def _describe(event: WebhookEvent) -> str:
    if isinstance(event, UnknownEvent):
        return f"unknown {event.field}/{event.kind} call_id={event.call_id}"
    if isinstance(event, CallConnect):
        return (f"connect {event.direction} call_id={event.call_id} "
                f"from={mask_phone(event.from_)} to={mask_phone(event.to)}")
    if isinstance(event, CallStatus):
        return f"status {event.raw_status} call_id={event.call_id}"
    if isinstance(event, PermissionReply):
        return f"permission {event.response} user={mask_phone(event.user)} source={event.source}"
    if isinstance(event, MessageStatus):
        return f"message {event.status} message_id={event.message_id}"
    if isinstance(event, CallArtifact):
        return f"{event.kind} available call_id={event.call_id}"
    return f"terminate {event.status} call_id={event.call_id}"


def webhook_routes(
    dispatch: Dispatch,
    *,
    verify_token: str | None = None,
    app_secret: str | None = None,
    auth: WebhookAuth | None = None,
    path: str = "/webhooks/whatsapp",
    deduper: EventDeduper | None = None,
    dedupe_store: Any = None,
    observe: Callable[[str, str], None] | None = None,
) -> list[web.RouteDef]:
    """aiohttp routes for the webhook endpoint.

    ``GET`` answers Meta's subscription handshake (403 unless ``verify_token``
    is set and matches). ``POST`` is authenticated by ``auth`` (or, as a shorthand,
    Meta's signature with ``app_secret``; neither: not at all) (401 if not), parses (400 ``bad_webhook`` if invalid), drops duplicates,
    awaits ``dispatch(event)`` for each event and answers 200. A failing
    dispatch is logged and does not affect the other events. Keep ``dispatch``
    fast: Meta expects a quick 200.

    Duplicates are dropped by ``deduper`` (in memory: also a redelivery that arrives
    while the first is being processed) and, with ``dedupe_store``
    (:class:`gateway.store.base.DedupeStore`), across restarts for Meta's 7-day
    redelivery window: an event is checked there before it is dispatched and
    remembered after, so one that a crash interrupted is processed when redelivered.
    """
    dedupe = deduper if deduper is not None else EventDeduper()
    authn = auth if auth is not None else WebhookAuth(app_secret=app_secret)
    expected = ", ".join(authn.methods)
    count = observe or (lambda kind, result: None)

    async def handshake(request: web.Request) -> web.StreamResponse:
        q = request.query
        token = q.get("hub.verify_token", "")
        if (not verify_token or q.get("hub.mode") != "subscribe"
                or not hmac.compare_digest(token.encode(), verify_token.encode())):
            log.warning("webhook verification refused (mode=%s)", q.get("hub.mode"))
            return web.Response(status=403, text="forbidden")
        return web.Response(text=q.get("hub.challenge", ""))

    async def receive(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if authn.check(body, request.headers) is None:
            log.warning("webhook refused: not authenticated by %s (%d bytes)", expected, len(body))
            count("unparsed", "bad_signature")
            return _bad_request("bad_signature", f"webhook not authenticated (expected: {expected})", 401)
        skipped: list[str] = []
        try:
            events = parse_webhook(json.loads(body), skipped=skipped)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSON errors, WebhookFormatError
            message = str(exc) if isinstance(exc, WebhookFormatError) else "body is not valid JSON"
            log.warning("bad webhook: %s", message[:300])
            count("unparsed", "bad_request")
            return _bad_request("bad_webhook", message[:300])
        if skipped:  # the good events of the batch still count: one line for the bad ones
            log.warning("webhook: %d malformed event(s) skipped, first: %s", len(skipped), skipped[0][:300])
            for _ in skipped:
                count("malformed", "skipped")
        for event in events:
            kind = event_kind(event)
            key = json.dumps(event.key, default=str, separators=(",", ":"))
            if dedupe.seen(event) or (dedupe_store is not None and await dedupe_store.seen(key)):
                log.debug("duplicate webhook event dropped: %s", _describe(event))
                count(kind, "duplicate")
                continue
            if isinstance(event, UnknownEvent):
                log.info("webhook event not handled yet: %s", _describe(event))
            else:
                log.debug("webhook event: %s", _describe(event))
            try:
                await dispatch(event)
            except Exception:
                log.exception("dispatch failed for %s", _describe(event))
                count(kind, "error")
            else:
                count(kind, "ok")
                if dedupe_store is not None:
                    try:
                        await dedupe_store.remember(key)
                    except Exception as exc:  # (a full disk: de-duplication falls back to memory)
                        if STORE_OUTAGE.first():
                            log.warning("could not remember webhook event %s (and maybe more): %s",
                                        _describe(event), exc)
        return web.json_response({"ok": True})

    return [web.get(path, handshake), web.post(path, receive)]
