"""ICE settings aiortc does not expose: which local addresses host candidates use.

aioice gathers a host candidate on every non-loopback interface. A gateway often wants
fewer (one public interface) and tests want exactly ``127.0.0.1``. aioice looks the
addresses up through one module function, so we wrap it once and let each peer choose
its addresses through a context variable that is set around its own gathering (aiortc
gathers in tasks created inside ``setLocalDescription``, which inherit the context).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import aioice.ice

_HOST_ADDRESSES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "wacall_host_addresses", default=None
)
_original_get_host_addresses = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    chosen = _HOST_ADDRESSES.get()
    if chosen is None:
        return _original_get_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


def _install() -> None:
    if aioice.ice.get_host_addresses is not _get_host_addresses:
        aioice.ice.get_host_addresses = _get_host_addresses


@contextlib.contextmanager
def host_addresses(addresses: Sequence[str] | None) -> Iterator[None]:
    """Within this block, ICE gathering uses exactly ``addresses`` for host candidates
    (``None``: every interface, aioice's default)."""
    _install()
    token = _HOST_ADDRESSES.set(tuple(addresses) if addresses is not None else None)
    try:
        yield
    finally:
        _HOST_ADDRESSES.reset(token)
