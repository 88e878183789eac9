"""The store protocols (:mod:`gateway.store.base`) on Redis: what several wacall
instances share (``WACALL_REDIS_URL``).

Every operation that must not lose a race is one Lua script (atomic on the server): a
call or document saved with ``expected_version``, a webhook id seen for the first time,
an event appended with the next position. Keys (prefix ``wacall:`` by default):

* ``call:<id>`` (hash: the record's columns, ``data`` as JSON), ``wacid:<wacid>`` (the
  call id), ``calls:live`` (set of ids not ended), ``calls:created`` (ids by creation time),
  ``calls:ended`` (ended ids by last change, for retention);
* ``doc:<key>`` (hash: ``document`` JSON, ``version``);
* ``seen:<key>`` (when it was first seen; expires after the window);
* ``events`` (a stream whose entry ids are the positions ``<seq>-0``), ``events:seq``,
  ``event:<id>`` (its position, for ``Last-Event-ID``; expires with the window).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from .base import DEDUPE_WINDOW_S, CallRecord, LoggedEvent, VersionConflict

__all__ = ["RedisPermissionStore", "RedisStore"]

_SAVE_CALL = """
local found = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= found then return {-1, found} end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'wacid', ARGV[3], 'direction', ARGV[4], 'user', ARGV[5],
           'state', ARGV[6], 'owner', ARGV[7], 'lease_until', ARGV[8], 'created_at', ARGV[9],
           'updated_at', ARGV[10], 'data', ARGV[11], 'version', found + 1)
if ARGV[3] ~= '' then redis.call('SET', KEYS[4], ARGV[2]) end
if ARGV[6] == 'ended' then
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[5], ARGV[10], ARGV[2])
else
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[5], ARGV[2])
end
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[2])
return {found + 1, found}
"""

_SAVE_DOC = """
local found = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0
if tonumber(ARGV[1]) ~= found then return {-1, found} end
redis.call('HSET', KEYS[1], 'document', ARGV[2], 'version', found + 1)
return {found + 1, found}
"""

_FIRST_TIME = """
local at = tonumber(redis.call('GET', KEYS[1]))
if at and tonumber(ARGV[1]) - at < tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""

_APPEND = """
local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], seq .. '-0', 'id', ARGV[1], 'type', ARGV[2], 'call_id', ARGV[3],
           'data', ARGV[4], 'created_at', ARGV[5])
redis.call('SET', KEYS[3], seq, 'EX', ARGV[6])
return seq
"""

