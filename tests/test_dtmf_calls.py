"""DTMF through the gateway: the user's keys reach the call's events, ours reach the phone."""

from dataclasses import replace

import aiohttp
import pytest

from gateway.app import Service
from gateway.calls import CallState
from tests.helpers import until

USER = "+4915112345678"
TOKEN = "dtmf-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 20


@pytest.mark.parametrize("mode", ["rfc4733", "inband"])
async def test_user_keys_arrive_in_order_and_ours_reach_the_phone(settings, mode):
    settings = replace(settings, api_token=TOKEN, inband_dtmf=True)
    async with Service(settings, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            async with http.post("/v1/calls", json={"to": USER}) as resp:
                call_json = await resp.json()
            call = service.manager.get(call_json["id"])
            await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
            digits = "159#*0" if mode == "rfc4733" else "2580"
            async with http.post(f"/sandbox/calls/{call.wacid}/dtmf", json={"digits": digits, "mode": mode}) as resp:
                assert resp.status == 200, await resp.text()
            await until(lambda: len(call.dtmf_received) >= len(digits))
            assert "".join(call.dtmf_received) == digits
            sources = {e.detail["source"] for e in call.timeline if e.name == "dtmf"}
            assert sources == {mode}

            async with http.post(f"/v1/calls/{call.id}/dtmf", json={"digits": "42#"}) as resp:
                assert resp.status == 202, await resp.text()
            phone = service.sandbox.calls[call.wacid].phone
            await until(lambda: len(phone.dtmf_received) >= 3)
            assert "".join(phone.dtmf_received) == "42#"
            async with http.post(f"/v1/calls/{call.id}/dtmf", json={"digits": "x"}) as resp:
                assert resp.status == 400
            async with http.get(f"/v1/calls/{call.id}") as resp:
                assert (await resp.json())["dtmf_received"] == digits
            async with http.delete(f"/v1/calls/{call.id}") as resp:
                assert resp.status == 200
            async with http.post(f"/v1/calls/{call.id}/dtmf", json={"digits": "1"}) as resp:
                assert resp.status == 409
