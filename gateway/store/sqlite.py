"""SQLite store for the call-permission ledger (stdlib :mod:`sqlite3`).

One file (by default ``<data dir>/permissions.sqlite3``), mode 0600, WAL
journal, one connection. One row per user holding the ledger's JSON record; each
save is a single ``INSERT … ON CONFLICT`` statement, so it is atomic without an
explicit transaction. The schema version is kept in ``PRAGMA user_version``;
opening a file written by a newer version raises :class:`StoreSchemaError`.

With ``synchronous=NORMAL`` a committed write survives a crash of the process;
after a power loss the last writes may be missing (WAL keeps the file consistent).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.errors import WacallError

from .base import DEDUPE_WINDOW_S, CallRecord, LoggedEvent, VersionConflict

__all__ = ["DEFAULT_FILENAME", "SCHEMA_VERSION", "SQLitePermissionStore", "SQLiteStore", "STATE_FILENAME",
           "StoreSchemaError"]

DEFAULT_FILENAME = "permissions.sqlite3"
SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE permission_records (
            user   TEXT PRIMARY KEY,
            record TEXT NOT NULL
        ) WITHOUT ROWID;
    """,
}


class StoreSchemaError(WacallError, RuntimeError):
    """The database was written by a newer wacall (unknown schema version)."""


class SQLitePermissionStore:
    """:class:`gateway.store.PermissionStore` in a SQLite file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = _open(self.path, _MIGRATIONS, SCHEMA_VERSION)

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike[str]) -> SQLitePermissionStore:
        """The store at ``<data_dir>/permissions.sqlite3``."""
        return cls(Path(data_dir) / DEFAULT_FILENAME)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def load(self, user: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT record FROM permission_records WHERE user = ?", (user,)).fetchone()
        return None if row is None else json.loads(row[0])

    def save(self, user: str, record: Mapping[str, Any]) -> None:
        text = json.dumps(record, separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._db.execute(
                "INSERT INTO permission_records (user, record) VALUES (?, ?) "
                "ON CONFLICT(user) DO UPDATE SET record = excluded.record", (user, text))

    def users(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT user FROM permission_records ORDER BY user").fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SQLitePermissionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- calls, versioned documents, webhook de-duplication, the event log ----------------------

STATE_FILENAME = "wacall.sqlite3"
STATE_SCHEMA_VERSION = 1

_STATE_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE calls (
            id          TEXT PRIMARY KEY,
            wacid       TEXT,
            direction   TEXT NOT NULL,
            user        TEXT NOT NULL,
            state       TEXT NOT NULL,
            owner       TEXT,
            lease_until REAL,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            data        TEXT NOT NULL,
            version     INTEGER NOT NULL
        );
        CREATE UNIQUE INDEX calls_wacid ON calls (wacid) WHERE wacid IS NOT NULL;
        CREATE INDEX calls_live ON calls (state, owner);
        CREATE INDEX calls_created ON calls (created_at);
        CREATE TABLE documents (
            key      TEXT PRIMARY KEY,
            document TEXT NOT NULL,
            version  INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE seen (
            key TEXT PRIMARY KEY,
            at  REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX seen_at ON seen (at);
        CREATE TABLE events (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            id         TEXT NOT NULL,
            type       TEXT NOT NULL,
            call_id    TEXT,
            data       TEXT NOT NULL,
            created_at REAL NOT NULL
        );
    """,
}


