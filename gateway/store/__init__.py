"""Storage: the protocols in :mod:`gateway.store.base` (calls, versioned documents,
webhook de-duplication, the event log; memory and SQLite implementations), and the
call-permission ledger's store (:mod:`gateway.permissions`), described below.

The ledger keeps one small JSON document per user (permission, recent requests and
calls, provider snapshot, ids already seen) and rewrites it whole on every change.
So a store only has to load, save and list documents by user: a single-key
read or write, atomic on its own, with no multi-row transactions. SQLite is the
default (:class:`SQLitePermissionStore`); a Redis store would be ``GET``/``SET``
of one key per user plus a set of user names.

Stores are synchronous: the queries are sub-millisecond, and the ledger is used
from one event loop, so no two writes to the same user interleave.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from gateway.store.base import (
    CallRecord,
    CallStore,
    DedupeStore,
    EventLog,
    LoggedEvent,
    VersionConflict,
    VersionedStore,
)
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import DEFAULT_FILENAME, SQLitePermissionStore, SQLiteStore, StoreSchemaError

__all__ = [
    "CallRecord",
    "CallStore",
    "DedupeStore",
    "EventLog",
    "LoggedEvent",
    "MemoryStore",
    "SQLiteStore",
    "VersionConflict",
    "VersionedStore",
    "DEFAULT_FILENAME",
    "MemoryPermissionStore",
    "PermissionStore",
    "SQLitePermissionStore",
    "StoreSchemaError",
]


@runtime_checkable
class PermissionStore(Protocol):
    """What :class:`gateway.permissions.PermissionLedger` needs from storage.

    Records are JSON-compatible dicts; a store must return an equal dict (not the
    same object) from :meth:`load` after :meth:`save`.
    """

    def load(self, user: str) -> dict[str, Any] | None:
        """The user's record, or ``None`` if the user is unknown."""
        ...

    def save(self, user: str, record: Mapping[str, Any]) -> None:
        """Replace the user's record (atomically)."""
        ...

    def users(self) -> list[str]:
        """Every user with a record, sorted."""
        ...

    def close(self) -> None:
        """Release resources; the store is unusable afterwards."""
        ...


class MemoryPermissionStore:
    """In-process store for the sandbox and tests.

    Records are kept as JSON text, so they behave exactly like a persisted store:
    what you get back is a fresh copy, and non-JSON values fail on save.
    """

    def __init__(self) -> None:
        self._records: dict[str, str] = {}

    def load(self, user: str) -> dict[str, Any] | None:
        text = self._records.get(user)
        return None if text is None else json.loads(text)

    def save(self, user: str, record: Mapping[str, Any]) -> None:
        self._records[user] = json.dumps(record, separators=(",", ":"), allow_nan=False)

    def users(self) -> list[str]:
        return sorted(self._records)

    def close(self) -> None:
        pass
