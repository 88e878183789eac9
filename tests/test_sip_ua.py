"""gateway.sip: two user agents in-process on 127.0.0.1 (UDP and TCP), calling each other."""

from __future__ import annotations

import asyncio

import pytest

from gateway.sip import CallFailed, Dtmf, EndKind, IncomingCall, PeerState, Timers
from gateway.sip.auth import DigestServer, Verdict, authorization, best_challenge
from gateway.sip.message import StreamFramer, parse
from tests.helpers import until
from tests.sip.support import TIMEOUT, sdp, ua_factory


@pytest.fixture
async def make_ua():
    async with ua_factory() as make:
        yield make


OFFER = sdp(40000)
ANSWER = sdp(40002, session=2)


class Answerer:
    """An ``on_invite`` handler: rings, then answers (or waits for ``go``)."""

    def __init__(self, *, answer: bool = True) -> None:
        self.calls: asyncio.Queue[IncomingCall] = asyncio.Queue()
        self.answer = answer
        self.go = asyncio.Event()

    async def __call__(self, call: IncomingCall) -> None:
        self.calls.put_nowait(call)
        call.ring()
        if not self.answer:
            await self.go.wait()
            if call.ended.done():
                return
        call.answer(ANSWER)

    async def next(self) -> IncomingCall:
        return await asyncio.wait_for(self.calls.get(), TIMEOUT)


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
async def test_invite_ring_answer_ack_bye(make_ua, transport):
    tcp = 0 if transport == "TCP" else None
    handler = Answerer()
    bob = await make_ua(handler, user="bob", tcp_port=tcp)
    alice = await make_ua(user="alice", tcp_port=tcp)
    provisionals = []
    call = alice.invite(bob.uri("+4915112345678", transport), OFFER, transport=transport)
    call.on_provisional = provisionals.append
    assert await call.wait_answered(TIMEOUT) == ANSWER.encode()
    incoming = await handler.next()
    await asyncio.wait_for(incoming.confirmed, TIMEOUT)
    assert incoming.user == "+4915112345678"
    assert incoming.offer == OFFER.encode()
    assert incoming.request.via[0].transport == transport
    assert [p.code for p in provisionals] == [180]
    assert [p.code async for p in call.provisionals()] == [180]
    await call.bye()
    assert (await asyncio.wait_for(incoming.ended, TIMEOUT)).kind is EndKind.REMOTE_BYE
    assert (await call.ended).kind is EndKind.LOCAL_BYE


async def test_remote_bye_ends_the_outgoing_call(make_ua):
    handler = Answerer()
    bob = await make_ua(handler)
    alice = await make_ua()
    call = alice.invite(bob.uri(), OFFER)
    await call.wait_answered(TIMEOUT)
    incoming = await handler.next()
    await asyncio.wait_for(incoming.confirmed, TIMEOUT)
    resp = await incoming.bye(headers={"Reason": 'Q.850;cause=16;text="Normal call clearing"'})
    assert resp is not None and resp.code == 200
    ended = await asyncio.wait_for(call.ended, TIMEOUT)
    assert ended.kind is EndKind.REMOTE_BYE and "cause=16" in ended.reason


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
async def test_cancel_before_answer(make_ua, transport):
    tcp = 0 if transport == "TCP" else None
    handler = Answerer(answer=False)
    bob = await make_ua(handler, tcp_port=tcp)
    alice = await make_ua(tcp_port=tcp)
    call = alice.invite(bob.uri(transport=transport), OFFER, transport=transport)
    async for p in call.provisionals():
        assert p.code == 180
        break
    call.cancel()
    ended = await asyncio.wait_for(call.ended, TIMEOUT)
    assert (ended.kind, ended.code) == (EndKind.CANCELLED, 487)
    with pytest.raises(CallFailed):
        await call.wait_answered(TIMEOUT)
    incoming = await handler.next()
    assert (await asyncio.wait_for(incoming.ended, TIMEOUT)).kind is EndKind.CANCELLED
    handler.go.set()


async def test_200_crossing_cancel_is_acked_then_byed(make_ua):
    """The CANCEL is lost; the callee answers meanwhile: the 200 (after our cancel()) is
    ACKed and the call hung up with BYE."""
    handler = Answerer(answer=False)
    bob = await make_ua(handler)
    alice = await make_ua()
    call = alice.invite(bob.uri(), OFFER)
    async for _ in call.provisionals():
        break
    dropped = []

    def drop_first_cancel(data: bytes, peer) -> bool:
        if data.startswith(b"CANCEL") and not dropped:
            dropped.append(data)
            return True
        return False

    alice.transports["UDP"].drop = drop_first_cancel
    call.cancel()
    assert dropped
    incoming = await handler.next()
    handler.go.set()  # bob answers: his 200 crosses the (lost) CANCEL
    await asyncio.wait_for(incoming.confirmed, TIMEOUT)  # the 200 was ACKed
    assert (await asyncio.wait_for(incoming.ended, TIMEOUT)).kind is EndKind.REMOTE_BYE
    ended = await asyncio.wait_for(call.ended, TIMEOUT)
    assert (ended.kind, ended.code) == (EndKind.CANCELLED, 200)


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
async def test_digest_protected_callee(make_ua, algorithm):
    handler = Answerer()
    bob = await make_ua(handler, users={"alice": "right"}, auth_algorithm=algorithm)
    alice = await make_ua()
    wrong = alice.invite(bob.uri(), OFFER, auth=("alice", "wrong"))
    with pytest.raises(CallFailed) as failed:
        await wrong.wait_answered(TIMEOUT)
    assert failed.value.reason.code == 403
    none = alice.invite(bob.uri(), OFFER)
    with pytest.raises(CallFailed) as failed:
        await none.wait_answered(TIMEOUT)
    assert failed.value.reason.code == 401
    right = alice.invite(bob.uri(), OFFER, auth=("alice", "right"))
    assert await right.wait_answered(TIMEOUT) == ANSWER.encode()
    assert right.request.headers.get("Authorization", "").startswith("Digest ")
    await right.bye()


async def test_reject_with_reason_and_warning(make_ua):
    async def refuse(call: IncomingCall) -> None:
        call.reject(403, "Forbidden", headers=[("Reason", 'Q.850;cause=21;text="Call rejected"'),
                                               ("Warning", '399 wacall "no permission"')])

    bob = await make_ua(refuse)
    alice = await make_ua()
    call = alice.invite(bob.uri(), OFFER)
    ended = await asyncio.wait_for(call.ended, TIMEOUT)
    assert (ended.kind, ended.code, ended.phrase) == (EndKind.FAILED, 403, "Forbidden")
    assert ended.reason == 'Q.850;cause=21;text="Call rejected"'
    assert ended.warning == '399 wacall "no permission"'


async def test_info_dtmf_both_content_types(make_ua):
    handler = Answerer()
    bob = await make_ua(handler)
    alice = await make_ua()
    call = alice.invite(bob.uri(), OFFER)
    await call.wait_answered(TIMEOUT)
    incoming = await handler.next()
    digits: asyncio.Queue[Dtmf] = asyncio.Queue()
    incoming.on_dtmf = digits.put_nowait
    assert (await call.send_dtmf("5", 250)).code == 200
    assert (await call.info("#", "application/dtmf")).code == 200
    assert (await call.info("hello", "text/plain")).code == 415
    assert await asyncio.wait_for(digits.get(), TIMEOUT) == Dtmf("5", 250)
    assert await asyncio.wait_for(digits.get(), TIMEOUT) == Dtmf("#")
    await call.bye()


async def test_udp_retransmissions_survive_lost_invite_200_and_ack(make_ua):
    handler = Answerer()
    bob = await make_ua(handler)
    alice = await make_ua()
    sent: dict[bytes, int] = {}

    def lossy(kinds):
        def drop(data: bytes, peer) -> bool:
            kind = next((k for k in kinds if data.startswith(k)), None)
            if kind is None:
                return False
            sent[kind] = sent.get(kind, 0) + 1
            return sent[kind] == 1  # the first of each is lost
        return drop

    alice.transports["UDP"].drop = lossy([b"INVITE", b"ACK"])
    bob.transports["UDP"].drop = lossy([b"SIP/2.0 200"])
    call = alice.invite(bob.uri(), OFFER)
    assert await call.wait_answered(TIMEOUT) == ANSWER.encode()
    incoming = await handler.next()
    await asyncio.wait_for(incoming.confirmed, TIMEOUT)
    assert sent[b"INVITE"] >= 2 and sent[b"SIP/2.0 200"] >= 2 and sent[b"ACK"] >= 2
    assert len(handler.calls._queue) == 0  # the retransmitted INVITE made no second call
    await call.bye()
    await asyncio.wait_for(incoming.ended, TIMEOUT)


@pytest.mark.parametrize("method", ["INVITE", "UPDATE"])
async def test_session_timer_refreshes(make_ua, method):
    handler = Answerer()
    bob = await make_ua(handler, min_se=1)
    alice = await make_ua(session_expires=2, min_se=1, refresh_with=method)
    call = alice.invite(bob.uri(), OFFER)
    await call.wait_answered(TIMEOUT)
    incoming = await handler.next()
    assert incoming.request.headers.get("Session-Expires") == "2"
    await until(lambda: incoming.refreshes_received >= 2, TIMEOUT)
    assert incoming.refreshes_received >= 2 and call.refreshes_sent >= 2
    assert not call.ended.done() and not incoming.ended.done()
    await call.bye()


async def test_session_expires_without_refresh_ends_with_bye(make_ua):
    handler = Answerer()
    bob = await make_ua(handler, min_se=1)
    alice = await make_ua(session_expires=2, min_se=1)
    call = alice.invite(bob.uri(), OFFER)
    await call.wait_answered(TIMEOUT)
    incoming = await handler.next()
    await asyncio.wait_for(incoming.confirmed, TIMEOUT)
    # alice's refreshes are lost: bob (not the refresher) gives up and sends BYE
    alice.transports["UDP"].drop = lambda data, peer: data.startswith((b"INVITE", b"UPDATE"))
    ended = await asyncio.wait_for(incoming.ended, TIMEOUT)
    assert ended.kind is EndKind.SESSION_EXPIRED
    assert (await asyncio.wait_for(call.ended, TIMEOUT)).kind is EndKind.REMOTE_BYE


