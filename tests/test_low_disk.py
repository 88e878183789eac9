"""Low disk is an operating state: refused recordings, inbound policy, readiness, logs.

"Low" is made real by a reserve larger than the disk (``min_free_mb``), not by a mock:
the guard reads the file system the data dir is on. (A really full disk: test_disk_full.)
"""

import asyncio
import io
import logging
from dataclasses import replace

import aiohttp
import pytest

from gateway.app import Service
from gateway.calls import CallState, EndReason
from gateway.disk import DiskGuard, LowDiskError, default_min_free_mb
from gateway.logs import RepeatFilter, configure

TOKEN = "low-disk-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = "+4915112345678"
HUGE_MB = 10**12  # more than any disk
TIMEOUT = 20


def test_guard_reads_the_file_system_of_the_data_dir(tmp_path):
    guard = DiskGuard(tmp_path / "not" / "yet", 1)
    assert guard.free_bytes() > 0 and not guard.low
    guard.check_recording()
    assert DiskGuard(tmp_path, HUGE_MB).low
    with pytest.raises(LowDiskError) as refused:
        DiskGuard(tmp_path, HUGE_MB).check_recording()
    assert "without recording" in refused.value.resolution
    assert not DiskGuard(tmp_path, 0).low  # 0 turns it off
    assert default_min_free_mb(100) == 3500 and default_min_free_mb(100, sandbox=True) == 64


async def test_low_disk_refuses_recorded_calls_only(settings):
    async with Service(replace(settings, api_token=TOKEN, min_free_mb=HUGE_MB), sandbox=True) as service, \
            aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        async with http.get("/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503 and body["reason"].startswith("low disk") and body["disk"]["low"]
        async with http.post("/v1/calls", json={"to": USER, "record": True}) as resp:
            assert resp.status == 507
            assert (await resp.json())["error"]["code"] == "insufficient_storage"
        assert service.sandbox.calls == {}  # nothing was placed
        async with http.post("/v1/calls", json={"to": USER}) as resp:
            assert resp.status == 201  # without recording it goes through
            call = service.manager.get((await resp.json())["id"])
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        await call.hangup()


@pytest.mark.parametrize("policy", [True, "required"])
async def test_inbound_calls_follow_the_recording_policy(settings, policy):
    async with Service(replace(settings, min_free_mb=HUGE_MB, inbound_record=policy), sandbox=True) as service:
        sandbox_call = await service.sandbox.user_calls(USER, hangup_after_s=0.5)
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
        call = service.manager.get(sandbox_call.wacid)
        await call.wait_finished(TIMEOUT)
    if policy == "required":  # cannot record: not answered
        assert call.end_reason is EndReason.DECLINED and "low disk" in call.end_detail
        assert sandbox_call.ended_by == "business_rejected"
    else:  # answered, unrecorded, and the call says why
        assert call.end_reason is EndReason.USER_HANGUP and sandbox_call.accepted_at is not None
        assert call.recording_files == {} and call.summary()["recording"]["error"]["code"] == "low_disk"


def test_ready_when_the_disk_has_room(settings):
    async def run():
        async with Service(settings, sandbox=True) as service, aiohttp.ClientSession() as http:
            async with http.get(f"{service.url}/readyz") as resp:
                return resp.status, await resp.json()

    status, body = asyncio.run(run())
    assert status == 200 and body["ready"] and not body["disk"]["low"] and "reason" not in body


def test_a_flood_of_one_line_becomes_one_line_and_a_count():
    now = [0.0]
    stream = io.StringIO()
    handler = configure(json=False, level=logging.INFO, stream=stream)
    repeat = next(f for f in handler.filters if isinstance(f, RepeatFilter))
    repeat._clock = lambda: now[0]
    log = logging.getLogger("wacall.test.flood")
    try:
        for i in range(5000):
            log.warning("write failed: %s", f"attempt {i}")
        log.warning("another message")
        now[0] = 61.0
        log.info("a minute later")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert "write failed: attempt 0" in lines[0] and "another message" in lines[1]
    assert "write failed: attempt 4999 (repeated 4999 times in the last 60 s)" in lines[2]
    assert "a minute later" in lines[3]
    assert repeat.suppressed == 4999


def test_the_repeat_count_line_is_redacted_too():
    now = [0.0]
    stream = io.StringIO()
    handler = configure(json=True, level=logging.INFO, stream=stream, secrets=["s3cr3t-token-value"])
    repeat = next(f for f in handler.filters if isinstance(f, RepeatFilter))
    repeat._clock = lambda: now[0]
    log = logging.getLogger("wacall.test.redact")
    try:
        for _ in range(3):
            log.warning("call to %s with %s failed", "+4915112345678", "s3cr3t-token-value")
        repeat.flush()
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert text.count("\n") == 2 and "repeated 2 times" in text
    assert "4915112345678" not in text and "s3cr3t-token-value" not in text and "5678" in text
