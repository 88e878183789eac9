"""The service on Redis (``WACALL_REDIS_URL``): calls, their events and webhook ids live in a
real redis-server, so another instance (here: the next one, with an empty data dir) sees them."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import replace

import aiohttp

from gateway.app import Service
from gateway.calls import CallState
from gateway.store.redis import RedisStore

TOKEN = "redis-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = "+4915112345678"


async def test_a_second_instance_sees_the_first_ones_calls_and_events(settings, tmp_path, redis_url):
    db = f"{redis_url.rsplit('/', 1)[0]}/{uuid.uuid4().int % 15 + 1}"  # a database of this test
    first = replace(settings, api_token=TOKEN, redis_url=db, data_dir=tmp_path / "a")
    async with Service(first, sandbox=True) as service:
        assert isinstance(service.store, RedisStore)
        await service.sandbox.grant(USER, permanent=True, notify=False)
        service.ledger.reply(USER[1:], True, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        call = await service.manager.place_call(USER)
        await call.wait_state(CallState.MEDIA_CONNECTED, 20)
        await call.hangup()
        await service.events.bus.flush()
        first_event = service.events.bus.history()[0].id
    second = replace(first, data_dir=tmp_path / "b")  # nothing on disk: all from Redis
    async with Service(second, sandbox=True) as service, aiohttp.ClientSession(base_url=service.url) as http:
        async with http.get(f"/v1/calls/{call.id}", headers=AUTH) as resp:
            stored = await resp.json()
        assert stored["state"] == "ended" and stored["end_reason"] == "business_hangup"
        async with http.get("/v1/calls", headers=AUTH) as resp:
            assert call.id in [c["id"] for c in (await resp.json())["calls"]]
        replay = await service.events.bus.stored_after(first_event)
        assert replay and replay[-1].type == "call.ended" and replay[-1].call_id == call.id
    client = RedisStore(db)
    try:
        assert await client.call_by_wacid(call.wacid) is not None
        await client._redis.flushdb()
    finally:
        await client.aclose()


async def test_sse_on_one_instance_shows_every_instance_s_events(redis_url):
    """Two buses sharing an outbox on Redis (two instances): a subscriber on B sees what A
    publishes, and B's own events once; A's webhook deliveries are A's alone."""
    import asyncio

    from gateway.eventbus import EventFanout

    db = f"{redis_url.rsplit('/', 1)[0]}/{uuid.uuid4().int % 15 + 1}"
    store_a, store_b = RedisStore(db, prefix="sse:"), RedisStore(db, prefix="sse:")
    a, b = EventFanout(store=store_a), EventFanout(store=store_b)
    following = asyncio.ensure_future(b.follow())
    try:
        sub = b.bus.subscribe()
        for _ in range(50):  # until the follower is listening: its first read starts at "now"
            probe = a.publish("test.probe", {})
            await a.bus.flush()
            try:
                first = await asyncio.wait_for(anext(sub), 0.2)
                break
            except TimeoutError:
                continue
        assert first.type == "test.probe"
        mine = b.publish("call.created", {"n": 1}, call_id="call_b")
        theirs = a.publish("call.ringing", {"n": 2}, call_id="call_a")
        await a.bus.flush()
        await b.bus.flush()
        got = [await asyncio.wait_for(anext(sub), 5) for _ in range(2)]
        assert {e.id for e in got} == {mine.id, theirs.id}
        # b's own event came back through Redis too (before this one): it is not shown twice
        end = a.publish("test.end", {})
        await a.bus.flush()
        assert (await asyncio.wait_for(anext(sub), 5)).id == end.id
        assert probe.id != mine.id
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        a.bus.close()
        b.bus.close()
        await store_a._redis.flushdb()
        await store_a.aclose()
        await store_b.aclose()


async def test_two_instances_dialing_one_user_at_once_never_exceed_the_limit(redis_url):
    """Two gatekeepers (two instances) on one ledger in Redis: 12 dials of one user at once,
    each holding its decision while the connect is in flight, place exactly the 5 the
    rules allow. Without the decision lock the same race places more (the test can fail)."""
    import asyncio

    from gateway.errors import ProviderError
    from gateway.gatekeeper import Gatekeeper
    from gateway.permissions import PermissionLedger
    from gateway.store.redis import RedisPermissionStore

    db = f"{redis_url.rsplit('/', 1)[0]}/{uuid.uuid4().int % 15 + 1}"
    user = "4915100000777"

    def instance(prefix: str) -> Gatekeeper:
        return Gatekeeper(PermissionLedger(RedisPermissionStore(db, prefix=prefix)), provider=None)

    async def dial(gate: Gatekeeper, n: int, locked: bool) -> bool:
        try:
            async with gate.deciding(user) if locked else contextlib.nullcontext():
                await gate.check_call(user)
                await asyncio.sleep(0.005)  # the connect request in flight
                gate.ledger.call_placed(user, f"wacid.{n}")
            return True
        except ProviderError:
            return False

    for locked, prefix in ((True, "gate1:"), (False, "gate2:")):
        a, b = instance(prefix), instance(prefix)
        a.ledger.reply(user, True, permanent=True)
        placed = await asyncio.gather(*(dial(a if n % 2 else b, n, locked) for n in range(12)))
        if locked:
            assert sum(placed) == 5, placed  # seed rules: 5 calls per 24 h
        else:
            assert sum(placed) > 5, placed  # (the race the lock closes)
        for gate in (a, b):
            gate.ledger.store.close()
    client = RedisStore(db)
    await client._redis.flushdb()
    await client.aclose()
