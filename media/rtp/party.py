"""A plain-RTP party on a call's media, driven by commands: what a SIP leg needs.

:class:`RtpParty` wraps an :class:`~media.rtp.bridge.RtpBridge` and the call's peer behind
a handful of awaitable commands — the same ones whether the media runs in this process
(:meth:`media.session.LocalMediaSession.open_rtp`) or in a media worker
(:class:`media.pool.RemoteRtpParty` sends them over the worker's socket)::

    party = await media.open_rtp(host="10.0.0.5", port_range=(40000, 40999), codecs=("PCMU",))
    offer = await party.offer()                 # we call the PBX …
    codec = await party.answer(sip_answer)      # … and it answered
    # (or: answer = await party.accept(sip_offer) when the PBX called us)
    await party.join(call_id)                   # audio flows both ways from now on
    await party.receive_dtmf("5")               # a SIP INFO digit, on to WhatsApp
    reason = await party.closed                 # "rtp timeout", "call media ended (…)"
    await party.stop("sip bye")
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .bridge import RtpBridge

if TYPE_CHECKING:  # pragma: no cover
    from ..dtmf import DtmfEvent
    from ..peer import MediaPeer

__all__ = ["COMMANDS", "RtpParty"]

#: The commands a party takes (what a media worker forwards, nothing else).
COMMANDS = ("offer", "accept", "answer", "join", "send_dtmf", "receive_dtmf", "get_stats", "stop")


class RtpParty:
    """See the module docstring. ``closed`` resolves with the reason the RTP side ended;
    ``ended_by`` is ``"rtp"`` (it went silent) or ``"local"``."""

    def __init__(self, bridge: RtpBridge, peer: MediaPeer) -> None:
        self.bridge = bridge
        self.peer = peer

    @classmethod
    async def open(cls, peer: MediaPeer, **options: Any) -> RtpParty:
        """A party with its RTP port bound (``options``: :class:`RtpBridge`'s)."""
        bridge = RtpBridge(**options)
        await bridge.open()
        return cls(bridge, peer)

    @property
    def closed(self) -> asyncio.Future[str]:
        return self.bridge.closed

    @property
    def ended_by(self) -> str | None:
        return self.bridge.ended_by

    @property
    def playback(self):  # (a media worker reports "its last audio played" by it)
        return self.bridge.playback

    async def offer(self) -> str:
        """Our SDP offer (we call the SIP side)."""
        return self.bridge.create_offer()

    async def accept(self, offer: str) -> str:
        """Our SDP answer to the SIP side's offer (it called us, or a re-INVITE)."""
        return self.bridge.accept_offer(offer)

    async def answer(self, answer: str) -> str:
        """Apply the SIP side's answer; returns the codec chosen (``"PCMU"``, ``"opus"`` …)."""
        return self.bridge.set_remote_answer(answer).codec.name

    async def join(self, call_id: str) -> None:
        """Connect the RTP side to the call's audio (both ways)."""
        await self.bridge.start(self.peer, call_id=call_id)

    async def send_dtmf(self, digits: str, duration_ms: int = 160) -> None:
        """RFC 4733 digits toward the SIP side."""
        await self.bridge.send_dtmf(digits, duration_ms)

    async def receive_dtmf(self, digit: str, duration_ms: int = 160) -> None:
        """A digit the SIP side sent out of band (SIP INFO): on to WhatsApp."""
        self.bridge.receive_dtmf(digit, duration_ms)

    def on_dtmf(self, callback: Callable[[DtmfEvent], None]) -> Callable[[], None]:
        """WhatsApp's digits (in-process only: for SIP INFO when telephone-event is off)."""
        return self.bridge.on_dtmf(callback)

    @property
    def dtmf_negotiated(self) -> bool:
        """The SIP side negotiated telephone-event (digits go as RFC 4733)."""
        return self.bridge.dtmf_negotiated

    async def get_stats(self) -> dict:
        return self.bridge.stats

    async def stop(self, reason: str = "hung up") -> str:
        return await self.bridge.stop(reason)
