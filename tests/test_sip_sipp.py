"""gateway.sip against SIPp (Debian package sip-tester): SIPp as a digest-challenging
callee, and as a caller (with digest, and cancelling before the answer).

Without ``sipp`` the tests are skipped, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.sip import EndKind, IncomingCall
from tests.sip.support import (
    TIMEOUT,
    free_udp_port,
    sdp,
    stop,
    tool,
    ua_factory,
    wait_exit,
)


@pytest.fixture
async def make_ua():
    async with ua_factory() as make:
        yield make


SCENARIOS = Path(__file__).parent / "sip"
NUMBER = "+4915112345678"


def sipp(tmp_path: Path, scenario: str, *args: str) -> tuple[subprocess.Popen, int]:
    """SIPp on a free port of 127.0.0.1 running one call of ``scenario`` (copied into
    ``tmp_path``, where its logs go); the process and its SIP port."""
    binary = tool("sipp")
    shutil.copy(SCENARIOS / scenario, tmp_path / scenario)
    port, media = free_udp_port(), free_udp_port()
    cmd = [binary, *args, "-sf", str(tmp_path / scenario), "-i", "127.0.0.1", "-p", str(port),
           "-mi", "127.0.0.1", "-mp", str(media), "-m", "1", "-nostdin", "-timeout", "20s", "-timeout_error",
           "-trace_err", "-trace_msg"]
    log = (tmp_path / "sipp.out").open("w")
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), port


def sipp_logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in tmp_path.glob("*.log"))


async def test_sipp_callee_challenges_then_answers(make_ua, tmp_path):
    proc, port = sipp(tmp_path, "uas_digest.xml")
    try:
        alice = await make_ua(user="alice")
        # SIPp is listening once its port is bound; an early INVITE is retransmitted anyway
        call = alice.invite(f"sip:{NUMBER}@127.0.0.1:{port}", sdp(40010), auth=("alice", "secret"))
        answer = await call.wait_answered(TIMEOUT)
        assert b"m=audio" in answer
        assert call.request.headers["Authorization"].startswith("Digest ")
        resp = await call.bye()
        assert resp is not None and resp.code == 200
        assert await wait_exit(proc) == 0, sipp_logs(tmp_path)
    finally:
        stop(proc)


async def test_sipp_caller_with_digest(make_ua, tmp_path):
    calls: asyncio.Queue[IncomingCall] = asyncio.Queue()

    def handler(call: IncomingCall) -> None:
        calls.put_nowait(call)
        call.ring()
        call.answer(sdp(40020))

    bob = await make_ua(handler, users={"alice": "secret"}, realm="wacall.test")
    proc, _ = sipp(tmp_path, "uac_digest.xml", f"127.0.0.1:{bob.port()}", "-s", NUMBER,
                   "-au", "alice", "-ap", "secret")
    try:
        incoming = await asyncio.wait_for(calls.get(), TIMEOUT)
        assert incoming.user == NUMBER and incoming.offer and b"m=audio" in incoming.offer
        await asyncio.wait_for(incoming.confirmed, TIMEOUT)
        assert (await asyncio.wait_for(incoming.ended, TIMEOUT)).kind is EndKind.REMOTE_BYE
        assert await wait_exit(proc) == 0, sipp_logs(tmp_path)
    finally:
        stop(proc)


async def test_sipp_caller_cancels_before_answer(make_ua, tmp_path):
    calls: asyncio.Queue[IncomingCall] = asyncio.Queue()

    def handler(call: IncomingCall) -> None:
        calls.put_nowait(call)
        call.ring()  # and never answer

    bob = await make_ua(handler)
    proc, _ = sipp(tmp_path, "uac_cancel.xml", f"127.0.0.1:{bob.port()}", "-s", NUMBER)
    try:
        incoming = await asyncio.wait_for(calls.get(), TIMEOUT)
        assert (await asyncio.wait_for(incoming.ended, TIMEOUT)).kind is EndKind.CANCELLED
        assert await wait_exit(proc) == 0, sipp_logs(tmp_path)
    finally:
        stop(proc)
