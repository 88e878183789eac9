"""ICE settings aiortc does not expose, applied per peer while it gathers candidates.

* **host addresses**: aioice gathers a host candidate on every non-loopback interface;
  a gateway often wants one public interface, tests want exactly ``127.0.0.1``;
* **UDP port range**: firewalls open a fixed range for media; aioice binds port 0
  (any port). Inside a range, every UDP socket the ICE agent binds (host candidates
  and the TURN client socket) gets a free port from the range. When the range is full
  on an address, gathering fails with :class:`PortRangeExhausted` (for the TURN socket:
  a warning, and no relay candidate, as aioice does with any TURN failure);
* **gathering bound**: aioice waits up to 5 s for STUN/TURN answers (hard-coded); we
  make it wait ``timeout`` instead, so an unanswering server costs at most that and the
  SDP still comes out, with the candidates that did arrive (at least the host ones).

Usage (this is what :class:`media.peer.MediaPeer` does)::

    with ice.gathering(host_addresses=["10.0.0.5"], port_range=(40000, 40999), timeout=5):
        await pc.setLocalDescription(offer)      # aiortc gathers in here

Everything is keyed on a context variable set by :func:`gathering`. aiortc gathers in
tasks created inside ``setLocalDescription``; tasks copy the current context when they
are created, so a peer's settings follow its own gathering and nobody else's: other
peers, and every other asyncio user, see aioice's and asyncio's normal behaviour.

aioice internals this relies on (aioice 0.13; ``tests/test_ice.py`` checks each one and
fails loudly if an upgrade changes them, and :func:`check_host_ports` re-checks every
SDP gathered under a port range):

1. ``aioice.ice.Connection.gather_candidates`` looks host addresses up by calling the
   module global ``aioice.ice.get_host_addresses(use_ipv4=..., use_ipv6=...)``; we
   replace that global with a wrapper.
2. ``aioice.ice`` and ``aioice.turn`` get the loop with ``asyncio.get_running_loop()``
   through their module global ``asyncio``, then bind with
   ``loop.create_datagram_endpoint``: host candidates with ``local_addr=(address, 0)``
   (``Connection.get_component_candidates``), the TURN/UDP client with
   ``remote_addr=server`` and no ``local_addr`` (``turn.create_turn_endpoint``). While
   a port range is active in the current context, that ``asyncio`` global (a view that
   forwards every other name to the real module) returns a loop proxy whose
   ``create_datagram_endpoint`` binds a port from the range instead of port 0. The
   view is installed on first use of a port range only.
3. ``Connection.gather_candidates`` calls ``self.get_component_candidates(component=...,
   addresses=...)`` without ``timeout``, a parameter that bounds the wait for STUN/TURN
   answers (default 5 s); we wrap the method to pass our timeout.

TURN over TCP/TLS (``create_connection``) is a TCP socket and is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import inspect
import logging
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
import aioice.turn

__all__ = [
    "PortRangeError",
    "PortRangeExhausted",
    "PortRangeNotEnforced",
    "check_host_ports",
    "gathering",
    "host_addresses",
    "validate_port_range",
]

log = logging.getLogger(__name__)

#: How long past its gathering timeout a caller should let ``setLocalDescription`` run
#: before giving up on it (aioice stops waiting for STUN/TURN at the timeout itself).
GATHER_GRACE_S = 1.0


class PortRangeError(RuntimeError):
    """The UDP port range could not be honoured."""


class PortRangeExhausted(PortRangeError):
    """Every port of the configured range is in use on the address to bind."""

    def __init__(self, address: str, port_range: tuple[int, int]):
        lo, hi = port_range
        self.address = address
        self.port_range = port_range
        super().__init__(
            f"no free UDP port in the media port range {lo}-{hi} on {address}: "
            f"all {hi - lo + 1} ports are in use (too many concurrent calls for the range?)"
        )


class PortRangeNotEnforced(PortRangeError):
    """Gathering produced a host candidate outside the range: the aioice hooks of this
    module no longer take effect (an aioice upgrade?)."""


@dataclass(slots=True, eq=False)
class _Gathering:
    host_addresses: tuple[str, ...] | None
    port_range: tuple[int, int] | None
    timeout: float | None
    #: Host sockets bound from the range during this gathering (closed if it fails).
    bound: list[asyncio.BaseTransport] = field(default_factory=list)


_STATE: contextvars.ContextVar[_Gathering | None] = contextvars.ContextVar(
    "wacall_ice_gathering", default=None
)


def validate_port_range(port_range: Sequence[int] | None) -> tuple[int, int] | None:
    """``(low, high)`` (inclusive) as a tuple, or ``ValueError`` if it is not a range of
    UDP ports (``1 <= low <= high <= 65535``)."""
    if port_range is None:
        return None
    try:
        lo, hi = (int(p) for p in port_range)
    except (TypeError, ValueError):
        raise ValueError(f"port_range must be (low, high), got {port_range!r}") from None
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"port_range must satisfy 1 <= low <= high <= 65535, got {lo}-{hi}")
    return lo, hi


# -- 1. host addresses -------------------------------------------------------------------

_original_get_host_addresses = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    state = _STATE.get()
    if state is None or state.host_addresses is None:
        return _original_get_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    return [
        a
        for a in state.host_addresses
        if (":" in a and use_ipv6) or (":" not in a and use_ipv4)
    ]


# -- 2. port range -----------------------------------------------------------------------


def _wildcard_for(family: int) -> str:
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


class _RangeLoop:
    """The running loop, except that UDP endpoints bound to port 0 get a port from the
    gathering's range. Everything else is the loop's own attribute."""

    __slots__ = ("_loop", "_state")

    def __init__(self, loop: asyncio.AbstractEventLoop, state: _Gathering):
        self._loop = loop
        self._state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def create_datagram_endpoint(
        self, protocol_factory, local_addr=None, remote_addr=None, **kwargs
    ):
        loop = self._loop
        if kwargs.get("sock") is None:
            turn_client = local_addr is None and remote_addr is not None
            if turn_client:
                # TURN/UDP client: aioice lets the kernel pick address and port; we pick
                # the port, so resolve the server first to know the family to bind.
                infos = await loop.getaddrinfo(
                    remote_addr[0],
                    remote_addr[1],
                    family=kwargs.pop("family", 0),
                    type=socket.SOCK_DGRAM,
                    proto=kwargs.pop("proto", 0),
                    flags=kwargs.pop("flags", 0),
                )
                if not infos:
                    raise OSError(f"getaddrinfo({remote_addr[0]!r}) returned nothing")
                family, _, _, _, sockaddr = infos[0]
                remote_addr = sockaddr[:2]
                local_addr = (_wildcard_for(family), 0)
            if local_addr is not None and local_addr[1] == 0:
                return await self._bind_in_range(
                    protocol_factory, local_addr, remote_addr, kwargs, turn_client
                )
        return await loop.create_datagram_endpoint(
            protocol_factory, local_addr=local_addr, remote_addr=remote_addr, **kwargs
        )

    async def _bind_in_range(
        self, protocol_factory, local_addr, remote_addr, kwargs, turn_client
    ):
        state = self._state
        assert state.port_range is not None
        lo, hi = state.port_range
        size = hi - lo + 1
        # A random start spreads concurrent peers over the range; the kernel is the
        # arbiter (EADDRINUSE), so concurrent binds never share a port.
        start = random.randrange(size)
        for i in range(size):
            port = lo + (start + i) % size
            try:
                transport, protocol = await self._loop.create_datagram_endpoint(
                    protocol_factory,
                    local_addr=(local_addr[0], port, *local_addr[2:]),
                    remote_addr=remote_addr,
                    **kwargs,
                )
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise  # e.g. EADDRNOTAVAIL: aioice skips the address, as without a range
            if not turn_client:
                state.bound.append(transport)
            return transport, protocol
        error = PortRangeExhausted(str(local_addr[0]), (lo, hi))
        if turn_client:
            # aioice drops a failed relay candidate and keeps the others: say why.
            log.warning("TURN client socket: %s; no relay candidate", error)
        else:
            # Gathering fails with this error. Release the host sockets it bound so far:
            # aioice records them only once all of a component's addresses are bound, so
            # the peer's close() would not find them all.
            for transport in state.bound:
                transport.close()
            state.bound.clear()
        raise error


class _AsyncioView:
    """What ``aioice.ice.asyncio`` / ``aioice.turn.asyncio`` become: the real
    :mod:`asyncio` for every name, except that ``get_running_loop()`` returns a
    :class:`_RangeLoop` while a port range is active in the current context."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def get_running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._module.get_running_loop()
        state = _STATE.get()
        if state is None or state.port_range is None:
            return loop
        return _RangeLoop(loop, state)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<wacall port-range view of {self._module!r}>"


