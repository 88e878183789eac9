"""The control API over real HTTP, every response checked against gateway/api/openapi.json."""

import shutil
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from gateway.app import Service
from tests.openapi import DOC, check

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = "+4915112345678"
TIMEOUT = 20


@pytest.fixture
async def api(settings, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(ROOT / "gateway/assets/business.ogg", media / "hello.ogg")
    async with Service(replace(settings, api_token=TOKEN, media_dir=media), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            service.http = http
            yield service


async def request(service, method, path, doc_path=None, **kwargs):
    async with service.http.request(method, path, **kwargs) as resp:
        body = await resp.json()
        check(body, resp.status, method, doc_path or path)
        return resp.status, body


def test_every_route_is_documented_and_every_documented_route_exists():
    from gateway.api.routes import ControlApi

    routes = {(r.method, r.path) for r in ControlApi(None, None, None).routes()}
    routes.add(("GET", "/v1/events"))  # served by the event bus
    documented = {(method.upper(), path) for path, item in DOC["paths"].items()
                  for method in item if method != "parameters"}
    assert routes == documented


async def test_openapi_is_served_without_auth(api):
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{api.url}/v1/openapi.json") as resp:
            assert resp.status == 200
            assert await resp.json() == DOC


async def test_place_watch_and_hang_up(api):
    status, call = await request(api, "POST", "/v1/calls",
                                 json={"to": USER, "play": "hello.ogg", "record": True,
                                       "biz_opaque_callback_data": "crm=42"})
    assert status == 201 and call["state"] == "offer_sent" and call["wacid"].startswith("wacid.")
    manager_call = api.manager.get(call["id"])
    await manager_call.wait_state(manager_call.state.MEDIA_CONNECTED, TIMEOUT)

    status, got = await request(api, "GET", f"/v1/calls/{call['id']}", "/v1/calls/{id}")
    assert status == 200 and got["state"] == "media_connected"
    assert got["media"]["candidate_pair"] == "host/host"
    assert got["biz_opaque_callback_data"] == "crm=42"
    status, by_wacid = await request(api, "GET", f"/v1/calls/{call['wacid']}", "/v1/calls/{id}")
    assert by_wacid["id"] == call["id"]

    status, queued = await request(api, "POST", f"/v1/calls/{call['id']}/play", "/v1/calls/{id}/play",
                                   json={"play": ["hello.ogg"]})
    assert status == 202 and queued["queued"] == 1

    status, ended = await request(api, "DELETE", f"/v1/calls/{call['id']}", "/v1/calls/{id}")
    assert status == 200 and ended["state"] == "ended" and ended["end_reason"] == "business_hangup"
    assert ended["media"]["packets_sent"] > 0
    assert any(p.endswith("user.wav") for p in ended["recordings"])
    status, again = await request(api, "DELETE", f"/v1/calls/{call['id']}", "/v1/calls/{id}")
    assert status == 200 and again["end_reason"] == "business_hangup"  # idempotent

    status, page = await request(api, "GET", "/v1/calls", params={"state": "ended"})
    assert [c["id"] for c in page["calls"]] == [call["id"]]
    status, page = await request(api, "GET", "/v1/calls", params={"state": "ringing"})
    assert page["calls"] == []
    status, _ = await request(api, "POST", f"/v1/calls/{call['id']}/play", "/v1/calls/{id}/play",
                              json={"play": "hello.ogg"})
    assert status == 409


async def test_pagination(api):
    ids = []
    for n in range(5):
        user = f"+4915112300{n:03d}"
        await api.sandbox.grant(user, permanent=True)
        api.sandbox.users.update(user, {"on_call": "reject", "answer_after_ms": 0})
        status, call = await request(api, "POST", "/v1/calls", json={"to": user})
        ids.append(call["id"])
        await api.manager.get(call["id"]).wait_finished(TIMEOUT)
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        status, page = await request(api, "GET", "/v1/calls", params=params)
        seen += [c["id"] for c in page["calls"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


@pytest.mark.parametrize("body, code", [
    ({"play": "hello.ogg"}, "bad_request"),                      # no "to"
    ({"to": "12"}, "bad_request"),                                # not E.164
    ({"to": USER, "play": "../../etc/passwd"}, "bad_media_path"),
    ({"to": USER, "play": "/etc/passwd"}, "bad_media_path"),
    ({"to": USER, "play": "missing.ogg"}, "bad_media_path"),
    ({"to": USER, "ring_timeout_s": -1}, "bad_request"),
    ({"to": USER, "record": "yes"}, "bad_request"),
    ({"to": USER, "colour": "blue"}, "bad_request"),
    ({"to": USER, "biz_opaque_callback_data": "x" * 513}, "bad_request"),
])
async def test_bad_requests(api, body, code):
    status, error = await request(api, "POST", "/v1/calls", json=body)
    assert status == 400 and error["error"]["code"] == code
    assert api.manager.calls == {} or all(c.ended for c in api.manager.calls.values())


async def test_bad_json_and_unknown_call(api):
    status, error = await request(api, "POST", "/v1/calls", data=b"{nope")
    assert status == 400 and error["error"]["code"] == "bad_request"
    status, error = await request(api, "GET", "/v1/calls/call_nope", "/v1/calls/{id}")
    assert status == 404 and error["error"]["code"] == "not_found"


async def test_wrong_or_missing_token_is_401(api):
    async with aiohttp.ClientSession(base_url=api.url) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            async with anonymous.get("/v1/calls", headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 401
                check(body, 401, "GET", "/v1/calls")


async def test_provider_refusal_is_typed(settings, tmp_path):
    """An offer the provider refuses (here: no candidates) -> 502 with 138014 and resolution."""
    async with Service(replace(settings, api_token=TOKEN, media_addresses=[]), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            service.http = http
            status, error = await request(service, "POST", "/v1/calls", json={"to": USER})
    assert status == 502
    assert error["error"]["code"] == 138014 and error["error"]["resolution"]
    assert error["error"]["call_id"].startswith("call_")


async def test_api_disabled_without_token(settings):
    async with Service(settings, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        async with aiohttp.ClientSession(base_url=service.url) as http:
            async with http.get("/v1/calls", headers={"Authorization": "Bearer "}) as resp:
                assert resp.status == 401
                assert "WACALL_API_TOKEN" in (await resp.json())["error"]["resolution"]


async def test_over_capacity_is_503(settings):
    async with Service(replace(settings, api_token=TOKEN, max_calls=0), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            service.http = http
            status, error = await request(service, "POST", "/v1/calls", json={"to": USER})
    assert status == 503 and error["error"]["code"] == "over_capacity"


async def test_health_and_readiness(api):
    async with aiohttp.ClientSession(base_url=api.url) as http:
        async with http.get("/healthz") as resp:
            assert resp.status == 200
        async with http.get("/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["ready"] is True


async def test_list_filters_by_user_direction_and_time_and_refuses_unknown_parameters(api):
    http = api.http
    api.sandbox.users.update(USER, {"on_call": "reject"})
    async with http.post("/v1/calls", json={"to": USER}) as resp:
        assert resp.status == 201
        placed = await resp.json()
    created = placed["created_at"]
    for query, expected in ((f"?user={USER}", True), ("?user=%2B4915100000000", False),
                            ("?direction=BUSINESS_INITIATED", True), ("?direction=USER_INITIATED", False),
                            (f"?since={created}", True), (f"?until={created}", False),
                            ("?since=2000-01-01T00:00:00Z&until=2100-01-01T00:00:00Z", True)):
        async with http.get("/v1/calls" + query) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            check(body, 200, "GET", "/v1/calls")
            assert (placed["id"] in [c["id"] for c in body["calls"]]) is expected, query
    for query in ("?colour=blue", "?since=yesterday", "?direction=sideways", "?user=123"):
        async with http.get("/v1/calls" + query) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request", query
    async with http.get(f"/v1/permissions/{USER}?refresh=1&x=2") as resp:
        assert resp.status == 400
    assert DOC["servers"][0]["url"].startswith("http://")
