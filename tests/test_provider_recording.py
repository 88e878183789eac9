"""WhatsApp's own call recording and transcription, end to end in the sandbox (Meta
backend): asked on connect, announced by webhook after the call, downloaded at once with
the provider's credentials, its sha256 verified, kept beside wacall's files, listed by
the recordings API, announced as events; a wrong sha256 is refused and reported; the
360dialog backend refuses the option with a clear 400."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import aiohttp
import pytest

from gateway.app import Service
from gateway.config import ConfigError, Settings
from gateway.calls import CallState
from gateway.recordings import ProviderRecording
from gateway.sandbox.browser import write_tone_wav
from media import analysis
from tests.helpers import until

TOKEN = "provider-recording-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = "+4915112345678"
TIMEOUT = 20
ASK = {"purpose": "quality assurance", "announcement_language": "en_US", "transcription": True}


@pytest.fixture
async def meta(settings, tmp_path):
    async with Service(replace(settings, api_token=TOKEN, provider="meta"), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        events = []
        service.events.bus.add_listener(events.append)
        service.seen = events
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            service.http = http
            play = write_tone_wav(tmp_path / "media" / "tone-1k.wav", 1000.0, 1.5, amplitude=0.3)
            service.library.root = play.parent
            yield service


async def call_with_recording(meta) -> str:
    async with meta.http.post("/v1/calls", json={"to": USER, "play": "tone-1k.wav", "provider_recording": ASK}) as resp:
        assert resp.status == 201, await resp.text()
        call = meta.manager.get((await resp.json())["id"])
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    sandbox_call = meta.sandbox.calls[call.wacid]
    assert sandbox_call.recording["purpose"] == "quality assurance"  # sent on connect
    assert sandbox_call.transcription["status"] == "ENABLED"
    await call.wait_playback()
    await call.hangup()
    await call.wait_finished(TIMEOUT)
    return call.id


async def test_whatsapps_recording_and_transcript_are_fetched_verified_and_listed(meta):
    call_id = await call_with_recording(meta)
    names = lambda: {e.type for e in meta.seen if e.call_id == call_id}  # noqa: E731
    await until(lambda: {"call.recording_available", "call.transcription_available"} <= names(), TIMEOUT)
    async with meta.http.get("/v1/recordings", params={"call_id": call_id}) as resp:
        (item,) = (await resp.json())["recordings"]
    files = {f["name"]: f for f in item["files"]}
    assert {"whatsapp-recording.ogg", "whatsapp-transcript.json"} <= set(files)
    assert files["whatsapp-recording.ogg"]["content_type"] == "audio/ogg"
    async with meta.http.get(files["whatsapp-recording.ogg"]["url"]) as resp:
        assert resp.status == 200
        audio = await resp.read()
    path = meta.manager.recordings_dir / call_id / "downloaded.ogg"
    path.write_bytes(audio)
    x, rate = analysis.read_audio(path)
    assert analysis.tone_seconds(x, rate, 1000) == pytest.approx(1.5, abs=0.15)  # the call's tone
    async with meta.http.get(files["whatsapp-transcript.json"]["url"]) as resp:
        assert (await resp.json())["segments"]
    async with meta.http.get(f"/v1/calls/{call_id}") as resp:
        summary = await resp.json()
    assert summary["provider_recording"]["artifacts"] == {"recording": "whatsapp-recording.ogg",
                                                          "transcription": "whatsapp-transcript.json"}
    event = next(e for e in meta.seen if e.type == "call.recording_available")
    assert event.data["url"] == f"/v1/calls/{call_id}/recordings/whatsapp-recording.ogg"


async def test_a_wrong_sha256_is_refused_and_reported(meta):
    async with aiohttp.ClientSession() as raw:
        async with raw.post(f"{meta.url}/sandbox/faults", json={"corrupt_artifacts": 1}) as resp:
            assert resp.status == 200
    call_id = await call_with_recording(meta)
    await until(lambda: any(e.type == "call.recording_failed" and e.call_id == call_id for e in meta.seen), TIMEOUT)
    failed = next(e for e in meta.seen if e.type == "call.recording_failed")
    assert "sha256" in failed.data["error"]
    await until(lambda: any(e.type == "call.transcription_available" and e.call_id == call_id
                            for e in meta.seen), TIMEOUT)  # (the next artifact was fine)
    assert not (meta.manager.recordings_dir / call_id / "whatsapp-recording.ogg").exists()


async def test_artifact_urls_need_the_credentials_and_expire(meta):
    meta.sandbox.artifact_ttl_s = 0.2
    call_id = await call_with_recording(meta)
    await until(lambda: meta.sandbox.artifacts, TIMEOUT)
    media_id = next(iter(meta.sandbox.artifacts))
    async with aiohttp.ClientSession() as raw:
        async with raw.get(f"{meta.url}/sandbox/media/{media_id}") as resp:
            assert resp.status == 401
    await asyncio.sleep(0.3)  # (the URL's lifetime passing is the scenario, not a synchronisation)
    async with aiohttp.ClientSession() as raw:
        async with raw.get(f"{meta.url}/sandbox/media/{media_id}",
                           headers={"Authorization": f"Bearer {meta.sandbox.token}"}) as resp:
            assert resp.status == 404
    assert call_id


def test_the_option_is_checked():
    assert ProviderRecording.from_dict(ASK).fields()["transcription"]["status"] == "ENABLED"
    for bad in ({}, {"purpose": ""}, {"purpose": "x" * 251}, {"purpose": "qa", "announcement_language": "xx"},
                {"purpose": "qa", "transcription": "yes"}, {"purpose": "qa", "other": 1}, "qa"):
        with pytest.raises(ValueError):
            ProviderRecording.from_dict(bad)


async def test_360dialog_refuses_the_option_with_a_clear_400(settings):
    async with Service(replace(settings, api_token=TOKEN), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            async with http.post("/v1/calls", json={"to": USER, "provider_recording": ASK}) as resp:
                assert resp.status == 400
                assert "does not document WhatsApp's call recording" in (await resp.json())["error"]["message"]
            async with http.post("/v1/calls", json={"to": USER, "provider_recording": {"purpose": ""}}) as resp:
                assert resp.status == 400


async def test_inbound_calls_ask_for_it_by_configuration(settings):
    configured = Settings.load({"WACALL_INBOUND_PROVIDER_RECORDING": "customer support QA"})
    assert json.loads(configured.inbound_provider_recording)["purpose"] == "customer support QA"
    async with Service(replace(settings, api_token=TOKEN, provider="meta",
                               inbound_provider_recording=configured.inbound_provider_recording),
                       sandbox=True) as service:
        events = []
        service.events.bus.add_listener(events.append)
        sandbox_call = await service.sandbox.user_calls(USER, hangup_after_s=1.0)
        # (sent on accept: the sandbox keeps what the business asked for)
        await until(lambda: sandbox_call.recording is not None, TIMEOUT)
        assert sandbox_call.recording["purpose"] == "customer support QA" and sandbox_call.transcription is None
        await until(lambda: any(e.type == "call.recording_available" for e in events), TIMEOUT)
        call_id = next(e.call_id for e in events if e.type == "call.recording_available")
        assert (service.manager.recordings_dir / call_id / "whatsapp-recording.ogg").stat().st_size > 0


def test_the_inbound_setting_is_checked():
    as_json = Settings.load({"WACALL_INBOUND_PROVIDER_RECORDING": json.dumps(ASK)}).inbound_provider_recording
    assert json.loads(as_json) == ASK
    for bad in ('{"purpose": ""}', '{"purpose": "qa", "announcement_language": "xx"}', "{not json"):
        with pytest.raises(ConfigError):
            Settings.load({"WACALL_INBOUND_PROVIDER_RECORDING": bad})
    d360 = Settings.load({"WACALL_INBOUND_PROVIDER_RECORDING": "qa", "WACALL_D360_API_KEY": "k"})
    with pytest.raises(ConfigError, match="needs the meta provider"):
        d360.provider_kwargs()


def test_two_artifacts_stored_at_once_are_both_listed(tmp_path):
    """The recording and the transcript arrive together (two threads write the sidecar):
    neither is lost, whatever the order or the clock's resolution."""
    import threading

    from gateway.recordings import Recordings

    recordings = Recordings(tmp_path)
    for i in range(20):
        call_id = f"call_{i:04d}"
        start = threading.Barrier(2)

        def store(kind: str) -> None:
            start.wait()
            recordings.store_artifact(call_id, kind, b"x" * 100, {"direction": "BUSINESS_INITIATED"})

        threads = [threading.Thread(target=store, args=(kind,)) for kind in ("recording", "transcription")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        item = recordings.item(recordings.sidecar(call_id))
        assert {f["name"] for f in item["files"]} == {"whatsapp-recording.ogg", "whatsapp-transcript.json"}
