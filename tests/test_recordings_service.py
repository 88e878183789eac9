"""The service's recordings: QA files per call, speech events, repair and retention at startup."""

import asyncio
import os
import struct
import time
from dataclasses import replace

import numpy as np
import pytest

from gateway.app import Service
from gateway.calls import CallState
from media import analysis
from media.sources.tone import SilenceSource, ToneSource

USER = "+4915112345678"
TIMEOUT = 20


async def test_recorded_call_has_qa_files_and_speech_events(service):
    service.sandbox.users.update(USER, {"answer_after_ms": 0})
    call = await service.manager.place_call(USER, record=True)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    phone = service.sandbox.calls[call.wacid].phone
    phone.peer.play(SilenceSource(0.4))
    phone.peer.play(ToneSource(600, 0.8))
    last = phone.peer.play(SilenceSource(0.8))
    await asyncio.wait_for(last.done, TIMEOUT)
    await call.hangup()
    names = [e.name for e in call.timeline]
    assert names.count("speech_start") == 1 and names.count("speech_stop") == 1
    start = next(e for e in call.timeline if e.name == "speech_start").detail["audio_s"]
    stop = next(e for e in call.timeline if e.name == "speech_stop").detail["audio_s"]
    assert stop - start == pytest.approx(0.8, abs=0.1)
    files = {os.path.basename(p): p for p in call.recording_paths()}
    assert set(files) == {"user.wav", "stereo.wav", "user.ogg", "recording.json"}
    for name, path in files.items():
        assert os.stat(path).st_mode & 0o777 == 0o600, name
    assert os.stat(os.path.dirname(files["user.wav"])).st_mode & 0o777 == 0o700
    x, rate = analysis.read_audio(files["user.ogg"])
    assert analysis.tone_seconds(x, rate, 600) == pytest.approx(0.8, abs=0.1)
    import json

    sidecar = json.loads(open(files["recording.json"]).read())
    assert sidecar["call_id"] == call.id and sidecar["media_stats"]["packets_sent"] > 0


def _broken_wav(path, seconds=1.0, rate=48000):
    """A WAV as a killed writer leaves it: samples on disk, header sizes still zero."""
    samples = (0.3 * 32767 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype("<i2")
    header = b"RIFF" + struct.pack("<I", 0) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    path.write_bytes(header + b"data" + struct.pack("<I", 0) + samples.tobytes())


async def test_startup_repairs_interrupted_recordings_and_applies_retention(settings):
    recordings = settings.data_dir / "recordings"
    for n, age in enumerate((3 * 86400, 2 * 86400, 60)):
        directory = recordings / f"call_{n:012x}"
        directory.mkdir(parents=True)
        _broken_wav(directory / "user.wav")
        old = time.time() - age
        os.utime(directory / "user.wav", (old, old))
        os.utime(directory, (old, old))
    async with Service(replace(settings, recording_max_age_s=86400.0), sandbox=True):
        pass
    remaining = sorted(p.name for p in recordings.iterdir())
    assert remaining == ["call_000000000002"]  # older than a day: removed
    x, rate = analysis.read_audio(recordings / remaining[0] / "user.wav")  # header repaired
    assert len(x) / rate == pytest.approx(1.0, abs=0.01)
    assert analysis.dominant_frequency(x, rate) == pytest.approx(440, abs=2)


async def test_opus_format_records_both_legs_without_decoding(settings):
    """``WACALL_RECORDING_FORMAT=opus`` (speech events off): stereo.ogg alone, the user's
    600 Hz on the left and the business's 1 kHz on the right, and the user's audio is
    never decoded on the way."""
    import json

    opus = replace(settings, recording_format="opus", speech_events=False)
    async with Service(opus, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        call = await service.manager.place_call(USER, record=True)
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        phone = service.sandbox.calls[call.wacid].phone
        said = phone.peer.play(ToneSource(600, 1.0))
        played = call.play(ToneSource(1000, 1.0))
        await asyncio.wait_for(asyncio.gather(said.done, played.done), TIMEOUT)
        await asyncio.wait_for(phone.peer.play(SilenceSource(0.5)).done, TIMEOUT)
        if settings.workers == 0:
            rx = call.media.peer._receiver
            assert rx.frames_not_decoded >= 50 and (rx.decoder is None or rx.decoder.packets == 0)
        await call.hangup()
        files = {os.path.basename(p): p for p in call.recording_paths()}
        assert set(files) == {"stereo.ogg", "recording.json"}
        (left, right), rate = analysis.read_channels(files["stereo.ogg"])
        assert rate == 48000
        assert analysis.tone_seconds(left, 48000, 600) == pytest.approx(1.0, abs=0.06)
        assert analysis.tone_seconds(right, 48000, 1000) == pytest.approx(1.0, abs=0.06)
        assert analysis.tone_seconds(left, 48000, 1000) == analysis.tone_seconds(right, 48000, 600) == 0
        sidecar = json.loads(open(files["recording.json"]).read())
        assert sidecar["files"] == {"stereo_ogg": "stereo.ogg"} and sidecar["complete"]
        assert sidecar["stereo_ogg"]["user"]["packets"] >= 50
        # nothing of the user was decoded, so nothing measured (not "silent"); the prompt's
        # levels are known without decoding
        assert sidecar["levels"]["user"] is None and sidecar["levels"]["business"]["peak_dbfs"] > -20, sidecar["levels"]
        recordings = service.manager.recordings
        item = recordings.item(sidecar)
        assert item["duration_s"] == sidecar["durations_s"]["stereo_ogg"] > 1.0
        assert [f["content_type"] for f in item["files"] if f["name"] == "stereo.ogg"] == ["audio/ogg"]
        waveform = recordings.waveform(recordings.file(call.id, "stereo.ogg"), 50)
        assert waveform["channels"] == 2 and waveform["sample_rate"] == 48000
        loud = [max(hi - lo for lo, hi in channel) for channel in waveform["peaks"]]
        assert min(loud) > 0.3  # both legs drawn (tones at -12 dBFS)
