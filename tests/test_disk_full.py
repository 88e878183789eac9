"""A full disk never breaks a call: the recording stops, the audio goes on.

The data dir lives on a real 3 MB file system (a tmpfs this test mounts). Two recorded
calls fill it within seconds; then the user must still hear the business's tone and the
business the user's (FFT, on both sides, *after* the fault), each call carries the
recording error, the log holds a few lines per call and no traceback, the files written
before the fault open and play, ``/readyz`` is 503 and a new recorded call gets a JSON
507. Where mounting is refused (not root), the test is skipped and says so.
"""

import asyncio
import logging
import os
import subprocess
import wave
from dataclasses import replace

import aiohttp
import numpy as np
import pytest

from gateway.app import Service
from gateway.calls import CallState
from media import analysis
from media.sources.tone import ToneSource
from tests.helpers import ToneEars, until

TOKEN = "disk-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUSINESS_HZ, USER_HZ = 1000, 600
TIMEOUT = 30


@pytest.fixture
def small_fs(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 3 MB tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "the disk-full test needs a real small file system")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def wav_channels(path) -> tuple[np.ndarray, int]:
    """The samples of a WAV file as ``(frames, channels)`` int16, through :mod:`wave`
    (which checks the header), and its rate."""
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        return data.reshape(-1, w.getnchannels()), w.getframerate()


@pytest.mark.parametrize("recording_format", ["wav", "opus"])
async def test_a_full_disk_stops_the_recording_not_the_call(small_fs, settings, recording_format):
    """(stereo.ogg writes ~0.5 MB a minute: the phones' WAVs on the same disk fill it first.)"""
    records = Records()
    logging.getLogger().addHandler(records)
    settings = replace(settings, data_dir=small_fs / "data", api_token=TOKEN, min_free_mb=1,
                       recording_format=recording_format)
    try:
        async with Service(settings, sandbox=True) as service, \
                aiohttp.ClientSession(base_url=service.url, headers=AUTH) as http:
            users = ["+4915100000001", "+4915100000002"]
            for user in users:
                await service.sandbox.grant(user, permanent=True)
                service.sandbox.users.update(user, {"answer_after_ms": 0})
            calls = [await service.manager.place_call(user, sources=[ToneSource(BUSINESS_HZ, 60)],
                                                      record=True) for user in users]
            phones = []
            for call in calls:
                await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
                phone = service.sandbox.calls[call.wacid].phone
                phone.peer.play(ToneSource(USER_HZ, 60))
                phones.append(phone)
            # ~0.3 MB per call-second: the 3 MB fill up within seconds.
            await until(lambda: all(c.recording_error for c in calls), TIMEOUT)
            assert os.statvfs(small_fs).f_bavail == 0  # really full

            # After the fault, audio goes on both ways.
            ears = []
            for call, phone in zip(calls, phones):
                user_hears, business_hears = ToneEars(BUSINESS_HZ), ToneEars(USER_HZ)
                phone.peer.add_sink(user_hears)
                call.media.peer.add_sink(business_hears)
                ears += [user_hears, business_hears]
            await asyncio.gather(*(e.hears(1.0) for e in ears))
            for call in calls:
                assert call.state is CallState.MEDIA_CONNECTED and call.media.peer.outbound.readyState == "live"
                error = call.summary()["recording"]["error"]
                assert error["code"] == "disk_full" and "No space left" in error["reason"]
                assert [e.name for e in call.timeline].count("recording_failed") == 1

            # Low disk is an operating state: not ready, recorded calls refused with a reason.
            async with http.get("/readyz") as resp:
                body = await resp.json()
                assert resp.status == 503 and "low disk" in body["reason"] and body["disk"]["low"]
            async with http.post("/v1/calls", json={"to": "+4915100000003", "record": True}) as resp:
                assert resp.status == 507 and resp.content_type == "application/json"
                error = (await resp.json())["error"]
                assert error["code"] == "insufficient_storage" and "without recording" in error["resolution"]
            async with http.get("/metrics") as resp:
                text = await resp.text()
                assert 'wacall_recording_failures_total{code="disk_full"} 2.0' in text
                assert "wacall_data_free_bytes 0.0" in text

            for call in calls:
                await call.hangup()
            directories = [call.recording_files["sidecar"].parent for call in calls]
    finally:
        logging.getLogger().removeHandler(records)

    # What was written before the fault opens and plays: the business's tone on the
    # right channel of stereo.wav, the user's in user.wav, Ogg pages that decode.
    for directory in directories:
        if recording_format == "opus":  # whole pages, both legs, up to the fault
            (left, right), rate = analysis.read_channels(directory / "stereo.ogg")
            assert analysis.tone_seconds(right, rate, BUSINESS_HZ) > 0.2
            assert analysis.tone_seconds(left, rate, USER_HZ) > 0.2
            continue
        stereo, rate = wav_channels(directory / "stereo.wav")
        assert stereo.shape[1] == 2 and stereo.shape[0] > 0
        right = stereo[:, 1].astype(np.float32) / 32768
        assert analysis.tone_seconds(right, rate, BUSINESS_HZ) > 0.2
        user, rate = wav_channels(directory / "user.wav")
        assert user.shape[0] > 0
        x, rate = analysis.read_audio(directory / "user.ogg")
        assert x.size > 0
    # A few lines per call, none with a traceback (a full disk is not a bug).
    # (the simulated phones record on the same full disk: their lines are not wacall's)
    ours = [r for r in records.records if "sandbox phone" not in r.getMessage()]
    assert len(ours) <= 4 * len(calls), "\n".join(r.name + ": " + r.getMessage() for r in ours)
    assert not [r for r in records.records if r.exc_info], [r.getMessage() for r in records.records]
