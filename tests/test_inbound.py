"""User-initiated calls: the sandbox user calls the business, wacall answers per policy."""

import asyncio
from dataclasses import replace

import pytest

from gateway.app import Service
from gateway.calls import CallState, EndReason, InboundPlan
from gateway.events import Direction
from media import analysis
from media.sources.tone import ToneSource
from tests.helpers import drain

USER = "+4915112345678"
TIMEOUT = 20


async def inbound_call(service, **kwargs):
    """Make the simulated user call; return (sandbox call, gateway call)."""
    created = asyncio.get_running_loop().create_future()

    def on_entry(call, entry):
        if entry.name == "created" and call.direction is Direction.USER_INITIATED and not created.done():
            created.set_result(call)

    unsubscribe = service.manager.subscribe(on_entry)
    try:
        sandbox_call = await service.sandbox.user_calls(USER, **kwargs)
        call = await asyncio.wait_for(created, TIMEOUT)
    finally:
        unsubscribe()
    assert call.wacid == sandbox_call.wacid
    return sandbox_call, call


async def test_inbound_call_is_answered_played_and_recorded(service, tmp_path):
    from gateway.sandbox.phone import Phone  # noqa: F401  (the phone is a real aiortc peer)

    service.manager.inbound_policy = lambda event: InboundPlan(sources=[ToneSource(1000, 0.6)], record=True)
    sandbox_call, call = await inbound_call(service, say=None)
    said = None
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    said = sandbox_call.phone.peer.play(ToneSource(600, 0.6))
    await call.wait_playback()
    await asyncio.wait_for(said.done, TIMEOUT)
    await drain(call.media, sandbox_call.phone.peer)
    await call.hangup()
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    names = [e.name for e in call.timeline]
    assert names.index("pre_accepted") < names.index("media_up") < names.index("accepted")
    assert call.end_reason is EndReason.BUSINESS_HANGUP
    assert sandbox_call.ended_by == "business"
    x, rate = analysis.read_audio(sandbox_call.phone.recording_path)
    assert analysis.tone_seconds(x, rate, 1000) == pytest.approx(0.6, abs=0.08)
    recording = next(p for p in call.recording_paths() if p.endswith("user.wav"))
    assert recording.endswith(f"{call.id}/user.wav")
    y, rate = analysis.read_audio(recording)
    assert analysis.tone_seconds(y, rate, 600) == pytest.approx(0.6, abs=0.08)


async def test_inbound_user_hangs_up(service):
    sandbox_call, call = await inbound_call(service, hangup_after_s=0.3)
    await call.wait_state(CallState.ENDED, TIMEOUT)
    assert call.end_reason is EndReason.USER_HANGUP
    assert sandbox_call.ended_by == "user_hangup"


async def test_policy_rejects(service):
    service.manager.inbound_policy = lambda event: None
    sandbox_call, call = await inbound_call(service)
    await call.wait_finished(TIMEOUT)
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert call.end_reason is EndReason.DECLINED
    assert sandbox_call.ended_by == "business_rejected"
    assert sandbox_call.accepted_at is None


async def test_over_capacity_rejects(settings):
    async with Service(replace(settings, max_calls=0), sandbox=True) as service:
        sandbox_call, call = await inbound_call(service)
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert call.end_reason is EndReason.DECLINED
    assert sandbox_call.ended_by == "business_rejected"


async def test_failure_before_accept_rejects(settings):
    """Media that never comes up (the gateway offers no candidates and the phone none
    reachable) ends in a reject, not a hanging call."""
    async with Service(replace(settings, media_addresses=[], media_timeout_s=1.0), sandbox=True) as service:
        sandbox_call, call = await inbound_call(service)
        await call.wait_finished(TIMEOUT)
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert call.end_reason in (EndReason.MEDIA_FAILURE, EndReason.PROVIDER_ERROR)
    assert sandbox_call.ended_by == "business_rejected"
