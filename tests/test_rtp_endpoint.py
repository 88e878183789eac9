"""media.rtp.endpoint: two RtpEndpoints on 127.0.0.1 talk RTP per codec: tones both
ways at once (FFT), DTMF both ways, symmetric RTP latching, loss and reordering,
inactivity timeout. No sleeps: futures with bounded timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct

import pytest

from media import analysis
from media.dtmf import DtmfError
from media.rtp import RtpEndpoint
from media.rtp.sdp import build_offer
from media.sources.tone import ToneSource
from tests.helpers import TIMEOUT, ToneEars

A_HZ, B_HZ = 1000.0, 440.0
CODECS = ["PCMU", "PCMA", "G722", "opus"]


class Digits:
    """DTMF events received by an endpoint; ``wait(n)`` until n arrived."""

    def __init__(self, endpoint: RtpEndpoint) -> None:
        self.events = []
        self._waiters: list[tuple[int, asyncio.Future]] = []
        endpoint.on_dtmf(self._on)

    def _on(self, event) -> None:
        self.events.append(event)
        for n, fut in self._waiters:
            if len(self.events) >= n and not fut.done():
                fut.set_result(None)

    async def wait(self, n: int) -> str:
        if len(self.events) < n:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((n, fut))
            await asyncio.wait_for(fut, TIMEOUT)
        return "".join(e.digit for e in self.events)


@contextlib.asynccontextmanager
async def pair(codec: str = "PCMU", *, a_kw=None, b_kw=None, before=None):
    a = RtpEndpoint(codecs=[codec], label="a", **(a_kw or {}))
    b = RtpEndpoint(codecs=CODECS, label="b", **(b_kw or {}))
    try:
        await a.open()
        await b.open()
        if before is not None:
            before(a, b)
        offer = a.create_offer()
        answer = b.accept_offer(offer)
        remote = a.set_remote_answer(answer)
        assert remote.codec.name.lower() == codec.lower()
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("codec", CODECS)
async def test_tones_both_ways_and_dtmf(codec, rtp_core):
    a_ears, b_ears = ToneEars(B_HZ), ToneEars(A_HZ)
    async with pair(codec) as (a, b):
        a.play(ToneSource(A_HZ, None))
        b.play(ToneSource(B_HZ, None))
        a.add_sink(a_ears)
        b.add_sink(b_ears)
        await asyncio.gather(a_ears.hears(1.0), b_ears.hears(1.0))
        b_digits, a_digits = Digits(b), Digits(a)
        await asyncio.gather(a.send_dtmf("159#", duration_ms=100, gap_ms=60), b.send_dtmf("*0D", duration_ms=200))
        assert await b_digits.wait(4) == "159#"
        assert await a_digits.wait(3) == "*0D"
        assert {e.duration_ms for e in b_digits.events} == {100}
        assert {e.duration_ms for e in a_digits.events} == {200}
        assert {e.source for e in a_digits.events} == {"rfc4733"}
        # audio goes on after the events
        before = a_ears.tone_s
        await a_ears.hears(before + 0.5)
    for ep, ears, hz in ((a, a_ears, B_HZ), (b, b_ears, A_HZ)):
        heard = ears.audio[-48000:]
        assert abs(analysis.dominant_frequency(heard, 48000) - hz) <= 20
        s = ep.stats
        assert s.packets_sent > 50 and s.packets_received > 50 and s.packets_lost == 0
        assert s.packets_foreign == s.packets_invalid == s.packets_unknown_pt == 0
        assert s.jitter_ms < 20
    assert b.stats.dtmf_received == 4 and a.stats.dtmf_sent == 4 and a.stats.dtmf_received == 3


async def test_wire_format():
    """What goes on the wire: RTP v2, PT, 20 ms timestamps, one marker, RFC 4733 events."""
    sniff = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sniff.bind(("127.0.0.1", 0))
    sniff.setblocking(False)
    port = sniff.getsockname()[1]
    packets: list[bytes] = []
    loop = asyncio.get_running_loop()
    got = loop.create_future()

    def readable():
        try:
            packets.append(sniff.recv(2048))
        except BlockingIOError:
            return
        if len(packets) >= 40 and not got.done():
            got.set_result(None)

    loop.add_reader(sniff.fileno(), readable)
    ep = RtpEndpoint(codecs=["PCMA"], rtcp=False)
    try:
        await ep.open()
        offer = build_offer("127.0.0.1", port, ["PCMA"])
        ep.accept_offer(offer)
        ep.play(ToneSource(A_HZ, None))
        await ep.send_dtmf("7", duration_ms=60)
        await asyncio.wait_for(got, TIMEOUT)
    finally:
        loop.remove_reader(sniff.fileno())
        sniff.close()
        ep.close()
    headers = [struct.unpack("!BBHII", p[:12]) for p in packets]
    assert {h[0] for h in headers} == {0x80}
    assert len({h[4] for h in headers}) == 1  # one SSRC
    seqs = [h[2] for h in headers]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))
    events = [(h, p[12:]) for h, p in zip(headers, packets) if h[1] & 0x7F == 101]
    audio = [(h, p[12:]) for h, p in zip(headers, packets) if h[1] & 0x7F == 8]
    assert len(events) == 2 + 3  # 60 ms: 2 updates, 3 end packets
    assert events[0][0][1] & 0x80 and not any(h[1] & 0x80 for h, _ in events[1:])
    assert len({h[3] for h, _ in events}) == 1  # one event timestamp
    assert [struct.unpack("!BBH", p[:4]) for _, p in events] == [(7, 10, 160), (7, 10, 320)] + [(7, 0x80 | 10, 480)] * 3
    assert {len(p) for _, p in audio} == {160}
    assert audio[0][0][1] & 0x80  # talkspurt start
    ts = [h[3] for h, _ in audio]
    assert all((b - a) % 160 == 0 and b != a for a, b in itertools.pairwise(ts))


async def test_symmetric_rtp_latches_to_the_real_source(rtp_core):
    decoy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the address the SDP claims
    decoy.bind(("127.0.0.1", 0))
    a_ears = ToneEars(B_HZ)
    try:
        a = RtpEndpoint(codecs=["PCMU"], label="a")
        b = RtpEndpoint(codecs=["PCMU"], label="b")
        await a.open()
        await b.open()
        # a's offer names the decoy's port (as a NAT'd phone names its private address)
        offer = build_offer("127.0.0.1", decoy.getsockname()[1], ["PCMU"])
        answer = b.accept_offer(offer)
        a.create_offer()
        a.set_remote_answer(answer)
        a.play(ToneSource(A_HZ, None))
        b.play(ToneSource(B_HZ, None))
        a.add_sink(a_ears)
        await a_ears.hears(1.0)  # b's replies reached a's real port
        assert b.latched and b.remote_addr == a.local_address
        # once latched, packets from elsewhere are dropped
        before = b.stats.packets_foreign
        decoy.sendto(struct.pack("!BBHII", 0x80, 0, 1, 160, 99) + b"\xff" * 160, b.local_address)
        await_until = asyncio.get_running_loop().create_future()

        def check():
            if b.stats.packets_foreign > before and not await_until.done():
                await_until.set_result(None)

        b.add_sink(type("S", (), {"write": lambda self, *a: check(), "close": lambda self: None})())
        await asyncio.wait_for(await_until, TIMEOUT)
    finally:
        decoy.close()
        a.close()
        b.close()


def lossy(deliver, *, drop_every: int = 10, swap_every: int = 7):
    """Drops every ``drop_every``-th packet and swaps every ``swap_every``-th with the
    one after it (deterministic)."""
    state = {"n": 0, "held": None}

    def datagram(data, addr):
        state["n"] += 1
        n = state["n"]
        if n % drop_every == 0:
            return
        if state["held"] is not None:
            deliver(data, addr)
            deliver(*state["held"])
            state["held"] = None
            return
        if n % swap_every == 0:
            state["held"] = (data, addr)
            return
        deliver(data, addr)

    return datagram


@pytest.mark.parametrize("codec", ["PCMU", "opus"])
async def test_loss_and_reordering_still_give_the_tone(codec):
    b_ears = ToneEars(A_HZ)
    a = RtpEndpoint(codecs=[codec], label="a")
    b = RtpEndpoint(codecs=CODECS, label="b")
    b._datagram = lossy(b._datagram)  # the protocol is wired at open(): wrap first
    try:
        await a.open()
        await b.open()
        a.set_remote_answer(b.accept_offer(a.create_offer()))
        a.play(ToneSource(A_HZ, None))
        b.add_sink(b_ears)
        await b_ears.hears(2.0)
        b_digits = Digits(b)
        await a.send_dtmf("0123", duration_ms=100)
        # every digit arrives once although some of its packets were lost or reordered
        assert await b_digits.wait(4) == "0123"
    finally:
        a.close()
        b.close()
    assert b.stats.packets_lost > 0 and b.stats.frames_concealed > 0
    assert abs(analysis.dominant_frequency(b_ears.audio[-24000:], 48000) - A_HZ) <= 20


async def test_inactivity_timeout_and_hold():
    async with pair("PCMU", a_kw={"inactivity_timeout_s": 0.3}) as (a, b):
        # b sends: a stays up well past its timeout
        ears = ToneEars(B_HZ)
        b.play(ToneSource(B_HZ, None))
        a.add_sink(ears)
        await ears.hears(0.8)
        assert not a.closed.done()
        b.close()  # the far side goes silent
        assert await asyncio.wait_for(a.closed, TIMEOUT) == "rtp timeout"
    with pytest.raises(DtmfError):
        a.queue_dtmf("1")


async def test_hold_suspends_timeout_and_sending():
    async with pair("PCMU", a_kw={"inactivity_timeout_s": 0.3}) as (a, b):
        ears = ToneEars(B_HZ)
        a.add_sink(ears)
        b.play(ToneSource(B_HZ, None))
        await ears.hears(0.2)
        # b puts a on hold (re-INVITE with a=inactive): a sends nothing, expects nothing
        offer = b.create_offer().replace("a=sendrecv", "a=inactive")
        a.accept_offer(offer)
        sent = a.stats.packets_sent
        b.close()
        # a ticks for > 0.3 s without RTP and without timing out; nothing is sent
        await ears.hears(ears.tone_s)  # (immediate)
        fut = asyncio.get_running_loop().create_future()
        ticks = {"n": 0}

        class Count:
            def write(self, *args):
                ticks["n"] += 1
                if ticks["n"] == 30 and not fut.done():
                    fut.set_result(None)

            def close(self):
                pass

        a.add_sink(Count())
        await asyncio.wait_for(fut, TIMEOUT)
        assert not a.closed.done() and a.stats.packets_sent == sent


async def test_port_range_even_ports_and_rtcp():
    low = 41000 + 2 * (hash("rtp") % 2000)
    eps = [RtpEndpoint(port_range=(low, low + 40)) for _ in range(3)]
    try:
        ports = [(await ep.open())[1] for ep in eps]
        assert len(set(ports)) == 3 and all(p % 2 == 0 and low <= p <= low + 40 for p in ports)
        assert all(ep._rtcp_transport is not None for ep in eps)
    finally:
        for ep in eps:
            ep.close()
    with pytest.raises(ValueError):
        RtpEndpoint(port_range=(5000, 4000))
