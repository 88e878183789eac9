"""Events out: the bus, the SSE endpoint and signed webhook delivery, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.helpers import until
from gateway.eventbus import (
    Event,
    EventBus,
    EventFanout,
    WebhookDelivery,
    sign_body,
    sse_handler,
    verify_signature,
)

SECRET = "event-secret-for-tests-0123456789"
WAIT = 5.0  # upper bound for anything that should happen "soon"
ID_RE = re.compile(r"^evt_[0-9A-HJKMNP-TV-Z]{26}$")
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def within(aw: Any, timeout: float = WAIT) -> Any:
    return await asyncio.wait_for(aw, timeout)


# -- events and the bus -----------------------------------------------------------------


class Color(Enum):
    RED = "red"


def test_event_shape_and_json() -> None:
    bus = EventBus()
    ev = bus.publish("call.ringing", {"b": 1, "a": [Color.RED]}, call_id="call_1")
    assert ID_RE.match(ev.id)
    assert TS_RE.match(ev.created_at)
    assert ev.to_dict() == {"id": ev.id, "type": "call.ringing", "created_at": ev.created_at,
                            "call_id": "call_1", "data": {"b": 1, "a": ["red"]}}
    body = ev.to_json()
    assert body == (b'{"id":"%s","type":"call.ringing","created_at":"%s","call_id":"call_1",'
                    b'"data":{"b":1,"a":["red"]}}' % (ev.id.encode(), ev.created_at.encode()))
    assert Event.from_json(body) == ev
    assert ev.to_sse() == b"id: %s\nevent: call.ringing\ndata: %s\n\n" % (ev.id.encode(), body)
    other = bus.publish("call.ended", None)
    assert other.id != ev.id and other.call_id is None and other.data == {}


def test_event_data_is_copied() -> None:
    data: dict[str, Any] = {"state": "ringing", "nested": {"n": 1}}
    ev = EventBus().publish("call.state", data)
    data["nested"]["n"] = 2
    assert ev.data == {"state": "ringing", "nested": {"n": 1}}
    assert b'"n":1' in ev.to_json()


@pytest.mark.parametrize("bad", ["", "call ended", "call\nended", "x" * 101])
def test_bad_event_type_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        EventBus().publish(bad, {})


def test_unserialisable_data_rejected() -> None:
    bus = EventBus()
    with pytest.raises(TypeError):
        bus.publish("call.state", {"x": object()})
    assert bus.history() == []


async def drain(sub: Any, n: int) -> list[Event]:
    return [await within(anext(sub)) for _ in range(n)]


async def test_subscribe_replay_filter_and_history() -> None:
    bus = EventBus(history=5)
    events = [bus.publish("call.state", {"i": i}, call_id=f"c{i % 2}") for i in range(8)]
    assert bus.history() == events[3:]
    # retained as their JSON bodies: a replay sends the very bytes the live event had
    assert [e.to_json() for e in bus.history()] == [e.to_json() for e in events[3:]]

    sub = bus.subscribe(last_event_id=events[5].id)
    assert not sub.gap
    assert await drain(sub, 2) == events[6:]

    filtered = bus.subscribe(call_id="c1", last_event_id=events[4].id)
    assert await drain(filtered, 2) == [events[5], events[7]]

    lost = bus.subscribe(last_event_id=events[0].id)  # rolled out of history
    assert lost.gap
    assert await drain(lost, 5) == events[3:]

    live = bus.publish("call.ended", {}, call_id="c1")
    assert await drain(sub, 1) == [live]
    assert await drain(filtered, 1) == [live]
    assert await drain(lost, 1) == [live]


async def test_waiting_is_cancellation_safe() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(sub), 0.01)
    ev = bus.publish("call.ringing", {})
    assert await within(anext(sub)) == ev


async def test_close_ends_subscriptions_after_queued_events() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    waiting = bus.subscribe()
    waiter = asyncio.create_task(anext(waiting))
    await asyncio.sleep(0)  # let the waiter park
    ev = bus.publish("call.ended", {})
    assert await within(waiter) == ev
    bus.close()
    assert [e async for e in sub] == [ev]
    assert [e async for e in waiting] == []
    assert bus.subscriber_count == 0
    late = bus.publish("call.ended", {})
    assert late not in bus.history()
    assert [e async for e in bus.subscribe()] == []


async def test_slow_subscriber_dropped_without_affecting_others() -> None:
    bus = EventBus()
    drops: list[str] = []
    slow = bus.subscribe(max_queue=3, on_drop=lambda: drops.append("slow"))
    fast = bus.subscribe(max_queue=3)
    got: list[Event] = []
    published: list[Event] = []
    for i in range(10):
        published.append(bus.publish("call.state", {"i": i}))
        got.extend(await drain(fast, 1))
    assert got == published
    assert slow.dropped and drops == ["slow"] and bus.dropped_subscribers == 1
    assert [e async for e in slow] == []  # queued events were freed, iteration ends
    assert bus.subscriber_count == 1 and not fast.dropped


# -- SSE --------------------------------------------------------------------------------


class SseReader:
    """Splits a text/event-stream body into messages (dicts of fields, comments under ':')."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.buf = b""

    async def message(self) -> dict[str, Any] | None:
        while b"\n\n" not in self.buf:
            chunk = await within(self.resp.content.readany())
            if not chunk:
                return None
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n\n", 1)
        msg: dict[str, Any] = {":": []}
        for line in raw.decode().split("\n"):
            if line.startswith(":"):
                msg[":"].append(line[1:].strip())
            else:
                name, _, value = line.partition(": ")
                msg[name] = value
        return msg

    async def event(self) -> dict[str, Any]:
        while True:
            msg = await self.message()
            assert msg is not None, "stream ended"
            if "id" in msg:
                return msg

    async def events(self, n: int) -> list[dict[str, Any]]:
        return [await self.event() for _ in range(n)]


