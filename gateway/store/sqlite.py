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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.errors import WacallError

__all__ = ["DEFAULT_FILENAME", "SCHEMA_VERSION", "SQLitePermissionStore", "StoreSchemaError"]

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file with 0600 before SQLite opens it; SQLite gives the -wal
        # and -shm files the same permissions as the database file.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike[str]) -> SQLitePermissionStore:
        """The store at ``<data_dir>/permissions.sqlite3``."""
        return cls(Path(data_dir) / DEFAULT_FILENAME)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreSchemaError(
                f"{self.path}: schema version {version} is newer than this wacall "
                f"({SCHEMA_VERSION}); upgrade wacall or use another data directory")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {target:d}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

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
