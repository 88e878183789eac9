"""Free space in the data dir as an operating state, not a crash.

Recordings are the only thing wacall writes at the rate of calls (about 0.3 MB per
recorded call-second: user.wav, stereo.wav and user.ogg). Below ``min_free_mb`` the
gateway stops *starting* recordings: ``/readyz`` answers 503 with the reason, a call
that asks for recording is refused with :class:`LowDiskError` (HTTP 507), inbound calls
follow the inbound recording policy (answered unrecorded, or rejected when recording is
required), and ``wacall_data_free_bytes`` shows the space. Recordings already running
stop cleanly if the disk does fill (see :mod:`media.sinks.recorder`).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["DiskGuard", "LowDiskError", "RECORDING_MB_PER_MINUTE", "default_min_free_mb"]

#: What one recorded call writes per minute (48 kHz: user.wav 5.8 MB, stereo.wav 11.5 MB,
#: user.ogg ~0.2 MB).
RECORDING_MB_PER_MINUTE = 17.5
#: The default reserve: this many minutes of recording with every call slot recording.
RESERVE_MINUTES = 2
#: The default reserve of a sandbox (demo, tests): its recordings are tiny and few.
SANDBOX_MIN_FREE_MB = 64


def default_min_free_mb(max_calls: int, *, sandbox: bool = False) -> int:
    """``WACALL_MIN_FREE_MB`` when unset: two minutes of recording at capacity
    (3,500 MB for 100 calls), or 64 MB for a sandbox."""
    if sandbox:
        return SANDBOX_MIN_FREE_MB
    return math.ceil(max(1, max_calls) * RECORDING_MB_PER_MINUTE * RESERVE_MINUTES)


class LowDiskError(RuntimeError):
    """Not enough free space in the data dir to start a recording."""

    code = "insufficient_storage"

    def __init__(self, free_bytes: int | None, min_free_bytes: int, path: Path) -> None:
        free = "unknown" if free_bytes is None else f"{free_bytes / 1e6:.0f} MB"
        self.message = (f"only {free} free in the data dir, below the {min_free_bytes / 1e6:.0f} MB "
                        "kept for recordings: a recorded call is not started")
        self.resolution = ("free space in the data dir (WACALL_RECORDING_MAX_* retention settings), "
                           "or place the call without recording")
        super().__init__(self.message)
        self.free_bytes, self.min_free_bytes, self.path = free_bytes, min_free_bytes, path


class DiskGuard:
    """Free space of the file system holding ``path``, read at most every ``cache_s``.

    Args:
        path: the data dir (need not exist yet: its nearest existing parent is measured).
        min_free_mb: the reserve; 0 turns the guard off.
    """

    def __init__(self, path: str | os.PathLike[str], min_free_mb: int, *, cache_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.min_free_bytes = max(0, int(min_free_mb)) * 1_000_000
        self.cache_s = cache_s
        self._clock = clock
        self._read_at: float | None = None
        self._free: int | None = None

    def free_bytes(self) -> int | None:
        """Bytes available to this process, or ``None`` if the file system cannot be read."""
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self.cache_s:
            self._read_at = now
            self._free = self._measure()
        return self._free

    def _measure(self) -> int | None:
        path = self.path
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            return shutil.disk_usage(path).free
        except OSError:
            return None

    @property
    def low(self) -> bool:
        if not self.min_free_bytes:
            return False
        free = self.free_bytes()
        return free is not None and free < self.min_free_bytes

    def check_recording(self) -> None:
        """Raise :class:`LowDiskError` when a recording must not start now."""
        if self.low:
            raise LowDiskError(self._free, self.min_free_bytes, self.path)

    def status(self) -> dict:
        free = self.free_bytes()
        return {"free_mb": None if free is None else round(free / 1e6, 1),
                "min_free_mb": round(self.min_free_bytes / 1e6), "low": self.low}