def as_sse(ev: Event) -> dict[str, Any]:
    return {":": [], "id": ev.id, "event": ev.type, "data": ev.to_json().decode()}


@dataclass
class SseApp:
    bus: EventBus
    client: TestClient
    finished: asyncio.Queue[str]  # one item per finished handler
    opened: list[aiohttp.ClientResponse] = field(default_factory=list)

    async def open(self, query: str = "", headers: dict[str, str] | None = None) -> SseReader:
        resp = await within(self.client.get("/v1/events" + query, headers=headers))
        self.opened.append(resp)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        return SseReader(resp)


def sse_app(bus: EventBus, finished: asyncio.Queue[str], **kwargs: Any) -> web.Application:
    inner = sse_handler(bus, **kwargs)

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("slow"):  # make the kernel buffer little for this client
            request.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        try:
            return await inner(request)
        finally:
            finished.put_nowait(request.query.get("name", ""))

    app = web.Application()
    app.router.add_get("/v1/events", handler)
    return app


@pytest.fixture
async def sse() -> AsyncIterator[SseApp]:
    bus = EventBus()
    finished: asyncio.Queue[str] = asyncio.Queue()
    async with TestClient(TestServer(sse_app(bus, finished, heartbeat_s=30))) as client:
        app = SseApp(bus, client, finished)
        yield app
        bus.close()
        for resp in app.opened:
            resp.close()


async def test_sse_delivers_in_order(sse: SseApp) -> None:
    stream = await sse.open()
    published = [sse.bus.publish("call.state", {"i": i}, call_id="c") for i in range(5)]
    got = await stream.events(5)
    assert got == [as_sse(ev) for ev in published]
    assert [json.loads(m["data"])["data"] for m in got] == [{"i": i} for i in range(5)]


