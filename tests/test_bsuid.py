"""Business-scoped user ids (BSUID, ``US.1349…``, parent form ``US.ENT.…``): a user is
called and asked for permission by BSUID through the sandbox (Meta backend), a user with
a username (webhooks carry only the BSUID) counts in the ledger entry of the number the
business wrote, and 360dialog refuses BSUIDs with a clear 400."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest

from gateway.app import Service
from gateway.calls import CallState
from gateway.numbers import normalize_recipient
from gateway.redact import mask_phone
from media import analysis
from media.sources.tone import ToneSource
from tests.helpers import drain

TOKEN = "bsuid-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 20


@pytest.fixture
async def meta(settings):
    async with Service(replace(settings, api_token=TOKEN, provider="meta"), sandbox=True) as service:
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            service.http = http
            yield service


async def status_of(http, user: str) -> dict:
    async with http.get(f"/v1/permissions/{user}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.mark.parametrize("bsuid", ["US.13491208655302741918", "US.ENT.11815799212886844830", "DE.a1B2c3"])
async def test_a_user_is_asked_and_called_by_bsuid(meta, bsuid):
    http = meta.http
    async with http.post("/v1/calls", json={"recipient": bsuid}) as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == 138006
    async with http.post(f"/v1/permissions/{bsuid}/request", json={"via": "interactive", "text": "May we call?"}) as resp:
        assert resp.status == 202, await resp.text()
        assert (await resp.json())["user"] == bsuid
    await asyncio.wait_for(_granted(http, bsuid), TIMEOUT)  # the reply webhook named only the BSUID
    meta.sandbox.users.update(bsuid, {"answer_after_ms": 0})
    async with http.post("/v1/calls", json={"to": bsuid}) as resp:
        assert resp.status == 201, await resp.text()
        body = await resp.json()
    assert body["user"] == mask_phone(bsuid) and body["user"].startswith(bsuid.split(".")[0] + ".")
    call = meta.manager.get(body["id"])
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    sandbox_call = meta.sandbox.calls[call.wacid]
    assert sandbox_call.user == bsuid  # the provider was asked with recipient=<BSUID>
    said = sandbox_call.phone.peer.play(ToneSource(600, 1.0))
    heard = []
    call.media.peer.add_sink(type("Ears", (), {"write": lambda self, pcm, *a: heard.append(pcm.copy())})())
    await asyncio.wait_for(said.done, TIMEOUT)
    await drain(call.media, sandbox_call.phone.peer)
    await call.hangup()
    await call.wait_finished(TIMEOUT)
    import numpy as np

    x = np.concatenate(heard).astype(np.float32) / 32768
    assert analysis.tone_seconds(x, 48000, 600) == pytest.approx(1.0, abs=0.1)
    # the ledger counted the call for that BSUID
    assert (await status_of(http, bsuid))["calls_last_24h"] == 1


async def _granted(http, user: str) -> None:
    while (await status_of(http, user))["status"] != "granted":
        await asyncio.sleep(0.02)


async def test_a_user_with_a_username_counts_in_the_entry_of_the_number_written(meta):
    """The business asks +49…; the user has a username, so every webhook (the request's
    delivery, the GRANTED reply, the call's statuses) carries only their BSUID. The
    message's response named both: the reply lands in the number's ledger entry."""
    http, phone, bsuid = meta.http, "+4915112340099", "DE.7770001"
    meta.sandbox.users.update(phone, {"bsuid": bsuid, "username": True, "answer_after_ms": 0})
    async with http.post(f"/v1/permissions/{phone}/request", json={"via": "interactive", "text": "May we call?"}) as resp:
        assert resp.status == 202, await resp.text()
    await asyncio.wait_for(_granted(http, phone), TIMEOUT)
    assert (await status_of(http, bsuid))["status"] == "granted"  # one entry, either name
    assert normalize_recipient(phone) in meta.gate.ledger.list() and bsuid not in meta.gate.ledger.list()
    async with http.post("/v1/calls", json={"to": phone}) as resp:
        assert resp.status == 201, await resp.text()
        call = meta.manager.get((await resp.json())["id"])
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    await call.hangup()
    await call.wait_finished(TIMEOUT)
    status = await status_of(http, phone)
    assert status["calls_last_24h"] == 1 and status["status"] == "granted"


async def test_360dialog_refuses_bsuids_with_a_clear_400(settings):
    async with Service(replace(settings, api_token=TOKEN), sandbox=True) as service:
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            for method, path, body in (("POST", "/v1/calls", {"to": "US.13491208655302741918"}),
                                       ("POST", "/v1/calls", {"recipient": "US.13491208655302741918"}),
                                       ("POST", "/v1/permissions/US.13491208655302741918/request", {}),
                                       ("GET", "/v1/permissions/US.13491208655302741918", None)):
                async with http.request(method, path, json=body) as resp:
                    assert resp.status == 400, (path, await resp.text())
                    assert "does not document business-scoped user ids" in (await resp.json())["error"]["message"]
            async with http.post("/v1/calls", json={"recipient": "+4915112345678"}) as resp:
                assert resp.status == 400 and "recipient" in (await resp.json())["error"]["message"]
            async with http.post("/v1/calls", json={"to": "USA.123"}) as resp:
                assert resp.status == 400