async def test_too_small_session_interval_gets_422_and_a_retry(make_ua):
    handler = Answerer()
    bob = await make_ua(handler, min_se=5)
    alice = await make_ua(session_expires=2, min_se=1)
    call = alice.invite(bob.uri(), OFFER)
    await call.wait_answered(TIMEOUT)
    incoming = await handler.next()
    assert incoming.request.headers.get("Session-Expires") == "5"
    await call.bye()


async def test_options_and_keepalive_state(make_ua):
    bob = await make_ua()
    alice = await make_ua(timers=Timers(t1=0.01, t2=0.1, t4=0.1, timer_d=0.1))
    resp = await asyncio.wait_for(alice.options(bob.uri()), TIMEOUT)
    assert resp.code == 200 and "INVITE" in resp.headers["Allow"]
    ka = alice.keepalive(bob.uri(), interval=0.05)
    await asyncio.wait_for(ka.changed.wait(), TIMEOUT)
    assert ka.state is PeerState.UP
    ka.changed.clear()
    bob.transports["UDP"].drop = lambda data, peer: True  # bob goes silent
    await asyncio.wait_for(ka.changed.wait(), TIMEOUT)
    assert ka.state is PeerState.DOWN


async def test_in_dialog_request_for_unknown_dialog_gets_481(make_ua):
    handler = Answerer()
    bob = await make_ua(handler)
    alice = await make_ua()
    call = alice.invite(bob.uri(), OFFER)
    await call.wait_answered(TIMEOUT)
    incoming = await handler.next()
    call.dialog.remote_tag = "nope"
    assert (await call.info("1", "application/dtmf")).code == 481
    await incoming.bye()


async def test_close_hangs_up_and_leaves_nothing_running(make_ua):
    handler = Answerer()
    bob = await make_ua(handler)
    alice = await make_ua()
    call = alice.invite(bob.uri(), OFFER)
    await call.wait_answered(TIMEOUT)
    incoming = await handler.next()
    await asyncio.wait_for(alice.close(), TIMEOUT)
    assert (await asyncio.wait_for(incoming.ended, TIMEOUT)).kind is EndKind.REMOTE_BYE
    assert call.ended.result().kind is EndKind.LOCAL_BYE


def test_digest_server_verdicts():
    server = DigestServer("wacall", {"alice": "secret"}, algorithm="SHA-256", nonce_ttl=60)
    challenge = best_challenge([server.challenge()])
    value = authorization(challenge, username="alice", password="secret", method="INVITE", uri="sip:x@y")
    assert server.verify("INVITE", value) == (Verdict.OK, "alice")
    bad = authorization(challenge, username="alice", password="nope", method="INVITE", uri="sip:x@y")
    assert server.verify("INVITE", bad)[0] is Verdict.INVALID
    assert server.verify("INVITE", None)[0] is Verdict.MISSING
    server.nonce_ttl = -1
    assert server.verify("INVITE", value)[0] is Verdict.STALE
    assert "stale=true" in server.challenge(stale=True)


def test_rfc2617_example_response():
    """RFC 2617 §3.5 (its example uses qop=auth over HTTP GET)."""
    from gateway.sip.auth import digest_response

    assert digest_response(algorithm="MD5", username="Mufasa", realm="testrealm@host.com",
                           password="Circle Of Life", method="GET", uri="/dir/index.html",
                           nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", qop="auth", nc="00000001",
                           cnonce="0a4f113b") == "6629fae49393a05397450978507c4ef1"


def test_stream_framer_and_parse():
    msg = (b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h:1;branch=z9hG4bKx\r\nFrom: <sip:c@d>;tag=1\r\n"
           b"To: <sip:a@b>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 3\r\n\r\nabc")
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n" + msg[:20]) == []
    assert framer.feed(msg[20:] + msg) == [msg, msg]
    assert parse(msg).body == b"abc"
    with pytest.raises(ValueError):
        parse(b"garbage\r\n\r\n")


async def test_a_host_name_is_resolved_off_the_loop(make_ua):
    """``sip:bob@localhost``: the name is resolved with the loop's resolver (a blocking
    ``sendto`` with a name would stall every call on DNS), and the call connects."""
    calls = []

    def answer(call):
        calls.append(call)
        call.answer(sdp(40090))

    bob = await make_ua(answer, user="bob")
    alice = await make_ua(user="alice")
    call = alice.invite(f"sip:bob@localhost:{bob.port()}", sdp(40091))
    await call.wait_answered(TIMEOUT)
    transport = alice.transports["UDP"]
    assert transport._names["localhost"][0] == "127.0.0.1"
    await call.bye()
