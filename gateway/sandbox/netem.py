"""A bad network between the gateway and a sandbox phone: a UDP impairment relay.

:class:`NetemRelay` sits on the media path of one call and drops, delays (jitter),
reorders and duplicates datagrams, each direction with its own :class:`Impairment` and
its own seeded random generator (the same seed gives the same decisions for the same
packet sequence), and can be switched to a *blackhole* (100 % loss, both directions or
one) for a while.

It works with ICE by address rewriting, like a NAT that both sides are told about:

* the relay binds two UDP sockets on ``host``: the *gateway side* (what the gateway
  believes is the phone) and the *phone side* (what the phone believes is the gateway);
* the SDP going to the phone (:meth:`NetemRelay.sdp_for_phone`) has its candidates
  replaced by the phone side's address, the SDP going to the gateway
  (:meth:`NetemRelay.sdp_for_gateway`) by the gateway side's;
* a datagram arriving on the gateway side is impaired and sent from the phone side to
  the phone (its first candidate, then whoever last sent from there); one arriving on
  the phone side is impaired and sent from the gateway side to the gateway.

Both agents then see only the relay: every STUN check, DTLS record and RTP/RTCP packet
crosses it (rewriting one SDP only is not enough: aiortc's "ICE-lite" phone is a full
agent underneath and would check the gateway directly, bypassing the relay).

In the sandbox, :func:`impaired_phone_factory` gives ``Sandbox.phone_factory`` phones
(:class:`ImpairedPhone`) whose media goes through a relay of their own::

    relays = []
    sandbox.phone_factory = impaired_phone_factory(
        lambda: NetemRelay(to_phone=Impairment(loss=0.05, jitter_ms=40),
                           to_gateway=Impairment(loss=0.05, jitter_ms=40), seed=7),
        on_relay=relays.append)
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

from media.peer import PeerConfig

from .phone import Phone

log = logging.getLogger(__name__)

Address = tuple[str, int]
DIRECTIONS = ("to_phone", "to_gateway")


@dataclass(slots=True)
class Impairment:
    """What happens to each datagram in one direction.

    ``loss``, ``reorder`` and ``duplicate`` are probabilities (0..1). Each datagram that
    is not lost waits ``delay_ms`` plus a uniform random ``0..jitter_ms`` (so jitter
    alone already reorders packets closer than ``jitter_ms``); with probability
    ``reorder`` it waits ``reorder_ms`` more (later ones overtake it); with probability
    ``duplicate`` it is sent twice.
    """

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0
    reorder_ms: float = 50.0
    duplicate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss", "reorder", "duplicate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("delay_ms", "jitter_ms", "reorder_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(slots=True)
class DirectionStats:
    received: int = 0
    #: Dropped by ``loss``.
    dropped: int = 0
    #: Dropped by the blackhole.
    blackholed: int = 0
    reordered: int = 0
    duplicated: int = 0
    #: Datagrams handed to the socket (duplicates count twice).
    sent: int = 0

    @property
    def loss_ratio(self) -> float:
        return (self.dropped + self.blackholed) / self.received if self.received else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "loss_ratio": round(self.loss_ratio, 4)}


class _Direction:
    def __init__(self, name: str, impairment: Impairment, seed: int | str):
        self.name = name
        self.impairment = impairment
        # A string seed is hashed with SHA-512 by random: the same on every run and
        # platform, independent of PYTHONHASHSEED.
        self.rng = random.Random(f"wacall-netem:{seed}:{name}")
        self.stats = DirectionStats()
        self.blackhole_until: float | None = None  # monotonic; math.inf = until restored

    def blackholed(self, now: float) -> bool:
        if self.blackhole_until is None:
            return False
        if now >= self.blackhole_until:
            self.blackhole_until = None
            return False
        return True

    def plan(self, now: float) -> list[float]:
        """Delays (seconds) of the copies of the next datagram to send; ``[]`` drops it."""
        imp = self.impairment
        # Always four draws per datagram: the decisions depend on the seed and on the
        # datagram's position in this direction's sequence only.
        r_loss, r_jitter, r_reorder, r_dup = (self.rng.random() for _ in range(4))
        stats = self.stats
        stats.received += 1
        if self.blackholed(now):
            stats.blackholed += 1
            return []
        if r_loss < imp.loss:
            stats.dropped += 1
            return []
        delay_ms = imp.delay_ms + r_jitter * imp.jitter_ms
        if r_reorder < imp.reorder:
            delay_ms += imp.reorder_ms
            stats.reordered += 1
        copies = 1
        if r_dup < imp.duplicate:
            copies = 2
            stats.duplicated += 1
        return [delay_ms / 1000.0] * copies


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]):
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        log.debug("netem relay: %s", exc)


class NetemRelay:
    """A two-socket UDP relay with per-direction impairments (see the module docstring)."""

    def __init__(
        self,
        *,
        to_phone: Impairment | None = None,
        to_gateway: Impairment | None = None,
        seed: int | str = 0,
        host: str = "127.0.0.1",
    ):
        self.host = host
        self.seed = seed
        self._dirs = {
            "to_phone": _Direction("to_phone", to_phone or Impairment(), seed),
            "to_gateway": _Direction("to_gateway", to_gateway or Impairment(), seed),
        }
        self._gateway_side: _Side | None = None
        self._phone_side: _Side | None = None
        #: Where datagrams for the gateway / the phone go (from the SDP, then learned).
        self.gateway_address: Address | None = None
        self.phone_address: Address | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False
        self.started = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> NetemRelay:
        if self.started:
            return self
        loop = asyncio.get_running_loop()
        _, self._gateway_side = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_gateway), local_addr=(self.host, 0))
        _, self._phone_side = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_phone), local_addr=(self.host, 0))
        self.started = True
        log.debug("netem relay: gateway side %s, phone side %s", self.gateway_side_address,
                  self.phone_side_address)
        return self

    def close(self) -> None:
        """Stop relaying; pending delayed datagrams are dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for side in (self._gateway_side, self._phone_side):
            if side is not None and side.transport is not None:
                side.transport.close()

    async def __aenter__(self) -> NetemRelay:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        self.close()

    @property
    def gateway_side_address(self) -> Address:
        """The address the gateway sends the phone's media to."""
        return self._sockname(self._gateway_side)

    @property
    def phone_side_address(self) -> Address:
        """The address the phone sends the gateway's media to."""
        return self._sockname(self._phone_side)

    @staticmethod
    def _sockname(side: _Side | None) -> Address:
        if side is None or side.transport is None:
            raise RuntimeError("the relay is not started")
        name = side.transport.get_extra_info("sockname")
        return name[0], name[1]

    # -- control -----------------------------------------------------------------------

    def impairment(self, direction: str) -> Impairment:
        return self._dirs[direction].impairment

    def set_impairment(self, *, to_phone: Impairment | None = None,
                       to_gateway: Impairment | None = None) -> None:
        """Change the impairments from the next datagram on (random state continues)."""
        if to_phone is not None:
            self._dirs["to_phone"].impairment = to_phone
        if to_gateway is not None:
            self._dirs["to_gateway"].impairment = to_gateway

    def blackhole(self, seconds: float | None = None, *, direction: str = "both") -> None:
        """Drop everything (``direction``: ``both``, ``to_phone`` or ``to_gateway``) for
        ``seconds`` from now, or until :meth:`restore` when ``None``."""
        until = math.inf if seconds is None else time.monotonic() + seconds
        for name in self._names(direction):
            self._dirs[name].blackhole_until = until

    def restore(self, *, direction: str = "both") -> None:
        """End a blackhole now."""
        for name in self._names(direction):
            self._dirs[name].blackhole_until = None

    def blackholed(self, direction: str = "both") -> bool:
        now = time.monotonic()
        return all(self._dirs[name].blackholed(now) for name in self._names(direction))

    @staticmethod
    def _names(direction: str) -> tuple[str, ...]:
        if direction == "both":
            return DIRECTIONS
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be both, to_phone or to_gateway, got {direction!r}")
        return (direction,)

    def stats(self) -> dict[str, DirectionStats]:
        return {name: d.stats for name, d in self._dirs.items()}

    # -- SDP ---------------------------------------------------------------------------

    def sdp_for_phone(self, sdp: str) -> str:
        """An SDP written by the gateway, as the phone must get it: the gateway's first
        UDP candidate is remembered as where its media goes, and the phone is told the
        gateway is at the relay's phone side."""
        rewritten, first = point_candidates_at(sdp, *self.phone_side_address)
        self.gateway_address = self.gateway_address or first
        return rewritten

    def sdp_for_gateway(self, sdp: str) -> str:
        """An SDP written by the phone, as the gateway must get it (the mirror image)."""
        rewritten, first = point_candidates_at(sdp, *self.gateway_side_address)
        self.phone_address = self.phone_address or first
        return rewritten

    # -- relaying ----------------------------------------------------------------------

    def _from_gateway(self, data: bytes, addr: Address) -> None:
        self.gateway_address = addr
        self._relay("to_phone", data, self._phone_side, self.phone_address)

    def _from_phone(self, data: bytes, addr: Address) -> None:
        self.phone_address = addr
        self._relay("to_gateway", data, self._gateway_side, self.gateway_address)

    def _relay(self, direction: str, data: bytes, out: _Side | None, dest: Address | None) -> None:
        if self._closed or out is None or dest is None:
            return
        loop = asyncio.get_running_loop()
        stats = self._dirs[direction].stats
        for delay in self._dirs[direction].plan(time.monotonic()):
            if delay <= 0:
                self._send(out, data, dest, stats)
            else:
                self._send_later(loop, delay, out, data, dest, stats)

    def _send_later(self, loop: asyncio.AbstractEventLoop, delay: float, out: _Side, data: bytes,
                    dest: Address, stats: DirectionStats) -> None:
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self._send(out, data, dest, stats)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _send(self, out: _Side, data: bytes, dest: Address, stats: DirectionStats) -> None:
        if self._closed or out.transport is None or out.transport.is_closing():
            return
        out.transport.sendto(data, dest)
        stats.sent += 1