#: The aioice modules whose ``asyncio`` global is replaced when a port range is used.
PORT_RANGE_MODULES = (aioice.ice, aioice.turn)


# -- 3. gathering timeout ----------------------------------------------------------------

_original_get_component_candidates = aioice.ice.Connection.get_component_candidates


@functools.wraps(_original_get_component_candidates)
def _get_component_candidates(self, *args, **kwargs):
    state = _STATE.get()
    if (
        state is not None
        and state.timeout is not None
        and "timeout" not in kwargs
        and len(args) < 3
    ):
        kwargs["timeout"] = state.timeout
    return _original_get_component_candidates(self, *args, **kwargs)


# -- installation ------------------------------------------------------------------------


def _check_internals(port_range: bool) -> None:
    """Fail loudly (at first use, not silently during a call) if aioice changed."""
    problems = []
    if not callable(getattr(aioice.ice, "get_host_addresses", None)):
        problems.append("aioice.ice.get_host_addresses is gone")
    if "timeout" not in inspect.signature(_original_get_component_candidates).parameters:
        problems.append("Connection.get_component_candidates has no timeout parameter")
    if port_range:
        for module in PORT_RANGE_MODULES:
            current = getattr(module, "asyncio", None)
            if current is not asyncio and not isinstance(current, _AsyncioView):
                problems.append(f"{module.__name__} no longer uses a module global 'asyncio'")
    if problems:
        raise RuntimeError(
            "media.ice cannot hook this aioice version "
            f"({getattr(aioice, '__version__', '?')}): " + "; ".join(problems)
        )


