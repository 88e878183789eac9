"""Hardening: bad input is a clear 4xx everywhere, nothing is stored from it, and limits
hold. One named test per item of the hardening issue; the fuzz suite is test_fuzz.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.app import Service
from gateway.events import CallStatus
from gateway.permissions import PermissionState
from gateway.webhooks import parse_webhook
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hardening-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = "+4915112345678"
FIXTURES = ROOT / "fixtures" / "webhooks"


@pytest.fixture
async def api(settings, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    async with Service(replace(settings, api_token=TOKEN, media_dir=media), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True, notify=False)
        async with aiohttp.ClientSession(base_url=service.url) as http:
            yield service, http


def signed(service, body: bytes) -> dict:
    return {"data": body, "headers": {"Content-Type": "application/json", **service.webhook_auth.sign(body)}}


def status_change(*statuses) -> dict:
    return {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
        {"field": "calls", "value": {"messaging_product": "whatsapp", "statuses": list(statuses)}}]}]}


GOOD_STATUS = {"id": "wacid.good", "type": "call", "status": "RINGING", "timestamp": "1749197000",
               "recipient_id": "4915112345678"}


# -- 1. webhook parsing never raises past the edge --------------------------------------------


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e400", "100000000000000000000",
                                    '"1e400"', '"\u0661\u0662\u0663"', "true", "[1]", '{"a": 1}'])
async def test_numbers_that_break_parsers_leave_the_field_empty(api, number):
    service, http = api
    body = json.dumps(status_change(GOOD_STATUS)).replace('"1749197000"', number).encode()
    async with http.post("/webhooks/whatsapp", **signed(service, body)) as resp:
        assert resp.status == 200, await resp.text()
    events = parse_webhook(json.loads(body))
    assert isinstance(events[0], CallStatus) and events[0].timestamp is None


async def test_malformed_events_are_skipped_and_counted_the_good_ones_processed(api, caplog):
    service, http = api
    batch = status_change("not an object", {"status": "RINGING"}, 7, GOOD_STATUS)
    batch["entry"][0]["changes"].append({"field": "calls", "value": {"calls": "x", "errors": 5}})
    batch["entry"][0]["changes"].append({"field": "messages", "value": {"messages": [
        {"from": "\u0664\u0669\u0661\u0665", "type": "interactive", "interactive": {
            "type": "call_permission_reply", "call_permission_reply": {"response": "accept"}}}]}})
    with caplog.at_level(logging.INFO):
        async with http.post("/webhooks/whatsapp", **signed(service, json.dumps(batch).encode())) as resp:
            assert resp.status == 200
    assert list(service.manager._early) == ["wacid.good"]  # the good event reached the calls
    lines = [r for r in caplog.records if "malformed event" in r.getMessage()]
    assert len(lines) == 1 and not lines[0].exc_info  # one line, no traceback
    async with http.get("/metrics") as resp:
        assert 'wacall_webhooks_total{kind="malformed",result="skipped"} 6.0' in await resp.text()


async def test_deeply_nested_json_is_a_400(api):
    service, http = api
    body = b"[" * 100_000 + b"]" * 100_000
    async with http.post("/webhooks/whatsapp", **signed(service, body)) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_webhook"


async def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request as raw bytes (headers aiohttp's client would not send)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


async def test_non_ascii_in_signature_and_bearer_headers_is_refused_not_raised(api):
    service, http = api
    body = json.dumps(status_change(GOOD_STATUS)).encode()
    for name in (b"X-Hub-Signature-256", b"X-Wacall-Sandbox-Token"):
        status, _ = await raw_request(service.url, b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\n"
                                      + name + b": sha256=\xc3\xa9\xff\r\nContent-Length: "
                                      + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        assert status == 401
    status, answer = await raw_request(service.url, b"GET /v1/calls HTTP/1.1\r\nHost: x\r\n"
                                       b"Authorization: Bearer \xc3\xa9\xff\r\nConnection: close\r\n\r\n")
    assert status == 401 and json.loads(answer)["error"]["code"] == "unauthorized"


# -- 2. a stored value never makes a read fail ------------------------------------------------


async def test_a_huge_expiry_cannot_poison_the_permission_reads(api):
    service, http = api
    reply = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp", "messages": [{
            "from": "4915199990000", "id": "wamid.x", "timestamp": "1e400", "type": "interactive",
            "interactive": {"type": "call_permission_reply", "call_permission_reply": {
                "response": "accept", "expiration_timestamp": str(10**20)}}}]}}]}]}
    async with http.post("/webhooks/whatsapp", **signed(service, json.dumps(reply).encode())) as resp:
        assert resp.status == 200
    assert service.ledger.status("4915199990000").status is PermissionState.GRANTED
    # and a value stored by an older wacall, before the checks
    service.ledger.reply("4915122223333", True)
    record = service.ledger.store.load("4915122223333")
    record["decision"] = {**record["decision"], "expires_at": 1e20, "at": 1e20}
    service.ledger.store.save("4915122223333", record)
    for path in ("/v1/permissions", "/v1/permissions/+4915199990000", "/v1/permissions/+4915122223333"):
        async with http.get(path, headers=AUTH) as resp:
            assert resp.status == 200, (path, await resp.text())


async def test_numbers_are_ascii_digits_only(api):
    service, http = api
    for to in ("+\u0664\u0669\u0661\u0665\u0661\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668",
               "+\uff14\uff19\uff11\uff15\uff11\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18", 4915112345678):
        async with http.post("/v1/calls", json={"to": to}, headers=AUTH) as resp:
            assert resp.status == 400, await resp.text()
    assert not service.manager.calls


# -- 3. the control API: 400 for bad input, JSON errors for everything ------------------------


@pytest.mark.parametrize("play", ["a\x00b.wav", "x" * 5000, ["a.wav"] * 51, "../../etc/passwd", "/etc/passwd",
                                  "bad\nname.wav"])
async def test_bad_play_names_are_400(api, play):
    service, http = api
    async with http.post("/v1/calls", json={"to": USER, "play": play}, headers=AUTH) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"]["code"] in ("bad_request", "bad_media_path")
    assert not service.manager.calls


@pytest.mark.parametrize("url", ["ws://bot.example:99999/x", "ws://:8080/x", "ws://bot.example:abc/x",
                                 "ws://bot.example:0/x", "ws://bad host/x", "ws://bot.example\x00/x"])
async def test_bad_bot_urls_are_400(api, url):
    service, http = api
    async with http.post("/v1/calls", json={"to": USER, "bot": {"protocol": "twilio", "url": url}},
                         headers=AUTH) as resp:
        assert resp.status == 400, await resp.text()


@pytest.mark.parametrize("raw", ['{"to": "%s", "ring_timeout_s": NaN}', '{"to": "%s", "ring_timeout_s": Infinity}',
                                 '{"to": "%s", "max_duration_s": 1e300}', '{"to": "%s", "ring_timeout_s": -1}',
                                 '{"to": "%s", "permission_wait_s": 99999999}'])
async def test_absurd_timeouts_are_400(api, raw):
    service, http = api
    async with http.post("/v1/calls", data=(raw % USER).encode(), headers={**AUTH, "Content-Type": "application/json"}) as resp:
        assert resp.status == 400, await resp.text()
    assert not service.manager.calls


async def test_nested_bodies_are_400(api):
    service, http = api
    nested: dict = {"to": USER}
    inner = nested
    for _ in range(20):
        inner["bot"] = {}
        inner = inner["bot"]
    async with http.post("/v1/calls", json=nested, headers=AUTH) as resp:
        assert resp.status == 400
    deep = ("[" * 50_000 + "]" * 50_000).encode()
    async with http.post("/v1/calls", data=deep, headers=AUTH) as resp:
        assert resp.status == 400


async def test_unknown_routes_and_methods_answer_the_json_error_shape(api):
    service, http = api
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/nope", 404), ("PUT", "/v1/calls", 405),
                                 ("PATCH", "/webhooks/whatsapp", 405)):
        async with http.request(method, path, headers=AUTH) as resp:
            assert resp.status == status
            assert resp.content_type == "application/json"
            assert (await resp.json())["error"]["code"] in ("not_found", "method_not_allowed")
            if status == 405:
                assert "Allow" in resp.headers


async def test_a_body_over_the_limit_is_413_json(api):
    service, http = api
    async with http.post("/v1/calls", data=b"{" + b" " * (3 * 1024 * 1024) + b"}", headers=AUTH) as resp:
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "body_too_large"


# -- 4. bots are not an SSRF tool ---------------------------------------------------------------


class Listener:
    """A TCP port that notes every connection."""

    def __init__(self) -> None:
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _on(self, reader, writer) -> None:
        self.connections += 1
        writer.close()


async def test_bots_at_metadata_addresses_or_the_gateway_itself_are_refused(api):
    service, http = api
    own_port = int(service.url.rsplit(":", 1)[1])
    for url in ("ws://169.254.169.254/latest/meta-data", f"ws://127.0.0.1:{own_port}/v1/calls"):
        async with http.post("/v1/calls", json={"to": USER, "bot": {"url": url}}, headers=AUTH) as resp:
            assert resp.status == 400, await resp.text()
            assert (await resp.json())["error"]["code"] == "bot_not_allowed"
    assert not service.manager.calls


async def test_an_allow_list_is_checked_before_any_connection(settings, tmp_path):
    listener = Listener()
    port = await listener.start()
    try:
        narrow = replace(settings, api_token=TOKEN, bot_allow=["10.0.0.0/8", "bots.example.org"])
        async with Service(narrow, sandbox=True) as service, aiohttp.ClientSession(base_url=service.url) as http:
            await service.sandbox.grant(USER, permanent=True, notify=False)
            async with http.post("/v1/calls", json={"to": USER, "bot": {"url": f"ws://127.0.0.1:{port}/"}},
                                 headers=AUTH) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "bot_not_allowed"
            closed_port = free_port()  # (what answers there, open or closed, is not revealed)
            async with http.post("/v1/calls", json={"to": USER, "bot": {"url": f"ws://127.0.0.1:{closed_port}/"}},
                                 headers=AUTH) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "bot_not_allowed"
        assert listener.connections == 0
        with pytest.raises(Exception, match="WACALL_BOT_ALLOW"):
            async with Service(replace(settings, bot_allow=["not a network!"]), sandbox=True):
                pass
    finally:
        listener.server.close()


# -- 5. capacity counts every call from its creation ------------------------------------------


async def test_max_calls_counts_parked_calls_and_concurrent_requests(settings):
    limited = replace(settings, api_token=TOKEN, max_calls=3)
    async with Service(limited, sandbox=True) as service, aiohttp.ClientSession(base_url=service.url) as http:
        for i in range(20):
            service.sandbox.users.update(f"+49151000000{i:02d}", {"on_permission_request": "ignore"})

        async def park(i: int) -> int:
            async with http.post("/v1/calls", json={"to": f"+49151000000{i:02d}", "if_no_permission": "request"},
                                 headers=AUTH) as resp:
                return resp.status

        statuses = await asyncio.gather(*(park(i) for i in range(20)))
        assert sorted(statuses) == [201] * 3 + [503] * 17
        assert len(service.manager.live_calls) == 3


# -- 6. no secrets in answers, private data dir -----------------------------------------------


def test_wacall_config_masks_url_userinfo(tmp_path):
    env = {**os.environ, "WACALL_BASE_URL": "https://admin:hunter2-secret@provider.example/api",
           "WACALL_EVENT_WEBHOOKS": "https://u:p4ss@hooks.example/x?token=abc", "WACALL_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "config"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout and "p4ss" not in done.stdout and "token=abc" not in done.stdout
    shown = json.loads(done.stdout)
    assert shown["base_url"] == "https://***@provider.example/api"


async def test_the_data_dir_is_created_private(settings, tmp_path):
    fresh = replace(settings, data_dir=tmp_path / "new" / "data")
    async with Service(fresh, sandbox=True):
        pass
    assert stat.S_IMODE((tmp_path / "new" / "data").stat().st_mode) == 0o700


async def test_provider_errors_in_answers_are_redacted(settings, tmp_path):
    """A provider that echoes our key and the user's number in its error: the API answer
    shows neither (the log does not either)."""
    key = "d360-live-key-abcdefghijklmnop0123"

    async def provider(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": f"bad key {key} calling +4915112345678", "code": 131000}},
                                 status=400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", provider)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        real = replace(settings, api_token=TOKEN, d360_api_key=key, base_url=f"http://127.0.0.1:{port}",
                       webhook_auth="none", media_addresses=["127.0.0.1"])
        async with Service(real) as service, aiohttp.ClientSession(base_url=service.url) as http:
            service.ledger.reply("4915112345678", True, permanent=True)
            async with http.post("/v1/calls", json={"to": USER}, headers=AUTH) as resp:
                text = await resp.text()
                assert 400 <= resp.status < 600 and resp.status != 500, text
            assert key not in text and "4915112345678" not in text
    finally:
        await runner.cleanup()
