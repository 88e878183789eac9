"""SIP/IVR bridge, end to end on the sandbox: a WhatsApp call (a simulated phone, a real
aiortc peer) joined to a SIP party once the user picked up — here an "IVR" made of a SIP
user agent and a plain-RTP endpoint on 127.0.0.1 (tests/test_sip_interop.py does the same
against baresip, Kamailio and SIPp). Tones both ways FFT-detected, DTMF both ways (RFC
4733 and SIP INFO), X-headers, either side hanging up ends both, recording on a bridged
call, the trunk direction (a PBX dials a WhatsApp user) with CANCEL and refusals."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest

from gateway.app import Service
from gateway.calls import CallState, EndReason
from gateway.sip import EndKind, UserAgent, UserAgentConfig
from media import analysis
from media.rtp import RtpEndpoint
from media.sources.tone import ToneSource
from tests.helpers import ToneEars, until
from tests.sip.support import FAST, free_udp_port
from tests.test_rtp_endpoint import Digits

USER = "+4915112345631"
PHONE_HZ, IVR_HZ = 600.0, 1000.0
TIMEOUT = 20
TOKEN = "sip-bridge-token-0123456789abcdef"


class Ivr:
    """A SIP party: a user agent answering every INVITE with an RTP endpoint that plays a
    tone and listens."""

    def __init__(self, codecs=("PCMU",), *, dtmf: bool = True) -> None:
        self.codecs = codecs
        self.dtmf = dtmf
        self.ua = UserAgent(UserAgentConfig(udp_port=0, tcp_port=0, timers=FAST, user="ivr"), on_invite=self.answer)
        self.endpoint: RtpEndpoint | None = None
        self.ears = ToneEars(PHONE_HZ)
        self.call = None
        self.answered = asyncio.get_running_loop().create_future()
        self.digits: Digits | None = None
        self.info_digits: list[str] = []

    async def answer(self, incoming) -> None:
        self.call = incoming
        endpoint = self.endpoint = RtpEndpoint(codecs=list(self.codecs), dtmf=self.dtmf, label="ivr")
        await endpoint.open()
        endpoint.add_sink(self.ears)
        endpoint.play(ToneSource(IVR_HZ, None))
        self.digits = Digits(endpoint)
        incoming.on_dtmf = lambda d: self.info_digits.append(d.digit)
        incoming.ring()
        incoming.answer(endpoint.accept_offer(incoming.offer.decode()))
        self.answered.set_result(incoming)

    @property
    def uri(self) -> str:
        return f"sip:ivr@127.0.0.1:{self.ua.port('UDP')}"

    async def __aenter__(self) -> Ivr:
        await self.ua.start()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        await self.ua.close()


@pytest.fixture
async def gateway(settings):
    sip = replace(settings, api_token=TOKEN, sip_listen=("127.0.0.1", free_udp_port()))
    async with Service(sip, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0, "say": None})
        yield service


async def bridged_call(service, ivr, **place):
    from gateway.sip.spec import SipSpec

    call = await service.manager.place_call(USER, sip=SipSpec.from_dict({"uri": ivr.uri, "codecs": ["PCMU"],
                                                                         "headers": {"X-Campaign": "spring"}}),
                                            **place)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    phone = service.sandbox.calls[call.wacid].phone
    user_ears = ToneEars(IVR_HZ)
    phone.peer.add_sink(user_ears)
    phone.peer.play(ToneSource(PHONE_HZ, None))
    await asyncio.wait_for(ivr.answered, TIMEOUT)
    return call, phone, user_ears


async def test_a_call_bridged_to_an_ivr_carries_tones_and_dtmf_both_ways(gateway, tmp_path):
    async with Ivr() as ivr:
        call, phone, user_ears = await bridged_call(gateway, ivr, record=True)
        await asyncio.gather(ivr.ears.hears(1.0), user_ears.hears(1.0))
        request = ivr.call.request
        assert request.headers.get("X-Wacall-Call-Id") == call.id
        assert request.headers.get("X-WhatsApp-Call-Id") == call.wacid
        assert request.headers.get("X-Campaign") == "spring"
        assert [e["name"] for e in call.summary()["timeline"]].count("sip_connected") == 1
        # DTMF: WhatsApp -> RFC 4733 at the IVR; IVR RFC 4733 and SIP INFO -> WhatsApp
        await phone.press("12")
        assert await ivr.digits.wait(2) == "12"
        await ivr.endpoint.send_dtmf("9", duration_ms=120)
        await ivr.call.send_dtmf("#", 120)
        await until(lambda: "".join(phone.dtmf_received) == "9#", TIMEOUT)
        # the IVR hangs up: the WhatsApp call ends, terminated at the provider
        await ivr.call.bye()
        await call.wait_finished(TIMEOUT)
    assert call.end_reason is EndReason.SIP_HANGUP
    sip = call.summary()["sip"]  # the SIP leg's own numbers, kept after the end
    assert sip["codec"] == "PCMU" and sip["target"].startswith("sip:…@127.0.0.1:")
    assert sip["media"]["packets_received"] > 40 and sip["media"]["packets_sent"] > 40
    async with aiohttp.ClientSession(base_url=gateway.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        async with http.get(f"/console/calls/{call.id}") as resp:
            page = await resp.text()
    assert "<h2>SIP party</h2>" in page and "sip_connected" in page and "sip_hangup" in page
    sandbox_call = gateway.sandbox.calls[call.wacid]
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert sandbox_call.ended_by == "business"
    # recording on a bridged call: the user left, the IVR (played to the user) right
    stereo = gateway.manager.recordings_dir / call.id / "stereo.wav"
    left, right, rate = _channels(stereo)
    assert analysis.tone_seconds(left, rate, PHONE_HZ) >= 1.0
    assert analysis.tone_seconds(right, rate, IVR_HZ) >= 1.0


async def test_without_telephone_event_the_users_keys_go_as_sip_info(gateway):
    async with Ivr(dtmf=False) as ivr:
        call, phone, user_ears = await bridged_call(gateway, ivr)
        assert b"telephone-event" not in ivr.call.local_sdp
        await user_ears.hears(0.5)
        await phone.press("4*")
        await until(lambda: ivr.info_digits == ["4", "*"], TIMEOUT)
        await call.hangup()


async def test_the_user_hanging_up_sends_bye_to_the_ivr(gateway):
    async with Ivr() as ivr:
        call, phone, user_ears = await bridged_call(gateway, ivr)
        await user_ears.hears(0.5)
        await gateway.sandbox._end(gateway.sandbox.calls[call.wacid], ended_by="user_hangup")  # (the user hangs up)
        end = await asyncio.wait_for(ivr.call.ended, TIMEOUT)
        await call.wait_finished(TIMEOUT)
    assert end.kind is EndKind.REMOTE_BYE
    assert call.end_reason is EndReason.USER_HANGUP


async def test_an_unreachable_ivr_means_no_call(gateway):
    from gateway.sip.spec import SipSpec

    dead = f"sip:ivr@127.0.0.1:{free_udp_port()}"
    gateway.manager.sip_context.probe_timeout_s = 1.0
    async with aiohttp.ClientSession(base_url=gateway.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        async with http.post("/v1/calls", json={"to": USER, "sip": {"uri": dead}}) as resp:
            body = await resp.json()
            assert resp.status == 502 and body["error"]["code"] == "sip_unavailable", body
        async with http.post("/v1/calls", json={"to": USER, "sip": {"uri": "http://x"}}) as resp:
            assert resp.status == 400 and "sip.uri" in (await resp.json())["error"]["message"]
    assert gateway.sandbox.calls_to(USER) == []
    with pytest.raises(ValueError):
        SipSpec.from_dict({"uri": dead, "headers": {"Via": "x"}})


def _channels(path):
    import wave

    import numpy as np

    with wave.open(str(path)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    return x[0::2], x[1::2], rate


# -- the SIP trunk: a PBX places WhatsApp calls through wacall ----------------------------

PBX_USER, PBX_PASSWORD = "pbx", "trunk-secret-42"


@pytest.fixture
async def trunk(settings):
    sip = replace(settings, api_token=TOKEN, sip_listen=("127.0.0.1", free_udp_port()),
                  sip_username=PBX_USER, sip_password=PBX_PASSWORD)
    async with Service(sip, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 300, "say": None})
        pbx = UserAgent(UserAgentConfig(udp_port=0, timers=FAST, user="pbx"))
        await pbx.start()
        pbx.endpoint = RtpEndpoint(codecs=["PCMA"], label="pbx")
        await pbx.endpoint.open()
        service.pbx = pbx
        try:
            yield service
        finally:
            pbx.endpoint.close()
            await pbx.close()


def dial(service, number: str = USER, auth=(PBX_USER, PBX_PASSWORD)):
    target = f"sip:{number}@127.0.0.1:{service.sip.ua.port('UDP')}"
    return service.pbx.invite(target, service.pbx.endpoint.create_offer(), auth=auth)


async def test_a_pbx_calls_a_whatsapp_user_through_the_trunk(trunk):
    pbx = trunk.pbx
    ears = ToneEars(PHONE_HZ)
    pbx.endpoint.add_sink(ears)
    pbx.endpoint.play(ToneSource(IVR_HZ, None))
    outgoing = dial(trunk)
    codes = []
    outgoing.on_provisional = lambda p: codes.append(p.code)
    answer = await outgoing.wait_answered(TIMEOUT)
    assert 180 in codes  # the user's phone rang first
    pbx.endpoint.set_remote_answer(answer.decode())
    (call,) = [c for c in trunk.manager.calls.values()]
    assert call.state is CallState.MEDIA_CONNECTED and call.user.endswith("5631")
    phone = trunk.sandbox.calls[call.wacid].phone
    user_ears = ToneEars(IVR_HZ)
    phone.peer.add_sink(user_ears)
    phone.peer.play(ToneSource(PHONE_HZ, None))
    await asyncio.gather(ears.hears(1.0), user_ears.hears(1.0))
    # the PBX hangs up: the WhatsApp call is terminated
    await outgoing.bye()
    await call.wait_finished(TIMEOUT)
    assert call.end_reason is EndReason.SIP_HANGUP
    assert trunk.sandbox.calls[call.wacid].ended_by == "business"


async def test_cancel_before_the_answer_ends_the_whatsapp_call(trunk):
    trunk.sandbox.users.update(USER, {"answer_after_ms": 60_000})
    outgoing = dial(trunk)
    provisional = await asyncio.wait_for(anext(outgoing.provisionals()), TIMEOUT)
    await until(lambda: any(c.state is CallState.RINGING for c in trunk.manager.calls.values()), TIMEOUT)
    (call,) = list(trunk.manager.calls.values())
    outgoing.cancel()
    end = await asyncio.wait_for(outgoing.ended, TIMEOUT)
    await call.wait_finished(TIMEOUT)
    assert provisional.code in (100, 180) and end.kind is EndKind.CANCELLED
    assert call.end_reason is EndReason.BUSINESS_HANGUP
    assert trunk.sandbox.calls[call.wacid].ended_by == "business"


async def test_refusals_are_sip_errors_with_the_reason(trunk):
    from gateway.sip import CallFailed

    async def refused(outgoing):
        with pytest.raises(CallFailed) as failed:
            await outgoing.wait_answered(TIMEOUT)
        return failed.value.reason

    stranger = "+4915112345699"  # no permission
    end = await refused(dial(trunk, stranger))
    assert end.code == 403 and "138006" in (end.warning or "") and "138006" in (end.reason or "")
    end = await refused(dial(trunk, "not-a-number"))
    assert end.code == 404
    end = await refused(dial(trunk, auth=(PBX_USER, "wrong")))
    assert end.code in (401, 403)
    trunk.sandbox.users.update(USER, {"answer_after_ms": 0, "on_call": "reject"})
    end = await refused(dial(trunk))
    assert end.code == 603
    assert trunk.sandbox.calls_to(stranger) == []


async def test_without_credentials_the_trunk_is_closed(gateway):
    pbx = UserAgent(UserAgentConfig(udp_port=0, timers=FAST, user="pbx"))
    await pbx.start()
    try:
        from gateway.sip import CallFailed

        target = f"sip:{USER}@127.0.0.1:{gateway.sip.ua.port('UDP')}"
        with pytest.raises(CallFailed) as failed:
            await pbx.invite(target, "v=0\r\n").wait_answered(TIMEOUT)
        assert failed.value.reason.code == 403 and "WACALL_SIP_USERNAME" in failed.value.reason.warning
    finally:
        await pbx.close()
    assert gateway.sandbox.calls_to(USER) == []


async def test_inbound_callers_join_the_configured_sip_party(settings):
    async with Ivr(codecs=("G722", "PCMU")) as ivr:
        sip = replace(settings, sip_listen=("127.0.0.1", free_udp_port()), inbound_sip_uri=ivr.uri,
                      inbound_record=False)
        async with Service(sip, sandbox=True) as service:
            sandbox_call = await service.sandbox.user_calls(USER)
            incoming = await asyncio.wait_for(ivr.answered, TIMEOUT)
            call = next(c for c in service.manager.calls.values() if c.wacid == sandbox_call.wacid)
            assert call.direction.value == "USER_INITIATED"
            assert incoming.request.headers.get("X-WhatsApp-Call-Id") == sandbox_call.wacid
            phone = sandbox_call.phone
            user_ears = ToneEars(IVR_HZ)
            phone.peer.add_sink(user_ears)
            phone.peer.play(ToneSource(PHONE_HZ, None))
            await asyncio.gather(user_ears.hears(1.0), ivr.ears.hears(1.0))
            assert call.sip_leg.codec == "G722"
            await ivr.call.bye()
            await call.wait_finished(TIMEOUT)
            assert call.end_reason is EndReason.SIP_HANGUP


class EarlyIvr(Ivr):
    """Plays its announcement as early media (183 with SDP) and answers only later."""

    def __init__(self) -> None:
        super().__init__()
        self.answer_now = asyncio.get_running_loop().create_future()

    async def answer(self, incoming) -> None:
        self.call = incoming
        endpoint = self.endpoint = RtpEndpoint(codecs=list(self.codecs), label="ivr")
        await endpoint.open()
        endpoint.add_sink(self.ears)
        endpoint.play(ToneSource(IVR_HZ, None))
        sdp = endpoint.accept_offer(incoming.offer.decode())
        incoming.progress(sdp)
        await self.answer_now
        incoming.answer(sdp)
        self.answered.set_result(incoming)


async def test_early_media_is_heard_before_the_answer(gateway):
    from gateway.sip.spec import SipSpec

    async with EarlyIvr() as ivr:
        call = await gateway.manager.place_call(USER, sip=SipSpec.from_dict({"uri": ivr.uri, "codecs": ["PCMU"]}))
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        phone = gateway.sandbox.calls[call.wacid].phone
        user_ears = ToneEars(IVR_HZ)
        phone.peer.add_sink(user_ears)
        await user_ears.hears(0.6)  # the announcement, while the SIP party has not answered
        assert not ivr.answered.done() and call.sip_leg.sip.answered.done() is False
        ivr.answer_now.set_result(None)
        await asyncio.wait_for(ivr.answered, TIMEOUT)
        await until(lambda: any(e["name"] == "sip_connected" for e in call.summary()["timeline"]), TIMEOUT)
        await user_ears.hears(1.2)  # and on after the answer
        await call.hangup()
