"""Prometheus metrics for one gateway service.

Every :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one), so several services can run in one process (tests)
without sharing or clashing on metric names.

The recording methods take plain strings and numbers, not :mod:`gateway.calls` types;
enum members are accepted too (their ``value`` is used). Label values that come from
outside (webhook kinds, provider error codes) are sanitised and capped per label so a
hostile or buggy peer cannot blow up the number of time series.

Exposed at ``GET /metrics`` via :func:`metrics_handler`::

    app.router.add_get("/metrics", metrics_handler(service.metrics))
"""

from __future__ import annotations

import asyncio
import collections
import enum
import math
import time
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# ``*_created`` series (a timestamp per counter) are noise for a service's dashboards.
disable_created_metrics()

__all__ = [
    "CONTENT_TYPE",
    "Metrics",
    "metrics_handler",
    "SETUP_BUCKETS",
    "JITTER_BUCKETS",
    "ROUND_TRIP_BUCKETS",
]

#: The Prometheus text exposition format that :func:`generate_latest` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ROUTED_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: Call setup (to the provider's answer; see Metrics.call_ended): 10 ms ... 30 s.
SETUP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)
#: A phone ringing until the user picks up: 0.5 s ... 60 s.
RING_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)
#: Interarrival jitter of a call's inbound RTP: 0.5 ms ... 500 ms.
JITTER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5)
#: RTCP round-trip time: 5 ms ... 5 s.
ROUND_TRIP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)

#: Distinct values kept per free-form label before falling back to ``"other"``.
MAX_LABEL_VALUES = 64
_LABEL_OK = re.compile(r"[^A-Za-z0-9_.:-]+")
_MAX_LABEL_LEN = 48


def _label(value: Any) -> str:
    """A label value from a str/enum/number; ``None`` or empty gives ``"unknown"``.

    The value is kept as given (case included) except that characters outside
    ``[A-Za-z0-9_.:-]`` become ``_`` and it is cut to 48 characters.
    """
    if value is None:
        return "unknown"
    if isinstance(value, enum.Enum):
        value = value.value
    text = _LABEL_OK.sub("_", str(value).strip())[:_MAX_LABEL_LEN]
    return text or "unknown"


def _count(value: Any) -> int:
    """A non-negative integer from a stats value; anything unusable gives 0."""
    if value is None or isinstance(value, bool):
        return 0
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return n if n > 0 else 0


def _seconds(value: Any) -> float | None:
    """A finite, non-negative float, or ``None``."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(x) or math.isinf(x) or x < 0:
        return None
    return x


class _Bounded:
    """Remembers the label values seen; past ``limit`` new ones become ``"other"``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES):
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        text = _label(value)
        if text in self.seen:
            return text
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(text)
        return text