async def test_sse_last_event_id_replay(sse: SseApp) -> None:
    published = [sse.bus.publish("call.state", {"i": i}) for i in range(4)]
    by_header = await sse.open(headers={"Last-Event-ID": published[1].id})
    by_query = await sse.open(f"?last_event_id={published[2].id}")
    live = sse.bus.publish("call.ended", {})
    assert await by_header.events(3) == [as_sse(ev) for ev in [*published[2:], live]]
    assert await by_query.events(2) == [as_sse(ev) for ev in [published[3], live]]


async def test_sse_call_id_filter(sse: SseApp) -> None:
    mine = await sse.open("?call_id=call_a")
    everything = await sse.open()
    a1 = sse.bus.publish("call.ringing", {}, call_id="call_a")
    b1 = sse.bus.publish("call.ringing", {}, call_id="call_b")
    n1 = sse.bus.publish("gateway.ready", {})
    a2 = sse.bus.publish("call.ended", {}, call_id="call_a")
    assert await mine.events(2) == [as_sse(a1), as_sse(a2)]
    assert await everything.events(4) == [as_sse(e) for e in (a1, b1, n1, a2)]


async def test_sse_heartbeat() -> None:
    bus = EventBus()
    finished: asyncio.Queue[str] = asyncio.Queue()
    async with TestClient(TestServer(sse_app(bus, finished, heartbeat_s=0.02))) as client:
        resp = await within(client.get("/v1/events"))
        stream = SseReader(resp)
        comments: list[str] = []
        while "ping" not in comments:
            msg = await stream.message()
            assert msg is not None
            comments += msg[":"]
        ev = bus.publish("call.ringing", {})
        assert await stream.event() == as_sse(ev)
        bus.close()
        await within(finished.get())
        resp.close()


async def test_sse_bus_close_ends_stream(sse: SseApp) -> None:
    stream = await sse.open()
    ev = sse.bus.publish("call.ended", {})
    sse.bus.close()
    assert await stream.event() == as_sse(ev)
    while (msg := await stream.message()) is not None:
        assert "id" not in msg
    await within(sse.finished.get())
    assert sse.bus.subscriber_count == 0


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_sse_client_disconnect_cleans_up(handler_cancellation: bool) -> None:
    """With and without aiohttp cancelling handlers of lost connections (run_app's default is not to)."""
    bus = EventBus()
    finished: asyncio.Queue[str] = asyncio.Queue()
    runner = web.AppRunner(sse_app(bus, finished, heartbeat_s=0.05),
                           handler_cancellation=handler_cancellation)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            stay = SseReader(await within(session.get(f"http://127.0.0.1:{port}/v1/events")))
            leave = await within(session.get(f"http://127.0.0.1:{port}/v1/events?name=leave"))
            assert bus.subscriber_count == 2
            leave.close()  # drop the connection
            assert await within(finished.get()) == "leave"
            assert bus.subscriber_count == 1
            ev = bus.publish("call.ringing", {})
            assert await stay.event() == as_sse(ev)
            stay.resp.close()
    finally:
        bus.close()
        await runner.cleanup()


