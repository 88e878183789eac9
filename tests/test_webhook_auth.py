"""Webhook authentication: Meta's signature, 360dialog's signature, a custom header; on by
default, checked before parsing, and forged webhooks of every kind change nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from gateway.app import Service
from gateway.calls import CallState
from gateway.config import ConfigError, Settings
from gateway.permissions import PermissionState
from gateway.webhook_auth import MISSING_AUTH, WebhookAuth
from tests.helpers import free_port, until
from tests.processes import ProviderAndGateway, poll_until

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"object": "whatsapp_business_account", "entry": []}'
USER = "+4915112345678"
STRANGER = "+4915199887766"  # never granted anything
TIMEOUT = 20


def hexmac(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# -- the checks themselves -----------------------------------------------------------------


def test_meta_signature():
    auth = WebhookAuth(app_secret="app-s3cret")
    good = "sha256=" + hexmac("app-s3cret", BODY)
    assert auth.check(BODY, {"X-Hub-Signature-256": good}) == "meta"
    assert auth.check(BODY, {"X-Hub-Signature-256": good.upper().replace("SHA256", "sha256")}) == "meta"
    assert auth.check(BODY, {"X-Hub-Signature-256": hexmac("app-s3cret", BODY)}) is None  # Meta's has the prefix
    assert auth.check(BODY, {"X-Hub-Signature-256": "sha256=" + hexmac("wrong", BODY)}) is None
    assert auth.check(BODY + b" ", {"X-Hub-Signature-256": good}) is None  # the body was changed
    assert auth.check(BODY, {}) is None


def test_360dialog_signature_with_or_without_prefix():
    auth = WebhookAuth(d360_secret="d360-s3cret")
    digest = hexmac("d360-s3cret", BODY)
    assert auth.check(BODY, {"x-360dialog-signature": digest}) == "360dialog"
    assert auth.check(BODY, {"x-360dialog-signature": "sha256=" + digest}) == "360dialog"
    assert auth.check(BODY, {"x-360dialog-signature": hexmac("other", BODY)}) is None
    assert auth.check(BODY, {"X-Hub-Signature-256": "sha256=" + digest}) is None  # not the 360dialog header


def test_custom_header():
    auth = WebhookAuth(header=("X-Hook-Token", "t0ken-value"))
    assert auth.check(BODY, {"X-Hook-Token": "t0ken-value"}) == "header"
    assert auth.check(BODY, {"X-Hook-Token": "t0ken-valuE"}) is None
    assert auth.check(BODY, {"X-Other": "t0ken-value"}) is None


def test_non_ascii_and_garbage_headers_are_refused_not_raised():
    auth = WebhookAuth(app_secret="a", d360_secret="b", header=("X-Hook-Token", "c"))
    for value in ("sha256=ü" * 3, "\udcff", "", "=", "sha256=", "٣٣٣", "x" * 10_000):
        headers = {"X-Hub-Signature-256": value, "x-360dialog-signature": value, "X-Hook-Token": value}
        assert auth.check(BODY, headers) is None


def test_any_configured_method_passes_and_sign_produces_each():
    auth = WebhookAuth(app_secret="a", d360_secret="b", header=("X-Hook-Token", "c"))
    signed = auth.sign(BODY)
    assert set(signed) == {"X-Hub-Signature-256", "x-360dialog-signature", "X-Hook-Token"}
    for name, value in signed.items():
        assert auth.check(BODY, {name: value}) is not None
    assert WebhookAuth().check(BODY, {}) == "none"  # nothing configured: the caller's choice


def test_settings_parse_the_header_and_mask_it():
    s = Settings.load({"WACALL_WEBHOOK_HEADER": "X-Hook-Token:  abc def 123 "})
    assert s.webhook_header == ("X-Hook-Token", "abc def 123")
    assert "abc def 123" not in json.dumps(s.masked())
    for bad in ("no colon", ": value", "Bad Name: v", "X-Name:", "X-Name: caf\u00e9"):
        with pytest.raises(ConfigError, match="WACALL_WEBHOOK_HEADER"):
            Settings.load({"WACALL_WEBHOOK_HEADER": bad})
    with pytest.raises(ConfigError, match="WACALL_WEBHOOK_AUTH"):
        Settings.load({"WACALL_WEBHOOK_AUTH": "off"})


# -- a server: on by default ---------------------------------------------------------------


async def test_a_real_server_without_webhook_auth_refuses_to_start(settings):
    real = replace(settings, d360_api_key="key", base_url="http://127.0.0.1:9")
    service = Service(real)
    with pytest.raises(ConfigError) as info:
        await service.start()
    assert str(info.value) == MISSING_AUTH and "\n" not in MISSING_AUTH


def test_wacall_serve_without_webhook_auth_says_so_in_one_line(tmp_path):
    env = {**os.environ, "WACALL_D360_API_KEY": "key", "WACALL_PORT": str(free_port()),
           "WACALL_DATA_DIR": str(tmp_path)}
    env.pop("WACALL_APP_SECRET", None)
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"wacall: {MISSING_AUTH}"]


async def test_auth_none_is_explicit_and_warned(settings, caplog):
    real = replace(settings, d360_api_key="key", base_url="http://127.0.0.1:9", webhook_auth="none")
    with caplog.at_level(logging.WARNING, logger="gateway"):
        async with Service(real) as service, aiohttp.ClientSession() as http:
            async with http.post(f"{service.url}/webhooks/whatsapp", data=BODY) as resp:
                assert resp.status == 200
    assert any("NOT authenticated" in r.getMessage() for r in caplog.records)


async def test_the_embedded_sandbox_authenticates_to_its_own_gateway(settings):
    """No auth configured, sandbox delivering to this process: a random shared header."""
    async with Service(settings, sandbox=True) as service, aiohttp.ClientSession() as http:
        assert service.webhook_auth.configured
        async with http.post(f"{service.url}/webhooks/whatsapp", data=BODY) as resp:
            assert resp.status == 401


# -- forged webhooks of every kind change nothing -----------------------------------------


def envelope(field: str, value: dict) -> bytes:
    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "100000000000001"}, **value}
    return json.dumps({"object": "whatsapp_business_account",
                       "entry": [{"id": "1", "changes": [{"field": field, "value": value}]}]}).encode()


def forgeries(wacid: str, offer: str) -> dict[str, bytes]:
    grant = {"response": "accept", "is_permanent": True, "response_source": "user_action"}
    return {
        "terminate": envelope("calls", {"calls": [{"id": wacid, "event": "terminate", "status": "COMPLETED",
                                                   "direction": "BUSINESS_INITIATED", "to": USER[1:]}]}),
        "status": envelope("calls", {"statuses": [{"id": wacid, "type": "call", "status": "REJECTED",
                                                   "timestamp": "1", "recipient_id": USER[1:]}]}),
        "inbound connect": envelope("calls", {"calls": [{
            "id": "wacid.forged-inbound", "event": "connect", "direction": "USER_INITIATED",
            "from": STRANGER[1:], "to": "15550001111", "session": {"sdp": offer, "sdp_type": "offer"}}]}),
        "permission reply": envelope("messages", {"contacts": [{"wa_id": STRANGER[1:]}], "messages": [{
            "from": STRANGER[1:], "id": "wamid.forged", "timestamp": "1", "type": "interactive",
            "interactive": {"type": "call_permission_reply", "call_permission_reply": grant}}]}),
        "revoke": envelope("messages", {"contacts": [{"wa_id": USER[1:]}], "messages": [{
            "from": USER[1:], "id": "wamid.forged2", "timestamp": "1", "type": "interactive",
            "interactive": {"type": "call_permission_reply",
                            "call_permission_reply": {"response": "reject", "response_source": "user_action"}}}]}),
        "360dialog permission": json.dumps({"event": "call_permission_status", "status": "GRANTED",
                                            "recipient": STRANGER[1:], "timestamp": "1"}).encode(),
    }


AUTH = {
    "meta": {"app_secret": "meta-app-secret-1"},
    "360dialog": {"d360_webhook_secret": "d360-hook-secret-1"},
    "header": {"webhook_header": ("X-Hook-Token", "hook-token-1")},
}


@pytest.mark.parametrize("method", sorted(AUTH))
async def test_forged_webhooks_get_401_and_change_nothing(settings, method):
    configured = replace(settings, **AUTH[method])
    async with Service(configured, sandbox=True) as service, aiohttp.ClientSession() as http:
        assert service.webhook_auth.methods[0].startswith(method)
        await service.sandbox.grant(USER, permanent=True)  # a signed webhook: accepted
        await until(lambda: service.ledger.status(USER[1:]).status is PermissionState.GRANTED)
        call = await service.manager.place_call(USER)
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)  # the signed webhooks got through
        offer = call.local_sdp  # (any well-formed SDP will do for the forged inbound offer)
        url = f"{service.url}/webhooks/whatsapp"
        wrong = WebhookAuth(app_secret="x", d360_secret="x", header=("X-Hook-Token", "x"))
        for kind, body in forgeries(call.wacid, offer).items():
            for headers in ({}, wrong.sign(body)):
                async with http.post(url, data=body, headers=headers) as resp:
                    assert resp.status == 401, (kind, await resp.text())
                    assert (await resp.json())["error"]["code"] == "bad_signature"
        # nothing changed: the call goes on, no inbound call, no permission granted or revoked
        assert call.state is CallState.MEDIA_CONNECTED and len(service.manager.calls) == 1
        assert service.ledger.status(STRANGER[1:]).status is PermissionState.NONE
        assert service.ledger.status(USER[1:]).status is PermissionState.GRANTED
        # and the same bodies, properly signed, are taken (so the forgeries were real events)
        body = forgeries(call.wacid, offer)["terminate"]
        async with http.post(url, data=body, headers=configured_auth(configured).sign(body)) as resp:
            assert resp.status == 200
        await call.wait_finished(TIMEOUT)
        assert call.end_reason.value == "user_hangup"


def configured_auth(settings: Settings) -> WebhookAuth:
    return WebhookAuth.from_settings(settings)


# -- two processes: a sandbox provider and a gateway, same settings -------------------------


async def test_a_sandbox_process_and_a_gateway_process_authenticate_with_the_same_settings(tmp_path):
    common = {"WACALL_D360_WEBHOOK_SECRET": "shared-d360-secret"}
    async with ProviderAndGateway(tmp_path, token="tok", common=common) as world:
        await world.grant(USER)  # the provider's signed webhook reached the gateway's ledger
        async with world.http.post(f"{world.gateway_url}/v1/calls", json={"to": USER}, headers=world.api) as resp:
            assert resp.status == 201, await resp.text()
            call_id = (await resp.json())["id"]
        await poll_until(lambda: world.call(call_id), lambda c: c["state"] == "media_connected")
        # a forged webhook to the gateway process: refused
        body = forgeries("wacid.x", "v=0")["permission reply"]
        async with world.http.post(f"{world.gateway_url}/webhooks/whatsapp", data=body,
                                   headers={"x-360dialog-signature": hexmac("guess", body)}) as resp:
            assert resp.status == 401
        async with world.http.delete(f"{world.gateway_url}/v1/calls/{call_id}", headers=world.api) as resp:
            assert resp.status == 200, await resp.text()
    # every webhook the provider sent was taken; the one refusal is the forgery
    assert world.gateway_log.read_text().count("webhook refused") == 1
