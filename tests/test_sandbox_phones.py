"""Lean sandbox phones (``WACALL_SANDBOX_PHONES=lean``), for load tests: a phone keeps
what it hears as the Opus packets received (nothing decoded) and says a file that is
decoded and encoded once for every phone, not per call."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from gateway.app import Service
from gateway.calls import CallState
from gateway.sandbox.browser import write_tone_wav
from media import analysis
from media.sinks.wav import WavSink
from media.sources.tone import ToneSource

USER = "+4915112345699"
TIMEOUT = 20


async def test_lean_phones_keep_what_they_hear_as_opus_and_say_a_pre_encoded_file(settings, tmp_path):
    async with Service(replace(settings, sandbox_phones="lean"), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        say = write_tone_wav(tmp_path / "say.wav", 600.0, 1.5, amplitude=0.3)
        service.sandbox.users.update(USER, {"answer_after_ms": 0, "say": str(say)})
        for n in range(2):  # (the second call's phone gets the file's packets, encoded by then)
            heard = tmp_path / f"heard-{n}.wav"
            call = await service.manager.place_call(USER, sources=[ToneSource(1000, 1.0)], sinks=[WavSink(heard)])
            await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
            phone = service.sandbox.calls[call.wacid].phone
            await asyncio.wait_for(asyncio.gather(phone.said, call.wait_playback()), TIMEOUT)
            rx = phone.peer._receiver
            assert rx.frames_not_decoded >= 50 and (rx.decoder is None or rx.decoder.packets == 0)
            pacing = phone.peer.outbound.stats
            await call.hangup()
            await call.wait_finished(TIMEOUT)
            await asyncio.wait_for(service.sandbox.calls[call.wacid].finished.wait(), TIMEOUT)
            assert phone.recording_path.suffix == ".ogg"
            x, rate = analysis.read_audio(phone.recording_path)
            assert analysis.tone_seconds(x, rate, 1000) == pytest.approx(1.0, abs=0.06)
            y, rate = analysis.read_audio(heard)
            assert analysis.tone_seconds(y, rate, 600) == pytest.approx(1.5, abs=0.06)
        assert pacing.passthrough_frames >= 70 and pacing.encoded_frames == 0
