"""The recordings API on real recorded sandbox calls: list (filters, pages), download
(stereo.wav with the user's tone left and the business's right, FFT-detected; Range → 206
with exactly those bytes; ETag → 304), names never joined to paths, waveform peaks
(cached), erasure (the call stays), retention by age."""

from __future__ import annotations

import asyncio
import io
import wave
from dataclasses import replace

import aiohttp
import numpy as np
import pytest

from gateway.app import Service
from gateway.calls import CallState
from gateway.sandbox.browser import write_tone_wav
from media import analysis
from media.sources.tone import ToneSource
from tests.helpers import until
from tests.openapi import check

TOKEN = "recordings-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USERS = ["+4915112345601", "+4915112345602"]
TIMEOUT = 20


@pytest.fixture
async def api(settings, tmp_path):
    async with Service(replace(settings, api_token=TOKEN), sandbox=True) as service:
        say = write_tone_wav(tmp_path / "say-600.wav", 600.0, 30.0, amplitude=0.3)
        for user in USERS:
            await service.sandbox.grant(user, permanent=True)
            service.sandbox.users.update(user, {"answer_after_ms": 0, "say": str(say)})
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            service.http = http
            yield service


async def recorded_call(api, user: str, seconds: float = 1.5):
    call = await api.manager.place_call(user, sources=[ToneSource(1000, seconds)], record=True)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    await call.wait_playback()
    await call.hangup()
    await call.wait_finished(TIMEOUT)
    return call


