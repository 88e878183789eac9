"""Events out: an in-process bus, a Server-Sent Events endpoint and signed webhooks.

Every call state change is published once on an :class:`EventBus` as an
:class:`Event` with a stable id. Programs driving ``wacall serve`` consume them

* over SSE (``GET /v1/events``, see :func:`sse_handler`): live, filterable by
  call, resumable with ``Last-Event-ID`` from the bus's recent history;
* as signed HTTP POSTs (:class:`WebhookDelivery`): one worker per endpoint,
  strictly in order, retried with exponential backoff until a 2xx answer.

The same event keeps its id (and its exact JSON body) on every delivery attempt
and every replay, so consumers de-duplicate on ``id``.

Durable with an *outbox* (:class:`gateway.store.base.EventLog`): every event is
appended to it in publish order (within milliseconds, by one writer task), SSE
``Last-Event-ID`` resumes from it across restarts, and each webhook endpoint's last
acknowledged event is remembered, so events still pending when the process died
are delivered by the next one (at least once, same id and body).

Slow consumers never slow the publisher down: :meth:`EventBus.publish` is
synchronous and only appends to bounded queues. An SSE subscriber that falls
``max_queue`` events behind is dropped (its connection is closed; it can
reconnect with ``Last-Event-ID``). A webhook endpoint that is down keeps up to
``max_queue`` pending events and then forgets the oldest ones.

Logs never show the webhook secret, and show endpoint URLs without user info,
query or fragment (they may carry tokens).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from .logs import STORE_OUTAGE
from .webhook_auth import matches_hmac
from .store.base import VersionConflict

__all__ = [
    "Event",
    "EventBus",
    "EventFanout",
    "Subscription",
    "WebhookDelivery",
    "event_routes",
    "sign_body",
    "standard_webhook_headers",
    "sse_handler",
    "verify_signature",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Wacall-Signature"
EVENT_ID_HEADER = "X-Wacall-Event-Id"
EVENT_TYPE_HEADER = "X-Wacall-Event-Type"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Listener = Callable[["Event"], None]

_TYPE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# -- events ---------------------------------------------------------------------------


def _new_event_id() -> str:
    """``evt_`` + a 26-character ULID: 48 bits of milliseconds, 80 random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "evt_" + "".join(reversed(chars))


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"event data is not JSON serialisable: {type(value).__name__}")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, as consumers see it.

    ``data`` holds JSON types only. The JSON body is computed once, so every
    delivery attempt and replay of an event sends the same bytes.
    """

    id: str
    type: str
    created_at: str
    call_id: str | None
    data: dict[str, Any]
    _json: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_json", _dumps(self.to_dict()))

    @classmethod
    def new(cls, type: str, data: Mapping[str, Any] | None = None, *,
            call_id: str | None = None) -> Self:
        """A fresh event with a new id and the current time.

        ``data`` is copied through JSON (enums become their values, datetimes ISO
        strings). Raises ``ValueError`` for a malformed ``type`` and ``TypeError``
        for data that cannot be serialised.
        """
        if not isinstance(type, str) or not _TYPE.match(type):
            raise ValueError(f"bad event type {type!r}: use letters, digits and . _ : -")
        if call_id is not None and not isinstance(call_id, str):
            raise TypeError(f"call_id must be a string, got {call_id.__class__.__name__}")
        copied = json.loads(_dumps(dict(data or {})))
        return cls(id=_new_event_id(), type=type, created_at=_utc_now(),
                   call_id=call_id, data=copied)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """The event :meth:`to_dict` made (the outbox keeps that)."""
        return cls(id=str(raw["id"]), type=str(raw["type"]), created_at=str(raw["created_at"]),
                   call_id=raw.get("call_id"), data=dict(raw["data"]))

    @classmethod
    def from_json(cls, body: bytes | str) -> Self:
        """Parse a body made by :meth:`to_json` (for receivers)."""
        raw = json.loads(body)
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise ValueError("not a wacall event")
        return cls(id=str(raw["id"]), type=str(raw["type"]), created_at=str(raw["created_at"]),
                   call_id=raw.get("call_id"), data=raw["data"])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "created_at": self.created_at,
                "call_id": self.call_id, "data": self.data}

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON, keys in the order of :meth:`to_dict`."""
        return self._json

    def to_sse(self) -> bytes:
        """The event as one Server-Sent Events message."""
        return b"id: %s\nevent: %s\ndata: %s\n\n" % (
            self.id.encode(), self.type.encode(), self._json)