def point_candidates_at(sdp: str, host: str, port: int) -> tuple[str, Address | None]:
    """Make ``sdp`` advertise one UDP host candidate at ``host:port`` (and ``c=``/``m=``
    to match). Returns the new SDP and the ``(address, port)`` of the first UDP
    candidate it had (``None`` if it had none)."""
    lines = [line for line in sdp.replace("\r\n", "\n").split("\n") if line]
    first: Address | None = None
    out: list[str] = []
    kept = False
    for line in lines:
        if line.startswith("a=candidate:"):
            fields = line[len("a=candidate:"):].split()
            if len(fields) < 8 or fields[2].lower() != "udp" or not fields[5].isdigit():
                continue
            if first is None:
                first = (fields[4], int(fields[5]))
            if kept:
                continue
            fields[4], fields[5], fields[7] = host, str(port), "host"
            # drop raddr/rport of a srflx/relay candidate turned host
            rest = fields[8:]
            cleaned: list[str] = []
            skip = False
            for i, word in enumerate(rest):
                if skip:
                    skip = False
                    continue
                if word in ("raddr", "rport"):
                    skip = True
                    continue
                cleaned.append(word)
            line = "a=candidate:" + " ".join(fields[:8] + cleaned)
            kept = True
        elif line.startswith("a=end-of-candidates"):
            pass
        elif line.startswith("m=audio "):
            parts = line.split(" ")
            parts[1] = str(port)
            line = " ".join(parts)
        elif line.startswith("c=IN "):
            line = f"c=IN {'IP6' if ':' in host else 'IP4'} {host}"
        out.append(line)
    return "\r\n".join(out) + "\r\n", first


