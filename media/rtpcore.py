"""The lean RTP path's optional C core (``media/_rtpcore.c``), or ``None``.

:data:`core` is the compiled module when the build had a C compiler, else ``None``:
:mod:`media.lean` and :class:`media.aiortc_hooks.FastSrtp` then do the same per-packet
work in Python (slower, same bytes on the wire, same results). ``WACALL_NATIVE_RTP=0``
turns the core off, to compare the two or to rule it out.
"""

from __future__ import annotations

import logging
import os

__all__ = ["core"]

log = logging.getLogger(__name__)

core = None
if os.environ.get("WACALL_NATIVE_RTP", "1").strip().lower() not in ("0", "false", "no", "off"):
    try:
        from . import _rtpcore as core  # type: ignore[no-redef]
    except ImportError as exc:  # built without a C compiler: the Python path
        log.info("media._rtpcore is not built (%s): the lean path runs in Python", exc)
        core = None
