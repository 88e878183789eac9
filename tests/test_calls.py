"""Business-initiated calls end to end through the sandbox: real HTTP, real WebRTC, real audio."""

import asyncio
import itertools
import json

import aiohttp
import numpy as np
import pytest

from gateway.calls import CallState, EndReason
from gateway.errors import InvalidSdpError
from gateway.providers import D360Provider, MetaProvider
from media import analysis
from media.sinks.wav import WavSink
from media.sources.tone import ToneSource
from tests.helpers import drain, tone_seconds

USER = "+4915112345678"
TIMEOUT = 20


async def wait_ended(call, timeout=TIMEOUT):
    await call.wait_state(CallState.ENDED, timeout)
    await call.wait_finished(timeout)


async def test_audio_flows_both_ways_and_playback_waits_for_accept(service, tmp_path):
    service.sandbox.users.update(USER, {"answer_after_ms": 300, "say": None})
    heard = tmp_path / "gateway.wav"
    call = await service.manager.place_call(USER, sources=[ToneSource(1000, 1.0)], sinks=[WavSink(heard)])
    assert call.state is CallState.OFFER_SENT and call.wacid.startswith("wacid.")
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    sandbox_call = service.sandbox.calls[call.wacid]
    said = sandbox_call.phone.peer.play(ToneSource(600, 1.0))
    await call.wait_playback()
    await asyncio.wait_for(said.done, TIMEOUT)
    await drain(call.media, sandbox_call.phone.peer)
    await call.hangup()
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)

    assert call.end_reason is EndReason.BUSINESS_HANGUP
    names = [e.name for e in call.timeline]
    assert names.index("accepted") < names.index("media_connected")
    assert names.index("media_up") < names.index("media_connected")
    # The phone heard the business tone, all of it, and not before the user picked up.
    assert tone_seconds(sandbox_call.phone.recording_path, 1000) == pytest.approx(1.0, abs=0.1)
    assert tone_seconds(heard, 600) == pytest.approx(1.0, abs=0.1)
    assert tone_seconds(heard, 1000) == 0
    assert sandbox_call.ended_by == "business"


# Every order of: HTTP response to connect, connect webhook (answer), RINGING, ACCEPTED
# (RINGING always before ACCEPTED, as a phone rings before it is picked up).
ORDERS = [p for p in itertools.permutations(("response", "connect", "ringing", "accepted"))
          if p.index("ringing") < p.index("accepted")]


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(p) for p in ORDERS])
async def test_every_webhook_ordering_connects_with_audio(service, order):
    service.sandbox.users.update(USER, {"answer_after_ms": 0, "event_order": list(order)})
    call = await service.manager.place_call(USER, sources=[ToneSource(800, 0.4)])
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    assert call.state is CallState.MEDIA_CONNECTED
    await call.wait_playback()
    sandbox_call = service.sandbox.calls[call.wacid]
    await drain(sandbox_call.phone.peer)
    await call.hangup()
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert call.end_reason is EndReason.BUSINESS_HANGUP
    assert tone_seconds(sandbox_call.phone.recording_path, 800) == pytest.approx(0.4, abs=0.08)
    names = [e.name for e in call.timeline]
    assert names.count("accepted") == 1 and names.count("answer_received") == 1


async def test_rejected(service):
    service.sandbox.users.update(USER, {"on_call": "reject", "answer_after_ms": 0})
    call = await service.manager.place_call(USER, sources=[ToneSource(800, 1)])
    await wait_ended(call)
    assert call.end_reason is EndReason.REJECTED
    assert "media_connected" not in [e.name for e in call.timeline]
    assert service.sandbox.calls[call.wacid].ended_by == "user_rejected"


async def test_ring_timeout_hangs_up_through_the_provider(service):
    service.sandbox.users.update(USER, {"on_call": "ignore"})
    call = await service.manager.place_call(USER, ring_timeout_s=0.5)
    await wait_ended(call)
    assert call.end_reason is EndReason.RING_TIMEOUT
    sandbox_call = service.sandbox.calls[call.wacid]
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert sandbox_call.ended_by == "business"  # we sent terminate
    assert sandbox_call.accepted_at is None


async def test_user_hangs_up(service):
    service.sandbox.users.update(USER, {"answer_after_ms": 0, "hangup_after_s": 0.5})
    call = await service.manager.place_call(USER)
    await wait_ended(call)
    assert call.end_reason is EndReason.USER_HANGUP
    assert call.duration_s is not None and call.duration_s <= 1
    assert service.sandbox.calls[call.wacid].ended_by == "user_hangup"


