"""Malformed SIP never breaks the user agent: mutated requests and responses (bytes
changed, cut, spliced) are parsed or dropped with ``ValueError``, and handling what parses
raises nothing and logs no error (no traceback for what someone on the network sent)."""

from __future__ import annotations

import logging

from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.sip import UserAgent, UserAgentConfig
from gateway.sip.message import parse
from gateway.sip.transport import Peer
from tests.sip.support import FAST

INVITE = (b"INVITE sip:+4915112345678@127.0.0.1:5060 SIP/2.0\r\n"
          b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc;rport\r\n"
          b"From: <sip:pbx@127.0.0.1>;tag=1\r\nTo: <sip:+4915112345678@127.0.0.1>\r\nCall-ID: abc@127.0.0.1\r\n"
          b"CSeq: 1 INVITE\r\nContact: <sip:pbx@127.0.0.1:5070>\r\nMax-Forwards: 70\r\n"
          b"Content-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n")
MESSAGES = [INVITE] + [INVITE.replace(b"INVITE sip", m + b" sip").replace(b"1 INVITE", b"1 " + m)
                       for m in (b"BYE", b"CANCEL", b"ACK", b"OPTIONS", b"INFO", b"UPDATE", b"REGISTER")] + [
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc\r\nFrom: <sip:a@b>;tag=1\r\n"
    b"To: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"]
PIECES = [b":", b";", b"<", b">", b"\r\n", b" ", b"=", b"\x00", b"\xff", b"@", b"sip:", b",", b"tag=",
          b"99999999999999999999", b"Content-Length: 99999\r\n", b"\r\n\r\n"]

mutation = st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(PIECES),
                     st.integers(1, 30))


def mutate(message: bytes, edits) -> bytes:
    data = bytearray(message)
    for kind, pos, byte, piece, length in edits:
        pos %= max(1, len(data))
        if kind == 0 and data:
            data[pos] = byte
        elif kind == 1:
            del data[pos:pos + length]
        else:
            data[pos:pos] = piece
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(MESSAGES), st.lists(mutation, max_size=6))
def test_parse_only_raises_value_error(message, edits):
    try:
        parse(mutate(message, edits))
    except ValueError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(st.sampled_from(MESSAGES), st.lists(mutation, max_size=5)), min_size=1, max_size=20))
def test_the_user_agent_takes_anything(batch, caplog):
    import asyncio

    async def run():
        ua = UserAgent(UserAgentConfig(udp_port=0, timers=FAST), on_invite=lambda call: call.reject(486))
        await ua.start()
        try:
            for message, edits in batch:
                ua._on_data(mutate(message, edits), Peer("UDP", "127.0.0.1", 5070))
            await asyncio.sleep(0)
        finally:
            await ua.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.sip"):
        asyncio.run(run())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
