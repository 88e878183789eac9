"""The SIP/IVR bridge against real SIP software, with real audio (a tone each way,
FFT-detected on the other side):

(a) a sandbox WhatsApp call bridged out to baresip auto-answering (codec matrix PCMU,
PCMA, G.722, Opus; DTMF both ways), to an IVR registered behind Kamailio (digest to the
proxy, record-routing: the BYE goes through it), and to SIPp challenging with 401 (SIPp
echoes the RTP: the user hears their own tone come back through the SIP leg);

(b) baresip and SIPp as the PBX dialling a sandbox user through the trunk: digest, audio
both ways, the PBX hanging up; CANCEL before the answer; a refused permission as 403.

Missing tools skip the tests, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gateway.app import Service
from gateway.calls import CallState, EndReason
from gateway.sip import EndKind, RegistrationState
from gateway.sip.spec import SipSpec
from media import analysis
from media.sources.tone import ToneSource
from tests.helpers import ToneEars, until
from tests.sip.support import free_udp_port, stop, tool, wait_exit
from tests.test_sip_bridge import Ivr
from tests.test_sip_kamailio import kamailio
from tests.test_sip_sipp import sipp, sipp_logs

USER = "+4915112345651"
STRANGER = "+4915112345652"  # no permission
PHONE_HZ, SIP_HZ = 600.0, 1000.0
TIMEOUT = 20
PBX_USER, PBX_PASSWORD = "pbx", "trunk-secret-42"

BARESIP = """\
poll_method\t\tepoll
sip_listen\t\t127.0.0.1:{port}
module_path\t\t/usr/lib/baresip/modules
module\t\t\tg711.so
module\t\t\tg722.so
module\t\t\topus.so
module\t\t\tausine.so
module\t\t\taubridge.so
module\t\t\tsndfile.so
module_app\t\taccount.so
module_app\t\tmenu.so
module_app\t\tctrl_tcp.so
ctrl_tcp_listen\t\t127.0.0.1:{ctrl}
snd_path\t\t{dir}
audio_source\t\tausine,{hz}
audio_player\t\taubridge,nil
audio_alert\t\taubridge,nil
ausrc_srate\t\t48000
auplay_srate\t\t48000
ausrc_channels\t\t2
auplay_channels\t\t2
"""


def growing_wav(path: Path) -> tuple[np.ndarray, int]:
    """What a 16-bit PCM WAV that baresip is still writing holds so far, as mono float32.

    While the call lasts the header's sizes are not final and the file may end inside a
    frame (a decoder refuses that), so this reads the ``fmt `` chunk and then every whole
    frame after the ``data`` chunk's header, up to the end of the file as it is now."""
    raw = path.read_bytes()
    channels, rate, pos = 1, 0, 12
    while pos + 8 <= len(raw):
        kind, size = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
        if kind == b"fmt ":
            channels = int.from_bytes(raw[pos + 10:pos + 12], "little")
            rate = int.from_bytes(raw[pos + 12:pos + 16], "little")
            assert int.from_bytes(raw[pos + 22:pos + 24], "little") == 16, "baresip writes 16-bit PCM"
        elif kind == b"data":
            body = raw[pos + 8:]
            body = body[:len(body) - len(body) % (2 * channels)]
            pcm = np.frombuffer(body, dtype="<i2").reshape(-1, channels).mean(axis=1)
            return (pcm / 32768.0).astype(np.float32), rate
        pos += 8 + size + (size & 1)
    return np.zeros(0, dtype=np.float32), rate or 8000


