"""A call's media statistics survive the far end hanging up first (which takes aiortc's
counters and the candidate pair with the transport): in the API, the ``call.ended`` event,
the recording's sidecar and ``/metrics``, for outbound and inbound calls."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import aiohttp
import pytest

from gateway.app import Service
from gateway.calls import EndReason
from tests.helpers import until

USER = "+4915112345678"
TIMEOUT = 20


def assert_kept(media: dict, where: str) -> None:
    assert media.get("packets_sent", 0) > 0 and media.get("packets_received", 0) > 0, (where, media)
    assert media.get("candidate_pair"), (where, media)


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
async def test_stats_survive_a_user_hangup(settings, direction):
    async with Service(replace(settings, inbound_record=True), sandbox=True) as service:
        ended = []
        service.events.bus.add_listener(lambda e: ended.append(e) if e.type == "call.ended" else None)
        if direction == "outbound":
            await service.sandbox.grant(USER, permanent=True)
            service.sandbox.users.update(USER, {"answer_after_ms": 0, "hangup_after_s": 1.5})
            call = await service.manager.place_call(USER, record=True)
        else:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{service.url}/sandbox/users/{USER}/call", json={"hangup_after_s": 1.5}) as resp:
                    assert resp.status in (200, 201, 202), await resp.text()
            await until(lambda: service.manager.calls, TIMEOUT)
            call = next(iter(service.manager.calls.values()))
        await call.wait_finished(TIMEOUT)
        assert call.end_reason is EndReason.USER_HANGUP
        assert_kept(call.summary()["media"], "API")
        await until(lambda: ended, TIMEOUT)
        assert_kept(ended[0].data["call"]["media"], "call.ended")
        sidecar = json.loads(call.recording_files["sidecar"].read_text())
        assert_kept(sidecar["media_stats"], "recording.json")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{service.url}/metrics") as resp:
                text = await resp.text()
        received = re.search(r'wacall_rtp_packets_total\{direction="received"\} ([0-9.e+]+)', text)
        assert received and float(received.group(1)) > 0, "metrics"
