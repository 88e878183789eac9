"""Durable calls: nothing left running at the provider. Hang-ups are retried until the
provider confirms; a call the provider placed despite a lost ``connect`` response is
terminated; a gateway killed mid-call (``kill -9``) finishes its calls at the next start."""

from __future__ import annotations

import asyncio
import json
import os
import time
import wave
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.app import Service

from gateway.calls import CallState, EndReason
from gateway.sandbox.browser import write_tone_wav
from gateway.webhook_auth import WebhookAuth
from media import analysis
from tests.helpers import free_port, until
from tests.openapi import check
from tests.processes import ProviderAndGateway, poll_until

USER = "+4915112345678"
TIMEOUT = 20
TOKEN = "api-token-durable"


async def faults(service, **spec) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{service.url}/sandbox/faults", json=spec) as resp:
            assert resp.status == 200, await resp.text()


async def connected_call(service):
    service.sandbox.users.update(USER, {"answer_after_ms": 0})
    call = await service.manager.place_call(USER)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    return call, service.sandbox.calls[call.wacid]


async def test_terminate_is_retried_until_the_provider_confirms(service):
    call, at_provider = await connected_call(service)
    await faults(service, terminate={"fail": 2, "status": 503})
    await call.hangup()
    assert call.provider_hangup == {"action": "terminate", "confirmed": True, "attempts": 3}
    await asyncio.wait_for(at_provider.finished.wait(), TIMEOUT)
    assert at_provider.ended_by == "business"
    assert call.summary()["provider_hangup"]["confirmed"] is True


