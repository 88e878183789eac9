"""Calls: the service that runs them and the parties on them.

* :mod:`.service` — :class:`CallManager`: admission (permission gate, capacity, disk,
  bot probe), placing and answering calls, routing webhooks by WhatsApp call id;
* :mod:`.live` — :class:`LiveCall`: one call's I/O (timers, tasks, legs) around the pure
  state machine of :mod:`gateway.domain.call`;
* :mod:`.legs` — the parties: :class:`~.legs.WhatsAppLeg`, :class:`~.legs.BotLeg`;
* :mod:`.plans` — :class:`InboundPlan`, what the business does with an inbound call.
"""

from ..domain.call import CallState, EndReason, TimelineEntry
from .live import Listener, LiveCall
from .plans import InboundPlan, InboundPolicy
from .service import CallManager, CapacityError

__all__ = [
    "CallManager", "CallState", "CapacityError", "EndReason", "InboundPlan", "InboundPolicy", "Listener",
    "LiveCall", "TimelineEntry",
]
