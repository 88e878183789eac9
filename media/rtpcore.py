"""The lean RTP path's optional C core (``media/_rtpcore.c``), or ``None``.

:data:`core` is the compiled module when the build had a C compiler, else ``None``:
:mod:`media.lean` and :class:`media.aiortc_hooks.FastSrtp` then do the same per-packet
work in Python (slower, same bytes on the wire, same results). ``WACALL_NATIVE_RTP=0``
turns the core off, to compare the two or to rule it out; :func:`enable` switches it for
this process at run time (the benchmarks compare the two, the tests hold both).
Everything that uses it reads ``rtpcore.core`` when it runs, so one switch covers all.
"""

from __future__ import annotations

import logging
import os

__all__ = ["core", "enable"]

log = logging.getLogger(__name__)

core = None
if os.environ.get("WACALL_NATIVE_RTP", "1").strip().lower() not in ("0", "false", "no", "off"):
    try:
        from . import _rtpcore as core  # type: ignore[no-redef]
    except ImportError as exc:  # built without a C compiler: the Python path
        log.info("media._rtpcore is not built (%s): the lean path runs in Python", exc)
        core = None

_built = core


def enable(on: bool = True) -> bool:
    """Switch the C core on (where it was built) or off for this process, from the next
    packet on; returns whether it was on before."""
    global core
    was = core is not None
    core = _built if on else None
    return was
