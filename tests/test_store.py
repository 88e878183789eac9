"""The store protocols (gateway.store.base), one contract for the memory and SQLite stores."""

import asyncio

import pytest

from gateway.store import (
    CallRecord,
    CallStore,
    DedupeStore,
    EventLog,
    MemoryStore,
    SQLiteStore,
    VersionConflict,
    VersionedStore,
)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request, tmp_path):
    if request.param == "redis":  # a real redis-server (conftest), keys of this test only
        from gateway.store.redis import RedisStore

        s = RedisStore(request.getfixturevalue("redis_url"), prefix=f"{tmp_path.name}:", dedupe_window_s=100.0)
        yield s
        await s.aclose()
        return
    s = MemoryStore(dedupe_window_s=100.0) if request.param == "memory" else SQLiteStore(
        tmp_path / "wacall.sqlite3", dedupe_window_s=100.0)
    yield s
    s.close()


def test_every_protocol_is_implemented(store):
    for protocol in (CallStore, VersionedStore, DedupeStore, EventLog):
        assert isinstance(store, protocol)


async def test_calls_keep_owner_state_and_data_and_refuse_stale_writes(store):
    new = CallRecord("call_1", "BUSINESS_INITIATED", "+4915112345678", "created", owner="a", created_at=1.0)
    saved = await store.save_call(new, expected_version=0)
    assert saved.version == 1
    ringing = await store.save_call(saved.changed(state="ringing", wacid="wacid.X",
                                                  data={"timeline": [{"name": "created"}]}),
                                    expected_version=1)
    assert ringing.version == 2
    with pytest.raises(VersionConflict):  # a writer that read version 1 lost the race
        await store.save_call(saved.changed(state="ended"), expected_version=1)
    got = await store.get_call("call_1")
    assert (got.state, got.wacid, got.owner, got.data["timeline"][0]["name"]) == ("ringing", "wacid.X", "a", "created")
    assert (await store.call_by_wacid("wacid.X")).id == "call_1"
    await store.save_call(CallRecord("call_2", "USER_INITIATED", "+4915100000000", "ended", owner="b", created_at=2.0))
    await store.save_call(CallRecord("call_3", "USER_INITIATED", "+4915100000001", "accepted", owner="b", created_at=3.0))
    assert [c.id for c in await store.live_calls()] == ["call_1", "call_3"]
    assert [c.id for c in await store.live_calls(owner="b")] == ["call_3"]
    assert [c.id for c in await store.recent_calls(2)] == ["call_3", "call_2"]
    assert await store.get_call("nope") is None and await store.call_by_wacid("nope") is None


async def test_versioned_save_never_loses_an_update_when_writers_race(store):
    """Ten writers each add their name to one document, re-reading on conflict: all ten
    names end up in it, whatever the interleaving."""
    async def writer(name: str) -> int:
        conflicts = 0
        while True:
            document, version = await store.load("user:+49151")
            names = list((document or {}).get("names", []))
            await asyncio.sleep(0)  # let the others read the same version
            try:
                await store.save("user:+49151", {"names": names + [name]}, expected_version=version)
                return conflicts
            except VersionConflict:
                conflicts += 1

    conflicts = await asyncio.gather(*(writer(f"w{i}") for i in range(10)))
    document, version = await store.load("user:+49151")
    assert sorted(document["names"]) == sorted(f"w{i}" for i in range(10)) and version == 10
    assert sum(conflicts) > 0  # the race really happened
    assert await store.load("unknown") == (None, 0)


async def test_dedupe_remembers_for_the_window_only(store):
    assert await store.first_time("calls:wacid.A:RINGING", now=1000.0)
    assert not await store.first_time("calls:wacid.A:RINGING", now=1050.0)
    assert await store.first_time("calls:wacid.B:RINGING", now=1050.0)
    assert await store.first_time("calls:wacid.A:RINGING", now=1101.0)  # 101 s later: forgotten


async def test_dedupe_can_check_first_and_remember_after_processing(store):
    assert not await store.seen("k", now=1000.0)
    assert not await store.seen("k", now=1000.0)  # checking remembers nothing
    await store.remember("k", now=1000.0)
    assert await store.seen("k", now=1050.0)
    assert not await store.first_time("k", now=1060.0)
    assert not await store.seen("k", now=1101.0)  # out of the window


async def test_ended_calls_are_forgotten_after_their_retention(store):
    old = await store.save_call(CallRecord("call_old", "USER_INITIATED", "+49", "ended", wacid="wacid.O",
                                           updated_at=100.0))
    await store.save_call(CallRecord("call_live", "USER_INITIATED", "+49", "accepted", updated_at=100.0))
    await store.save_call(CallRecord("call_new", "USER_INITIATED", "+49", "ended", updated_at=300.0))
    assert await store.forget_calls(ended_before=200.0) == 1
    assert await store.get_call(old.id) is None and await store.call_by_wacid("wacid.O") is None
    assert {r.id for r in await store.recent_calls()} == {"call_live", "call_new"}


async def test_event_log_is_ordered_and_trims_the_oldest(store):
    for i in range(5):
        await store.append(f"evt_{i}", "call.ringing", {"n": i}, call_id="call_1")
    first = await store.after(0)
    assert [e.data["n"] for e in first] == [0, 1, 2, 3, 4]
    assert [e.id for e in await store.after(first[2].seq)] == ["evt_3", "evt_4"]
    assert await store.position("evt_2") == first[2].seq and await store.position("nope") is None
    assert await store.trim(2) == 3
    assert [e.id for e in await store.after(0)] == ["evt_3", "evt_4"]


def test_sqlite_store_survives_a_reopen(tmp_path):
    async def run():
        path = tmp_path / "wacall.sqlite3"
        first = SQLiteStore(path)
        await first.save_call(CallRecord("call_9", "BUSINESS_INITIATED", "+49", "accepted", owner="x"))
        await first.save("k", {"a": 1}, expected_version=0)
        first.close()
        again = SQLiteStore(path)
        try:
            return (await again.live_calls(owner="x"))[0].id, await again.load("k")
        finally:
            again.close()

    assert asyncio.run(run()) == ("call_9", ({"a": 1}, 1))