async def test_slow_sse_client_dropped_others_unaffected() -> None:
    bus = EventBus(history=50)
    finished: asyncio.Queue[str] = asyncio.Queue()
    app = sse_app(bus, finished, heartbeat_s=30, max_queue=8)
    async with TestClient(TestServer(app)) as client:
        fast = SseReader(await within(client.get("/v1/events")))
        # The slow client: a raw socket with a tiny receive buffer that never reads.
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.setblocking(False)
        await within(asyncio.get_running_loop().sock_connect(
            raw, (client.server.host, client.server.port)))
        reader, writer = await within(asyncio.open_connection(sock=raw))
        writer.write(f"GET /v1/events?slow=1&name=slow HTTP/1.1\r\nHost: {client.server.host}\r\n\r\n"
                     .encode())
        assert (await within(reader.readline())).startswith(b"HTTP/1.1 200")
        assert bus.subscriber_count == 2

        published: list[Event] = []

        async def consume() -> list[dict[str, Any]]:
            received = []
            while not received or received[-1]["event"] != "call.ended":
                received.append(await fast.event())
            return received

        consumer = asyncio.create_task(consume())
        try:
            padding = "x" * 8192
            while finished.empty():
                assert len(published) < 900, "slow client never dropped"
                started = time.perf_counter()
                published.append(bus.publish("call.state", {"i": len(published), "pad": padding}))
                assert time.perf_counter() - started < 0.05  # publishing never waits for clients
                await asyncio.sleep(0)  # let the handlers write
            assert await within(finished.get()) == "slow"
            assert bus.dropped_subscribers == 1 and bus.subscriber_count == 1
            published.append(bus.publish("call.ended", {}))
            assert await within(consumer) == [as_sse(ev) for ev in published]
            with contextlib.suppress(ConnectionResetError):  # the slow connection is closed
                await within(reader.read())
        finally:
            consumer.cancel()
            writer.close()
            fast.resp.close()
        bus.close()


# -- webhook delivery -------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    action: str

    @property
    def event_id(self) -> str:
        return self.headers["X-Wacall-Event-Id"]


class Receiver:
    """A webhook endpoint whose answers follow a script: ok, 500, drop, hang."""

    def __init__(self) -> None:
        self.hits: asyncio.Queue[Hit] = asyncio.Queue()
        self.script: deque[str] = deque()
        self.default = "ok"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        action = self.script.popleft() if self.script else self.default
        self.hits.put_nowait(Hit(request.path, dict(request.headers), body, action))
        if action == "ok":
            return web.Response(status=204)
        if action == "500":
            return web.Response(status=500, text="boom")
        if action == "drop":
            request.transport.close()
        await asyncio.Event().wait()  # "hang" (and "drop"): never answer
        raise AssertionError("unreachable")

    async def next(self) -> Hit:
        return await within(self.hits.get())


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, TestServer]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{name}", rec.handle)
    async with TestServer(app) as server:
        yield rec, server


def url(server: TestServer, path: str = "/hook") -> str:
    return str(server.make_url(path))


async def test_webhook_in_order_and_signed(receiver: tuple[Receiver, TestServer]) -> None:
    rec, server = receiver
    bus = EventBus()
    delivery = WebhookDelivery(url(server), SECRET, backoff_base_s=0.01)
    delivery.attach(bus)
    delivery.start()
    try:
        published = [bus.publish("call.state", {"i": i}, call_id="call_1") for i in range(5)]
        hits = [await rec.next() for _ in published]
        for ev, hit in zip(published, hits, strict=True):
            assert hit.body == ev.to_json()
            assert hit.event_id == ev.id
            assert hit.headers["X-Wacall-Event-Type"] == "call.state"
            assert hit.headers["Content-Type"] == "application/json"
            assert verify_signature(hit.body, hit.headers["X-Wacall-Signature"], SECRET)
            assert not verify_signature(hit.body, hit.headers["X-Wacall-Signature"], "other")
            assert not verify_signature(hit.body + b" ", hit.headers["X-Wacall-Signature"], SECRET)
    finally:
        await delivery.close(timeout_s=WAIT)
    assert (delivery.delivered, delivery.attempts, delivery.failures) == (5, 5, 0)


def test_verify_signature() -> None:
    body = b'{"id":"evt_1"}'
    header = sign_body(body, SECRET)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify_signature(body, header, SECRET)
    assert verify_signature(body, " SHA256=" + header[7:].upper(), SECRET)
    for bad in (None, "", header[7:], "sha1=" + header[7:], "sha256=", header[:-1]):
        assert not verify_signature(body, bad, SECRET)
    assert not verify_signature(body, header, "")


async def test_unsigned_without_secret(receiver: tuple[Receiver, TestServer]) -> None:
    rec, server = receiver
    delivery = WebhookDelivery(url(server), None)
    delivery.start()
    delivery.enqueue(EventBus().publish("call.ringing", {}))
    hit = await rec.next()
    await delivery.close(timeout_s=WAIT)
    assert "X-Wacall-Signature" not in hit.headers