_FORGET = """
local gone = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])) do
  local key = ARGV[2] .. 'call:' .. id
  local wacid = redis.call('HGET', key, 'wacid')
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if wacid and wacid ~= '' then redis.call('DEL', ARGV[2] .. 'wacid:' .. wacid) end
  gone = gone + 1
end
return gone
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class RedisStore:
    """:class:`~gateway.store.base.CallStore`, :class:`~gateway.store.base.VersionedStore`,
    :class:`~gateway.store.base.DedupeStore` and :class:`~gateway.store.base.EventLog`
    on one Redis (``redis://host:port/db``)."""

    #: How long an event id keeps its position for ``Last-Event-ID`` (the stream itself
    #: is trimmed by count).
    EVENT_ID_TTL_S = 30 * 86400

    def __init__(self, url: str, *, prefix: str = "wacall:", dedupe_window_s: float | None = None,
                 client: aioredis.Redis | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.dedupe_window_s = DEDUPE_WINDOW_S if dedupe_window_s is None else dedupe_window_s
        self._redis = client or aioredis.Redis.from_url(url, decode_responses=True)
        self._save_call = self._redis.register_script(_SAVE_CALL)
        self._save_doc = self._redis.register_script(_SAVE_DOC)
        self._first_time = self._redis.register_script(_FIRST_TIME)
        self._append = self._redis.register_script(_APPEND)
        self._forget = self._redis.register_script(_FORGET)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- calls -----------------------------------------------------------------------------

    async def save_call(self, record: CallRecord, *, expected_version: int | None = None) -> CallRecord:
        data = _dumps(dict(record.data))
        keys = [self._key("call", record.id), self._key("calls", "live"), self._key("calls", "created"),
                self._key("wacid", record.wacid or "-"), self._key("calls", "ended")]
        args = [_text(expected_version), record.id, _text(record.wacid), record.direction, record.user,
                record.state, _text(record.owner), _text(record.lease_until), repr(record.created_at),
                repr(record.updated_at), data]
        version, found = await self._save_call(keys=keys, args=args)
        if version == -1:
            raise VersionConflict(record.id, expected_version, found)
        return replace(record, data=json.loads(data), version=version)

    @staticmethod
    def _record(row: Mapping[str, str]) -> CallRecord:
        lease = row.get("lease_until")
        return CallRecord(id=row["id"], direction=row["direction"], user=row["user"], state=row["state"],
                          wacid=row.get("wacid") or None, owner=row.get("owner") or None,
                          lease_until=float(lease) if lease else None,
                          created_at=float(row["created_at"]), updated_at=float(row["updated_at"]),
                          data=json.loads(row["data"]), version=int(row["version"]))

    async def _records(self, ids: list[str]) -> list[CallRecord]:
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for call_id in ids:
                pipe.hgetall(self._key("call", call_id))
            rows = await pipe.execute()
        return [self._record(row) for row in rows if row]

    async def get_call(self, call_id: str) -> CallRecord | None:
        found = await self._records([call_id])
        return found[0] if found else None

    async def call_by_wacid(self, wacid: str) -> CallRecord | None:
        call_id = await self._redis.get(self._key("wacid", wacid))
        return await self.get_call(call_id) if call_id else None

    async def live_calls(self, owner: str | None = None) -> list[CallRecord]:
        ids = sorted(await self._redis.smembers(self._key("calls", "live")))
        found = [r for r in await self._records(ids) if not r.ended and (owner is None or r.owner == owner)]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    async def recent_calls(self, limit: int = 50) -> list[CallRecord]:
        ids = await self._redis.zrevrange(self._key("calls", "created"), 0, max(0, int(limit)) - 1)
        return await self._records(list(ids))

    async def forget_calls(self, *, ended_before: float) -> int:
        return int(await self._forget(keys=[self._key("calls", "ended"), self._key("calls", "created")],
                                      args=[repr(ended_before), self.prefix]))

    # -- versioned documents ---------------------------------------------------------------

    async def load(self, key: str) -> tuple[dict[str, Any] | None, int]:
        row = await self._redis.hgetall(self._key("doc", key))
        return (None, 0) if not row else (json.loads(row["document"]), int(row["version"]))

    async def save(self, key: str, document: Mapping[str, Any], *, expected_version: int) -> int:
        version, found = await self._save_doc(keys=[self._key("doc", key)],
                                              args=[int(expected_version), _dumps(dict(document))])
        if version == -1:
            raise VersionConflict(key, expected_version, found)
        return int(version)

    # -- webhook de-duplication ------------------------------------------------------------

    def _ttl(self) -> int:
        return max(1, int(self.dedupe_window_s) + 1)

    async def first_time(self, key: str, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return bool(await self._first_time(keys=[self._key("seen", key)],
                                           args=[repr(now), repr(self.dedupe_window_s), self._ttl()]))

    async def seen(self, key: str, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        at = await self._redis.get(self._key("seen", key))
        return at is not None and now - float(at) < self.dedupe_window_s

    async def remember(self, key: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        await self._redis.set(self._key("seen", key), repr(now), ex=self._ttl())

    # -- event log -------------------------------------------------------------------------

    async def append(self, event_id: str, type: str, data: Mapping[str, Any], *,
                     call_id: str | None = None, created_at: float | None = None) -> LoggedEvent:
        text = _dumps(dict(data))
        at = time.time() if created_at is None else created_at
        seq = await self._append(keys=[self._key("events"), self._key("events", "seq"), self._key("event", event_id)],
                                 args=[event_id, type, _text(call_id), text, repr(at), self.EVENT_ID_TTL_S])
        return LoggedEvent(int(seq), event_id, type, call_id, json.loads(text), at)

    async def after(self, seq: int, limit: int = 100) -> list[LoggedEvent]:
        entries = await self._redis.xrange(self._key("events"), min=f"({int(seq)}-0", max="+", count=int(limit))
        return [LoggedEvent(int(entry_id.split("-")[0]), f["id"], f["type"], f["call_id"] or None,
                            json.loads(f["data"]), float(f["created_at"])) for entry_id, f in entries]

    async def trim(self, keep: int) -> int:
        return int(await self._redis.xtrim(self._key("events"), maxlen=max(0, int(keep)), approximate=False))

    async def tail(self, after: str = "$", block_ms: int = 1000) -> tuple[str, list[LoggedEvent]]:
        """Events appended after stream id ``after`` (``"$"``: from now), waiting up to
        ``block_ms`` for one; returns the id to continue from and the events."""
        found = await self._redis.xread({self._key("events"): after}, count=500, block=block_ms)
        events = []
        for _, entries in found or []:
            for entry_id, f in entries:
                after = entry_id
                events.append(LoggedEvent(int(entry_id.split("-")[0]), f["id"], f["type"], f["call_id"] or None,
                                          json.loads(f["data"]), float(f["created_at"])))
        return after, events

    async def position(self, event_id: str) -> int | None:
        seq = await self._redis.get(self._key("event", event_id))
        if seq is None:
            return None
        kept = await self._redis.xrange(self._key("events"), min=f"{seq}-0", max=f"{seq}-0", count=1)
        return int(seq) if kept else None

    # -- instance inboxes (routing to the instance that owns a call) ------------------------

    #: An inbox keeps at most this many messages (a dead instance's does not grow forever).
    INBOX_MAX = 10_000

    async def send(self, instance: str, message: Mapping[str, Any]) -> str:
        """Queue ``message`` for ``instance`` (it reads its inbox with :meth:`receive`)."""
        return await self._redis.xadd(self._key("inbox", instance), {"m": _dumps(dict(message))},
                                      maxlen=self.INBOX_MAX, approximate=True)

    async def receive(self, instance: str, after: str = "0", block_ms: int = 1000,
                      count: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """Messages for ``instance`` after ``after`` (waiting up to ``block_ms`` for one)."""
        found = await self._redis.xread({self._key("inbox", instance): after}, count=count, block=block_ms)
        return [(entry_id, json.loads(fields["m"])) for _, entries in found or [] for entry_id, fields in entries]

    async def received(self, instance: str, ids: list[str]) -> None:
        """Forget handled messages."""
        if ids:
            await self._redis.xdel(self._key("inbox", instance), *ids)

    def close(self) -> None:
        """(See :meth:`aclose`: closing a Redis connection is a coroutine.)"""

    async def aclose(self) -> None:
        await self._redis.aclose()


class RedisPermissionStore:
    """:class:`gateway.store.PermissionStore` on Redis, so every instance's permission
    ledger reads and writes the same records; with :meth:`lock`, one instance at a time
    decides a user's next call (see :meth:`gateway.gatekeeper.Gatekeeper.deciding`).

    The ledger's interface is synchronous: this store uses a synchronous client (a
    loopback round trip is a fraction of a millisecond)."""

    def __init__(self, url: str, *, prefix: str = "wacall:") -> None:
        import redis as sync_redis

        self.prefix = prefix
        self._redis = sync_redis.Redis.from_url(url, decode_responses=True)

    def load(self, user: str) -> dict[str, Any] | None:
        text = self._redis.get(f"{self.prefix}permission:{user}")
        return None if text is None else json.loads(text)

    def save(self, user: str, record: Mapping[str, Any]) -> None:
        with self._redis.pipeline() as pipe:  # (MULTI: record and index together)
            pipe.set(f"{self.prefix}permission:{user}", _dumps(dict(record)))
            pipe.sadd(f"{self.prefix}permissions", user)
            pipe.execute()

    def users(self) -> list[str]:
        return sorted(self._redis.smembers(f"{self.prefix}permissions"))

    def try_lock(self, user: str, token: str, ttl_s: float) -> bool:
        """Take ``user``'s decision lock for ``ttl_s`` (``False``: someone holds it)."""
        return bool(self._redis.set(f"{self.prefix}permission-lock:{user}", token, nx=True,
                                    px=max(1, int(ttl_s * 1000))))

    def unlock(self, user: str, token: str) -> None:
        """Release the lock if it is still ours (not after it expired and was taken)."""
        self._redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
                         "else return 0 end", 1, f"{self.prefix}permission-lock:{user}", token)

    def close(self) -> None:
        self._redis.close()