# -- the bus ----------------------------------------------------------------------------


class Subscription:
    """A live view of a bus: ``async for event in subscription``.

    Yields the replayed events first (those after ``last_event_id``), then live
    events as they are published. Iteration ends when the bus closes (after the
    already-queued events) or when the subscription is dropped for falling
    ``max_queue`` events behind (queued events are discarded; ``dropped`` is
    then True). Waiting for the next event is cancellation-safe.
    """

    def __init__(self, bus: EventBus, *, call_id: str | None, max_queue: int,
                 replay: Iterable[Event] = (), gap: bool = False,
                 on_drop: Callable[[], None] | None = None) -> None:
        self.call_id = call_id
        self.max_queue = max_queue
        #: True when ``last_event_id`` was given but is no longer (or never was)
        #: in the history: all retained history was replayed and events may be missing.
        self.gap = gap
        self.dropped = False
        self._bus = bus
        self._replay: deque[Event] = deque(replay)
        self._queue: deque[Event] = deque()
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._on_drop = on_drop

    def __repr__(self) -> str:
        return (f"<Subscription call_id={self.call_id} pending={self.pending} "
                f"ended={self._ended} dropped={self.dropped}>")

    @property
    def pending(self) -> int:
        """Events waiting to be read."""
        return len(self._replay) + len(self._queue)

    @property
    def closed(self) -> bool:
        """No further live events will arrive (queued ones may still be read)."""
        return self._ended

    def matches(self, event: Event) -> bool:
        return self.call_id is None or event.call_id == self.call_id

    def close(self) -> None:
        """Stop receiving; what is already queued is discarded."""
        self._replay.clear()
        self._queue.clear()
        self._end()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._replay:
                return self._replay.popleft()
            if self._queue:
                return self._queue.popleft()
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # called by the bus, synchronously

    def _offer(self, event: Event) -> bool:
        """Queue ``event``; False if the queue is full (the caller drops us)."""
        if self._ended:
            return True
        if len(self._queue) >= self.max_queue:
            return False
        self._queue.append(event)
        self._wake()
        return True

    def _drop(self) -> None:
        self.dropped = True
        self.close()
        if self._on_drop is not None:
            try:
                self._on_drop()
            except Exception:
                log.exception("event subscriber drop callback failed")

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._bus._forget(self)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class EventBus:
    """Publishes events to subscriptions and listeners; keeps recent history.

    All methods must be called from the event loop's thread (from another
    thread, use ``loop.call_soon_threadsafe(bus.publish, ...)``).
    """

    #: How many events the outbox keeps (older ones are trimmed).
    OUTBOX_KEEP = 100_000

    def __init__(self, history: int = 1000, *, outbox: Any = None) -> None:
        if history < 0:
            raise ValueError("history must be zero or more")
        self.history_size = history
        #: The durable log events are appended to (``None``: memory only).
        self.outbox = outbox
        self._unwritten: deque[Event] = deque()
        #: Ids of the events published here lately (an outbox shared with other instances
        #: brings them back: :meth:`inject` skips them).
        self._mine: deque[str] = deque(maxlen=10_000)
        self._mine_set: set[str] = set()
        self._writer: asyncio.Task | None = None
        self._written = 0
        #: Subscriptions dropped for falling behind, since start.
        self.dropped_subscribers = 0
        self.published = 0
        # (event id, its JSON body): a retained event as bytes, not as parsed data
        # (several times smaller; replays are rare and parse it again)
        self._history: deque[tuple[str, bytes]] = deque(maxlen=history)
        self._subs: set[Subscription] = set()
        self._listeners: list[Listener] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def history(self) -> list[Event]:
        """The retained events, oldest first."""
        return [Event.from_json(body) for _, body in self._history]

    def publish(self, type: str, data: Mapping[str, Any] | None = None, *,
                call_id: str | None = None) -> Event:
        """Create an event and hand it to every subscriber and listener. Never blocks.

        Raises ``ValueError``/``TypeError`` for a malformed type or data (see
        :meth:`Event.new`). After :meth:`close` the event is still returned but
        goes nowhere.
        """
        event = Event.new(type, data, call_id=call_id)
        if self._closed:
            log.debug("event %s %s published after the bus closed; not delivered",
                      event.type, event.id)
            return event
        self.published += 1
        self._history.append((event.id, event.to_json()))
        if len(self._mine) == self._mine.maxlen:
            self._mine_set.discard(self._mine[0])
        self._mine.append(event.id)
        self._mine_set.add(event.id)
        if self.outbox is not None:
            self._unwritten.append(event)
            if self._writer is None or self._writer.done():
                self._writer = asyncio.get_running_loop().create_task(self._write(), name="event outbox")
        self._offer(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed for %s %s", event.type, event.id)
        return event

    async def _write(self) -> None:
        """Append published events to the outbox, in order."""
        while self._unwritten:
            event = self._unwritten[0]
            try:
                await self.outbox.append(event.id, event.type, event.to_dict(), call_id=event.call_id)
                self._written += 1
                if self._written % 1000 == 0:
                    await self.outbox.trim(self.OUTBOX_KEEP)
            except Exception as exc:  # a full disk: the event still goes out live
                if STORE_OUTAGE.first():
                    log.error("could not store event %s %s (and maybe more): %s", event.type, event.id, exc)
            self._unwritten.popleft()

    async def flush(self) -> None:
        """Wait until every published event is in the outbox."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def inject(self, event: Event) -> bool:
        """Show ``event``, published by another instance sharing the outbox, to this bus's
        subscribers (SSE) — not to its listeners (each instance delivers its own events'
        webhooks) and not to the outbox again. False when it was ours, or the bus is closed."""
        if self._closed or event.id in self._mine_set:
            return False
        self._history.append((event.id, event.to_json()))
        self._offer(event)
        return True

    def _offer(self, event: Event) -> None:
        """``event`` to every matching subscription; one that fell behind is dropped."""
        for sub in list(self._subs):
            if sub.matches(event) and not sub._offer(event):
                self.dropped_subscribers += 1
                log.warning("event subscriber dropped: %d events behind (call_id filter %s); "
                            "it may reconnect with Last-Event-ID", sub.max_queue, sub.call_id)
                sub._drop()

    def knows(self, event_id: str) -> bool:
        return any(retained == event_id for retained, _ in self._history)

    async def stored_after(self, event_id: str, limit: int = 10_000) -> list[Event] | None:
        """The events after ``event_id`` from the outbox (an earlier process's too) and
        this process's history, in order; ``None`` when the outbox does not know it."""
        if self.outbox is None:
            return None
        seq = await self.outbox.position(event_id)
        if seq is None:
            return None
        stored = [Event.from_dict(e.data) for e in await self.outbox.after(seq, limit)]
        ids = {e.id for e in stored}
        # (what is published but not written yet is in the history, after what is)
        return stored + [Event.from_json(body) for retained, body in self._history
                         if retained not in ids and retained != event_id]

    def subscribe(self, *, call_id: str | None = None, last_event_id: str | None = None,
                  max_queue: int = 1000, replay: list[Event] | None = None,
                  on_drop: Callable[[], None] | None = None) -> Subscription:
        """Start receiving events (all, or only those of ``call_id``).

        With ``last_event_id``, the retained events published after it are
        replayed first; if it is unknown, all retained events are replayed and
        ``subscription.gap`` is True. ``on_drop`` runs (synchronously, inside
        ``publish``) if the subscription is dropped for falling behind.
        """
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        gap = False
        if replay is not None:  # worked out by the caller (stored_after)
            pass
        elif last_event_id:
            replay = []
            retained = list(self._history)
            for i in range(len(retained) - 1, -1, -1):
                if retained[i][0] == last_event_id:
                    replay = [Event.from_json(body) for _, body in retained[i + 1:]]
                    break
            else:
                gap = True
                replay = [Event.from_json(body) for _, body in retained]
                log.info("Last-Event-ID not in the last %d events; replaying all of them",
                         len(retained))
        else:
            replay = []
        sub = Subscription(self, call_id=call_id, max_queue=max_queue,
                           replay=(e for e in replay if call_id is None or e.call_id == call_id),
                           gap=gap, on_drop=on_drop)
        if self._closed:
            sub._end()
        else:
            self._subs.add(sub)
        return sub

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` synchronously for each event; returns a remover.

        Listeners must not block; exceptions are logged and ignored.
        """
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def close(self) -> None:
        """End every subscription (after what they have queued) and drop listeners."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            sub._end()
        self._listeners.clear()

    def _forget(self, sub: Subscription) -> None:
        self._subs.discard(sub)


# -- Server-Sent Events -----------------------------------------------------------------


def sse_handler(bus: EventBus, *, heartbeat_s: float = 15.0, max_queue: int = 1000,
                retry_ms: int | None = None) -> Handler:
    """aiohttp handler streaming ``bus`` as ``text/event-stream``.

    Query: ``call_id`` (only that call's events), ``last_event_id`` (like the
    ``Last-Event-ID`` header, which wins). A ``: ping`` comment is sent after
    ``heartbeat_s`` without events. The stream ends when the bus closes; a
    client that goes away is noticed at the next write (at most ``heartbeat_s``
    later) and its subscription removed. A client that falls ``max_queue``
    events behind is disconnected.
    """
    if heartbeat_s <= 0:
        raise ValueError("heartbeat_s must be positive")

    async def handler(request: web.Request) -> web.StreamResponse:
        call_id = request.query.get("call_id") or None
        last_id = (request.headers.get("Last-Event-ID")
                   or request.query.get("last_event_id") or None)

        def disconnect() -> None:
            transport = request.transport
            if transport is not None:
                transport.abort()

        replay = None
        if last_id and not bus.knows(last_id):  # from before this process: the outbox
            replay = await bus.stored_after(last_id)
        # Subscribe before answering: once the client has the headers, it
        # receives every event published from then on.
        sub = bus.subscribe(call_id=call_id, last_event_id=last_id, max_queue=max_queue,
                            replay=replay, on_drop=disconnect)
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })
        try:
            await resp.prepare(request)
            await resp.write(b"retry: %d\n\n" % retry_ms if retry_ms else b": ok\n\n")
            while True:
                try:
                    async with asyncio.timeout(heartbeat_s):
                        event = await anext(sub)
                except TimeoutError:
                    chunk = b": ping\n\n"
                except StopAsyncIteration:
                    break
                else:
                    chunk = event.to_sse()
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await resp.write(chunk)
        except ConnectionError:
            log.debug("event stream client went away")
        finally:
            sub.close()
        if sub.dropped:
            log.info("event stream closed: client fell behind")
        return resp

    return handler


def event_routes(bus: EventBus, *, path: str = "/v1/events", heartbeat_s: float = 15.0,
                 max_queue: int = 1000) -> list[web.RouteDef]:
    """``GET path`` serving :func:`sse_handler`."""
    return [web.get(path, sse_handler(bus, heartbeat_s=heartbeat_s, max_queue=max_queue))]


# -- signed HTTP delivery ---------------------------------------------------------------


def sign_body(body: bytes, secret: str) -> str:
    """The ``X-Wacall-Signature`` value: ``sha256=<hex HMAC-SHA256 of body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _secrets(configured: str) -> list[str]:
    """``WACALL_EVENT_SECRET``: one secret, or several separated by spaces or commas while
    rotating (every one signs; the first also signs the ``X-Wacall-Signature`` header)."""
    return [s for s in re.split(r"[\s,]+", configured.strip()) if s] or [configured]


def _key(secret: str) -> bytes:
    """A Standard Webhooks secret ``whsec_<base64>`` is its decoded bytes; any other text is
    its UTF-8 bytes (receivers then use ``whsec_`` + base64 of it)."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            pass
    return secret.encode()


def standard_webhook_headers(event_id: str, body: bytes, secrets: Sequence[str],
                             timestamp: int | None = None) -> dict[str, str]:
    """The Standard Webhooks headers (``webhook-id``, ``webhook-timestamp``,
    ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` per secret),
    so receivers verify with the scheme's libraries (and reject replays by the timestamp)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    signed = f"{event_id}.{timestamp}.".encode() + body
    signatures = " ".join("v1," + base64.b64encode(hmac.new(_key(s), signed, hashlib.sha256).digest()).decode()
                          for s in secrets)
    return {"webhook-id": event_id, "webhook-timestamp": str(timestamp), "webhook-signature": signatures}


def verify_signature(body: bytes, header: str | None, secret: str) -> bool:
    """For receivers: does ``header`` (``X-Wacall-Signature``) match ``body``?

    Compare against the raw body bytes, before any JSON parsing. Constant-time.
    """
    return matches_hmac(secret, body, header)


def _log_url(url: str) -> str:
    """``scheme://host:port/path`` — no user info, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


def _reason(exc: BaseException) -> str:
    """Why a request failed, without echoing URLs (they can hold tokens)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    name = type(exc).__name__
    os_error = getattr(exc, "os_error", None) if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(os_error, OSError) and os_error.strerror:
        return f"{name}: {os_error.strerror}"
    return name


class WebhookDelivery:
    """POSTs events to one URL, in order, retrying each until it gets a 2xx.

    Body: ``event.to_json()``. Headers: ``Content-Type: application/json``,
    ``X-Wacall-Event-Id``, ``X-Wacall-Event-Type`` and, with a secret,
    ``X-Wacall-Signature: sha256=<hex>`` (see :func:`verify_signature`).
    A failed attempt (non-2xx, network error, no answer within ``timeout_s``)
    is retried after ``backoff_base_s * 2**(n-1)`` seconds, capped at
    ``backoff_max_s`` and scaled by a deterministic factor in [0.5, 1].
    At most ``max_queue`` events wait; beyond that the oldest waiting one is
    forgotten (counted in ``dropped``).
    """

    def __init__(self, url: str, secret: str | None = None, *,
                 session: aiohttp.ClientSession | None = None, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 60.0, timeout_s: float = 10.0,
                 max_queue: int = 10000,
                 on_delivered: Callable[[Event], Awaitable[None]] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"event webhook URL must be http(s)://host/...: {_log_url(url)}")
        if backoff_base_s <= 0 or backoff_max_s < backoff_base_s:
            raise ValueError("need 0 < backoff_base_s <= backoff_max_s")
        if timeout_s <= 0 or max_queue < 1:
            raise ValueError("timeout_s must be positive and max_queue at least 1")
        self.url = url
        self.log_url = _log_url(url)
        self._secret = secret or None
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.max_queue = max_queue
        #: Events acknowledged with a 2xx.
        self.delivered = 0
        #: POSTs made (successful or not).
        self.attempts = 0
        #: Failed POSTs.
        self.failures = 0
        #: Waiting events forgotten because the queue was full.
        self.dropped = 0
        #: Awaited after each acknowledged event (the fanout remembers it in the store).
        self.on_delivered = on_delivered
        self._session = session
        self._own_session = session is None
        self._pending: deque[Event] = deque()
        self._current: Event | None = None
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._detach: Callable[[], None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (f"<WebhookDelivery {self.log_url} signed={self._secret is not None} "
                f"pending={self.pending} delivered={self.delivered}>")

    @property
    def signed(self) -> bool:
        return self._secret is not None

    @property
    def pending(self) -> int:
        """Events not yet acknowledged (including the one being sent)."""
        return len(self._pending) + (self._current is not None)

    def attach(self, bus: EventBus) -> None:
        """Queue every event published on ``bus`` from now on (before or after start)."""
        if self._detach is not None:
            raise RuntimeError("already attached to a bus")
        self._detach = bus.add_listener(self.enqueue)

    def enqueue(self, event: Event) -> None:
        """Queue one event for delivery. Never blocks."""
        if self._closed:
            log.warning("event webhook %s closed; event %s not queued", self.log_url, event.id)
            return
        if len(self._pending) >= self.max_queue:
            lost = self._pending.popleft()
            self.dropped += 1
            log.warning("event webhook %s: %d events waiting, forgetting the oldest (%s %s)",
                        self.log_url, self.max_queue, lost.type, lost.id)
        self._pending.append(event)
        self._ready.set()

    def requeue(self, events: Sequence[Event]) -> None:
        """Put ``events`` (left pending by an earlier process) before everything queued."""
        for event in reversed(events):
            self._pending.appendleft(event)
        if events:
            self._ready.set()

    def start(self) -> None:
        """Start the worker (call from a running event loop)."""
        if self._closed:
            raise RuntimeError("delivery is closed")
        if self._task is not None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"event-webhook {self.log_url}")
        log.info("event webhook %s started (%s)", self.log_url,
                 "signed" if self._secret else "unsigned")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking events, try to deliver what is pending within ``timeout_s``, then stop."""
        if self._closed:
            return
        self._closed = True
        if self._detach is not None:
            self._detach()
        self._stopping.set()
        self._ready.set()
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif not task.cancelled() and task.exception() is not None:
                log.error("event webhook %s worker failed: %r", self.log_url, task.exception())
        left = ([self._current] if self._current else []) + list(self._pending)
        if left:
            log.warning("event webhook %s closed with %d undelivered events (%s … %s)",
                        self.log_url, len(left), left[0].id, left[-1].id)
        else:
            log.info("event webhook %s closed, all %d events delivered",
                     self.log_url, self.delivered)
        if self._own_session and self._session is not None:
            await self._session.close()

    def backoff(self, event: Event, attempt: int) -> float:
        """Seconds to wait after failed ``attempt`` (1-based) of ``event``."""
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(attempt - 1, 62))
        digest = hashlib.blake2b(f"{self.url}\0{event.id}\0{attempt}".encode(),
                                 digest_size=4).digest()
        return delay * (0.5 + 0.5 * int.from_bytes(digest, "big") / 0xFFFFFFFF)

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._stopping.is_set():
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            self._current = event = self._pending.popleft()
            attempt = 0
            while True:
                attempt += 1
                error = await self._post(event)
                if error is None:
                    break
                self.failures += 1
                delay = self.backoff(event, attempt)
                log.warning("event webhook %s: %s %s attempt %d failed (%s); retrying in %.2fs",
                            self.log_url, event.type, event.id, attempt, error, delay)
                await self._pause(delay)
            self.delivered += 1
            self._current = None
            if self.on_delivered is not None:
                try:
                    await self.on_delivered(event)
                except Exception as exc:  # (then it may be delivered again after a restart)
                    log.warning("event webhook %s: could not remember %s as delivered: %s",
                                self.log_url, event.id, exc)

    async def _pause(self, delay: float) -> None:
        if self._stopping.is_set():  # flushing: no long waits, but no busy loop either
            await asyncio.sleep(min(delay, self.backoff_base_s))
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()

    async def _post(self, event: Event) -> str | None:
        """One attempt; None if acknowledged, else why not."""
        assert self._session is not None
        body = event.to_json()
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: event.id,
            EVENT_TYPE_HEADER: event.type,
            "User-Agent": "wacall-events",
        }
        if self._secret:
            secrets = _secrets(self._secret)
            headers[SIGNATURE_HEADER] = sign_body(body, secrets[0])  # (wacall's own, for one more release)
            headers.update(standard_webhook_headers(event.id, body, secrets))
        self.attempts += 1
        try:
            async with self._session.post(
                    self.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status}"
        except Exception as exc:  # network, timeout, or anything odd: retry, never stop
            return _reason(exc)


# -- wiring -----------------------------------------------------------------------------


class EventFanout:
    """An :class:`EventBus` plus one :class:`WebhookDelivery` per configured URL."""

    def __init__(self, urls: Sequence[str] = (), secret: str | None = None, *,
                 bus: EventBus | None = None, history: int = 1000,
                 session: aiohttp.ClientSession | None = None, store: Any = None,
                 instance: str | None = None, **delivery: Any) -> None:
        #: Outbox and delivery markers (:class:`gateway.store.sqlite.SQLiteStore`), if durable.
        self.store = store
        #: With a store shared by several instances: each remembers its own deliveries.
        self.instance = instance
        self.bus = bus if bus is not None else EventBus(history=history, outbox=store)
        self.deliveries = [WebhookDelivery(url, secret, session=session, **delivery)
                           for url in urls]
        self._marker_versions: dict[str, int] = {}
        for d in self.deliveries:
            d.attach(self.bus)
            if store is not None:
                d.on_delivered = self._marker(d)

    def _marker_key(self, delivery: WebhookDelivery) -> str:
        owner = f"{self.instance}:" if self.instance else ""
        return f"event-delivery:{owner}" + hashlib.sha256(delivery.url.encode()).hexdigest()[:32]

    def _marker(self, delivery: WebhookDelivery) -> Callable[[Event], Awaitable[None]]:
        key = self._marker_key(delivery)

        async def remember(event: Event) -> None:
            for _ in range(3):
                version = self._marker_versions.get(key)
                if version is None:
                    _, version = await self.store.load(key)
                try:
                    self._marker_versions[key] = await self.store.save(
                        key, {"last_id": event.id}, expected_version=version)
                    return
                except VersionConflict:
                    self._marker_versions.pop(key, None)

        return remember

    async def follow(self) -> None:
        """With an outbox shared by several instances (Redis): show every instance's events
        to this instance's SSE subscribers, forever."""
        tail = getattr(self.store, "tail", None)
        if tail is None:
            return
        after = "$"
        while not self.bus.closed:
            try:
                after, events = await tail(after, 1000)
            except Exception as exc:  # (Redis away for a moment)
                if STORE_OUTAGE.first():
                    log.warning("following the shared event log failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for logged in events:
                self.bus.inject(Event.from_dict(logged.data))

    async def recover(self) -> int:
        """Before :meth:`start`: queue, for each endpoint, the events an earlier process
        published after the last one that endpoint acknowledged. Returns how many."""
        if self.store is None:
            return 0
        total = 0
        for d in self.deliveries:
            key = self._marker_key(d)
            document, version = await self.store.load(key)
            self._marker_versions[key] = version
            if not document:
                continue  # a new endpoint: it gets events from now on
            seq = await self.store.position(str(document.get("last_id")))
            if seq is None:
                log.warning("event webhook %s: its last delivered event is no longer stored; "
                            "events since then cannot be redelivered", d.log_url)
                continue
            pending = [Event.from_dict(e.data) for e in await self.store.after(seq, d.max_queue)]
            if pending:
                log.info("event webhook %s: %d event(s) left pending by a previous process",
                         d.log_url, len(pending))
                d.requeue(pending)
                total += len(pending)
        return total

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> EventFanout:
        """Built from ``settings.event_webhooks`` and ``settings.event_secret``."""
        return cls(list(getattr(settings, "event_webhooks", None) or []),
                   getattr(settings, "event_secret", None), **kwargs)

    def publish(self, type: str, data: Mapping[str, Any] | None = None, *,
                call_id: str | None = None) -> Event:
        return self.bus.publish(type, data, call_id=call_id)

    def routes(self, *, path: str = "/v1/events", heartbeat_s: float = 15.0) -> list[web.RouteDef]:
        return event_routes(self.bus, path=path, heartbeat_s=heartbeat_s)

    def start(self) -> None:
        for d in self.deliveries:
            d.start()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Close the bus (ending SSE streams), then flush the webhooks within ``timeout_s``."""
        self.bus.close()
        await self.bus.flush()
        await asyncio.gather(*(d.close(timeout_s) for d in self.deliveries))

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