async def test_webhook_retries_until_acknowledged(receiver: tuple[Receiver, TestServer]) -> None:
    rec, server = receiver
    rec.script.extend(["500", "drop", "ok"])
    bus = EventBus()
    delivery = WebhookDelivery(url(server), SECRET, backoff_base_s=0.01, backoff_max_s=0.05)
    delivery.attach(bus)
    delivery.start()
    try:
        first = bus.publish("call.ringing", {}, call_id="c")
        tries = [await rec.next() for _ in range(3)]
        assert [h.action for h in tries] == ["500", "drop", "ok"]
        assert {h.event_id for h in tries} == {first.id}
        assert {h.body for h in tries} == {first.to_json()}
        assert len({h.headers["X-Wacall-Signature"] for h in tries}) == 1
        second = bus.publish("call.ended", {}, call_id="c")
        hit = await rec.next()  # the next POST is the new event: the first is not resent
        assert (hit.event_id, hit.action) == (second.id, "ok")
    finally:
        await delivery.close(timeout_s=WAIT)
    assert rec.hits.empty()
    assert (delivery.delivered, delivery.attempts, delivery.failures) == (2, 4, 2)


async def test_webhook_timeout_retried(receiver: tuple[Receiver, TestServer]) -> None:
    rec, server = receiver
    rec.script.extend(["hang", "ok"])
    delivery = WebhookDelivery(url(server), SECRET, timeout_s=0.2, backoff_base_s=0.01)
    delivery.start()
    ev = EventBus().publish("call.ringing", {})
    delivery.enqueue(ev)
    try:
        hang, ok = await rec.next(), await rec.next()
        assert (hang.action, ok.action) == ("hang", "ok")
        assert hang.event_id == ok.event_id == ev.id
    finally:
        await delivery.close(timeout_s=WAIT)
    assert (delivery.delivered, delivery.failures) == (1, 1)


async def test_attach_before_start_misses_nothing(receiver: tuple[Receiver, TestServer]) -> None:
    rec, server = receiver
    bus = EventBus()
    delivery = WebhookDelivery(url(server), SECRET)
    delivery.attach(bus)
    early = [bus.publish("call.state", {"i": i}) for i in range(3)]
    assert delivery.pending == 3
    delivery.start()
    late = bus.publish("call.ended", {})
    try:
        assert [(await rec.next()).event_id for _ in range(4)] == [e.id for e in [*early, late]]
    finally:
        await delivery.close(timeout_s=WAIT)


async def test_close_flushes_pending(receiver: tuple[Receiver, TestServer]) -> None:
    rec, server = receiver
    bus = EventBus()
    delivery = WebhookDelivery(url(server), SECRET)
    delivery.attach(bus)
    delivery.start()
    published = [bus.publish("call.state", {"i": i}) for i in range(20)]
    await delivery.close(timeout_s=WAIT)
    assert delivery.delivered == 20 and delivery.pending == 0
    assert [rec.hits.get_nowait().event_id for _ in range(20)] == [e.id for e in published]
    bus.publish("call.state", {})  # detached on close
    assert delivery.pending == 0


