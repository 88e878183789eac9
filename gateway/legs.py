"""Legs: the parties a call joins besides the WhatsApp user.

A call has the WhatsApp user's leg (the provider's signalling and a
:class:`~media.session.MediaSession`) and may join it to another party: today a voice
bot (:class:`BotLeg`, over the WebSocket/TCP bridges of :mod:`media.bridges`); next a
SIP/IVR leg, a person in the browser, a speech-to-speech model. Each is described by a
*leg spec*, parsed once at the edge with ``from_dict`` (:class:`gateway.bots.BotSpec`
for bots), and driven through the same small protocol, :class:`Leg`: ``join`` the
user's media, ``hangup``, and ``ended`` (who ended it and why). Moving the user from one
leg to another (transfer) or adding a listener is joining another leg to the same media.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from media.session import LocalMediaSession

__all__ = ["BotLeg", "Leg", "LegEnded"]

#: How long a bot's last words may play after it hung up, before the call ends.
GOODBYE_S = 10.0


@dataclass(frozen=True, slots=True)
class LegEnded:
    """How a leg ended: ``by`` is ``"remote"`` (the party hung up), ``"local"`` (we did)
    or ``"failure"`` (unreachable, broke its protocol, went idle)."""

    by: str
    reason: str


@runtime_checkable
class Leg(Protocol):
    kind: str

    async def join(self, media: LocalMediaSession, *, call_id: str, parameters: dict[str, str]) -> None:
        """Connect this party to the user's media (raises when it cannot be reached)."""
        ...

    async def ended(self) -> LegEnded: ...

    async def hangup(self, reason: str) -> None: ...


class BotLeg:
    """A voice bot on the call (a :class:`~gateway.bots.BotSpec` made live)."""

    kind = "bot"

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.bridge = spec.bridge()

    @property
    def protocol(self) -> str:
        return self.spec.protocol

    async def join(self, media: LocalMediaSession, *, call_id: str, parameters: dict[str, str]) -> None:
        await media.start_bridge(self.bridge, call_id=call_id,
                                 parameters={**parameters, **self.spec.parameters})

    async def ended(self) -> LegEnded:
        """Resolves when the bot's side ends; a bot that hung up first gets its last
        words played (up to :data:`GOODBYE_S`)."""
        bridge = self.bridge
        reason = await bridge.closed
        by = {"bot": "remote", "local": "local"}.get(bridge.ended_by, "failure")
        if by == "remote":
            try:
                await asyncio.wait_for(asyncio.shield(bridge.playback.done), GOODBYE_S)
            except (asyncio.TimeoutError, AttributeError):
                pass
        return LegEnded(by, str(reason))

    async def hangup(self, reason: str) -> None:
        """The user hung up (or we did): the bot gets its stop message."""
        await self.bridge.stop(reason)
