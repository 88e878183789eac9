"""Inbound RTP tap: the far side's Opus payloads and their arrival times, before aiortc
decodes them.

:class:`RtpTap` observes the receiver's hook (:func:`media.aiortc_hooks.receiver_hook`,
on the receiver instance: the class and other peers are untouched) and sees every routed
RTP packet first. For each RTP packet of the negotiated Opus payload type it

* calls the registered listeners with an :class:`RtpArrival` (payload bytes, the RTP
  timestamp mapped to the stream timeline like aiortc's decoder does, arrival time on
  the event loop's clock): an Ogg recorder stores those payloads as they are, without
  decoding and re-encoding;
* once someone asked (:meth:`want_arrivals`: a stereo recording), remembers the
  arrival times of the last ~2.5 s of packets (:meth:`arrival`), so a recorder can
  place each *decoded* frame at the time its packet arrived rather than when
  aiortc's jitter buffer released it, ~80 ms later (that buffer also holds the last
  packets back until newer ones arrive, e.g. across a pause in sending).

Timestamps are mapped like aiortc's ``TimestampMapper``: the first packet's timestamp
is 0, and wrap-arounds keep counting up, so ``mapped == frame.pts`` of the decoded frame.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

from . import aiortc_hooks
from .rtpseq import Unwrapper
from .sinkset import SinkFault, report

log = logging.getLogger(__name__)

__all__ = ["RtpArrival", "RtpTap"]

#: Arrival times kept for lookup (packets): ~2.5 s of 20 ms packets.
_ARRIVALS_KEPT = 128
#: Later packets consulted to correct an arrival time stamped late (see RtpTap.arrival).
LOOKAHEAD = 10
_FRAME = 960
_FRAME_S = 0.02


@dataclass(slots=True)
class RtpArrival:
    payload: bytes
    #: RTP timestamp on the stream timeline (first packet = 0), 48 kHz units.
    pts: int
    sequence_number: int
    #: ``loop.time()`` when the packet reached the receiver.
    at: float
    marker: int = 0


Listener = Callable[[RtpArrival], None]


class RtpTap:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        #: A listener that raises is removed and reported here (see media.sinkset).
        self.on_fault: Callable[[SinkFault], None] | None = None
        self.label = "peer"
        self._receiver = None
        self._opus_types: dict[int, bool] = {}
        self._origin: int | None = None
        self._timestamps = Unwrapper(32)
        self._times: dict[int, float] = {}
        self._order: collections.deque[int] = collections.deque()
        self._keep_arrivals = False
        self.packets = 0

    @property
    def installed(self) -> bool:
        return self._receiver is not None

    def install(self, receiver) -> None:
        """Start tapping ``receiver`` (an ``RTCRtpReceiver``): an observer of its hook
        (:func:`media.aiortc_hooks.receiver_hook`), which sees every packet before the
        receive path does. Idempotent."""
        if self._receiver is not None:
            return
        aiortc_hooks.receiver_hook(receiver).observers.append(self._on_packet)
        self._receiver = receiver

    def uninstall(self) -> None:
        if self._receiver is not None:
            observers = aiortc_hooks.receiver_hook(self._receiver).observers
            if self._on_packet in observers:
                observers.remove(self._on_packet)
            self._receiver = None

    def release(self) -> None:
        """The call is over: drop listeners and the arrival times (counters stay)."""
        self._listeners = []
        self.on_fault = None
        self._times = {}
        self._order = collections.deque()

    # -- consumers -------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def want_arrivals(self) -> None:
        """Remember arrival times from now on, for :meth:`arrival` (nothing is kept
        until someone needs them: per packet, that bookkeeping is most of a tap's cost)."""
        self._keep_arrivals = True

    def arrival(self, pts: int | None) -> float | None:
        """When the packet with stream timestamp ``pts`` arrived (loop clock), or ``None``.

        Arrival is stamped when the event loop gets to the packet, so a busy loop stamps
        a batch of packets late, all at once. The estimate is therefore the earliest
        time *implied* by this packet and the ones after it that are already known
        (``arrival(pts + k·960) - k·20 ms``, up to :data:`LOOKAHEAD` packets): packets
        processed in a burst are pulled back to their pace, while a real gap in sending
        (every later packet late too) is kept. By the time aiortc decodes a frame, its
        jitter buffer has seen at least the next four packets.
        """
        if pts is None:
            return None
        times = self._times
        at = times.get(pts)
        if at is None:
            return None
        for k in range(1, LOOKAHEAD + 1):
            later = times.get(pts + k * _FRAME)
            if later is not None:
                implied = later - k * _FRAME_S
                if implied < at:
                    at = implied
        return at

    # -- the hook --------------------------------------------------------------------

    def _is_opus(self, payload_type: int) -> bool:
        known = self._opus_types.get(payload_type)
        if known is None:
            codec = aiortc_hooks.receiver_codecs(self._receiver).get(payload_type)
            if codec is None:
                return False  # not negotiated (yet): decide again next time
            known = self._opus_types[payload_type] = codec.name.lower() == "opus"
        return known

    def _on_packet(self, packet, at: float) -> None:
        try:
            if not packet.payload or not self._is_opus(packet.payload_type):
                return
            extended = self._timestamps.extend(packet.timestamp)
            if self._origin is None:
                self._origin = extended
            pts = extended - self._origin
            if pts < 0:
                return  # from before the first packet: too old to matter
            self.packets += 1
            times = self._times
            if self._keep_arrivals and pts not in times:
                times[pts] = at
                order = self._order
                order.append(pts)
                if len(order) > _ARRIVALS_KEPT:
                    times.pop(order.popleft(), None)
            if self._listeners:
                event = RtpArrival(packet.payload, pts, packet.sequence_number, at, packet.marker)
                for listener in tuple(self._listeners):
                    try:
                        listener(event)
                    except Exception as exc:  # noqa: BLE001 - never into the receive path
                        self.remove_listener(listener)
                        report(SinkFault(listener, exc, "rtp"), self.label, self.on_fault)
        except Exception:  # a tap must never break the receive path
            log.exception("RTP tap failed")
