"""A plain-RTP party (a SIP leg's audio) on a real sandbox call, in process and in a media
worker: the same commands (offer, answer, join, DTMF both ways, stats), tones both ways
FFT-detected, and the RTP side going silent ends the party with its reason."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from gateway.app import Service
from gateway.calls import CallState
from media.rtp import RtpEndpoint
from media.sources.tone import ToneSource
from tests.helpers import ToneEars, until
from tests.test_rtp_endpoint import Digits

USER = "+4915112345621"
PHONE_HZ, SIP_HZ = 600.0, 1000.0
TIMEOUT = 20


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "worker"])
async def test_an_rtp_party_joins_a_call(settings, workers):
    async with Service(replace(settings, workers=workers), sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0, "say": None})
        call = await service.manager.place_call(USER)
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        phone = service.sandbox.calls[call.wacid].phone
        user_ears, far_ears = ToneEars(SIP_HZ), ToneEars(PHONE_HZ)
        phone.peer.add_sink(user_ears)
        phone.peer.play(ToneSource(PHONE_HZ, None))
        far = RtpEndpoint(codecs=["PCMU"], label="pbx")
        await far.open()
        far.add_sink(far_ears)
        far.play(ToneSource(SIP_HZ, None))
        far_digits = Digits(far)
        try:
            party = await call.media.open_rtp(codecs=("opus", "PCMU"), inactivity_timeout_s=1.0)
            answer = far.accept_offer(await party.offer())
            assert await party.answer(answer) == "PCMU"
            await party.join(call.id)
            await asyncio.gather(far_ears.hears(1.0), user_ears.hears(1.0))
            await party.send_dtmf("7", 120)
            assert await far_digits.wait(1) == "7"
            await party.receive_dtmf("3", 120)  # (a SIP INFO digit)
            await until(lambda: "3" in "".join(phone.dtmf_received), TIMEOUT)
            stats = await party.get_stats()
            assert stats["codec"] == "PCMU" and stats["frames_to_rtp"] > 40 and stats["packets_received"] > 40
            far.close()  # the PBX goes silent
            assert await asyncio.wait_for(party.closed, TIMEOUT) == "rtp timeout"
            assert party.ended_by == "rtp"
        finally:
            far.close()
        await call.hangup()
        await call.wait_finished(TIMEOUT)