class SQLiteStore:
    """The store protocols of :mod:`gateway.store.base` in one SQLite file (WAL, one
    connection, 0600). Each operation is one statement or one ``BEGIN IMMEDIATE``
    transaction, so it is atomic against other connections to the same file; the
    queries are sub-millisecond and run on the caller's thread."""

    def __init__(self, path: str | os.PathLike[str], *, dedupe_window_s: float | None = None) -> None:
        self.path = Path(path)
        self.dedupe_window_s = DEDUPE_WINDOW_S if dedupe_window_s is None else dedupe_window_s
        self._lock = threading.Lock()
        self._db = _open(self.path, _STATE_MIGRATIONS, STATE_SCHEMA_VERSION)

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike[str], **kwargs: Any) -> SQLiteStore:
        return cls(Path(data_dir) / STATE_FILENAME, **kwargs)

    def _transaction(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    # -- calls -----------------------------------------------------------------------------

    async def save_call(self, record, *, expected_version: int | None = None):
        data = json.dumps(dict(record.data), separators=(",", ":"), allow_nan=False)

        def write(db):
            row = db.execute("SELECT version FROM calls WHERE id = ?", (record.id,)).fetchone()
            found = row[0] if row else 0
            if expected_version is not None and expected_version != found:
                raise VersionConflict(record.id, expected_version, found)
            db.execute(
                "INSERT INTO calls (id, wacid, direction, user, state, owner, lease_until, created_at, "
                "updated_at, data, version) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                "wacid=excluded.wacid, direction=excluded.direction, user=excluded.user, "
                "state=excluded.state, owner=excluded.owner, lease_until=excluded.lease_until, "
                "updated_at=excluded.updated_at, data=excluded.data, version=excluded.version",
                (record.id, record.wacid, record.direction, record.user, record.state, record.owner,
                 record.lease_until, record.created_at, record.updated_at, data, found + 1))
            return found + 1

        version = self._transaction(write)
        return replace(record, data=json.loads(data), version=version)

    _CALL_COLUMNS = ("id, wacid, direction, user, state, owner, lease_until, created_at, updated_at, "
                     "data, version")

    @staticmethod
    def _record(row):
        (id_, wacid, direction, user, state, owner, lease_until, created_at, updated_at, data,
         version) = row
        return CallRecord(id=id_, wacid=wacid, direction=direction, user=user, state=state, owner=owner,
                          lease_until=lease_until, created_at=created_at, updated_at=updated_at,
                          data=json.loads(data), version=version)

    def _calls(self, where: str, args: tuple = (), tail: str = "") -> list:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._CALL_COLUMNS} FROM calls {where} {tail}", args).fetchall()
        return [self._record(r) for r in rows]

    async def get_call(self, call_id: str):
        found = self._calls("WHERE id = ?", (call_id,))
        return found[0] if found else None

    async def call_by_wacid(self, wacid: str):
        found = self._calls("WHERE wacid = ?", (wacid,))
        return found[0] if found else None

    async def live_calls(self, owner: str | None = None) -> list:
        if owner is None:
            return self._calls("WHERE state != 'ended'", (), "ORDER BY created_at, id")
        return self._calls("WHERE state != 'ended' AND owner = ?", (owner,), "ORDER BY created_at, id")

    async def recent_calls(self, limit: int = 50) -> list:
        return self._calls("", (), f"ORDER BY created_at DESC, id DESC LIMIT {int(limit):d}")

    async def forget_calls(self, *, ended_before: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM calls WHERE state = 'ended' AND updated_at < ?",
                                    (ended_before,)).rowcount

    # -- versioned documents ---------------------------------------------------------------

    async def load(self, key: str) -> tuple[dict[str, Any] | None, int]:
        with self._lock:
            row = self._db.execute("SELECT document, version FROM documents WHERE key = ?", (key,)).fetchone()
        return (None, 0) if row is None else (json.loads(row[0]), row[1])

    async def save(self, key: str, document: Mapping[str, Any], *, expected_version: int) -> int:
        text = json.dumps(dict(document), separators=(",", ":"), allow_nan=False)
        with self._lock:
            if expected_version == 0:
                cursor = self._db.execute(
                    "INSERT INTO documents (key, document, version) VALUES (?, ?, 1) "
                    "ON CONFLICT(key) DO NOTHING", (key, text))
            else:
                cursor = self._db.execute(
                    "UPDATE documents SET document = ?, version = version + 1 WHERE key = ? AND version = ?",
                    (text, key, expected_version))
            if cursor.rowcount == 1:
                return expected_version + 1
            row = self._db.execute("SELECT version FROM documents WHERE key = ?", (key,)).fetchone()
        raise VersionConflict(key, expected_version, row[0] if row else 0)

    # -- webhook de-duplication ------------------------------------------------------------

    async def first_time(self, key: str, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        horizon = now - self.dedupe_window_s

        def check(db):
            db.execute("DELETE FROM seen WHERE at <= ?", (horizon,))
            inserted = db.execute("INSERT INTO seen (key, at) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                                  (key, now)).rowcount
            return inserted == 1

        return self._transaction(check)

    async def seen(self, key: str, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute("SELECT at FROM seen WHERE key = ?", (key,)).fetchone()
        return row is not None and now - row[0] < self.dedupe_window_s

    async def remember(self, key: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE at <= ?", (now - self.dedupe_window_s,))
            self._db.execute("INSERT INTO seen (key, at) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET at = "
                             "excluded.at", (key, now))

    # -- event log -------------------------------------------------------------------------

    async def append(self, event_id: str, type: str, data: Mapping[str, Any], *,
                     call_id: str | None = None, created_at: float | None = None):
        text = json.dumps(dict(data), separators=(",", ":"), allow_nan=False)
        at = time.time() if created_at is None else created_at
        with self._lock:
            seq = self._db.execute(
                "INSERT INTO events (id, type, call_id, data, created_at) VALUES (?, ?, ?, ?, ?)",
                (event_id, type, call_id, text, at)).lastrowid
        return LoggedEvent(seq, event_id, type, call_id, json.loads(text), at)

    async def after(self, seq: int, limit: int = 100) -> list:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id, type, call_id, data, created_at FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit)).fetchall()
        return [LoggedEvent(s, i, t, c, json.loads(d), a) for s, i, t, c, d, a in rows]

    async def trim(self, keep: int) -> int:
        with self._lock:
            return self._db.execute(
                "DELETE FROM events WHERE seq <= (SELECT COALESCE(MAX(seq), 0) FROM events) - ?",
                (int(keep),)).rowcount

    async def position(self, event_id: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM events WHERE id = ?", (event_id,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _open(path: Path, migrations: dict[int, str], latest: int) -> sqlite3.Connection:
    """One connection to ``path`` (created 0600 first: SQLite gives the -wal and -shm
    files the database file's permissions), WAL, migrated to ``latest``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        _apply_migrations(db, path, migrations, latest)
    except BaseException:
        db.close()
        raise
    return db


def _apply_migrations(db: sqlite3.Connection, path: Path, migrations: dict[int, str], latest: int) -> None:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > latest:
        raise StoreSchemaError(
            f"{path}: schema version {version} is newer than this wacall ({latest}); "
            "upgrade wacall or use another data directory")
    for target in range(version + 1, latest + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in migrations[target].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {target:d}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
