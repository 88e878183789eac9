"""Turns call timeline entries into metrics and outgoing events.

Subscribed to the :class:`~gateway.calls.CallManager`; the manager knows nothing about
Prometheus or event consumers. Every timeline entry becomes an event ``call.<name>``
(``call.ringing``, ``call.media_connected``, …); ``call.ended`` carries the whole call
summary: end reason, provider error, durations and media statistics.
"""

from __future__ import annotations

from .calls import Call, CallState, TimelineEntry
from .manager import CallManager
from .eventbus import EventFanout
from .metrics import Metrics

_STATES = {state.value for state in CallState}


class CallTelemetry:
    def __init__(self, manager: CallManager, metrics: Metrics, events: EventFanout):
        self.manager = manager
        self.metrics = metrics
        self.events = events

    def __call__(self, call: Call, entry: TimelineEntry) -> None:
        direction = call.direction.value
        if entry.name in _STATES:
            self.metrics.call_state(direction, entry.name)
        self.metrics.set_live_calls(len(self.manager.live_calls))
        if entry.name == "recording_failed":
            self.metrics.recording_failed(str((entry.detail.get("error") or {}).get("code")))
        if entry.name == CallState.ENDED.value:
            self.metrics.call_ended(direction, call.end_reason.value if call.end_reason else None,
                                    call.elapsed_until(CallState.MEDIA_CONNECTED.value))
            if call.error is not None:
                self.metrics.provider_error(call.error.code)
            self.metrics.media(call.media_stats)
        self.events.publish(f"call.{entry.name}",
                            {"state": call.state.value, "entry": entry.as_dict(), "call": call.summary()},
                            call_id=call.id)