async def test_close_gives_up_at_deadline_and_logs_safely(
        receiver: tuple[Receiver, TestServer], caplog: pytest.LogCaptureFixture) -> None:
    rec, server = receiver
    rec.default = "500"
    target = url(server).replace("http://", "http://user:pa55word@") + "?token=tok-SENSITIVE#frag"
    bus = EventBus()
    delivery = WebhookDelivery(target, SECRET, backoff_base_s=0.02, backoff_max_s=0.05)
    delivery.attach(bus)
    caplog.set_level(logging.DEBUG, logger="gateway.eventbus")
    delivery.start()
    for i in range(3):
        bus.publish("call.state", {"i": i})
    await rec.next()
    await rec.next()  # retrying, with backoff
    started = time.monotonic()
    await delivery.close(timeout_s=0.3)
    assert time.monotonic() - started < 2.0
    assert delivery.delivered == 0 and delivery.pending == 3 and delivery.failures >= 2
    assert "closed with 3 undelivered events" in caplog.text
    assert f"http://127.0.0.1:{server.port}/hook" in caplog.text
    for secret in (SECRET, "tok-SENSITIVE", "pa55word", "frag"):
        assert secret not in caplog.text
    assert SECRET not in repr(delivery) and "tok-SENSITIVE" not in repr(delivery)


async def test_full_queue_forgets_oldest() -> None:
    delivery = WebhookDelivery("http://127.0.0.1:9/hook", max_queue=2)
    bus = EventBus()
    events = [bus.publish("call.state", {"i": i}) for i in range(3)]
    for ev in events:
        delivery.enqueue(ev)
    assert delivery.pending == 2 and delivery.dropped == 1
    await delivery.close(timeout_s=0)  # never started: nothing to flush


def test_bad_urls_rejected() -> None:
    for bad in ("ftp://host/x", "not a url", "http:///nohost"):
        with pytest.raises(ValueError):
            WebhookDelivery(bad)


async def test_fanout_wiring(receiver: tuple[Receiver, TestServer]) -> None:
    rec, server = receiver
    fan = EventFanout([url(server, "/a"), url(server, "/b")], SECRET, backoff_base_s=0.01)
    async with fan:
        ev = fan.publish("call.connected", {"direction": "outbound"}, call_id="call_9")
        hits = sorted([await rec.next(), await rec.next()], key=lambda h: h.path)
    assert [h.path for h in hits] == ["/a", "/b"]
    assert all(h.event_id == ev.id and verify_signature(h.body, h.headers["X-Wacall-Signature"],
                                                        SECRET) for h in hits)
    assert fan.bus.closed and all(d.delivered == 1 for d in fan.deliveries)


def test_fanout_from_settings() -> None:
    @dataclass
    class Cfg:
        event_webhooks: list[str]
        event_secret: str | None

    fan = EventFanout.from_settings(Cfg(["https://example.test/hook?k=1"], "s"))
    assert [d.log_url for d in fan.deliveries] == ["https://example.test/hook"]
    assert fan.deliveries[0].signed
    assert EventFanout.from_settings(Cfg([], None)).deliveries == []


# -- durable: the outbox, across restarts ------------------------------------------------


async def test_sse_resumes_across_a_restart_from_the_outbox(tmp_path) -> None:
    """Events of an earlier process (same store) are replayed after Last-Event-ID, then
    this process's own, in order, each exactly once."""
    from gateway.store import SQLiteStore

    store = SQLiteStore(tmp_path / "wacall.sqlite3")
    before = EventBus(outbox=store)
    old = [before.publish("call.state", {"i": i}, call_id="c") for i in range(4)]
    await before.flush()
    before.close()
    store.close()

    store = SQLiteStore(tmp_path / "wacall.sqlite3")  # the next process
    bus = EventBus(outbox=store)
    new = bus.publish("call.created", {"i": 4}, call_id="c")  # (in its history, maybe not written yet)
    finished: asyncio.Queue[str] = asyncio.Queue()
    try:
        async with TestClient(TestServer(sse_app(bus, finished, heartbeat_s=30))) as client:
            app = SseApp(bus, client, finished)
            stream = await app.open(headers={"Last-Event-ID": old[1].id})
            live = bus.publish("call.ended", {"i": 5}, call_id="c")
            assert await stream.events(4) == [as_sse(ev) for ev in [old[2], old[3], new, live]]
            unknown = await app.open(headers={"Last-Event-ID": "evt_nope"})  # a gap: this process's history
            assert await unknown.events(2) == [as_sse(ev) for ev in [new, live]]
            bus.close()
            for resp in app.opened:
                resp.close()
    finally:
        await bus.flush()
        store.close()