async def test_max_duration(service):
    service.sandbox.users.update(USER, {"answer_after_ms": 0})
    call = await service.manager.place_call(USER, max_duration_s=0.5)
    await wait_ended(call)
    assert call.end_reason is EndReason.MAX_DURATION
    assert service.sandbox.calls[call.wacid].ended_by == "business"


async def test_media_failure_when_the_phone_vanishes(service):
    service.sandbox.users.update(USER, {"answer_after_ms": 0})
    call = await service.manager.place_call(USER)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    await service.sandbox.calls[call.wacid].phone.peer.close()  # no terminate webhook
    await wait_ended(call)
    assert call.end_reason is EndReason.MEDIA_FAILURE


async def test_offer_without_candidates_is_refused_with_typed_138014(settings, tmp_path):
    from dataclasses import replace

    from gateway.app import Service

    async with Service(replace(settings, media_addresses=[]), sandbox=True) as service:

        await service.sandbox.grant(USER, permanent=True)
        # the sandbox's phones still use loopback; the gateway has no address to offer
        call = await service.manager.place_call(USER)
        await wait_ended(call)
    assert call.end_reason is EndReason.PROVIDER_ERROR
    assert isinstance(call.error, InvalidSdpError)
    assert call.error.code == 138014
    assert "no ICE candidates" in call.error.details
    assert call.error.resolution
    assert call.summary()["error"]["code"] == 138014


async def test_sandbox_refuses_bad_offers_for_both_provider_shapes(service):
    from pathlib import Path

    bad = (Path(__file__).resolve().parent.parent / "fixtures" / "sdp" / "bad-offer-sha384.sdp").read_bytes().decode()
    sandbox = service.sandbox
    for provider in (
        D360Provider(sandbox.api_key, base_url=f"{service.url}/sandbox"),
        MetaProvider(sandbox.token, sandbox.phone_number_id, base_url=f"{service.url}/sandbox"),
    ):
        try:
            with pytest.raises(InvalidSdpError) as info:
                await provider.connect(USER, bad)
        finally:
            await provider.close()
        assert info.value.code == 138014
        assert "sha-256" in info.value.details


async def test_meta_provider_places_a_call_through_the_sandbox(settings):
    from dataclasses import replace

    from gateway.app import Service

    async with Service(replace(settings, provider="meta"), sandbox=True) as service:

        await service.sandbox.grant(USER, permanent=True)
        assert isinstance(service.provider, MetaProvider)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        call = await service.manager.place_call(USER, sources=[ToneSource(900, 0.4)])
        await call.wait_playback()
        sandbox_call = service.sandbox.calls[call.wacid]
        await drain(sandbox_call.phone.peer)
        await call.hangup()
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert call.end_reason is EndReason.BUSINESS_HANGUP
    assert tone_seconds(sandbox_call.phone.recording_path, 900) == pytest.approx(0.4, abs=0.08)