class ImpairedPhone(Phone):
    """The sandbox's aiortc :class:`Phone` with its media behind a :class:`NetemRelay`.

    Both SDPs are rewritten (see :class:`NetemRelay`); the relay starts with the first
    SDP and closes when the phone hangs up.
    """

    def __init__(self, peer_config: PeerConfig, *, recording_path, say: str | None = None,
                 relay: NetemRelay):
        super().__init__(peer_config, recording_path=recording_path, say=say)
        self.relay = relay

    async def answer(self, offer: str) -> str:
        await self.relay.start()
        answer = await super().answer(self.relay.sdp_for_phone(offer))
        return self.relay.sdp_for_gateway(answer)

    async def offer(self) -> str:
        await self.relay.start()
        return self.relay.sdp_for_gateway(await super().offer())

    async def apply_answer(self, answer: str) -> None:
        await super().apply_answer(self.relay.sdp_for_phone(answer))

    async def hang_up(self) -> None:
        try:
            await super().hang_up()
        finally:
            self.relay.close()


def impaired_phone_factory(
    make_relay: Callable[[], NetemRelay],
    *,
    on_relay: Callable[[NetemRelay], None] | None = None,
) -> Callable[..., ImpairedPhone]:
    """A ``Sandbox.phone_factory``: each phone gets a relay from ``make_relay()``
    (``on_relay`` sees each one, e.g. to keep them for a test)."""

    def factory(peer_config: PeerConfig, *, recording_path, say: str | None = None) -> ImpairedPhone:
        relay = make_relay()
        if on_relay is not None:
            on_relay(relay)
        return ImpairedPhone(peer_config, recording_path=recording_path, say=say, relay=relay)

    return factory


__all__ = [
    "DirectionStats",
    "Impairment",
    "ImpairedPhone",
    "NetemRelay",
    "impaired_phone_factory",
    "point_candidates_at",
]