def channels(data: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        assert w.getnchannels() == 2
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    return x[0::2], x[1::2], rate


async def test_list_download_range_waveform_and_erase(api):
    http = api.http
    first = await recorded_call(api, USERS[0])
    second = await recorded_call(api, USERS[1])

    async with http.get("/v1/recordings") as resp:
        body = await resp.json()
        check(body, resp.status, "GET", "/v1/recordings")
    listed = [r["call_id"] for r in body["recordings"]]
    assert listed[:2] == [second.id, first.id]  # newest first
    item = body["recordings"][1]
    assert item["direction"] == "BUSINESS_INITIATED" and item["user"] == "+*********5601"
    assert item["complete"] and item["duration_s"] > 1.0
    files = {f["name"]: f for f in item["files"]}
    assert {"stereo.wav", "user.wav", "user.ogg"} <= set(files)
    assert files["stereo.wav"]["content_type"] == "audio/wav" and files["user.ogg"]["content_type"] == "audio/ogg"

    # pages and filters
    async with http.get("/v1/recordings", params={"limit": "1"}) as resp:
        page = await resp.json()
    assert [r["call_id"] for r in page["recordings"]] == [second.id] and page["next_cursor"] == second.id
    async with http.get("/v1/recordings", params={"limit": "1", "cursor": page["next_cursor"]}) as resp:
        assert [r["call_id"] for r in (await resp.json())["recordings"]] == [first.id]
    async with http.get("/v1/recordings", params={"user": USERS[0]}) as resp:
        assert [r["call_id"] for r in (await resp.json())["recordings"]] == [first.id]
    async with http.get("/v1/recordings", params={"call_id": second.id}) as resp:
        assert [r["call_id"] for r in (await resp.json())["recordings"]] == [second.id]
    async with http.get("/v1/recordings", params={"since": "2100-01-01T00:00:00Z"}) as resp:
        assert (await resp.json())["recordings"] == []
    async with http.get("/v1/recordings", params={"bogus": "1"}) as resp:
        assert resp.status == 400

    # the stereo file: the user's tone on the left, the business's on the right
    url = files["stereo.wav"]["url"]
    async with http.get(url) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
        whole = await resp.read()
        etag = resp.headers["ETag"]
        assert int(resp.headers["Content-Length"]) == len(whole) == files["stereo.wav"]["size"]
    left, right, rate = channels(whole)
    assert analysis.tone_seconds(left, rate, 600) >= 1.0 and analysis.tone_seconds(left, rate, 1000) == 0
    assert analysis.tone_seconds(right, rate, 1000) == pytest.approx(1.5, abs=0.1)
    assert analysis.tone_seconds(right, rate, 600) == 0
    async with http.get(url, headers={"Range": "bytes=1000-1999"}) as resp:
        assert resp.status == 206
        assert await resp.read() == whole[1000:2000]
        assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(whole)}"
    async with http.get(url, headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
    async with http.get(url, headers={"Range": f"bytes={len(whole) + 10}-"}) as resp:
        assert resp.status == 416

    # a name is matched against the call's own list, never joined to a path
    for bad in ("..%2F..%2Fwacall.sqlite3", "..%2Frecording.json", "%2Fetc%2Fpasswd", "nope.wav", ".stereo.wav.peaks-1.json"):
        async with http.get(f"/v1/calls/{first.id}/recordings/{bad}") as resp:
            assert resp.status == 404, bad
    async with http.get("/v1/calls/..%2F..%2F/recordings/stereo.wav") as resp:
        assert resp.status == 404

    # waveform: two channels of min/max columns, cached next to the file
    async with http.get(f"/v1/calls/{first.id}/waveform", params={"width": "100"}) as resp:
        peaks = await resp.json()
        check(peaks, resp.status, "GET", "/v1/calls/{id}/waveform")
    assert peaks["channels"] == 2 and peaks["width"] == 100 and len(peaks["peaks"][1]) == 100
    assert max(hi for _, hi in peaks["peaks"][1]) > 0.2  # the business's tone is drawn
    cached = api.manager.recordings_dir / first.id / ".stereo.wav.peaks-100.json"
    assert cached.exists()
    async with http.get(f"/v1/calls/{first.id}/waveform", params={"width": "100"}) as resp:
        assert await resp.json() == peaks
    async with http.get(f"/v1/calls/{first.id}/waveform", params={"file": "user.ogg", "width": "50"}) as resp:
        mono = await resp.json()
    assert mono["channels"] == 1 and mono["width"] == 50
    async with http.get(f"/v1/calls/{first.id}/waveform", params={"width": "0"}) as resp:
        assert resp.status == 400

    # erasure: files gone, the call stays
    async with http.delete(f"/v1/calls/{first.id}/recordings") as resp:
        body = await resp.json()
        check(body, resp.status, "DELETE", "/v1/calls/{id}/recordings")
        assert body == {"call_id": first.id, "erased": True}
    async with http.get(url) as resp:
        assert resp.status == 404
    async with http.get("/v1/recordings") as resp:
        assert first.id not in [r["call_id"] for r in (await resp.json())["recordings"]]
    async with http.get(f"/v1/calls/{first.id}") as resp:
        assert resp.status == 200
    async with http.delete(f"/v1/calls/{first.id}/recordings") as resp:
        assert resp.status == 404


async def test_a_call_still_recording_cannot_be_erased(api):
    call = await api.manager.place_call(USERS[0], sources=[ToneSource(1000, 30)], record=True)
    try:
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        async with api.http.delete(f"/v1/calls/{call.id}/recordings") as resp:
            assert resp.status == 409
        async with api.http.get("/v1/recordings", params={"call_id": call.id}) as resp:
            (live,) = (await resp.json())["recordings"]
        assert live["complete"] is False  # listed while it records
    finally:
        await call.hangup()
        await call.wait_finished(TIMEOUT)


async def test_recordings_older_than_the_retention_are_swept_and_the_call_stays(settings, tmp_path):
    async with Service(replace(settings, api_token=TOKEN, recording_retention_days=1.0), sandbox=True) as service:
        await service.sandbox.grant(USERS[0], permanent=True)
        service.sandbox.users.update(USERS[0], {"answer_after_ms": 0})
        call = await recorded_call(service, USERS[0], 0.3)
        directory = service.manager.recordings_dir / call.id
        assert directory.is_dir()
        service.sweep_recordings()  # (fresh: kept)
        assert directory.is_dir()
        import os
        import time

        old = time.time() - 2 * 86400
        for path in (directory, *directory.iterdir()):
            os.utime(path, (old, old))
        service.sweep_recordings()
        assert not directory.exists()
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            async with http.get(f"/v1/calls/{call.id}") as resp:
                assert resp.status == 200
        await asyncio.sleep(0)


async def test_a_call_the_user_hangs_up_lists_with_playable_files(api):
    """QA needs the calls the *user* ended too (most real calls end that way)."""
    api.sandbox.users.update(USERS[0], {"hangup_after_s": 2.0})
    call = await api.manager.place_call(USERS[0], sources=[ToneSource(1000, 30.0)], record=True)
    await call.wait_finished(TIMEOUT)
    assert call.end_reason.value == "user_hangup"
    async with api.http.get("/v1/recordings", params={"call_id": call.id}) as resp:
        (item,) = (await resp.json())["recordings"]
    assert item["complete"] and 1.5 < item["duration_s"] < 3.0
    files = {f["name"]: f for f in item["files"]}
    async with api.http.get(files["stereo.wav"]["url"]) as resp:
        left, right, rate = channels(await resp.read())
    assert analysis.tone_seconds(left, rate, 600) >= 1.2  # the user, until they hung up
    assert analysis.tone_seconds(right, rate, 1000) >= 1.5  # the business, cut by the hang-up
    async with api.http.get(files["user.ogg"]["url"]) as resp:
        assert resp.status == 200 and (await resp.read())[:4] == b"OggS"


async def test_a_compressed_recording_downloads_as_wav(settings, tmp_path):
    """``?format=wav`` renders stereo.ogg (``WACALL_RECORDING_FORMAT=both``: stereo.wav
    alongside to compare) into a WAV once per file version; bad asks get 400/422."""
    both = replace(settings, api_token=TOKEN, recording_format="both")
    async with Service(both, sandbox=True) as service:
        say = write_tone_wav(tmp_path / "say-600.wav", 600.0, 30.0, amplitude=0.3)
        await service.sandbox.grant(USERS[0], permanent=True)
        service.sandbox.users.update(USERS[0], {"answer_after_ms": 0, "say": str(say)})
        async with aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            service.http = http
            call = await recorded_call(service, USERS[0])
            base = f"/v1/calls/{call.id}/recordings"
            async with http.get(f"{base}/stereo.wav") as resp:
                left_wav, _, rate = channels(await resp.read())
            async with http.get(f"{base}/stereo.ogg", params={"format": "wav"}) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
                assert 'filename="stereo.wav"' in resp.headers["Content-Disposition"]
                rendered = await resp.read()
                etag = resp.headers["ETag"]
            left, right, rate = channels(rendered)
            assert rate == 48000 and left.size / rate == pytest.approx(left_wav.size / rate, abs=0.05)
            assert analysis.tone_seconds(left, rate, 600) >= 1.0 and analysis.tone_seconds(left, rate, 1000) == 0
            assert analysis.tone_seconds(right, rate, 1000) == pytest.approx(1.5, abs=0.1)
            renders = sorted(service.manager.recordings_dir.glob(f"{call.id}/.stereo.ogg.render-*.wav"))
            assert len(renders) == 1
            async with http.get(f"{base}/stereo.ogg", params={"format": "wav"},
                                headers={"If-None-Match": etag}) as resp:
                assert resp.status == 304  # (the render kept: not made again)
            async with http.get(f"{base}/stereo.ogg", params={"format": "wav"},
                                headers={"Range": "bytes=44-1043"}) as resp:
                assert resp.status == 206 and await resp.read() == rendered[44:1044]
            async with http.get(f"{base}/user.ogg", params={"format": "wav"}) as resp:
                with wave.open(io.BytesIO(await resp.read())) as w:
                    assert w.getnchannels() == 1 and w.getframerate() == 48000
            async with http.get(f"{base}/stereo.wav", params={"format": "wav"}) as resp:
                assert await resp.read() == (service.manager.recordings_dir / call.id / "stereo.wav").read_bytes()
            for name, fmt, status in (("stereo.ogg", "mp3", 400), ("recording.json", "wav", 400)):
                async with http.get(f"{base}/{name}", params={"format": fmt}) as resp:
                    body = await resp.json()
                    check(body, resp.status, "GET", "/v1/calls/{id}/recordings/{file}")
                    assert resp.status == status, (name, fmt)
            (service.manager.recordings_dir / call.id / "user.ogg").write_bytes(b"OggS not really")
            async with http.get(f"{base}/user.ogg", params={"format": "wav"}) as resp:
                body = await resp.json()
                assert resp.status == 422 and body["error"]["code"] == "bad_media_file"


async def test_a_call_can_ask_for_its_own_recording_format(api):
    http = api.http
    for bad in ("mp3", 1, None):
        async with http.post("/v1/calls", json={"to": USERS[0], "record": bad}) as resp:
            body = await resp.json()
            check(body, resp.status, "POST", "/v1/calls")
            assert resp.status == 400 and "recording format" in body["error"]["message"], bad
    async with http.post("/v1/calls", json={"to": USERS[0], "record": "opus"}) as resp:
        body = await resp.json()
        check(body, resp.status, "POST", "/v1/calls")
        assert resp.status == 201
    call = api.manager.get(body["id"])
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    await until(lambda: call.media.received.seconds >= 0.6, TIMEOUT)
    await call.hangup()
    await call.wait_finished(TIMEOUT)
    assert set(call.recording_files) == {"stereo_ogg", "sidecar"}  # (the service's own format is wav)
    (left, _), rate = analysis.read_channels(call.recording_files["stereo_ogg"])
    assert analysis.tone_seconds(left, rate, 600) > 0.3  # the user says 600 Hz from pick-up