class Baresip:
    """baresip on free ports of 127.0.0.1 (its config in ``directory``): plays a sine of
    ``SIP_HZ``, writes what it hears to ``dump-…-dec.wav`` (the sndfile module), takes
    commands on ctrl_tcp; auto-answers, or dials ``dial`` at start."""

    def __init__(self, directory: Path, *, account: str, codec: str | None = None, dial: str | None = None):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        codecs = f";audio_codecs={codec}" if codec else ""
        (directory / "accounts").write_text(f"{account};regint=0;answermode=auto{codecs}\n")
        self._args = [tool("baresip"), "-f", str(directory)] + (["-e", f"/dial {dial}"] if dial else [])
        self.log = directory / "baresip.log"
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        # (baresip also listens on TCP and TLS next to the UDP port it is given: a port
        # taken there by another process makes it exit, and it is started again on others)
        self.port, self.ctrl = free_udp_port(), free_udp_port()
        (self.directory / "config").write_text(
            BARESIP.format(port=self.port, ctrl=self.ctrl, dir=self.directory, hz=int(SIP_HZ)))
        self.proc = subprocess.Popen(self._args, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.PIPE)

    def collided(self) -> bool:
        """It exited because a port it wanted was taken; then it is started again (3 times at most)."""
        if self.proc.poll() is None or self.restarts >= 3 or "Address already in use" not in self.log.read_text():
            return False
        self.restarts += 1
        self._start()
        return True

    async def command(self, command: str, params: str = "") -> dict:
        """A ctrl_tcp command (netstring-framed JSON), once baresip listens."""

        async def connect():
            while True:
                try:
                    return await asyncio.open_connection("127.0.0.1", self.ctrl)
                except OSError:
                    assert self.collided() or self.proc.poll() is None, self.log.read_text()[-2000:]
                    await asyncio.sleep(0.05)

        reader, writer = await asyncio.wait_for(connect(), TIMEOUT)
        try:
            body = json.dumps({"command": command, "params": params, "token": "t"}).encode()
            writer.write(b"%d:%s," % (len(body), body))
            await writer.drain()
            while True:  # (events may come first: the reply is the message with "response")
                length = await asyncio.wait_for(reader.readuntil(b":"), TIMEOUT)
                reply = json.loads((await reader.readexactly(int(length[:-1]) + 1))[:-1])
                if reply.get("response"):
                    return reply
        finally:
            writer.close()

    def heard(self, hz: float) -> float:
        """Seconds of ``hz`` in what baresip received (decoded)."""
        total = 0.0
        for path in self.directory.glob("dump-*-dec.wav"):
            samples, rate = growing_wav(path)
            total += analysis.tone_seconds(samples, rate, hz)
        return total

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture
async def gateway(settings):
    sip = replace(settings, sip_listen=("127.0.0.1", free_udp_port()), sip_username=PBX_USER,
                  sip_password=PBX_PASSWORD)
    async with Service(sip, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 200, "say": None})
        yield service


async def talking_phone(service, call):
    """The sandbox phone of ``call`` saying PHONE_HZ; its ears for SIP_HZ (or its own echo)."""
    phone = service.sandbox.calls[call.wacid].phone
    ears = ToneEars(SIP_HZ)
    echo = ToneEars(PHONE_HZ)
    phone.peer.add_sink(ears)
    phone.peer.add_sink(echo)
    phone.peer.play(ToneSource(PHONE_HZ, None))
    return phone, ears, echo


# -- (a) WhatsApp call → SIP party --------------------------------------------------------


@pytest.mark.parametrize("codec", ["PCMU", "PCMA", "G722", "opus"])
async def test_bridged_to_baresip(gateway, tmp_path, codec):
    baresip = Baresip(tmp_path / "baresip", account="<sip:ivr@127.0.0.1>")
    try:
        await baresip.command("reginfo")  # (up: it takes commands)
        spec = SipSpec.from_dict({"uri": f"sip:ivr@127.0.0.1:{baresip.port}", "codecs": [codec]})
        call = await gateway.manager.place_call(USER, sip=spec)
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        phone, ears, _ = await talking_phone(gateway, call)
        await ears.hears(1.0)  # baresip's sine, through the SIP leg, at the WhatsApp user
        assert call.sip_leg.codec.lower() == codec.lower()
        # DTMF: WhatsApp -> baresip (RFC 4733), baresip -> WhatsApp
        await phone.press("7")
        await until(lambda: "received event: '7'" in baresip.log_text(), TIMEOUT)
        assert (await baresip.command("sndcode", "5"))["ok"]
        await until(lambda: "5" in "".join(phone.dtmf_received), TIMEOUT)
        await call.hangup()  # the business hangs up: BYE to baresip
        assert (await asyncio.wait_for(call.sip_leg.sip.ended, TIMEOUT)).kind is EndKind.LOCAL_BYE
        await until(lambda: "terminated" in baresip.log_text(), TIMEOUT)
    finally:
        baresip.stop()
    assert baresip.heard(PHONE_HZ) >= 1.0, baresip.log_text()[-2000:]


