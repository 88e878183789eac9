"""gateway.sip against baresip (auto-answering softphone, audio from its ``ausine``
module so no sound card is needed): we call it and hang up, and it calls us.

Without ``baresip`` the tests are skipped, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from gateway.sip import EndKind, IncomingCall
from tests.sip.support import TIMEOUT, free_udp_port, sdp, stop, tool, ua_factory


@pytest.fixture
async def make_ua():
    async with ua_factory() as make:
        yield make


NUMBER = "+4915112345678"

CONFIG = """\
poll_method\t\tepoll
sip_listen\t\t127.0.0.1:{port}
sip_trans_def\t\tudp
module_path\t\t/usr/lib/baresip/modules
module\t\t\tg711.so
module\t\t\tausine.so
module\t\t\taubridge.so
module_app\t\taccount.so
module_app\t\tmenu.so
audio_source\t\tausine,440
audio_player\t\taubridge,nil
audio_alert\t\taubridge,nil
ausrc_srate\t\t48000
auplay_srate\t\t48000
ausrc_channels\t\t2
auplay_channels\t\t2
"""


def baresip(tmp_path: Path, *commands: str) -> tuple[subprocess.Popen, int]:
    """baresip on a free port of 127.0.0.1, auto-answering, with a config of its own in
    ``tmp_path``; ``commands`` are run at start (``/dial sip:…``)."""
    binary = tool("baresip")
    port = free_udp_port()
    (tmp_path / "config").write_text(CONFIG.format(port=port))
    (tmp_path / "accounts").write_text("<sip:baresip@127.0.0.1>;regint=0;answermode=auto;audio_codecs=PCMU\n")
    args = [binary, "-f", str(tmp_path)]
    for command in commands:
        args += ["-e", command]
    log = (tmp_path / "baresip.log").open("w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE), port


class RtpSink(asyncio.DatagramProtocol):
    """Our end of the media: a UDP socket that notes the first RTP packet."""

    def __init__(self) -> None:
        self.first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.first.done():
            self.first.set_result(data)


async def test_we_call_baresip_it_answers_we_hang_up(make_ua, tmp_path):
    proc, port = baresip(tmp_path)
    transport = None
    try:
        ua = await make_ua()
        loop = asyncio.get_running_loop()
        transport, sink = await loop.create_datagram_endpoint(RtpSink, local_addr=("127.0.0.1", 0))
        rtp_port = transport.get_extra_info("sockname")[1]
        # baresip is up once it answers OPTIONS (bounded)
        async def up():
            while (await ua.options(f"sip:127.0.0.1:{port}")).code in (408, 503):
                pass
        await asyncio.wait_for(up(), TIMEOUT)
        call = ua.invite(f"sip:baresip@127.0.0.1:{port}", sdp(rtp_port))
        answer = await call.wait_answered(TIMEOUT)
        assert b"PCMU" in answer or b"RTP/AVP 0" in answer
        packet = await asyncio.wait_for(sink.first, TIMEOUT)  # its sine tone, in RTP
        assert packet[0] >> 6 == 2 and packet[1] & 0x7F == 0  # RTP v2, PCMU
        resp = await call.bye()
        assert resp is not None and resp.code == 200
        assert (await call.ended).kind is EndKind.LOCAL_BYE
    finally:
        if transport is not None:
            transport.close()
        stop(proc)


async def test_baresip_calls_us_we_answer(make_ua, tmp_path):
    calls: asyncio.Queue[IncomingCall] = asyncio.Queue()

    def answer(call: IncomingCall) -> None:
        calls.put_nowait(call)
        call.ring()
        call.answer(sdp(free_udp_port()))

    ua = await make_ua(answer)
    proc, _ = baresip(tmp_path, f"/dial sip:{NUMBER}@127.0.0.1:{ua.port()}")
    try:
        incoming = await asyncio.wait_for(calls.get(), TIMEOUT)
        assert incoming.user == NUMBER and incoming.offer and b"m=audio" in incoming.offer
        await asyncio.wait_for(incoming.confirmed, TIMEOUT)
        resp = await incoming.bye()
        assert resp is not None and resp.code == 200
    finally:
        stop(proc)