async def test_an_unconfirmed_hangup_is_a_502_and_shows_on_the_call(settings):
    async with Service(replace(settings, api_token=TOKEN), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.manager.hangup_attempts, service.manager.hangup_pause_s = 2, 0.01
        call, at_provider = await connected_call(service)
        await faults(service, terminate={"fail": 5, "status": 503})
        async with aiohttp.ClientSession() as http:
            async with http.delete(f"{service.url}/v1/calls/{call.id}",
                                   headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 502
                body = await resp.json()
        assert not at_provider.ended  # (what the 502 is about: it may still be up there)
    check(body, 502, "DELETE", "/v1/calls/{id}")  # (as the OpenAPI document says)
    assert body["error"]["code"] == "hangup_unconfirmed"
    assert body["call"]["state"] == "ended"
    assert body["call"]["provider_hangup"] == {
        "action": "terminate", "confirmed": False, "attempts": 2,
        "error": body["call"]["provider_hangup"]["error"]}
    ended = [e for e in call.timeline if e.name == "ended"]
    assert len(ended) == 1 and call.end_reason is EndReason.BUSINESS_HANGUP


async def test_a_call_placed_despite_a_lost_connect_response_is_terminated(service):
    service.sandbox.users.update(USER, {"answer_after_ms": 5000})
    await faults(service, connect={"fail": 1, "status": 502, "lose_response": True})
    call = await service.manager.place_call(USER)
    assert call.state is CallState.ENDED and call.end_reason is EndReason.PROVIDER_ERROR
    assert call.connect_unknown and "offer_sent" not in [e.name for e in call.timeline]  # no id from connect
    placed = [c for c in service.sandbox.calls.values() if c.user == USER[1:]]
    assert len(placed) == 1  # it rings at the provider: its first webhook carries our tag
    await asyncio.wait_for(placed[0].finished.wait(), TIMEOUT)
    assert placed[0].ended_by == "business"
    await until(lambda: call.provider_hangup is not None)
    assert call.wacid == placed[0].wacid and call.provider_hangup["confirmed"] is True


# -- kill -9 and restart: two processes -------------------------------------------------------


HEADER = ("X-Hook-Token", "restart-test-" + os.urandom(6).hex())
COMMON = {"WACALL_WEBHOOK_HEADER": f"{HEADER[0]}: {HEADER[1]}"}


class Events:
    """wacall's event webhooks, as a receiver sees them."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.events.append(json.loads(await request.read()))
        return web.Response(status=204)


async def sse_until(http, url: str, headers: dict, last_event_id: str, done, timeout: float = TIMEOUT) -> list[dict]:
    """Read ``url``'s event stream from ``last_event_id`` until ``done(event)``."""
    got: list[dict] = []

    async def read():
        async with http.get(url, headers={**headers, "Last-Event-ID": last_event_id}) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    got.append(json.loads(line[6:]))
                    if done(got[-1]):
                        return

    await asyncio.wait_for(read(), timeout)
    return got


@pytest.mark.parametrize("workers", ["0", "2"], ids=["media-in-process", "media-workers"])
async def test_a_gateway_killed_mid_call_finishes_the_call_at_the_next_start(tmp_path, workers):
    """kill -9 of the gateway: with media in-process the recording is repaired at the next
    start; with media workers, the worker reads the end of its pipe and finishes it."""
    events_port = free_port()
    events = Events()
    receiver = web.Application()
    receiver.router.add_post("/events", events.handle)
    runner = web.AppRunner(receiver)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", events_port).start()
    say = write_tone_wav(tmp_path / "say-600.wav", 600.0, 60.0, amplitude=0.3)
    try:
        async with ProviderAndGateway(tmp_path, token=TOKEN, common=COMMON, gateway_env={
                "WACALL_EVENT_WEBHOOKS": f"http://127.0.0.1:{events_port}/events",
                "WACALL_WORKERS": workers}) as world:
            http, gateway_url = world.http, world.gateway_url
            await world.grant(USER)
            await world.user(USER, say=str(say), answer_after_ms=0)
            keyed = {**world.api, "Idempotency-Key": "campaign-7-lead-42"}
            async with http.post(f"{gateway_url}/v1/calls", json={"to": USER, "record": True},
                                 headers=keyed) as resp:
                assert resp.status == 201, await resp.text()
                call_id = (await resp.json())["id"]
            live = await poll_until(lambda: world.call(call_id), lambda c: c["state"] == "media_connected")
            user_wav = Path(live["recording"]["files"]["user_wav"])
            # two seconds of the user's audio on disk, then the gateway dies without a word
            await until(lambda: user_wav.exists() and user_wav.stat().st_size > 44 + 2 * 2 * 48000, TIMEOUT)
            wacid = live["wacid"]
            await until(lambda: len(events.events) >= 3, TIMEOUT)
            seen_before_kill = [e["id"] for e in events.events]
            world.kill_gateway()
            killed_at = time.time()

            def there(calls):
                return next(c for c in calls if c["id"] == wacid)

            assert there(await world.calls_at_provider(USER))["state"] != "ended"  # still up there
            world.start_gateway()
            restarted = time.monotonic()
            ended_there = await poll_until(lambda: world.calls_at_provider(USER),
                                           lambda calls: there(calls)["state"] == "ended", timeout=30)
            terminated_after = time.monotonic() - restarted
            assert terminated_after < 10.0  # process start included
            assert there(ended_there)["ended_by"] == "business"
            await world.gateway_healthy()
            ended = await poll_until(lambda: world.call(call_id), lambda c: c["state"] == "ended")
            assert ended["end_reason"] == "gateway_restart" and ended["wacid"] == wacid
            check(ended, 200, "GET", "/v1/calls/{id}")
            assert ended["provider_hangup"]["confirmed"] is True
            assert [e["name"] for e in ended["timeline"]][-1] == "ended"
            listed = await world.get(f"{gateway_url}/v1/calls")
            assert call_id in [c["id"] for c in listed["calls"]]
            # the recording of the killed call is listed by the new process, and plays
            (recording,) = (await world.get(f"{gateway_url}/v1/recordings?call_id={call_id}"))["recordings"]
            files = {f["name"]: f for f in recording["files"]}
            async with http.get(gateway_url + files["user.wav"]["url"], headers=world.api) as resp:
                assert resp.status == 200
                downloaded = await resp.read()
            assert downloaded[:4] == b"RIFF" and len(downloaded) == files["user.wav"]["size"] > 44
            # a retry of the POST with its Idempotency-Key: the same call, as it is now
            async with http.post(f"{gateway_url}/v1/calls", json={"to": USER, "record": True},
                                 headers=keyed) as resp:
                assert resp.status == 201
                retried = await resp.json()
            assert retried["id"] == call_id and retried["state"] == "ended"
            # SSE resumes after an event of the dead process: its later events, then the new ones
            replayed = await sse_until(http, f"{gateway_url}/v1/events", world.api, seen_before_kill[1],
                                       lambda e: e["type"] == "call.ended" and e["call_id"] == call_id)
            assert [e["id"] for e in replayed[:len(seen_before_kill) - 2]] == seen_before_kill[2:]
            assert replayed[-1]["data"]["entry"]["reason"] == "gateway_restart"
            assert len({e["id"] for e in replayed}) == len(replayed)
            # its call.ended event went out from the new process
            await until(lambda: any(e["type"] == "call.ended" and e["data"]["call"]["id"] == call_id
                                    for e in events.events), TIMEOUT)
            # a redelivered connect for that call creates nothing
            body = json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
                "field": "calls", "value": {"messaging_product": "whatsapp", "calls": [{
                    "id": wacid, "event": "connect", "direction": "USER_INITIATED", "from": USER[1:],
                    "to": "15550001111", "session": {"sdp": "v=0\r\n", "sdp_type": "offer"}}]}}]}]}).encode()
            signed = WebhookAuth(header=HEADER).sign(body)
            async with http.post(f"{gateway_url}/webhooks/whatsapp", data=body, headers=signed) as resp:
                assert resp.status == 200
            listed_again = await world.get(f"{gateway_url}/v1/calls")
            assert len(listed_again["calls"]) == len(listed["calls"])
    finally:
        await runner.cleanup()
    # the recording plays up to the kill: user.wav holds the user's tone from media up
    # to (at most 0.1 s before) the kill, plus what the playout buffer held
    with wave.open(str(user_wav)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    media_up = next(e for e in ended["timeline"] if e["name"] == "media_up")
    up_at = datetime.fromisoformat(media_up["at"].replace("Z", "+00:00")).timestamp()
    expected = killed_at - up_at
    print(f"kill -9 mid-call: provider's call terminated {terminated_after:.2f} s after the restart began; "
          f"user.wav {seconds:.3f} s of {expected:.3f} s from media up to the kill")
    # (a worker hears of the kill at once: it records up to 0.1 s more while it closes)
    assert expected - 0.25 <= seconds <= expected + (0.02 if workers == "0" else 0.1), (seconds, expected)
    x, rate = analysis.read_audio(user_wav)
    assert abs(analysis.dominant_frequency(x[-rate // 2:], rate) - 600.0) < 15  # to the end
    sidecar = json.loads((user_wav.parent / "recording.json").read_text())
    if workers == "0":
        assert sidecar.get("recovered") is True
    else:
        assert sidecar["complete"] is True and "recovered" not in sidecar, sidecar


async def test_a_call_parked_for_permission_waits_again_after_a_kill(tmp_path):
    async with ProviderAndGateway(tmp_path, token=TOKEN, common=COMMON) as world:
        await world.user(USER, on_permission_request="ignore", answer_after_ms=0)
        async with world.http.post(f"{world.gateway_url}/v1/calls", headers=world.api, json={
                "to": USER, "if_no_permission": "request", "permission_wait_s": 120}) as resp:
            assert resp.status == 201, await resp.text()
            call_id = (await resp.json())["id"]
        parked = await poll_until(lambda: world.call(call_id),
                                  lambda c: "permission_requested" in [e["name"] for e in c["timeline"]])
        assert parked["state"] == "created"
        world.kill_gateway()
        world.start_gateway()
        await world.gateway_healthy()
        # the user grants now (the webhook reaches the new process): the same call dials
        await world.grant(USER)
        connected = await poll_until(lambda: world.call(call_id),
                                     lambda c: c["state"] in ("media_connected", "ended"), timeout=30)
        assert connected["state"] == "media_connected", connected
        names = [e["name"] for e in connected["timeline"]]
        assert names[:3] == ["created", "permission_requested", "permission_granted"]
        assert "offer_sent" in names and "ended" not in names
        assert connected["timeline"][0] == parked["timeline"][0]  # its history, kept
        async with world.http.delete(f"{world.gateway_url}/v1/calls/{call_id}", headers=world.api) as resp:
            assert resp.status == 200
            assert (await resp.json())["end_reason"] == "business_hangup"


async def test_an_unconfirmed_hangup_is_tried_again_at_the_next_start(tmp_path):
    async with ProviderAndGateway(tmp_path, token=TOKEN, common=COMMON,
                                  gateway_env={"WACALL_HANGUP_ATTEMPTS": "1"}) as world:
        await world.grant(USER)
        await world.user(USER, answer_after_ms=0)
        async with world.http.post(f"{world.gateway_url}/v1/calls", json={"to": USER}, headers=world.api) as resp:
            call_id = (await resp.json())["id"]
        live = await poll_until(lambda: world.call(call_id), lambda c: c["state"] == "media_connected")
        async with world.http.post(f"{world.provider_url}/sandbox/faults", json={"terminate": {"fail": 1}}) as resp:
            assert resp.status == 200
        async with world.http.delete(f"{world.gateway_url}/v1/calls/{call_id}", headers=world.api) as resp:
            assert resp.status == 502

        def state_there(calls):
            return [c["state"] for c in calls if c["id"] == live["wacid"]]

        assert state_there(await world.calls_at_provider(USER)) != ["ended"]
        world.stop_gateway()  # (graceful: the call has ended here already)
        world.start_gateway()
        await poll_until(lambda: world.calls_at_provider(USER), lambda calls: state_there(calls) == ["ended"])
        await world.gateway_healthy()
        done = await poll_until(lambda: world.call(call_id), lambda c: c["provider_hangup"]["confirmed"])
        assert done["end_reason"] == "business_hangup"