def signed(service, payload) -> dict:
    """A webhook body as the provider sends it: authenticated the way this service expects."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return {"data": body, "headers": {"Content-Type": "application/json", **service.webhook_auth.sign(body)}}


async def test_duplicate_and_late_webhooks_change_nothing(service):
    service.sandbox.users.update(USER, {"answer_after_ms": 0})
    call = await service.manager.place_call(USER)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    envelope = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "calls", "value": {"messaging_product": "whatsapp", "statuses": [
            {"id": call.wacid, "type": "call", "status": "RINGING", "timestamp": "1749197000",
             "recipient_id": "4915112345678"}]}}]}]}
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.post(f"{service.url}/webhooks/whatsapp", **signed(service, envelope)) as resp:
                assert resp.status == 200
        assert call.state is CallState.MEDIA_CONNECTED  # a late RINGING does not go back
        await call.hangup()
        envelope["entry"][0]["changes"][0]["value"]["statuses"][0]["status"] = "ACCEPTED"
        async with http.post(f"{service.url}/webhooks/whatsapp", **signed(service, envelope)) as resp:
            assert resp.status == 200
    assert call.state is CallState.ENDED and call.end_reason is EndReason.BUSINESS_HANGUP


async def test_unknown_and_malformed_webhooks(service):
    async with aiohttp.ClientSession() as http:
        unknown = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
            {"field": "calls", "value": {"calls": [{"id": "wacid.nobody", "event": "call_quality_summary"}]}}]}]}
        async with http.post(f"{service.url}/webhooks/whatsapp", **signed(service, unknown)) as resp:
            assert resp.status == 200
        async with http.post(f"{service.url}/webhooks/whatsapp", **signed(service, b"{not json")) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "bad_webhook"
        async with http.post(f"{service.url}/webhooks/whatsapp", **signed(service, {"entry": 5})) as resp:
            assert resp.status == 400


class SentFrames:
    """Outbound tap: counts the frames wacall sends and notes the first audible one."""

    def __init__(self):
        self.frames = 0
        self.first_audible: int | None = None

    def write(self, pcm, rate, channels) -> None:
        if self.first_audible is None and np.abs(pcm).max() > 100:
            self.first_audible = self.frames
        self.frames += 1

    def close(self) -> None:
        pass


async def test_business_sends_audio_from_the_moment_media_is_up(service):
    """Silence flows while the phone rings; the prompt starts only after pick-up."""
    service.sandbox.users.update(USER, {"answer_after_ms": 800})
    sent = SentFrames()
    at_accept = {}

    def on_entry(call, entry):
        if entry.name == "offer_created":  # before any frame can go out
            call.media.peer.add_outbound_sink(sent)
        if entry.name == "accepted":
            at_accept["sent"] = sent.frames
            at_accept["heard"] = service.sandbox.calls[call.wacid].phone.peer.received.frames

    service.manager.subscribe(on_entry)
    call = await service.manager.place_call(USER, sources=[ToneSource(1000, 0.3)])
    await call.wait_playback()
    sandbox_call = service.sandbox.calls[call.wacid]
    await drain(sandbox_call.phone.peer)
    await call.hangup()
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)

    ringing_s = call.elapsed_until("accepted") - call.elapsed_until("media_up")
    assert ringing_s > 0.5
    # wacall sent a frame every 20 ms while the phone rang (frames are paced by the
    # loop's clock; a stalled loop re-schedules rather than bursting, so the count can
    # only fall short), and the phone received them as they came
    assert ringing_s - 0.15 <= at_accept["sent"] * 0.02 <= ringing_s + 0.04
    assert at_accept["heard"] >= at_accept["sent"] - 10  # a few in flight / in its buffer
    # The prompt began only after the pick-up ...
    assert sent.first_audible is not None and sent.first_audible >= at_accept["sent"]
    # ... and the phone's recording has exactly that much silence before the tone.
    x, rate = analysis.read_audio(sandbox_call.phone.recording_path)
    segments = analysis.tone_segments(x, rate, 1000)
    assert len(segments) == 1
    start, end = segments[0]
    assert start == pytest.approx(sent.first_audible * 0.02, abs=0.06)
    assert end - start == pytest.approx(0.3, abs=0.06)
    assert analysis.rms_dbfs(x[: int(rate * (start - 0.1))]) < -60  # and it was silence


async def test_service_media_uses_the_port_range_and_advertised_address(settings):
    """Settings reach every call's peer: host candidates inside WACALL_MEDIA_PORT_RANGE,
    advertising WACALL_ADVERTISED_ADDRESS, and the call still carries audio."""
    import os
    from dataclasses import replace

    from gateway.app import Service
    from media import sdp

    low = 21000 + (os.getpid() * 13) % 9000
    configured = replace(settings, media_port_range=(low, low + 9), media_addresses=["0.0.0.0"],
                         advertised_address="127.0.0.1")
    async with Service(configured, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        call = await service.manager.place_call(USER, sources=[ToneSource(700, 0.4)])
        offer = call.local_sdp
        candidates = sdp.host_candidates(offer)
        assert candidates and all(addr == "127.0.0.1" and low <= port <= low + 9 for addr, port in candidates)
        assert "c=IN IP4 127.0.0.1" in offer
        await call.wait_playback()
        sandbox_call = service.sandbox.calls[call.wacid]
        await drain(sandbox_call.phone.peer)
        await call.hangup()
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert tone_seconds(sandbox_call.phone.recording_path, 700) == pytest.approx(0.4, abs=0.08)


async def test_rtp_inactivity_ends_the_call_as_media_failure(settings):
    """ICE and DTLS stay "connected" on a dead path; the RTP watchdog notices."""
    from dataclasses import replace

    from gateway.app import Service

    async with Service(replace(settings, rtp_timeout_s=1.0), sandbox=True) as service:

        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        call = await service.manager.place_call(USER)
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        service.sandbox.calls[call.wacid].phone.peer.outbound.stop()  # the phone goes quiet
        await wait_ended(call)
    assert call.end_reason is EndReason.MEDIA_FAILURE
    assert call.end_detail == "no audio received for 1 s"
    assert service.sandbox.calls[call.wacid].ended_by == "business"  # we sent terminate
