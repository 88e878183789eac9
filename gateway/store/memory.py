"""The store protocols (:mod:`gateway.store.base`) in process memory: the sandbox, tests.

Documents and call data are kept as JSON text, so they behave like a persisted store:
what comes back is a fresh copy, and non-JSON values fail when saved. Each method runs
to completion without awaiting, so on one event loop every operation is atomic.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .base import DEDUPE_WINDOW_S, CallRecord, LoggedEvent, VersionConflict

__all__ = ["MemoryStore"]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class MemoryStore:
    """:class:`~gateway.store.base.CallStore`, :class:`~gateway.store.base.VersionedStore`,
    :class:`~gateway.store.base.DedupeStore` and :class:`~gateway.store.base.EventLog`."""

    def __init__(self, *, dedupe_window_s: float = DEDUPE_WINDOW_S, dedupe_max: int = 1_000_000) -> None:
        self._calls: dict[str, tuple[CallRecord, str]] = {}
        self._wacids: dict[str, str] = {}
        self._documents: dict[str, tuple[str, int]] = {}
        self._seen: OrderedDict[str, float] = OrderedDict()
        self.dedupe_window_s = dedupe_window_s
        self.dedupe_max = dedupe_max
        self._events: list[LoggedEvent] = []
        self._seq = 0

    # -- calls -----------------------------------------------------------------------------

    async def save_call(self, record: CallRecord, *, expected_version: int | None = None) -> CallRecord:
        stored = self._calls.get(record.id)
        found = stored[0].version if stored is not None else 0
        if expected_version is not None and expected_version != found:
            raise VersionConflict(record.id, expected_version, found)
        saved = replace(record, version=found + 1)
        self._calls[record.id] = (saved, _dumps(dict(record.data)))
        if record.wacid:
            self._wacids[record.wacid] = record.id
        return self._copy(saved, self._calls[record.id][1])

    @staticmethod
    def _copy(record: CallRecord, data: str) -> CallRecord:
        return replace(record, data=json.loads(data))

    async def get_call(self, call_id: str) -> CallRecord | None:
        stored = self._calls.get(call_id)
        return None if stored is None else self._copy(*stored)

    async def call_by_wacid(self, wacid: str) -> CallRecord | None:
        call_id = self._wacids.get(wacid)
        return None if call_id is None else await self.get_call(call_id)

    async def live_calls(self, owner: str | None = None) -> list[CallRecord]:
        found = [self._copy(*s) for s in self._calls.values()
                 if not s[0].ended and (owner is None or s[0].owner == owner)]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    async def recent_calls(self, limit: int = 50) -> list[CallRecord]:
        found = sorted((s for s in self._calls.values()), key=lambda s: (s[0].created_at, s[0].id), reverse=True)
        return [self._copy(*s) for s in found[:limit]]

    async def forget_calls(self, *, ended_before: float) -> int:
        old = [cid for cid, (r, _) in self._calls.items() if r.ended and r.updated_at < ended_before]
        for cid in old:
            record, _ = self._calls.pop(cid)
            if record.wacid and self._wacids.get(record.wacid) == cid:
                del self._wacids[record.wacid]
        return len(old)

    # -- versioned documents ---------------------------------------------------------------

    async def load(self, key: str) -> tuple[dict[str, Any] | None, int]:
        stored = self._documents.get(key)
        return (None, 0) if stored is None else (json.loads(stored[0]), stored[1])

    async def save(self, key: str, document: Mapping[str, Any], *, expected_version: int) -> int:
        found = self._documents.get(key, ("", 0))[1]
        if found != expected_version:
            raise VersionConflict(key, expected_version, found)
        self._documents[key] = (_dumps(dict(document)), found + 1)
        return found + 1

    # -- webhook de-duplication ------------------------------------------------------------

    async def first_time(self, key: str, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        seen = self._seen
        while seen:  # forget what left the window (oldest first)
            oldest_key, at = next(iter(seen.items()))
            if now - at < self.dedupe_window_s and len(seen) < self.dedupe_max:
                break
            del seen[oldest_key]
        at = seen.get(key)
        if at is not None and now - at < self.dedupe_window_s:
            return False
        seen[key] = now
        seen.move_to_end(key)
        return True

    async def seen(self, key: str, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        at = self._seen.get(key)
        return at is not None and now - at < self.dedupe_window_s

    async def remember(self, key: str, *, now: float | None = None) -> None:
        await self.first_time(key, now=now)

    # -- event log -------------------------------------------------------------------------

    async def append(self, event_id: str, type: str, data: Mapping[str, Any], *,
                     call_id: str | None = None, created_at: float | None = None) -> LoggedEvent:
        self._seq += 1
        event = LoggedEvent(self._seq, event_id, type, call_id, json.loads(_dumps(dict(data))),
                            time.time() if created_at is None else created_at)
        self._events.append(event)
        return event

    async def after(self, seq: int, limit: int = 100) -> list[LoggedEvent]:
        return [e for e in self._events if e.seq > seq][:limit]

    async def trim(self, keep: int) -> int:
        drop = max(0, len(self._events) - keep)
        del self._events[:drop]
        return drop

    async def position(self, event_id: str) -> int | None:
        return next((e.seq for e in reversed(self._events) if e.id == event_id), None)

    def close(self) -> None:
        pass