async def test_events_pending_at_a_crash_are_delivered_by_the_next_process(
        receiver: tuple[Receiver, TestServer], tmp_path) -> None:
    from gateway.eventbus import EventFanout
    from gateway.store import SQLiteStore

    rec, server = receiver
    store = SQLiteStore(tmp_path / "wacall.sqlite3")
    first = EventFanout([url(server)], SECRET, store=store, backoff_base_s=0.01, backoff_max_s=0.02)
    first.start()
    delivered = first.publish("call.ringing", {}, call_id="c")
    assert (await rec.next()).event_id == delivered.id
    await until(lambda: first._marker_versions)  # its acknowledgement is remembered
    rec.default = "500"  # the endpoint goes down; the process dies with two events pending
    pending = [first.publish("call.accepted", {}, call_id="c"), first.publish("call.ended", {}, call_id="c")]
    assert (await rec.next()).action == "500"
    await first.close(timeout_s=0.05)
    store.close()
    while not rec.hits.empty():
        rec.hits.get_nowait()

    rec.default = "ok"
    store = SQLiteStore(tmp_path / "wacall.sqlite3")
    second = EventFanout([url(server)], SECRET, store=store, backoff_base_s=0.01, backoff_max_s=0.02)
    assert await second.recover() == 2
    second.start()
    try:
        fresh = second.publish("call.created", {}, call_id="d")
        hits = [await rec.next() for _ in range(3)]
        # the two pending first, same ids and bytes; the one acknowledged before is not resent
        assert [h.event_id for h in hits] == [pending[0].id, pending[1].id, fresh.id]
        assert [h.body for h in hits[:2]] == [e.to_json() for e in pending]
    finally:
        await second.close(timeout_s=WAIT)
        store.close()


async def test_event_webhooks_follow_standard_webhooks_and_rotate_secrets(receiver) -> None:
    """Receivers verify with the Standard Webhooks library; while rotating, both secrets
    verify; the old X-Wacall-Signature header is still there."""
    import base64 as b64

    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    rec, server = receiver
    new = "whsec_" + b64.b64encode(b"a-new-secret-of-32-bytes-0123456").decode()
    old = "an-old-plain-secret"
    bus = EventBus()
    delivery = WebhookDelivery(url(server), f"{new} {old}")
    delivery.attach(bus)
    delivery.start()
    try:
        event = bus.publish("call.ringing", {"n": 1}, call_id="c")
        hit = await rec.next()
    finally:
        await delivery.close(timeout_s=WAIT)
    headers = {k.lower(): v for k, v in hit.headers.items()}
    assert headers["webhook-id"] == event.id
    Webhook(new).verify(hit.body, headers)  # the new secret
    Webhook("whsec_" + b64.b64encode(old.encode()).decode()).verify(hit.body, headers)  # the old one
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + b64.b64encode(b"someone-else").decode()).verify(hit.body, headers)
    tampered = {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 3600)}
    with pytest.raises(WebhookVerificationError):  # an old timestamp: a replay
        Webhook(new).verify(hit.body, tampered)
    assert verify_signature(hit.body, headers["x-wacall-signature"], new)


def test_retained_events_keep_their_exact_bytes() -> None:
    bus = EventBus(history=10)
    data = {"ratio": 0.1 + 0.2, "name": "Zoë ☎", "nested": {"b": [1, 2.5, None, True], "a": "x"},
            "big": 2**70, "tiny": 1e-300}
    live = bus.publish("call.state", data, call_id="c1")
    (kept,) = bus.history()
    assert kept == live and kept.to_json() == live.to_json() and kept.to_sse() == live.to_sse()
    assert list(kept.data) == ["ratio", "name", "nested", "big", "tiny"]
    assert bus.knows(live.id) and not bus.knows("nope")