def _install(port_range: bool) -> None:
    _check_internals(port_range)
    if aioice.ice.get_host_addresses is not _get_host_addresses:
        aioice.ice.get_host_addresses = _get_host_addresses
    if aioice.ice.Connection.get_component_candidates is not _get_component_candidates:
        aioice.ice.Connection.get_component_candidates = _get_component_candidates
    if port_range:
        for module in PORT_RANGE_MODULES:
            if not isinstance(module.asyncio, _AsyncioView):
                module.asyncio = _AsyncioView(asyncio)


@contextlib.contextmanager
def gathering(
    *,
    host_addresses: Sequence[str] | None = None,
    port_range: Sequence[int] | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """Within this block (and the tasks created in it), ICE gathering:

    * uses exactly ``host_addresses`` for host candidates (``None``: every interface,
      aioice's default);
    * binds every UDP socket on a free port in ``port_range`` (inclusive ``(low, high)``;
      ``None``: any port). Raises :class:`PortRangeExhausted` out of the gathering when
      the range is full on a host address (the TURN client only logs a warning and
      gathering goes on without the relay candidate);
    * waits at most ``timeout`` seconds for STUN/TURN answers, then goes on with the
      candidates it has (``None``: aioice's 5 s).
    """
    port_range = validate_port_range(port_range)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    _install(port_range is not None)
    token = _STATE.set(
        _Gathering(
            tuple(host_addresses) if host_addresses is not None else None, port_range, timeout
        )
    )
    try:
        yield
    finally:
        _STATE.reset(token)


@contextlib.contextmanager
def host_addresses(addresses: Sequence[str] | None) -> Iterator[None]:
    """``gathering(host_addresses=addresses)`` (kept for existing callers)."""
    with gathering(host_addresses=addresses):
        yield


def check_host_ports(candidates: Sequence[tuple[str, int]], port_range: Sequence[int]) -> None:
    """Raise :class:`PortRangeNotEnforced` if a host candidate ``(address, port)`` is
    outside ``port_range``: the hooks above did not take effect."""
    lo, hi = validate_port_range(port_range)  # type: ignore[misc]
    outside = sorted({port for _, port in candidates if not lo <= port <= hi})
    if outside:
        raise PortRangeNotEnforced(
            f"host candidate port(s) {', '.join(map(str, outside))} outside the media port "
            f"range {lo}-{hi}: media.ice's aioice hooks did not apply (aioice "
            f"{getattr(aioice, '__version__', '?')})"
        )
