"""Webhook parsing, signatures, de-duplication and the aiohttp routes."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiortc.sdp import SessionDescription

from gateway.errors import InvalidSdpError, ProviderError
from gateway.events import (
    CallArtifact,
    CallConnect,
    CallStatus,
    CallStatusKind,
    CallTerminate,
    Direction,
    TerminateStatus,
    UnknownEvent,
    WebhookError,
)
from gateway.webhooks import (
    EventDeduper,
    WebhookFormatError,
    parse_webhook,
    verify_signature,
    webhook_routes,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks"
WACID = "wacid.HBgLMTIxODU1NTI4MjgVAgARGCAyODRQIAFRoA"
PNID = "436666719526789"
SECRET = "app-secret-for-tests"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def one(payload: Any) -> Any:
    events = parse_webhook(payload)
    assert len(events) == 1
    return events[0]


def calls_change(**value: Any) -> dict[str, Any]:
    value.setdefault("metadata", {"phone_number_id": PNID})
    return {"object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "calls", "value": value}]}]}


# -- fixtures parse to typed events ------------------------------------------------------


def test_seed_connect_business_initiated() -> None:
    ev = one(load("connect_business_initiated.json"))
    assert isinstance(ev, CallConnect)
    assert ev.call_id == WACID
    assert ev.direction is Direction.BUSINESS_INITIATED
    assert (ev.from_, ev.to) == ("13175551399", "12185552828")
    assert ev.timestamp == 1749196895
    assert ev.sdp_type == "answer"
    assert ev.biz_opaque_callback_data == "TRx334DUDFTI4Mj"
    assert ev.phone_number_id == PNID
    assert ev.sdp is not None and "a=ice-lite" in ev.sdp
    parsed = SessionDescription.parse(ev.sdp)
    assert [m.kind for m in parsed.media] == ["audio"]
    assert [f.algorithm for f in parsed.media[0].dtls.fingerprints] == ["sha-256"]


@pytest.mark.parametrize("status", ["RINGING", "ACCEPTED", "REJECTED"])
def test_seed_statuses(status: str) -> None:
    ev = one(load(f"status_{status.lower()}.json"))
    assert isinstance(ev, CallStatus)
    assert ev.status is CallStatusKind[status]
    assert ev.raw_status == status
    assert ev.call_id == WACID
    assert ev.timestamp == 1749197000
    assert ev.recipient_id == "12185552828"
    assert ev.phone_number_id == PNID


def test_terminate_completed() -> None:
    ev = one(load("terminate_completed.json"))
    assert isinstance(ev, CallTerminate)
    assert ev.status is TerminateStatus.COMPLETED
    assert ev.direction is Direction.BUSINESS_INITIATED
    assert (ev.start_time, ev.end_time, ev.duration) == (1749197010, 1749197190, 180)
    assert ev.timestamp == 1749197200
    assert ev.biz_opaque_callback_data == "TRx334DUDFTI4Mj"
    assert ev.errors == ()


def test_terminate_failed_carries_errors() -> None:
    ev = one(load("terminate_failed.json"))
    assert isinstance(ev, CallTerminate)
    assert ev.status is TerminateStatus.FAILED
    assert ev.duration is None and ev.start_time is None
    assert ev.errors == (WebhookError(138021, "Media receive timeout",
                                      "The client did not receive any media from the business"),)
    err = ev.errors[0].as_error()
    assert isinstance(err, ProviderError) and err.code == 138021
    assert "RTP" in err.resolution


def test_legacy_webrtc_connect() -> None:
    ev = one(load("connect_legacy_webrtc.json"))
    assert isinstance(ev, CallConnect)
    assert ev.direction is Direction.USER_INITIATED
    assert ev.sdp_type == "offer"
    assert ev.sdp is not None and ev.sdp.startswith("v=0\r\n")
    assert "a=setup:actpass" in ev.sdp


def test_batch_two_changes() -> None:
    events = parse_webhook(load("batch_two_changes.json"))
    assert [type(e) for e in events] == [CallConnect, CallStatus]
    connect, status = events
    assert connect.direction is Direction.USER_INITIATED and connect.sdp_type == "offer"
    assert status.status is CallStatusKind.RINGING
    assert status.biz_opaque_callback_data == "TRx334DUDFTI4Mj"


def test_unknown_event_fixture() -> None:
    ev = one(load("unknown_event.json"))
    assert isinstance(ev, UnknownEvent)
    assert (ev.field, ev.kind) == ("calls", "call_quality_summary")
    assert ev.call_id == WACID
    assert ev.raw["quality"] == {"mos": 4.1}


def test_call_recording_available_fixture() -> None:
    ev = one(load("call_recording_available.json"))
    assert isinstance(ev, CallArtifact)
    assert (ev.call_id, ev.kind, ev.media_id) == (WACID, "recording", "1873264501923847")
    assert ev.sha256 == "q9Jw0L5Xr6tY3uI8oP2aS4dF6gH8jK0lZ1xC3vB5nM7="
    assert ev.url.startswith("https://lookaside.fbsbx.com/")


def test_every_fixture_parses() -> None:
    names = sorted(p.name for p in FIXTURES.glob("*.json"))
    assert len(names) >= 9
    for name in names:
        assert parse_webhook(load(name)), name


# -- tolerant details ------------------------------------------------------------------


def test_case_insensitive_enums_and_int_timestamps() -> None:
    payload = calls_change(calls=[{"id": "wacid.1", "event": "terminate",
                                   "direction": "user_initiated", "status": "Completed",
                                   "timestamp": 1767168200, "duration": "12"}],
                           statuses=[{"id": "wacid.2", "status": "ringing", "timestamp": "5"},
                                     {"id": "wacid.3", "status": "ON_HOLD"}])
    term, ringing, odd = parse_webhook(payload)
    assert term.status is TerminateStatus.COMPLETED and term.direction is Direction.USER_INITIATED
    assert term.timestamp == 1767168200 and term.duration == 12
    assert ringing.status is CallStatusKind.RINGING and ringing.raw_status == "ringing"
    assert odd.status is CallStatusKind.UNKNOWN and odd.raw_status == "ON_HOLD"
    assert odd.timestamp is None


def test_unknown_direction_and_status_values() -> None:
    payload = calls_change(calls=[{"id": "wacid.1", "event": "terminate",
                                   "direction": "SOMETHING_NEW", "status": "MISSED"}])
    ev = one(payload)
    assert ev.direction is Direction.UNKNOWN and ev.status is TerminateStatus.UNKNOWN


def test_status_terminate_becomes_call_terminate() -> None:
    payload = calls_change(statuses=[{"id": "wacid.1", "status": "TERMINATE",
                                      "timestamp": "9", "recipient_id": "12185552828"}],
                           errors=[{"code": 138014, "message": "bad sdp"}])
    ev = one(payload)
    assert isinstance(ev, CallTerminate)
    assert ev.status is TerminateStatus.UNKNOWN
    assert ev.call_id == "wacid.1" and ev.to == "12185552828" and ev.timestamp == 9
    assert ev.errors[0].code == 138014
    assert isinstance(ev.errors[0].as_error(), InvalidSdpError)


def test_legacy_raw_sdp_infers_type_from_direction() -> None:
    payload = calls_change(calls=[{"id": "wacid.1", "event": "connect",
                                   "direction": "BUSINESS_INITIATED",
                                   "connection": {"webrtc": {"sdp": "v=0\r\ns=-\r\n"}}}])
    ev = one(payload)
    assert ev.sdp == "v=0\r\ns=-\r\n" and ev.sdp_type == "answer"


def test_connect_without_sdp() -> None:
    ev = one(calls_change(calls=[{"id": "wacid.1", "event": "connect"}]))
    assert ev.sdp is None and ev.sdp_type is None and ev.direction is Direction.UNKNOWN
    assert ev.from_ is None and ev.timestamp is None


def test_other_fields_are_unknown_events() -> None:
    payload = {"entry": [{"changes": [{"field": "account_update", "value": {
        "metadata": {"phone_number_id": PNID}, "event": "ACCOUNT_VIOLATION"}}]}]}
    ev = one(payload)
    assert isinstance(ev, UnknownEvent)
    assert (ev.field, ev.kind, ev.phone_number_id) == ("account_update", "account_update", PNID)
    assert ev.call_id is None


def test_messages_that_are_not_permission_replies_stay_unknown() -> None:
    payload = {"entry": [{"changes": [{"field": "messages", "value": {
        "metadata": {"phone_number_id": PNID},
        "messages": [{"from": "4915112345678", "type": "text", "text": {"body": "hi"}}]}}]}]}
    ev = one(payload)
    assert isinstance(ev, UnknownEvent) and (ev.field, ev.kind) == ("messages", "message:text")


def _reply(reply: dict, context: dict | None = None) -> dict:
    message = {"from": "4915112345678", "id": "wamid.reply1", "timestamp": "1767168000",
               "type": "interactive",
               "interactive": {"type": "call_permission_reply", "call_permission_reply": reply}}
    if context is not None:
        message["context"] = context
    return {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages", "value": {"messaging_product": "whatsapp",
                                       "metadata": {"phone_number_id": PNID}, "messages": [message]}}]}]}


@pytest.mark.parametrize("reply, context, response, permanent, expires, source", [
    # temporary grant from a request
    ({"response": "accept", "is_permanent": False, "expiration_timestamp": "1767772800",
      "response_source": "user_action"}, {"id": "wamid.cpr"}, "GRANTED", False, 1767772800, "user_action"),
    # permanent grant (from a request, or from the business profile: no context)
    ({"response": "accept", "is_permanent": True, "response_source": "user_action"}, None,
     "GRANTED", True, None, "user_action"),
    # user declines
    ({"response": "reject", "response_source": "user_action"}, {"id": "wamid.cpr"},
     "REJECTED", False, None, "user_action"),
    # callback grant after the user called (context is the call's wacid); integer timestamp
    ({"response": "accept", "is_permanent": False, "expiration_timestamp": 1767772800,
      "response_source": "automatic"}, {"id": "wacid.abc"}, "GRANTED", False, 1767772800, "automatic"),
    # auto-revoke after 4 unanswered calls
    ({"response": "reject", "response_source": "automatic"}, None, "REVOKED", False, None, "automatic"),
])
def test_meta_permission_replies(reply, context, response, permanent, expires, source) -> None:
    from gateway.events import PermissionReply

    ev = one(_reply(reply, context))
    assert isinstance(ev, PermissionReply)
    assert (ev.user, ev.response.value, ev.permanent, ev.expires_at, ev.source) == (
        "4915112345678", response, permanent, expires, source)
    assert ev.context_id == (context or {}).get("id")
    assert ev.phone_number_id == PNID


@pytest.mark.parametrize("status", ["GRANTED", "REJECTED", "REVOKED", "granted"])
def test_d360_permission_status_event(status) -> None:
    from gateway.events import PermissionReply

    ev = one({"event": "call_permission_status", "status": status, "waba_id": "1",
              "recipient": "4915112345678"})
    assert isinstance(ev, PermissionReply) and ev.response.value == status.upper()
    assert ev.user == "4915112345678"
    with pytest.raises(WebhookFormatError):
        parse_webhook({"event": "call_permission_status", "status": "GRANTED"})


def test_message_delivery_statuses() -> None:
    from gateway.events import MessageStatus

    payload = {"entry": [{"changes": [{"field": "messages", "value": {
        "metadata": {"phone_number_id": PNID},
        "statuses": [{"id": "wamid.cpr", "status": "delivered", "timestamp": "1767168000",
                      "recipient_id": "4915112345678"}]}}]}]}
    ev = one(payload)
    assert isinstance(ev, MessageStatus)
    assert (ev.message_id, ev.status, ev.recipient, ev.timestamp) == (
        "wamid.cpr", "delivered", "4915112345678", 1767168000)


def test_errors_without_terminate_are_reported() -> None:
    ev = one(calls_change(errors=[{"code": 131044, "message": "no payment method"}]))
    assert isinstance(ev, UnknownEvent) and ev.kind == "errors"


def test_empty_entry_list() -> None:
    assert parse_webhook({"object": "whatsapp_business_account", "entry": []}) == []


@pytest.mark.parametrize(("payload", "fragment"), [
    ([], "object"),
    ("x", "object"),
    ({}, "entry"),
    ({"entry": {}}, "list"),
    ({"entry": ["x"]}, "entry[0]"),
    ({"entry": [{"changes": "x"}]}, "changes"),
    ({"entry": [{"changes": [{"value": {}}]}]}, "field"),
    ({"entry": [{"changes": [{"field": "calls", "value": []}]}]}, "value"),
    ({"entry": [{"changes": [{"field": "calls", "value": {"calls": {}}}]}]}, "calls"),
    ({"entry": [{"changes": [{"field": "calls", "value": {"calls": [{"event": "connect"}]}}]}]},
     "calls[0] has no 'id'"),
    ({"entry": [{"changes": [{"field": "calls", "value": {"calls": [{"id": "", "event": "x"}]}}]}]},
     "id"),
    ({"entry": [{"changes": [{"field": "calls", "value": {"statuses": [{"status": "RINGING"}]}}]}]},
     "statuses[0] has no 'id'"),
    ({"entry": [{"changes": [{"field": "calls", "value": {"calls": [7]}}]}]}, "calls[0]"),
])
def test_malformed_envelopes(payload: Any, fragment: str) -> None:
    with pytest.raises(WebhookFormatError) as info:
        parse_webhook(payload)
    assert fragment in str(info.value)


def test_events_are_frozen_and_hashable() -> None:
    ev = one(load("status_ringing.json"))
    with pytest.raises(AttributeError):
        ev.call_id = "other"  # type: ignore[misc]
    assert hash(ev) == hash(one(load("status_ringing.json")))


# -- de-duplication -----------------------------------------------------------------------


def test_keys_distinguish_events() -> None:
    keys = {one(load(f"status_{s}.json")).key for s in ("ringing", "accepted", "rejected")}
    assert len(keys) == 3
    assert one(load("status_ringing.json")).key == ("status", WACID, "RINGING", 1749197000)
    assert (one(load("terminate_completed.json")).key
            == ("terminate", WACID, "COMPLETED", 1749197200))
    assert one(load("unknown_event.json")).key == one(load("unknown_event.json")).key


def test_deduper_is_bounded_lru() -> None:
    dd = EventDeduper(max_keys=2)
    a, b, c = (one(load(f"status_{s}.json")) for s in ("ringing", "accepted", "rejected"))
    assert not dd.seen(a) and not dd.seen(b)
    assert dd.seen(a)            # refreshes a; b is now the oldest
    assert not dd.seen(c)        # evicts b
    assert len(dd) == 2
    assert dd.seen(a) and dd.seen(c)
    assert not dd.seen(b)
    with pytest.raises(ValueError):
        EventDeduper(0)


# -- signatures ----------------------------------------------------------------------------


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_verify_signature() -> None:
    body = (FIXTURES / "status_ringing.json").read_bytes()
    assert verify_signature(body, sign(body), SECRET)
    assert verify_signature(body, sign(body).upper().replace("SHA256=", "sha256="), SECRET)
    assert not verify_signature(body + b" ", sign(body), SECRET)
    assert not verify_signature(body, sign(body, "other"), SECRET)
    assert not verify_signature(body, sign(body)[7:], SECRET)       # no prefix
    assert not verify_signature(body, "sha1=" + sign(body)[7:], SECRET)
    assert not verify_signature(body, None, SECRET)
    assert not verify_signature(body, sign(body), "")
    assert not verify_signature(body, "sha256=é", SECRET)


# -- aiohttp routes ------------------------------------------------------------------------


class Recorder:
    def __init__(self, fail_on: str | None = None) -> None:
        self.events: list[Any] = []
        self.fail_on = fail_on

    async def __call__(self, event: Any) -> None:
        if self.fail_on and getattr(event, "call_id", None) == self.fail_on:
            raise RuntimeError("dispatch exploded")
        self.events.append(event)


async def make_client(dispatch: Recorder, **kw: Any) -> TestClient:
    app = web.Application()
    app.add_routes(webhook_routes(dispatch, **kw))
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    return client


@pytest.fixture
async def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def client(recorder: Recorder) -> AsyncIterator[TestClient]:
    c = await make_client(recorder, verify_token="vt-123")
    yield c
    await c.close()


async def test_post_dispatches_events(client: TestClient, recorder: Recorder) -> None:
    resp = await client.post("/webhooks/whatsapp", json=load("batch_two_changes.json"))
    assert resp.status == 200
    assert await resp.json() == {"ok": True}
    assert [type(e) for e in recorder.events] == [CallConnect, CallStatus]


async def test_duplicates_dispatched_once(client: TestClient, recorder: Recorder) -> None:
    payload = load("connect_business_initiated.json")
    for _ in range(3):
        resp = await client.post("/webhooks/whatsapp", json=payload)
        assert resp.status == 200
    doubled = copy.deepcopy(payload)
    doubled["entry"].append(copy.deepcopy(payload["entry"][0]))
    assert (await client.post("/webhooks/whatsapp", json=doubled)).status == 200
    assert len(recorder.events) == 1


async def test_bad_json_is_400(client: TestClient, recorder: Recorder) -> None:
    for body in (b"{not json", b"\xff\xfe"):
        resp = await client.post("/webhooks/whatsapp", data=body,
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 400
        data = await resp.json()
        assert data["error"]["code"] == "bad_webhook"
        assert data["error"]["message"]
    assert recorder.events == []


async def test_malformed_envelope_is_400(client: TestClient) -> None:
    resp = await client.post("/webhooks/whatsapp", json={"entry": "nope"})
    assert resp.status == 400
    data = await resp.json()
    assert data["error"]["code"] == "bad_webhook"
    assert "entry" in data["error"]["message"]


async def test_unknown_event_is_200_and_logged(client: TestClient, recorder: Recorder,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.webhooks")
    resp = await client.post("/webhooks/whatsapp", json=load("unknown_event.json"))
    assert resp.status == 200
    assert isinstance(recorder.events[0], UnknownEvent)
    assert any(r.levelno == logging.INFO and "call_quality_summary" in r.getMessage()
               for r in caplog.records)


async def test_dispatch_failure_does_not_block_others(caplog: pytest.LogCaptureFixture) -> None:
    failing_id = "wacid.HBgLMTIxODU1NTI4MjgVAgARGCBCQVRDSFVJQzAwMDAwMQA"
    rec = Recorder(fail_on=failing_id)
    c = await make_client(rec)
    try:
        resp = await c.post("/webhooks/whatsapp", json=load("batch_two_changes.json"))
    finally:
        await c.close()
    assert resp.status == 200
    assert [type(e) for e in rec.events] == [CallStatus]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failures and failing_id in failures[0].getMessage()
    assert "12185552828" not in caplog.text


async def test_signature_checked_when_secret_set() -> None:
    rec = Recorder()
    c = await make_client(rec, app_secret=SECRET)
    try:
        body = (FIXTURES / "status_ringing.json").read_bytes()
        good = await c.post("/webhooks/whatsapp", data=body,
                            headers={"X-Hub-Signature-256": sign(body)})
        bad = await c.post("/webhooks/whatsapp", data=body,
                           headers={"X-Hub-Signature-256": sign(body, "wrong")})
        missing = await c.post("/webhooks/whatsapp", data=body)
        bad_body = await bad.json()
    finally:
        await c.close()
    assert good.status == 200
    assert bad.status == 401 and missing.status == 401
    assert bad_body["error"]["code"] == "bad_signature"
    assert len(rec.events) == 1


async def test_verify_handshake(client: TestClient) -> None:
    ok = await client.get("/webhooks/whatsapp", params={
        "hub.mode": "subscribe", "hub.verify_token": "vt-123", "hub.challenge": "1158201444"})
    assert ok.status == 200 and await ok.text() == "1158201444"
    wrong = await client.get("/webhooks/whatsapp", params={
        "hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "1"})
    assert wrong.status == 403
    mode = await client.get("/webhooks/whatsapp", params={
        "hub.mode": "unsubscribe", "hub.verify_token": "vt-123", "hub.challenge": "1"})
    assert mode.status == 403


async def test_handshake_refused_without_token() -> None:
    c = await make_client(Recorder(), path="/hooks")
    try:
        resp = await c.get("/hooks", params={
            "hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"})
    finally:
        await c.close()
    assert resp.status == 403


async def test_duplicates_are_dropped_across_restarts_and_a_failed_one_is_redone(tmp_path) -> None:
    """Two servers one after the other on the same SQLite store (a restart): a redelivered
    event is dropped by the second; an event whose dispatch failed is processed when
    redelivered (checked before dispatch, remembered only after)."""
    from gateway.store import SQLiteStore

    failing_id = "wacid.HBgLMTIxODU1NTI4MjgVAgARGCBCQVRDSFVJQzAwMDAwMQA"
    batch = load("batch_two_changes.json")
    first, second = Recorder(fail_on=failing_id), Recorder()
    store = SQLiteStore(tmp_path / "wacall.sqlite3")
    c = await make_client(first, dedupe_store=store)
    try:
        assert (await c.post("/webhooks/whatsapp", json=batch)).status == 200
    finally:
        await c.close()
        store.close()
    assert [type(e) for e in first.events] == [CallStatus]  # the connect's dispatch failed
    store = SQLiteStore(tmp_path / "wacall.sqlite3")  # the process restarted
    c = await make_client(second, dedupe_store=store)
    try:
        assert (await c.post("/webhooks/whatsapp", json=batch)).status == 200  # Meta redelivers
        assert (await c.post("/webhooks/whatsapp", json=batch)).status == 200
    finally:
        await c.close()
        store.close()
    assert [type(e) for e in second.events] == [CallConnect]  # only what was not done before
