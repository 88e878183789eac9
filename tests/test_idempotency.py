"""``Idempotency-Key`` on POST /v1/calls and permission requests: a retry returns the same
call (or request), also after a restart; the same key with another body is a 422."""

from __future__ import annotations

from dataclasses import replace

import aiohttp

from gateway.app import Service
from tests.helpers import until
from tests.openapi import check

TOKEN = "idempotency-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = "+4915112345678"
OTHER = "+4915122223333"


async def post(http, url, body, key):
    async with http.post(url, json=body, headers={**AUTH, "Idempotency-Key": key}) as resp:
        return resp.status, await resp.json()


async def test_a_retried_call_is_the_same_call_also_after_a_restart(settings):
    settings = replace(settings, api_token=TOKEN)
    async with Service(settings, sandbox=True) as service, aiohttp.ClientSession() as http:
        await service.sandbox.grant(USER, permanent=True)
        await until(lambda: service.ledger.status(USER[1:]).status.value == "granted")
        service.sandbox.users.update(USER, {"on_call": "reject"})
        url = f"{service.url}/v1/calls"
        status, first = await post(http, url, {"to": USER}, "order-8812-call")
        assert status == 201
        status, again = await post(http, url, {"to": USER}, "order-8812-call")
        assert status == 201 and again["id"] == first["id"]
        assert len(service.sandbox.calls) == 1  # placed once
        status, other = await post(http, url, {"to": USER, "record": True}, "order-8812-call")
        assert status == 422 and other["error"]["code"] == "idempotency_key_reused"
        check(other, 422, "POST", "/v1/calls")
        status, bad = await post(http, url, {"to": USER}, "bad\u00e9key")
        assert status == 400
        await service.manager.calls[first["id"]].wait_finished(20)
        status, message = await post(http, f"{service.url}/v1/permissions/{OTHER}/request", {}, "ask-other-1")
        assert status == 202
        sent = len(service.sandbox.messaging.sent)
        status, same = await post(http, f"{service.url}/v1/permissions/{OTHER}/request", {}, "ask-other-1")
        assert status == 202 and same["message_id"] == message["message_id"]
        assert len(service.sandbox.messaging.sent) == sent  # not sent twice

    async with Service(settings, sandbox=True) as service, aiohttp.ClientSession() as http:  # restarted
        status, after = await post(http, f"{service.url}/v1/calls", {"to": USER}, "order-8812-call")
        assert status == 201 and after["id"] == first["id"] and after["state"] == "ended"
        assert not service.sandbox.calls  # nothing placed by the new process
        status, same = await post(http, f"{service.url}/v1/permissions/{OTHER}/request", {}, "ask-other-1")
        assert status == 202 and same["message_id"] == message["message_id"]
        assert not service.sandbox.messaging.sent