async def test_bridged_through_kamailio_with_digest_and_record_route(gateway, tmp_path):
    proc, port = kamailio(tmp_path)
    try:
        async with Ivr(codecs=("PCMU", "G722")) as ivr:
            reg = ivr.ua.register(f"sip:127.0.0.1:{port}", user="bob", password="bobpw", expires=60)
            resp = await asyncio.wait_for(reg.start(), TIMEOUT)
            assert resp.code == 200 and reg.state is RegistrationState.REGISTERED
            spec = SipSpec.from_dict({"uri": f"sip:bob@127.0.0.1:{port}", "username": "alice", "password": "alicepw"})
            call = await gateway.manager.place_call(USER, sip=spec)
            await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
            phone, ears, _ = await talking_phone(gateway, call)
            incoming = await asyncio.wait_for(ivr.answered, TIMEOUT)
            await asyncio.gather(ears.hears(1.0), ivr.ears.hears(1.0))
            leg = call.sip_leg.sip
            assert leg.request.headers.get("Proxy-Authorization", "").startswith("Digest ")  # (407 answered)
            assert any(f":{port};lr" in r for r in leg.dialog.route_set), leg.dialog.route_set
            assert len(incoming.request.via) == 2  # it came through the proxy
            await call.hangup()
            end = await asyncio.wait_for(incoming.ended, TIMEOUT)
            assert end.kind is EndKind.REMOTE_BYE
            await asyncio.wait_for(reg.close(), TIMEOUT)
    finally:
        stop(proc)


async def test_bridged_to_sipp_after_a_401(gateway, tmp_path):
    proc, port = sipp(tmp_path, "uas_digest.xml", "-rtp_echo")
    try:
        spec = SipSpec.from_dict({"uri": f"sip:ivr@127.0.0.1:{port}", "username": "alice", "password": "secret",
                                  "codecs": ["PCMU"], "probe": False})  # (its scenario takes one INVITE)
        call = await gateway.manager.place_call(USER, sip=spec)
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        phone, _, echo = await talking_phone(gateway, call)
        await until(lambda: call.sip_leg is not None and call.sip_leg.codec is not None, TIMEOUT)
        assert call.sip_leg.sip.request.headers["Authorization"].startswith("Digest ")
        await echo.hears(1.0)  # the user's own tone, echoed by SIPp through the SIP leg
        await call.hangup()  # BYE: SIPp's scenario ends
        assert await wait_exit(proc) == 0, sipp_logs(tmp_path)
    finally:
        stop(proc)


# -- (b) a PBX → WhatsApp, through the trunk ----------------------------------------------


async def test_baresip_as_the_pbx_calls_a_whatsapp_user(gateway, tmp_path):
    trunk = f"127.0.0.1:{gateway.sip.ua.port('UDP')}"
    baresip = Baresip(tmp_path / "pbx", account=f"<sip:{PBX_USER}@127.0.0.1>;auth_pass={PBX_PASSWORD}",
                      codec="PCMU", dial=f"sip:{USER}@{trunk}")
    try:
        await until(lambda: any(c.state is CallState.MEDIA_CONNECTED for c in gateway.manager.calls.values()),
                    TIMEOUT)
        (call,) = list(gateway.manager.calls.values())
        assert call.direction.value == "BUSINESS_INITIATED" and call.user.endswith("5651")
        phone, ears, _ = await talking_phone(gateway, call)
        await ears.hears(1.0)
        await until(lambda: baresip.heard(PHONE_HZ) >= 1.0, TIMEOUT)
        assert (await baresip.command("hangup"))["ok"]  # the PBX hangs up: terminate
        await call.wait_finished(TIMEOUT)
    finally:
        baresip.stop()
    assert call.end_reason is EndReason.SIP_HANGUP
    assert gateway.sandbox.calls[call.wacid].ended_by == "business"


async def test_sipp_as_the_pbx_cancels_before_the_answer(gateway, tmp_path):
    gateway.sandbox.users.update(USER, {"answer_after_ms": 60_000})
    proc, _ = sipp(tmp_path, "pbx_cancel.xml", f"127.0.0.1:{gateway.sip.ua.port('UDP')}", "-s", USER,
                   "-au", PBX_USER, "-ap", PBX_PASSWORD)
    try:
        assert await wait_exit(proc) == 0, sipp_logs(tmp_path)
        (call,) = list(gateway.manager.calls.values())
        await call.wait_finished(TIMEOUT)
    finally:
        stop(proc)
    assert call.end_reason is EndReason.BUSINESS_HANGUP
    assert gateway.sandbox.calls[call.wacid].ended_by == "business"


async def test_sipp_as_the_pbx_is_refused_without_permission(gateway, tmp_path):
    proc, _ = sipp(tmp_path, "pbx_refused.xml", f"127.0.0.1:{gateway.sip.ua.port('UDP')}", "-s", STRANGER,
                   "-au", PBX_USER, "-ap", PBX_PASSWORD)
    try:
        assert await wait_exit(proc) == 0, sipp_logs(tmp_path)
    finally:
        stop(proc)
    messages = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("*messages.log"))
    assert "SIP/2.0 403" in messages and "138006" in messages
    assert gateway.sandbox.calls_to(STRANGER) == []
