"""FFmpeg threading for 20 ms audio: one thread, the caller's.

FFmpeg sizes every *automatic* thread pool from ``av_cpu_count()``. wacall sets an
explicit ``thread_count = 1`` on every codec context it opens, but PyAV also builds
objects whose thread count cannot be set from Python: each ``AudioCodecContext`` used
for encoding gets a private ``AudioResampler`` (a libavfilter graph, to cut frames to
the encoder's frame size), and every ``av.AudioResampler`` is a filter graph too. A
graph's slice-thread pool starts one worker thread per core (2 on a 2-core box, 64 on
a 64-core one) that live as long as the graph: one Opus encoder per call was two
idle native threads per call. For 20 ms audio frames a thread pool costs more than it
saves, so :func:`limit_threads` makes FFmpeg's automatic count 1 for the whole process
(``av_cpu_force_count(1)``, public libavutil API reached through ctypes on the libavutil
PyAV loaded). Nothing in wacall decodes video; a host process that embeds wacall and
wants threaded video decoding should set ``thread_count`` on those contexts explicitly.

Importing :mod:`media` applies it; :func:`threads_limited` says whether it worked.
"""

from __future__ import annotations

import ctypes
import logging
import os

import av  # noqa: F401  (loads libavutil into the process)

__all__ = ["limit_threads", "loaded_library", "threads_limited"]

log = logging.getLogger(__name__)

_state: dict[str, object] = {"limited": False, "reason": "not tried"}


def loaded_library(stem: str) -> str | None:
    """Path of the shared library named ``stem`` (``"libavutil"``, ``"libopus"``) this
    process loaded: PyAV's bundled copy or the system's; ``None`` if none is mapped."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                name = os.path.basename(path)
                if path.startswith("/") and (name.startswith(stem + "-") or name.startswith(stem + ".")):
                    return path
    except OSError:
        return None
    return None


def limit_threads() -> bool:
    """Make FFmpeg's automatic thread count 1 (idempotent); ``False`` if libavutil could
    not be reached (then each filter graph keeps its own pool; logged once)."""
    if _state["limited"]:
        return True
    path = loaded_library("libavutil")
    if path is None:
        _state["reason"] = "libavutil not found in /proc/self/maps"
    else:
        try:
            lib = ctypes.CDLL(path)
            lib.av_cpu_force_count.argtypes = [ctypes.c_int]
            lib.av_cpu_force_count.restype = None
            lib.av_cpu_count.restype = ctypes.c_int
            lib.av_cpu_force_count(1)
            if lib.av_cpu_count() == 1:
                _state.update(limited=True, reason=path)
                return True
            _state["reason"] = f"av_cpu_force_count(1) had no effect in {path}"
        except (OSError, AttributeError) as exc:
            _state["reason"] = f"{path}: {exc}"
    log.warning("cannot limit FFmpeg's threads (%s): each resampler and encoder "
                "keeps a thread pool of its own", _state["reason"])
    return False


def threads_limited() -> tuple[bool, str]:
    """``(limited, where or why not)``."""
    return bool(_state["limited"]), str(_state["reason"])