class Metrics:
    """The gateway's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            "wacall_calls_total", "Calls that ended, by direction and end reason.",
            ["direction", "end_reason"], registry=r,
        )
        self.call_states = Counter(
            "wacall_call_state_total", "Call state transitions, by direction and new state.",
            ["direction", "state"], registry=r,
        )
        self.live_calls = Gauge("wacall_live_calls", "Calls not yet ended.", registry=r)
        self.call_setup = Histogram(
            "wacall_call_setup_seconds", "Call setup: business-initiated, from the dial (or the permission "
            "grant) to the provider's SDP answer; user-initiated, from the connect webhook to media connected. "
            "The user's ring time is not in it.",
            ["direction"], buckets=SETUP_BUCKETS, registry=r,
        )
        self.call_ring = Histogram(
            "wacall_call_ring_seconds", "Seconds a business-initiated call rang before the user picked up "
            "(answered calls).", ["direction"], buckets=RING_BUCKETS, registry=r,
        )
        self.webhooks = Counter(
            "wacall_webhooks_total", "Provider webhooks received, by event kind and result.",
            ["kind", "result"], registry=r,
        )
        self.provider_errors = Counter(
            "wacall_provider_errors_total", "Errors returned by the calling provider, by code.",
            ["code"], registry=r,
        )
        self.rtp_packets = Counter(
            "wacall_rtp_packets_total", "RTP packets, by direction (sent/received).",
            ["direction"], registry=r,
        )
        self.rtp_bytes = Counter(
            "wacall_rtp_bytes_total", "RTP payload bytes, by direction (sent/received).",
            ["direction"], registry=r,
        )
        self.rtp_lost = Counter(
            "wacall_rtp_packets_lost_total", "Inbound RTP packets lost.", registry=r,
        )
        self.rtp_jitter = Histogram(
            "wacall_rtp_jitter_seconds", "Inbound RTP interarrival jitter per call (at call end).",
            buckets=JITTER_BUCKETS, registry=r,
        )
        self.rtp_round_trip = Histogram(
            "wacall_rtp_round_trip_seconds", "RTCP round-trip time per call (at call end).",
            buckets=ROUND_TRIP_BUCKETS, registry=r,
        )
        self.events_delivered = Counter(
            "wacall_events_delivered_total", "Outgoing event webhook deliveries, by result.",
            ["result"], registry=r,
        )
        self.data_free = Gauge(
            "wacall_data_free_bytes", "Free bytes in the data dir's file system (recordings).",
            registry=r,
        )
        self.data_min_free = Gauge(
            "wacall_data_min_free_bytes", "Below this, recordings are refused and /readyz is 503.",
            registry=r,
        )
        self.recording_failures = Counter(
            "wacall_recording_failures_total", "Recordings stopped early, by code (disk_full...).",
            ["code"], registry=r,
        )
        # the process: CPU seconds, resident memory, open file descriptors (process_*)
        ProcessCollector(registry=r)
        self.loop_lag = Gauge(
            "wacall_event_loop_lag_seconds", "How late the event loop ran a 1 s timer, lately (the "
            "worst of the last 10 readings): what every call's audio waits on.", registry=r,
        )
        self.routed = Histogram(
            "wacall_routed_seconds", "Seconds from another instance forwarding a webhook or command to "
            "this one handling it (several instances on Redis).", buckets=ROUTED_BUCKETS, registry=r,
        )
        # Caps on label values that outsiders can influence.
        self._direction = _Bounded(8)
        self._state = _Bounded(16)
        self._end_reason = _Bounded(32)
        self._kind = _Bounded()
        self._result = _Bounded(16)
        self._code = _Bounded()
        self._delivery = _Bounded(16)
        self._recording_code = _Bounded(8)

    # -- calls ---------------------------------------------------------------------------

    def call_state(self, direction: str, state: str) -> None:
        """A call moved to ``state`` (including ``created`` and ``ended``)."""
        self.call_states.labels(self._direction(direction), self._state(state)).inc()

    def call_ended(self, direction: str, end_reason: str | None, setup_s: float | None,
                   ring_s: float | None = None) -> None:
        """A call ended. ``setup_s``: its setup (see ``wacall_call_setup_seconds``), ``ring_s``:
        how long it rang before being picked up; ``None`` when it never got there."""
        direction = self._direction(direction)
        self.calls.labels(direction, self._end_reason(end_reason)).inc()
        setup = _seconds(setup_s)
        if setup is not None:
            self.call_setup.labels(direction).observe(setup)
        ring = _seconds(ring_s)
        if ring is not None:
            self.call_ring.labels(direction).observe(ring)

    async def watch_loop_lag(self, period_s: float = 1.0) -> None:
        """Measure the event loop's lag forever (run it as a task)."""
        recent: collections.deque[float] = collections.deque(maxlen=10)
        while True:
            before = time.monotonic()
            await asyncio.sleep(period_s)
            recent.append(max(0.0, time.monotonic() - before - period_s))
            self.loop_lag.set(max(recent))

    def routed_seconds(self, seconds: float) -> None:
        self.routed.observe(max(0.0, seconds))

    def set_live_calls(self, n: int) -> None:
        self.live_calls.set(max(0, int(n)))

    def watch_disk(self, free_bytes: Callable[[], int | None], min_free_bytes: int) -> None:
        """Read the data dir's free space at every scrape."""
        self.data_free.set_function(lambda: float(free_bytes() or 0))
        self.data_min_free.set(min_free_bytes)

    def watch_workers(self, pool) -> None:
        """Media worker processes (:class:`media.pool.WorkerPool`), read at every scrape:
        sessions, CPU and memory per worker, running workers, restarts."""
        self.registry.register(_WorkerCollector(pool))

    def recording_failed(self, code: str) -> None:
        self.recording_failures.labels(self._recording_code(code)).inc()

    # -- webhooks and provider -----------------------------------------------------------

    def webhook(self, kind: str | None, result: str) -> None:
        """A provider webhook: ``kind`` connect/status/terminate/permission/unknown...,
        ``result`` ok/duplicate/bad_request/bad_signature/error."""
        self.webhooks.labels(self._kind(kind), self._result(result)).inc()

    def provider_error(self, code: int | str | None) -> None:
        """The provider returned an error; ``None`` counts as code ``"unknown"``."""
        self.provider_errors.labels(self._code(code)).inc()

    def event_delivery(self, result: str) -> None:
        """An outgoing event webhook delivery finished with ``result`` (ok/error/...)."""
        self.events_delivered.labels(self._delivery(result)).inc()

    # -- media ---------------------------------------------------------------------------

    def media(self, stats: Mapping[str, Any] | None) -> None:
        """Add one call's RTP totals (call at call end, once per call).

        Keys (all optional): ``packets_sent``, ``packets_received``, ``bytes_sent``,
        ``bytes_received``, ``packets_lost``, ``jitter_s``, ``round_trip_s``.
        Missing, ``None``, negative or non-numeric values are skipped.
        """
        if not stats:
            return
        for key, counter, direction in (
            ("packets_sent", self.rtp_packets, "sent"),
            ("packets_received", self.rtp_packets, "received"),
            ("bytes_sent", self.rtp_bytes, "sent"),
            ("bytes_received", self.rtp_bytes, "received"),
        ):
            n = _count(stats.get(key))
            if n:
                counter.labels(direction).inc(n)
        lost = _count(stats.get("packets_lost"))
        if lost:
            self.rtp_lost.inc(lost)
        jitter = _seconds(stats.get("jitter_s"))
        if jitter is not None:
            self.rtp_jitter.observe(jitter)
        rtt = _seconds(stats.get("round_trip_s"))
        if rtt is not None:
            self.rtp_round_trip.observe(rtt)

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format: ``(body, content_type)``."""
        return generate_latest(self.registry), CONTENT_TYPE


class _WorkerCollector:
    """``wacall_media_worker_*`` series from the pool, at scrape time."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sessions = GaugeMetricFamily("wacall_media_worker_sessions", "Calls' media sessions per media worker.",
                                     labels=["worker"])
        cpu = CounterMetricFamily("wacall_media_worker_cpu_seconds", "CPU seconds a media worker process used.",
                                  labels=["worker"])
        rss = GaugeMetricFamily("wacall_media_worker_resident_memory_bytes", "A media worker's resident memory.",
                                labels=["worker"])
        for worker in self.pool.workers:
            label = [str(worker.index)]
            sessions.add_metric(label, len(worker.sessions))
            usage = _proc_usage(worker.pid) if worker.alive else None
            if usage is not None:
                cpu.add_metric(label, usage[0])
                rss.add_metric(label, usage[1])
        yield sessions
        yield cpu
        yield rss
        yield GaugeMetricFamily("wacall_media_workers", "Media worker processes running.", value=self.pool.alive)
        yield CounterMetricFamily("wacall_media_worker_restarts", "Media workers started again after one died.",
                                  value=self.pool.restarts)


def _proc_usage(pid: int | None) -> tuple[float, float] | None:
    """(CPU seconds, resident bytes) of a process, from /proc (``None`` elsewhere)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler serving ``metrics`` (mount it at ``GET /metrics``)."""

    async def handle(request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle
