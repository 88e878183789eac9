"""gateway.sip over TLS (``sips:`` / ``;transport=tls``): two user agents with a
certificate made for the test (openssl), a call answered and hung up, and a client that
does not trust the certificate refused (the call fails, nothing hangs)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess

import pytest

from gateway.sip import CallFailed, EndKind, IncomingCall
from tests.sip.support import TIMEOUT, sdp, ua_factory


@pytest.fixture
async def make_ua():
    async with ua_factory() as make:
        yield make


@pytest.fixture
def certificate(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def contexts(cert, key, *, trusted: bool = True) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context()
    if trusted:
        client.load_verify_locations(cert)
    return server, client


async def test_a_call_over_tls(make_ua, certificate):
    server, client = contexts(*certificate)
    calls: asyncio.Queue[IncomingCall] = asyncio.Queue()

    def answer(call: IncomingCall) -> None:
        calls.put_nowait(call)
        call.answer(sdp(40050))

    bob = await make_ua(answer, udp_port=None, tls_port=0, tls_server=server, tls_client=client, user="bob")
    alice = await make_ua(udp_port=None, tls_port=0, tls_server=server, tls_client=client, user="alice")
    call = alice.invite(f"sip:bob@127.0.0.1:{bob.port('TLS')};transport=tls", sdp(40060))
    assert b"m=audio" in await call.wait_answered(TIMEOUT)
    incoming = await asyncio.wait_for(calls.get(), TIMEOUT)
    assert "TLS" in incoming.request.headers.get("Via")
    await call.bye()
    assert (await asyncio.wait_for(incoming.ended, TIMEOUT)).kind is EndKind.REMOTE_BYE


async def test_an_untrusted_certificate_fails_the_call(make_ua, certificate):
    server, _ = contexts(*certificate)
    _, untrusting = contexts(*certificate, trusted=False)
    bob = await make_ua(lambda call: call.answer(sdp(40070)), udp_port=None, tls_port=0, tls_server=server,
                        user="bob")
    alice = await make_ua(udp_port=None, tls_port=0, tls_server=server, tls_client=untrusting, user="alice")
    call = alice.invite(f"sip:bob@127.0.0.1:{bob.port('TLS')};transport=tls", sdp(40080))
    with pytest.raises(CallFailed) as failed:
        await call.wait_answered(TIMEOUT)
    assert failed.value.reason.code == 503  # (the transport error, as RFC 3261 §8.1.3.1 has it)
