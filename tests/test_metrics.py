"""gateway.metrics: own registry, labelled counters, histograms, the /metrics handler."""

from __future__ import annotations

import enum

import pytest

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics, metrics_handler


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """All samples as ``{(sample_name, sorted label items): value}``."""
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def families(metrics: Metrics) -> dict[str, str]:
    body, _ = metrics.render()
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


def test_all_families_exposed_with_types():
    fams = families(Metrics())
    expected = {
        "wacall_calls": "counter",
        "wacall_call_state": "counter",
        "wacall_live_calls": "gauge",
        "wacall_call_setup_seconds": "histogram",
        "wacall_call_ring_seconds": "histogram",
        "wacall_webhooks": "counter",
        "wacall_provider_errors": "counter",
        "wacall_rtp_packets": "counter",
        "wacall_rtp_bytes": "counter",
        "wacall_rtp_packets_lost": "counter",
        "wacall_rtp_jitter_seconds": "histogram",
        "wacall_rtp_round_trip_seconds": "histogram",
        "wacall_events_delivered": "counter",
        "wacall_routed_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert fams.get(name) == kind, name


def test_call_state_and_ended_counters():
    m = Metrics()
    m.call_state("BUSINESS_INITIATED", "ringing")
    m.call_state("BUSINESS_INITIATED", "ringing")
    m.call_state("USER_INITIATED", "accepted")
    m.call_ended("BUSINESS_INITIATED", "user_hangup", 1.5)
    m.call_ended("BUSINESS_INITIATED", "rejected", None)

    assert value(m, "wacall_call_state_total", direction="BUSINESS_INITIATED", state="ringing") == 2
    assert value(m, "wacall_call_state_total", direction="USER_INITIATED", state="accepted") == 1
    assert value(m, "wacall_calls_total", direction="BUSINESS_INITIATED", end_reason="user_hangup") == 1
    assert value(m, "wacall_calls_total", direction="BUSINESS_INITIATED", end_reason="rejected") == 1
    # only the call that connected is observed in the setup histogram
    assert value(m, "wacall_call_setup_seconds_count", direction="BUSINESS_INITIATED") == 1
    assert value(m, "wacall_call_setup_seconds_sum", direction="BUSINESS_INITIATED") == 1.5
    assert value(m, "wacall_call_setup_seconds_bucket", direction="BUSINESS_INITIATED", le="1.0") == 0
    assert value(m, "wacall_call_setup_seconds_bucket", direction="BUSINESS_INITIATED", le="2.0") == 1
    assert value(m, "wacall_call_setup_seconds_bucket", direction="BUSINESS_INITIATED", le="+Inf") == 1


def test_ring_time_is_its_own_histogram():
    m = Metrics()
    m.call_ended("BUSINESS_INITIATED", "user_hangup", 0.4, 7.0)
    m.call_ended("BUSINESS_INITIATED", "no_answer", 0.3, None)  # never picked up: no ring sample
    assert value(m, "wacall_call_setup_seconds_count", direction="BUSINESS_INITIATED") == 2
    assert value(m, "wacall_call_ring_seconds_count", direction="BUSINESS_INITIATED") == 1
    assert value(m, "wacall_call_ring_seconds_bucket", direction="BUSINESS_INITIATED", le="5.0") == 0
    assert value(m, "wacall_call_ring_seconds_bucket", direction="BUSINESS_INITIATED", le="7.5") == 1


def test_setup_buckets_span_10ms_to_30s():
    m = Metrics()
    m.call_ended("BUSINESS_INITIATED", "user_hangup", 0.005)
    les = {dict(labels)["le"] for (name, labels) in samples(m) if name == "wacall_call_setup_seconds_bucket"}
    bounds = sorted(float(le) for le in les if le != "+Inf")
    assert bounds[0] == 0.01
    assert bounds[-1] == 30.0
    assert value(m, "wacall_call_setup_seconds_bucket", direction="BUSINESS_INITIATED", le="0.01") == 1


def test_enum_members_use_their_value():
    class Reason(enum.StrEnum):
        HANGUP = "user_hangup"

    class Dir(enum.Enum):
        OUT = "BUSINESS_INITIATED"

    m = Metrics()
    m.call_ended(Dir.OUT, Reason.HANGUP, None)
    assert value(m, "wacall_calls_total", direction="BUSINESS_INITIATED", end_reason="user_hangup") == 1


def test_live_calls_gauge():
    m = Metrics()
    m.set_live_calls(3)
    assert value(m, "wacall_live_calls") == 3
    m.set_live_calls(1)
    assert value(m, "wacall_live_calls") == 1


def test_webhooks_provider_errors_and_deliveries():
    m = Metrics()
    m.webhook("connect", "ok")
    m.webhook("connect", "duplicate")
    m.webhook("status", "ok")
    m.webhook("unknown", "bad_signature")
    m.webhook(None, "bad_request")
    m.provider_error(131047)
    m.provider_error(131047)
    m.provider_error(None)
    m.event_delivery("ok")
    m.event_delivery("error")
    m.event_delivery("ok")

    assert value(m, "wacall_webhooks_total", kind="connect", result="ok") == 1
    assert value(m, "wacall_webhooks_total", kind="connect", result="duplicate") == 1
    assert value(m, "wacall_webhooks_total", kind="status", result="ok") == 1
    assert value(m, "wacall_webhooks_total", kind="unknown", result="bad_signature") == 1
    assert value(m, "wacall_webhooks_total", kind="unknown", result="bad_request") == 1
    assert value(m, "wacall_provider_errors_total", code="131047") == 2
    assert value(m, "wacall_provider_errors_total", code="unknown") == 1
    assert value(m, "wacall_events_delivered_total", result="ok") == 2
    assert value(m, "wacall_events_delivered_total", result="error") == 1


def test_untrusted_label_values_are_sanitised_and_capped():
    m = Metrics()
    m.webhook('x"} 1\nevil', "ok")
    for i in range(500):
        m.webhook(f"kind{i}", "ok")
    kinds = {dict(labels)["kind"] for (name, labels) in samples(m) if name == "wacall_webhooks_total"}
    assert all("\n" not in k and '"' not in k for k in kinds)
    assert "other" in kinds
    assert len(kinds) <= 65
    # the output still parses and the overflow is counted, not dropped
    total = sum(v for (name, _), v in samples(m).items() if name == "wacall_webhooks_total")
    assert total == 501


def test_media_stats():
    m = Metrics()
    m.media({
        "packets_sent": 250, "packets_received": 240, "bytes_sent": 40000, "bytes_received": 38000,
        "packets_lost": 3, "jitter_s": 0.004, "round_trip_s": 0.12,
    })
    m.media({"packets_sent": 10, "jitter_s": None})  # missing keys and None tolerated
    m.media({})
    m.media({"packets_lost": -2, "bytes_sent": "nope", "round_trip_s": float("nan")})

    assert value(m, "wacall_rtp_packets_total", direction="sent") == 260
    assert value(m, "wacall_rtp_packets_total", direction="received") == 240
    assert value(m, "wacall_rtp_bytes_total", direction="sent") == 40000
    assert value(m, "wacall_rtp_bytes_total", direction="received") == 38000
    assert value(m, "wacall_rtp_packets_lost_total") == 3
    assert value(m, "wacall_rtp_jitter_seconds_count") == 1
    assert value(m, "wacall_rtp_jitter_seconds_sum") == 0.004
    assert value(m, "wacall_rtp_jitter_seconds_bucket", le="0.005") == 1
    assert value(m, "wacall_rtp_jitter_seconds_bucket", le="0.0025") == 0
    assert value(m, "wacall_rtp_round_trip_seconds_count") == 1
    assert value(m, "wacall_rtp_round_trip_seconds_bucket", le="0.15") == 1


def test_instances_do_not_share_state():
    a, b = Metrics(), Metrics()
    a.webhook("connect", "ok")
    a.set_live_calls(5)
    a.media({"packets_sent": 7})
    assert value(a, "wacall_webhooks_total", kind="connect", result="ok") == 1
    assert value(b, "wacall_webhooks_total", kind="connect", result="ok") is None
    assert value(b, "wacall_live_calls") == 0
    assert value(b, "wacall_rtp_packets_total", direction="sent") is None
    assert a.registry is not b.registry


def test_global_registry_untouched():
    Metrics()
    Metrics()  # a second instance must not raise "Duplicated timeseries"
    assert not any(name.startswith("wacall_") for name in REGISTRY._names_to_collectors)


def test_render_content_type():
    body, ctype = Metrics().render()
    assert isinstance(body, bytes)
    assert ctype.startswith("text/plain; version=0.0.4")


async def test_aiohttp_handler():
    m = Metrics()
    m.webhook("terminate", "ok")
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(m))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    sample = next(s for s in fams["wacall_webhooks"].samples if s.name == "wacall_webhooks_total")
    assert sample.labels == {"kind": "terminate", "result": "ok"}
    assert sample.value == 1


