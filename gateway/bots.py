"""Voice bots on calls: which bot, how to reach it, and its life tied to the call's.

A :class:`BotSpec` — the bot's *leg spec* (see :mod:`gateway.calls.legs`: it becomes a
:class:`~gateway.calls.legs.BotLeg` once the user answers), parsed once from ``POST /v1/calls``
``"bot": {...}`` or the inbound policy — names
the protocol (``twilio`` Media Streams, raw ``pcm`` over WebSocket, Asterisk
``audiosocket`` over TCP), the bot's URL and the custom parameters it receives in its
start message. Before a call is placed (or an inbound call accepted) the bot is probed:
a bot that cannot be reached means no call, with a clear reason. The bridge itself starts
once the user picked up and media is up, so the bot's greeting is heard from its first
word; the bot hanging up ends the WhatsApp call, the user hanging up stops the bot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from media.bridges import PROTOCOLS, BridgeUnavailable, make_bridge

__all__ = ["BotPolicy", "BotSpec", "BotTargetRefused", "BridgeUnavailable", "probe"]


class BotTargetRefused(ValueError):
    """The bot's address is not one wacall may connect to (``WACALL_BOT_ALLOW``)."""


#: Never a bot, unless listed in ``WACALL_BOT_ALLOW``: link-local addresses, where cloud
#: metadata services live (169.254.169.254, fd00:ec2::254).
_LINK_LOCAL = [ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
               ipaddress.ip_network("fd00:ec2::254/128")]


@dataclass(frozen=True, slots=True)
class BotPolicy:
    """Where bots (and later SIP targets) may be: an allow-list of networks and host
    names, or, without one, anywhere but link-local/metadata addresses and this gateway's
    own HTTP port. Checked on the resolved addresses before any connection, so a refused
    target reveals nothing about what listens there."""

    allow: tuple[str, ...] = ()
    own_port: int | None = None

    @classmethod
    def parse(cls, entries: list[str] | tuple[str, ...], own_port: int | None = None) -> BotPolicy:
        for entry in entries:
            if not _is_network(entry) and not _HOST.fullmatch(entry):
                raise ValueError(f"not a network (CIDR) or a host name: {entry!r}")
        return cls(tuple(e.lower() for e in entries), own_port)

    async def check(self, host: str, port: int) -> None:
        """Raise :class:`BotTargetRefused` unless ``host:port`` may be connected to."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return  # (it cannot be reached either: the probe says so)
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
        if self.allow:
            if host.lower() in self.allow:
                return
            networks = [ipaddress.ip_network(e, strict=False) for e in self.allow if _is_network(e)]
            if addresses and all(any(a in n for n in networks) for a in addresses):
                return
            raise BotTargetRefused("the bot's address is not in WACALL_BOT_ALLOW")
        if any(a in n for a in addresses for n in _LINK_LOCAL):
            raise BotTargetRefused("the bot's address is link-local (cloud metadata); list it in WACALL_BOT_ALLOW")
        if self.own_port is not None and port == self.own_port and any(
                a.is_loopback or a.is_unspecified for a in addresses):
            raise BotTargetRefused("the bot's address is this gateway itself")


_HOST = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True

_OPTIONS = {"idle_timeout_s", "connect_timeout_s", "sample_rate", "frame_ms", "account_sid"}


@dataclass(slots=True)
class BotSpec:
    """A voice bot's leg spec (:class:`gateway.calls.legs.LegSpec`)."""

    kind: ClassVar[str] = "bot"
    protocol: str
    url: str
    parameters: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "url": self.url, "parameters": dict(self.parameters), **self.options}

    @classmethod
    def from_dict(cls, data: Any) -> BotSpec:
        if not isinstance(data, dict):
            raise ValueError("bot must be an object: {'protocol', 'url', 'parameters'?}")
        unknown = sorted(set(data) - {"protocol", "url", "parameters"} - _OPTIONS)
        if unknown:
            raise ValueError(f"unknown bot fields: {', '.join(unknown)}")
        protocol = data.get("protocol", "twilio")
        if protocol not in PROTOCOLS:
            raise ValueError(f"bot.protocol must be one of {', '.join(PROTOCOLS)}")
        url = data.get("url")
        if not isinstance(url, str) or not url:
            raise ValueError("bot.url is required")
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError("bot.parameters must be an object")
        if len(url) > 2048 or not url.isprintable():
            raise ValueError("bot.url must be at most 2048 printable characters")
        spec = cls(protocol, url, {str(k): str(v) for k, v in parameters.items()},
                   {k: data[k] for k in _OPTIONS if k in data})
        try:
            host, port = spec.target()
        except ValueError:
            raise ValueError("bot.url has a bad port (1-65535)") from None
        if not host or not (_HOST.fullmatch(host) or _is_network(host)) or not 0 < port < 65536:
            raise ValueError("bot.url needs a host name or address and a port from 1 to 65535")
        spec.bridge()  # validates the URL and options now, not when the user answers
        return spec

    def bridge(self):
        try:
            return make_bridge(self.protocol, self.url, **self.options)
        except TypeError as exc:
            raise ValueError(f"bot option not valid for {self.protocol}: {exc}") from None

    def target(self) -> tuple[str, int]:
        parts = urlsplit(self.url if "://" in self.url else f"tcp://{self.url}")
        default = 443 if parts.scheme in ("wss", "https") else 80
        return parts.hostname or "", parts.port if parts.port is not None else default


async def probe(spec: BotSpec, timeout: float = 3.0, policy: BotPolicy | None = None) -> None:
    """May wacall connect to the bot (``policy``: :class:`BotTargetRefused`), and is its
    host accepting connections (:class:`BridgeUnavailable`)?"""
    host, port = spec.target()
    if policy is not None:
        await policy.check(host, port)
    shown = spec.url.split("?", 1)[0]
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        raise BridgeUnavailable(shown, f"no answer within {timeout:g} s") from None
    except OSError as exc:
        raise BridgeUnavailable(shown, exc.strerror or str(exc)) from None
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
