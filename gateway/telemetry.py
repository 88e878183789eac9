"""Turns call timeline entries into metrics and outgoing events.

Subscribed to the :class:`~gateway.calls.CallManager`; the manager knows nothing about
Prometheus or event consumers. Every timeline entry becomes an event ``call.<name>``
(``call.ringing``, ``call.media_connected``, …); ``call.ended`` carries the whole call
summary: end reason, provider error, durations and media statistics.
"""

from __future__ import annotations

from .domain import events as ev
from .calls import CallManager, LiveCall as Call, TimelineEntry
from .eventbus import EventFanout
from .events import Direction
from .metrics import Metrics


class CallTelemetry:
    """Metrics from the typed call events; every event out as ``call.<name>`` JSON."""

    def __init__(self, manager: CallManager, metrics: Metrics, events: EventFanout):
        self.manager = manager
        self.metrics = metrics
        self.events = events

    def __call__(self, call: Call, entry: TimelineEntry) -> None:
        event = entry.event
        direction = call.direction.value
        if event is not None and event.state is not None:
            self.metrics.call_state(direction, event.state)
        self.metrics.set_live_calls(len(self.manager.live_calls))
        if isinstance(event, ev.RecordingFailed):
            self.metrics.recording_failed(str((event.error or {}).get("code")))
        elif isinstance(event, ev.CallEnded):
            self.metrics.call_ended(direction, event.reason or None, *setup_and_ring(call))
            if call.error is not None:
                self.metrics.provider_error(call.error.code)
            self.metrics.media(call.media_stats)
        # The edge: the public name and JSON, as documented.
        self.events.publish(f"call.{entry.name}",
                            {"state": call.state.value, "entry": entry.as_dict(), "call": call.summary()},
                            call_id=call.id)

    def recovered(self, call: dict, entry: dict) -> None:  # (its timings are not known here)
        """A call a previous process left live was finished at startup: its ``call.ended``."""
        self.metrics.call_ended(str(call.get("direction")), str(entry.get("reason")), None)
        self.events.publish("call.ended", {"state": "ended", "entry": entry, "call": call}, call_id=call.get("id"))


def setup_and_ring(call: Call) -> tuple[float | None, float | None]:
    """A call's setup and ring time, seconds (``None``: it did not get that far).

    Business-initiated: setup runs from the dial (creation, or the permission grant of a
    call that waited for one) to the provider's SDP answer; ring time from ``ringing`` to
    ``accepted``. User-initiated: setup runs from the connect webhook to media connected
    (the user is not ringing: they called)."""
    at = call.elapsed_until
    if call.direction is Direction.BUSINESS_INITIATED:
        answered = at(ev.AnswerReceived.name)
        start = at(ev.PermissionGranted.name) or 0.0
        setup = answered - start if answered is not None and answered >= start else None
        ringing, accepted = at(ev.Ringing.name), at(ev.Accepted.name)
        ring = accepted - ringing if ringing is not None and accepted is not None else None
        return setup, ring
    return at(ev.MediaConnected.name), None