async def test_process_metrics_loop_lag_and_no_created_series():
    import asyncio

    m = Metrics()
    watching = asyncio.ensure_future(m.watch_loop_lag(period_s=0.01))
    try:
        started = asyncio.get_running_loop().time()
        while "wacall_event_loop_lag_seconds" not in m.render()[0].decode() or \
                asyncio.get_running_loop().time() - started < 0.05:
            await asyncio.sleep(0.01)
    finally:
        watching.cancel()
    text = m.render()[0].decode()
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total",
                 "wacall_event_loop_lag_seconds"):
        assert f"\n{name} " in text, name
    assert "_created" not in text


async def test_setup_stops_at_the_providers_answer_and_ringing_is_counted_apart(service):
    """A user who picks up after 1.5 s: the call's setup (dial -> the provider's SDP
    answer) is short, its ring time (ringing -> accepted) is the 1.5 s."""
    from gateway.calls import CallState
    from gateway.telemetry import setup_and_ring
    from tests.conftest import TEST_USER

    service.sandbox.users.update(TEST_USER, {"answer_after_ms": 1500})
    call = await service.manager.place_call(TEST_USER)
    await call.wait_state(CallState.MEDIA_CONNECTED, 20)
    await call.hangup()
    await call.wait_finished(20)
    setup, ring = setup_and_ring(call)
    assert setup is not None and setup < 1.0, setup
    assert ring == pytest.approx(1.5, abs=0.4)
    m = service.metrics
    assert value(m, "wacall_call_ring_seconds_count", direction="BUSINESS_INITIATED") == 1
    assert value(m, "wacall_call_ring_seconds_sum", direction="BUSINESS_INITIATED") == pytest.approx(ring)
    assert value(m, "wacall_call_setup_seconds_sum", direction="BUSINESS_INITIATED") == pytest.approx(setup)
