"""What the business side of a call does: the plan for an inbound call.

An :data:`InboundPolicy` looks at an inbound ``connect`` and returns an
:class:`InboundPlan` (answer: play these sources, feed these sinks, record, hand the call
to a bot) or ``None`` (reject). The bot is a leg spec (:class:`gateway.bots.BotSpec`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from media.frames import Sink, Source

from ..events import CallConnect

__all__ = ["InboundPlan", "InboundPolicy"]


@dataclass(slots=True)
class InboundPlan:
    """What to do with an inbound call: play these sources, feed these sinks."""

    sources: list[Source] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    record: bool = False
    #: With ``record``: reject the call rather than answer it unrecorded when
    #: recording cannot start (low disk).
    record_required: bool = False
    biz_opaque_callback_data: str | None = None
    max_duration_s: float | None = None
    #: A voice bot that takes the call (:class:`gateway.bots.BotSpec`).
    bot: Any = None
    #: WhatsApp's own recording / transcription (:class:`gateway.recordings.ProviderRecording`).
    provider_recording: Any = None
    #: A SIP party (IVR, PBX) joined once the caller is answered (:class:`gateway.sip.spec.SipSpec`).
    sip: Any = None


#: Decides about an inbound call: a plan to answer it, or ``None`` to reject it.
InboundPolicy = Callable[[CallConnect], "InboundPlan | None"]
