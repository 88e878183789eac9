"""media.rtp.bridge: a real WhatsApp-side call (two aiortc peers on 127.0.0.1) bridged to
a plain-RTP far side (an RtpEndpoint playing the SIP phone): tones both ways, DTMF both
ways, inactivity timeout, pickling."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from media_call import TIMEOUT, call_pair

from media import analysis
from media.rtp import RtpBridge, RtpEndpoint
from media.sources.tone import ToneSource
from tests.helpers import ToneEars
from tests.test_rtp_endpoint import Digits

PHONE_HZ = 600.0  # the WhatsApp user
SIP_HZ = 1000.0  # the SIP party


class PeerDigits:
    def __init__(self, peer) -> None:
        self.events = []
        self._changed = asyncio.Event()
        peer.on_dtmf(self._on)

    def _on(self, event) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait(self, n: int) -> str:
        async def loop():
            while len(self.events) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), TIMEOUT)
        return "".join(e.digit for e in self.events)


@pytest.mark.parametrize("codec", ["PCMU", "G722", "opus"])
async def test_tones_and_dtmf_both_ways(codec):
    user_ears, sip_ears = ToneEars(SIP_HZ), ToneEars(PHONE_HZ)
    far = RtpEndpoint(codecs=[codec], label="sip-phone")
    await far.open()
    bridge = RtpBridge(codecs=("PCMU", "PCMA", "G722", "opus"))
    try:
        async with call_pair(lambda business, user: user.add_sink(user_ears)) as (business, user):
            # SIP leg, outbound: our offer, the phone's answer
            await bridge.open()
            answer = far.accept_offer(bridge.create_offer())
            assert bridge.set_remote_answer(answer).codec.name.lower() == codec.lower()
            user.play(ToneSource(PHONE_HZ, None))
            far.play(ToneSource(SIP_HZ, None))
            far.add_sink(sip_ears)
            await bridge.start(business, call_id="call-rtp-1")
            await asyncio.gather(user_ears.hears(1.0), sip_ears.hears(1.0))
            # WhatsApp → RFC 4733 on the RTP side
            sip_digits = Digits(far)
            await user.send_dtmf("4#", duration_ms=120, gap_ms=80)
            assert await sip_digits.wait(2) == "4#"
            assert all(e.duration_ms >= 100 for e in sip_digits.events)
            # RFC 4733 from the RTP side → WhatsApp
            user_digits = PeerDigits(user)
            await far.send_dtmf("9*", duration_ms=120)
            assert await user_digits.wait(2) == "9*"
            # SIP INFO style
            await bridge.receive_dtmf("B", 100)
            assert await user_digits.wait(3) == "9*B"
            passthrough_frames = business.outbound.stats.passthrough_frames
            reason = await bridge.stop("sip bye")
    finally:
        far.close()
    assert reason == "sip bye" and bridge.ended_by == "local"
    assert abs(analysis.dominant_frequency(sip_ears.audio[-24000:], 48000) - PHONE_HZ) <= 20
    assert abs(analysis.dominant_frequency(user_ears.audio[-24000:], 48000) - SIP_HZ) <= 20
    stats = bridge.stats
    assert stats["codec"].lower() == codec.lower() and stats["dtmf_to_rtp"] == 2 and stats["dtmf_to_whatsapp"] == 3
    if codec == "opus":
        # pass-through both ways: WhatsApp's payloads out as they came, the phone's sent on
        assert stats["payloads_passed"] > 50 and stats["frames_to_rtp"] < 10
        assert passthrough_frames > 50
    else:
        assert stats["frames_to_rtp"] > 50 and stats["payloads_passed"] == 0
    assert bridge.playback.done.done()


async def test_inbound_offer_and_rtp_timeout():
    far = RtpEndpoint(codecs=["PCMA"], label="sip-phone")
    await far.open()
    bridge = RtpBridge(inactivity_timeout_s=0.5)
    try:
        async with call_pair() as (business, user):
            await bridge.start(business, call_id="call-rtp-2")  # start first, SDP later
            offer = far.create_offer()
            far.set_remote_answer(bridge.accept_offer(offer))
            far.play(ToneSource(SIP_HZ, None))
            ears = ToneEars(SIP_HZ)
            user.add_sink(ears)
            await ears.hears(0.6)  # past the timeout: RTP keeps it alive
            assert bridge.running
            far.close()
            assert await asyncio.wait_for(bridge.closed, TIMEOUT) == "rtp timeout"
            assert bridge.ended_by == "rtp"
    finally:
        far.close()


async def test_media_end_closes_and_pickling():
    bridge = RtpBridge(codecs=("PCMU",), port_range=(42000, 42100), inactivity_timeout_s=None)
    clone = pickle.loads(pickle.dumps(bridge))
    assert isinstance(clone, RtpBridge) and clone.options == bridge.options
    async with call_pair() as (business, _user):
        await bridge.start(business, call_id="call-rtp-3")
        with pytest.raises(TypeError):
            pickle.dumps(bridge)
        host, port = bridge.endpoint.local_address
        assert host == "127.0.0.1" and 42000 <= port <= 42100 and port % 2 == 0
        await business.close()
        reason = await asyncio.wait_for(bridge.closed, TIMEOUT)
    assert reason.startswith("call media ended")
