"""gateway.sip through Kamailio (registrar and record-routing proxy with digest auth):
two user agents REGISTER with credentials, one calls the other through the proxy, and
the ACK and BYE follow the Route set.

Without ``kamailio`` the test is skipped, except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from gateway.sip import EndKind, IncomingCall, RegistrationState
from tests.sip.support import TIMEOUT, free_udp_port, sdp, stop, tool, ua_factory


@pytest.fixture
async def make_ua():
    async with ua_factory() as make:
        yield make


CFG = Path(__file__).parent / "sip" / "kamailio.cfg"
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"


def kamailio(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    binary = tool("kamailio")
    port = free_udp_port()
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(CFG.read_text().replace("__PORT__", str(port)).replace("__MPATH__", MODULES))
    log = (tmp_path / "kamailio.log").open("w")
    proc = subprocess.Popen([binary, "-f", str(cfg), "-DD", "-E", "-m", "32", "-M", "8", "-w", str(tmp_path),
                             "-Y", str(tmp_path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, port


async def test_register_and_call_through_kamailio(make_ua, tmp_path):
    proc, port = kamailio(tmp_path)
    try:
        calls: asyncio.Queue[IncomingCall] = asyncio.Queue()

        def answer(call: IncomingCall) -> None:
            calls.put_nowait(call)
            call.ring()
            call.answer(sdp(40030))

        alice = await make_ua(user="alice")
        bob = await make_ua(answer, user="bob")
        seen = []
        original = bob._on_request

        def spy(req, peer):
            seen.append((req.method, len(req.via), peer.port))
            original(req, peer)

        bob._on_request = spy
        proxy = f"sip:127.0.0.1:{port}"
        regs = []
        for ua, user in ((alice, "alice"), (bob, "bob")):
            reg = ua.register(proxy, user=user, password=f"{user}pw", expires=60)
            resp = await asyncio.wait_for(reg.start(), TIMEOUT)
            assert resp.code == 200, (tmp_path / "kamailio.log").read_text()[-3000:]
            assert reg.state is RegistrationState.REGISTERED and reg.granted
            regs.append(reg)

        call = alice.invite(f"sip:bob@127.0.0.1:{port}", sdp(40040), auth=("alice", "alicepw"))
        await call.wait_answered(TIMEOUT)
        assert call.request.headers.get("Proxy-Authorization", "").startswith("Digest ")
        incoming = await asyncio.wait_for(calls.get(), TIMEOUT)
        await asyncio.wait_for(incoming.confirmed, TIMEOUT)
        assert any(f":{port};lr" in r for r in call.dialog.route_set), call.dialog.route_set
        assert incoming.request.headers.getlist("Record-Route")
        await call.bye()
        assert (await asyncio.wait_for(incoming.ended, TIMEOUT)).kind is EndKind.REMOTE_BYE
        # the INVITE, its ACK and the BYE all came through the proxy (its Via on top of ours)
        assert {(m, vias, p) for m, vias, p in seen} >= {("INVITE", 2, port), ("ACK", 2, port), ("BYE", 2, port)}, seen
        for reg in regs:
            await asyncio.wait_for(reg.close(), TIMEOUT)
            assert reg.state is RegistrationState.UNREGISTERED
            assert reg.last_response.code == 200
    finally:
        stop(proc)
