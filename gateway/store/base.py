"""What wacall keeps, as async protocols: calls, permissions, webhook de-duplication, events.

State that must outlive a process (durable calls), be shared by several instances
(Redis) or be read by another service (the console) goes through these protocols.
Each has a memory implementation (:mod:`gateway.store.memory`: the sandbox, tests) and
a SQLite one (:mod:`gateway.store.sqlite`); a Redis one comes with the scale work.

* :class:`CallStore`: one :class:`CallRecord` per call, with the instance that owns it
  (``owner``) and until when (``lease_until``), its provider id, state and data.
* :class:`VersionedStore`: documents with a version; ``save(expected_version=...)`` fails
  with :class:`VersionConflict` when someone saved in between, so two writers racing
  never lose an update (the permission ledger's records).
* :class:`DedupeStore`: "have I seen this webhook event?", atomically, for a window
  (Meta redelivers for up to 7 days).
* :class:`EventLog`: the outbox that SSE and event webhooks read, in order.

Every method is a coroutine, so a networked store fits without changing callers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from ..errors import WacallError

__all__ = [
    "CallRecord",
    "CallStore",
    "DedupeStore",
    "EventLog",
    "LoggedEvent",
    "VersionConflict",
    "VersionedStore",
    "DEDUPE_WINDOW_S",
]

#: How long a webhook event id is remembered: Meta retries for up to 7 days.
DEDUPE_WINDOW_S = 7 * 24 * 3600.0


class VersionConflict(WacallError, RuntimeError):
    """Someone saved this document after you read it: read it again and re-apply."""

    def __init__(self, key: str, expected: int | None, found: int | None) -> None:
        super().__init__(f"{key}: expected version {expected}, found {found}")
        self.key, self.expected, self.found = key, expected, found


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call as data. ``version`` counts saves (0: never saved)."""

    id: str
    direction: str
    user: str
    state: str
    wacid: str | None = None
    #: The instance that runs the call's media, and until when it holds it.
    owner: str | None = None
    lease_until: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    #: Everything else (timeline, end reason, error, stats...), JSON-compatible.
    data: Mapping[str, Any] = field(default_factory=dict)
    version: int = 0

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    def changed(self, **changes: Any) -> CallRecord:
        return replace(self, updated_at=time.time(), **changes)


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """An event in the log: its position (``seq``, increasing) and its JSON data."""

    seq: int
    id: str
    type: str
    call_id: str | None
    data: Mapping[str, Any]
    created_at: float


@runtime_checkable
class CallStore(Protocol):
    async def save_call(self, record: CallRecord, *, expected_version: int | None = None) -> CallRecord:
        """Store ``record``; returns it with its new version. ``expected_version``:
        the version read before (0 for a new call); :class:`VersionConflict` if the
        stored one differs. ``None`` saves unconditionally."""
        ...

    async def get_call(self, call_id: str) -> CallRecord | None: ...

    async def call_by_wacid(self, wacid: str) -> CallRecord | None: ...

    async def live_calls(self, owner: str | None = None) -> list[CallRecord]:
        """Calls not ended (of ``owner``, when given), oldest first."""
        ...

    async def recent_calls(self, limit: int = 50) -> list[CallRecord]:
        """The newest calls first."""
        ...

    async def forget_calls(self, *, ended_before: float) -> int:
        """Delete ended calls last changed before ``ended_before`` (retention); returns
        how many went."""
        ...


@runtime_checkable
class VersionedStore(Protocol):
    async def load(self, key: str) -> tuple[dict[str, Any] | None, int]:
        """``(document, version)``; ``(None, 0)`` for an unknown key."""
        ...

    async def save(self, key: str, document: Mapping[str, Any], *, expected_version: int) -> int:
        """Replace the document if its version is still ``expected_version``; returns
        the new version, or raises :class:`VersionConflict`."""
        ...


@runtime_checkable
class DedupeStore(Protocol):
    async def first_time(self, key: str, *, now: float | None = None) -> bool:
        """``True`` the first time ``key`` is seen within the window (and remember it),
        ``False`` for a repeat. Atomic: of two concurrent calls, one gets ``True``."""
        ...

    async def seen(self, key: str, *, now: float | None = None) -> bool:
        """Was ``key`` remembered within the window? (Read only: check first, process,
        then :meth:`remember`, so a crash in between leaves the event to be redelivered.)"""
        ...

    async def remember(self, key: str, *, now: float | None = None) -> None: ...


@runtime_checkable
class EventLog(Protocol):
    async def append(self, event_id: str, type: str, data: Mapping[str, Any], *,
                     call_id: str | None = None, created_at: float | None = None) -> LoggedEvent: ...

    async def after(self, seq: int, limit: int = 100) -> list[LoggedEvent]:
        """Events with a position greater than ``seq``, oldest first."""
        ...

    async def trim(self, keep: int) -> int:
        """Forget all but the newest ``keep`` events; returns how many went."""
        ...

    async def position(self, event_id: str) -> int | None:
        """The ``seq`` of the event with this id (``Last-Event-ID``), if still kept."""
        ...
