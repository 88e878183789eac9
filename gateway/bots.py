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
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from media.bridges import PROTOCOLS, BridgeUnavailable, make_bridge

__all__ = ["BotSpec", "BridgeUnavailable", "probe"]

_OPTIONS = {"idle_timeout_s", "connect_timeout_s", "sample_rate", "account_sid"}


@dataclass(slots=True)
class BotSpec:
    protocol: str
    url: str
    parameters: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

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
        spec = cls(protocol, url, {str(k): str(v) for k, v in parameters.items()},
                   {k: data[k] for k in _OPTIONS if k in data})
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
        return parts.hostname or "", parts.port or default


async def probe(spec: BotSpec, timeout: float = 3.0) -> None:
    """Is the bot's host accepting connections? Raises :class:`BridgeUnavailable`."""
    host, port = spec.target()
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
