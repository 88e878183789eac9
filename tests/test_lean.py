"""The lean RTP path (media.lean): real peers on 127.0.0.1 carry tones both ways on it,
interoperate with aiortc's own path, keep RTCP and statistics right; the shared ticker's
catch-up rules; the polled receive (kernel arrival stamps, the fall-back to the loop's
reading); the RTP parser against aiortc's and against garbage."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from aiortc.rtp import RtpPacket
from hypothesis import given, settings, strategies as st

from media import aiortc_hooks, analysis, lean, rtpcore
from media.lean import MAX_CATCH_UP, MAX_DRAIN, FrameTicker, PolledSocket, SocketPoller
from media.sources.tone import ToneSource
from tests.helpers import native_rtp_core, until
from tests.media_call import LOOPBACK, TIMEOUT, FrameGate, call_pair


def parse_rtp(data: bytes):
    """The lean path's parser: the C core's, unless the rtp_core fixture switched it off."""
    core = rtpcore.core
    return lean.parse_rtp(data) if core is None else core.parse_rtp(data)


class Ears:
    """Keeps every received frame."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def write(self, pcm, sample_rate, channels=1) -> None:
        self.frames.append(pcm.copy())

    def tone_s(self, hz: float) -> float:
        x = np.concatenate(self.frames).astype(np.float32) / 32768
        return analysis.tone_seconds(x, 48000, hz)


@pytest.mark.parametrize("business_path,user_path", [("lean", "lean"), ("lean", "aiortc"), ("aiortc", "lean")])
async def test_tones_both_ways_on_the_lean_path_and_with_aiortcs(business_path, user_path, rtp_core):
    business_heard, user_heard = Ears(), Ears()

    def ears(business, user):
        business.add_sink(business_heard)
        user.add_sink(user_heard)
        user.config.rtp_path = user_path  # (before it answers)

    async with call_pair(ears, business_config=replace(LOOPBACK, rtp_path=business_path)) as (business, user):
        gate_b, gate_u = FrameGate(), FrameGate()
        business.add_sink(gate_b)
        user.add_sink(gate_u)
        played = [business.play(ToneSource(1000, 1.0)), user.play(ToneSource(600, 1.0))]
        await asyncio.wait_for(asyncio.gather(*(p.done for p in played)), TIMEOUT)
        await asyncio.wait_for(asyncio.gather(gate_b.reached(gate_b.frames + 10),
                                              gate_u.reached(gate_u.frames + 10)), TIMEOUT)
        for peer, path in ((business, business_path), (user, user_path)):
            lean_sent = peer.outbound.lean.packets if peer.outbound.lean is not None else 0
            lean_received = peer._lean_receiver.packets if peer._lean_receiver is not None else 0
            if path == "lean":
                assert lean_sent > 50 and lean_received > 50, (peer.label, lean_sent, lean_received)
                assert peer._lean_receiver.polled == sys.platform.startswith("linux")
            else:
                assert lean_sent == lean_received == 0
        # RTCP works on the lean path: each side's sender counters reach the other side
        # (its round-trip time comes from our reports), and counts agree
        # (a polled receiver reads what was sent up to a tick later: wait for both counts)
        user_streams = aiortc_hooks.remote_streams(user._pc.getTransceivers()[0].receiver)
        await until(lambda: business._pc.getTransceivers()[0].sender._RTCRtpSender__packet_count > 60
                    and sum(s.packets_received for s in user_streams.values()) > 60, TIMEOUT)
        stats_b, stats_u = await business.get_stats(), await user.get_stats()
        assert stats_b["packets_sent"] > 60 and stats_u["packets_received"] > 60
        assert abs(stats_b["packets_sent"] - stats_u["packets_received"]) <= 5, (stats_b, stats_u)
        assert stats_b["bytes_sent"] > 0 and stats_u["bytes_received"] > 0
    assert user_heard.tone_s(1000) == pytest.approx(1.0, abs=0.1)
    assert business_heard.tone_s(600) == pytest.approx(1.0, abs=0.1)
    assert user_heard.tone_s(600) == 0 and business_heard.tone_s(1000) == 0


async def test_round_trip_time_is_measured_on_the_lean_path():
    async with call_pair() as (business, user):
        await until(lambda: business.outbound.lean.packets > 0, TIMEOUT)

        async def rtt():
            return (await business.get_stats()).get("round_trip_s")

        deadline = time.monotonic() + TIMEOUT
        while (value := await rtt()) is None:  # (the first sender/receiver reports take ~1-2 s)
            assert time.monotonic() < deadline, "no RTT from RTCP"
            await asyncio.sleep(0.1)
        assert 0 <= value < 0.2


async def test_ticker_sends_a_short_backlog_and_restarts_after_a_long_stall():
    ticker = FrameTicker(asyncio.get_running_loop())
    calls: list[tuple[float, int]] = []
    stalled = asyncio.Event()

    def tick(now: float, late: float, frames: int) -> None:
        calls.append((late, frames))
        if len(calls) == 3:
            time.sleep(0.07)  # the loop is held up: 2-3 frames fall due meanwhile
        elif len(calls) == 6:
            time.sleep(0.25)  # longer than MAX_CATCH_UP frames
        elif len(calls) == 9:
            stalled.set()

    ticker.add(tick)
    try:
        await asyncio.wait_for(stalled.wait(), TIMEOUT)
    finally:
        ticker.remove(tick)
    assert ticker._handle is None  # no subscriber: no timer left
    assert calls[3][1] >= 3 and calls[3][1] <= MAX_CATCH_UP  # the backlog after 70 ms
    assert calls[6][1] == 1 and ticker.resyncs >= 1  # 250 ms: started again, no burst
    assert sum(f for _, f in calls[7:9]) <= 4  # and then back to the pace


def _packet(**kwargs) -> bytes:
    packet = RtpPacket(payload_type=111, sequence_number=65535, timestamp=0xFFFFFFFF, ssrc=0x01020304,
                       payload=b"\x78\x01\x02", marker=1, **kwargs)
    return packet.serialize()


def test_parse_rtp_matches_aiortc_with_csrcs_extension_and_padding(rtp_core):
    packet = RtpPacket(payload_type=111, sequence_number=4242, timestamp=123456, ssrc=99, payload=b"opus!")
    packet.csrc = [1, 2]
    packet.extensions.mid = "0"
    packet.padding_size = 3
    from aiortc.rtp import HeaderExtensionsMap
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters

    ext = HeaderExtensionsMap()
    ext.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid")]))
    data = packet.serialize(ext)
    view = parse_rtp(data)
    ours = RtpPacket.parse(data, ext)
    assert (view.payload_type, view.sequence_number, view.timestamp, view.ssrc, view.payload, view.marker) == (
        ours.payload_type, ours.sequence_number, ours.timestamp, ours.ssrc, ours.payload, ours.marker)
    assert view.payload == b"opus!"
    assert parse_rtp(_packet()).sequence_number == 65535


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_parse_rtp_refuses_garbage_with_value_error_only(data):
    try:
        view = parse_rtp(data)
    except ValueError:
        return
    assert len(view.payload) <= len(data) - 12


def _fields(parse, data: bytes):
    try:
        view = parse(data)
    except ValueError:
        return "ValueError"
    return (view.payload_type, view.marker, view.sequence_number, view.timestamp, view.ssrc, view.payload)


def _native():
    return native_rtp_core()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80) | st.builds(lambda head, rest: bytes([0x80 | (head & 0x3F)]) + rest,
                                           st.integers(0, 255), st.binary(min_size=11, max_size=80)))
def test_parse_rtp_in_c_and_in_python_agree_on_any_bytes(data):
    core = _native()
    assert _fields(core.parse_rtp, data) == _fields(lean.parse_rtp, data)


def test_parse_rtp_refuses_bad_lengths(rtp_core):
    for bad in (b"\x80" * 11, b"\x00" + b"\x00" * 11,
                bytes([0x90]) + b"\x00" * 11 + struct.pack("!HH", 0xBEDE, 50),  # extension beyond the end
                bytes([0xA0]) + b"\x00" * 11 + b"\x00\xff"):  # padding longer than the packet
        with pytest.raises(ValueError):
            parse_rtp(bad)


# -- the polled receive path: sockets drained on the ticker, arrivals stamped by the kernel --


class _Datagrams(asyncio.DatagramProtocol):
    """What a transport's own reading delivers (nothing, while it is polled)."""

    def __init__(self) -> None:
        self.by_callback: list[bytes] = []

    def datagram_received(self, data, addr) -> None:
        self.by_callback.append(data)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel arrival stamps (SO_TIMESTAMPNS) are Linux's")
async def test_a_polled_socket_gives_each_datagram_its_arrival_time_not_when_it_was_read(rtp_core):
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0))
    got: list[tuple[bytes, float, float]] = []
    polled = PolledSocket(transport, lambda data, addr, at: got.append((data, at, loop.time())))
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert polled.start() and polled.running
        # The kernel turns arrival stamping on for the whole system a moment after the
        # first socket asks (deferred work); until then a datagram is stamped when read.
        # One datagram through first, so the one measured is stamped on arrival.
        out.sendto(b"warm-up", transport.get_extra_info("sockname"))
        await until(lambda: got, TIMEOUT)
        got.clear()
        sent_at = loop.time()
        out.sendto(b"first", transport.get_extra_info("sockname"))
        time.sleep(0.15)  # the loop is busy (blocked here): the datagram waits in the socket
        await until(lambda: got, TIMEOUT)
        data, at, read_at = got[0]
        assert data == b"first"
        assert read_at - sent_at >= 0.15  # read after the stall...
        assert abs(at - sent_at) < 0.05, (at - sent_at)  # ...but stamped when it arrived
        assert protocol.by_callback == [] and polled.datagrams == 2
    finally:
        polled.stop()
        transport.close()
        out.close()
    assert not polled.running and FrameTicker.of(loop).next_due is None  # the ticker went idle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel arrival stamps (SO_TIMESTAMPNS) are Linux's")
async def test_a_polled_socket_whose_consumer_fails_goes_back_to_the_loops_reading(caplog, rtp_core):
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0))
    stopped: list[bool] = []

    def broken(data, addr, at):
        raise RuntimeError("a bug in the receive path")

    polled = PolledSocket(transport, broken, on_stop=lambda: stopped.append(True))
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert polled.start()
        out.sendto(b"one", transport.get_extra_info("sockname"))
        await until(lambda: stopped, TIMEOUT)
        assert not polled.running
        out.sendto(b"two", transport.get_extra_info("sockname"))  # nothing is left unread
        await until(lambda: protocol.by_callback == [b"two"], TIMEOUT)
    finally:
        polled.stop()
        transport.close()
        out.close()
    assert sum("read by callback from now on" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel arrival stamps (SO_TIMESTAMPNS) are Linux's")
async def test_polled_sockets_are_read_through_one_epoll_fairly_and_leave_nothing_behind(rtp_core):
    """Five polled sockets: one epoll set for all; a flood on one socket is read
    MAX_DRAIN datagrams per tick while the others get theirs in the first tick, in order;
    a socket closed without stopping drops out; the epoll descriptor goes with the last."""
    loop = asyncio.get_running_loop()
    ticker = FrameTicker.of(loop)
    fds_before = set(os.listdir("/proc/self/fd"))
    endpoints = [await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0)) for _ in range(5)]
    got: dict[int, list[tuple[bytes, int]]] = {i: [] for i in range(5)}
    polled = [PolledSocket(t, lambda data, addr, at, i=i: got[i].append((data, ticker.ticks)))
              for i, (t, _) in enumerate(endpoints)]
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for p in polled:
            assert p.start()
        poller = SocketPoller.of(ticker)
        assert len(poller) == 5
        flood = MAX_DRAIN + 20
        for i, (t, _) in enumerate(endpoints):  # (on loopback a datagram is queued when sendto returns)
            for k in range(3):
                out.sendto(b"%d-%d" % (i, k), t.get_extra_info("sockname"))
        for _ in range(flood):
            out.sendto(b"flood", endpoints[0][0].get_extra_info("sockname"))
        await until(lambda: len(got[0]) == 3 + flood, TIMEOUT)
        first = got[1][0][1]
        for i in range(1, 5):
            assert got[i] == [(b"%d-%d" % (i, k), first) for k in range(3)]
        ticks = [tick for _, tick in got[0]]
        assert ticks.count(first) == MAX_DRAIN and ticks[-1] == first + 1  # the rest: next tick
        assert all(p.datagrams == len(got[i]) for i, p in enumerate(polled))
        endpoints[4][0].close()  # closed under it, not stopped: it stops at the next datagram or not at all
        out.sendto(b"late", endpoints[3][0].get_extra_info("sockname"))
        await until(lambda: len(got[3]) == 4, TIMEOUT)
    finally:
        for p in polled:
            p.stop()
        for t, _ in endpoints:
            t.close()
        out.close()
    assert len(poller) == 0 and not any(p.running for p in polled)
    assert ticker.next_due is None  # idle
    await until(lambda: set(os.listdir("/proc/self/fd")) <= fds_before, TIMEOUT)  # sockets and the epoll


def test_receive_statistics_count_jitter_from_the_arrival_times_given():
    stats = aiortc_hooks.stream_statistics(48000)
    for i in range(300):  # every 20 ms, every other packet 3 ms late: |D| = 144 samples each time
        at = 1000.0 + i * 0.02 + (0.003 if i % 2 else 0.0)
        stats.add(RtpPacket(payload_type=111, sequence_number=(65400 + i) & 0xFFFF, timestamp=i * 960), at)
    assert stats.jitter == pytest.approx(144, abs=2)  # RFC 3550 A.8, converged
    assert stats.packets_received == 300 and stats.packets_lost == 0 and stats.cycles == 1 << 16
    steady = aiortc_hooks.stream_statistics(48000)
    for i in range(100):
        steady.add(RtpPacket(payload_type=111, sequence_number=i, timestamp=i * 960), 5.0 + i * 0.02)
    steady.add(RtpPacket(payload_type=111, sequence_number=50, timestamp=50 * 960), 9.0)  # late duplicate
    assert steady.jitter == 0 and steady.packets_received == 101


# -- SRTP without per-packet allocation -------------------------------------------------------


def _srtp_pair():
    import os

    from pylibsrtp import Policy, Session

    key = os.urandom(30)
    tx = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    rx = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND))
    return tx, rx


def _rtp(seq: int, payload: bytes) -> bytes:
    return RtpPacket(payload_type=111, sequence_number=seq, timestamp=960 * seq, ssrc=0x1234,
                     payload=payload).serialize()


def test_fast_srtp_interoperates_with_pylibsrtp_both_ways(rtp_core):
    import pylibsrtp

    tx, rx = _srtp_pair()
    fast_tx, fast_rx = aiortc_hooks.fast_srtp(tx), aiortc_hooks.fast_srtp(rx)
    assert isinstance(fast_tx, aiortc_hooks.FastSrtp)
    for seq in range(1, 200):
        plain = _rtp(seq, bytes([seq & 0xFF]) * (20 + seq % 100))
        protected = fast_tx.protect(plain) if seq % 2 else tx.protect(plain)
        assert protected != plain and len(protected) == len(plain) + 10  # the 80-bit tag
        assert (rx.unprotect(protected) if seq % 3 else fast_rx.unprotect(protected)) == plain
    # a replayed packet and a forged one are refused, as pylibsrtp refuses them
    with pytest.raises(pylibsrtp.Error):
        fast_rx.unprotect(protected)
    forged = bytearray(fast_tx.protect(_rtp(500, b"x" * 40)))
    forged[20] ^= 1
    with pytest.raises(pylibsrtp.Error):
        fast_rx.unprotect(bytes(forged))
    with pytest.raises(pylibsrtp.Error):
        fast_tx.protect(_rtp(501, b"x" * 3000))  # longer than any datagram we send
    assert fast_rx.unprotect(fast_tx.protect(_rtp(502, b"ok"))) == _rtp(502, b"ok")


def test_the_c_core_sends_a_patched_protected_packet_and_reports_a_dead_socket():
    """send_rtp writes the template header with the sequence number and timestamp patched
    in, behind it the payload, protected with the session's context (or plain with none),
    to the prebuilt address: what the receiver unprotects is exactly that packet."""
    core = _native()
    tx, rx = _srtp_pair()
    fast = aiortc_hooks.fast_srtp(tx)
    header = _rtp(0, b"")  # a 12-byte template
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(TIMEOUT)
        address = core.sockaddr(receiver.getsockname())
        for seq, ts, payload in ((1, 960, b"\x78abc"), (65535, 0xFFFFFFFF, b"x" * 300)):
            wire = core.send_rtp(sender.fileno(), address, fast.address, header, seq, ts, payload)
            data = receiver.recv(4096)
            assert wire == len(data) == 12 + len(payload) + 10
            assert rx.unprotect(data) == _rtp(seq, payload)[:4] + struct.pack("!I", ts) + _rtp(seq, payload)[8:]
        assert core.send_rtp(sender.fileno(), address, 0, header, 7, 7, b"plain") == 17  # ctx 0: plain RTP
        assert parse_rtp(receiver.recv(4096)).payload == b"plain"
        with pytest.raises(ValueError):
            core.sockaddr(("example.org", 5))  # addresses only: nothing resolves on the media path
        assert len(core.sockaddr(("::1", 5000))) == 28  # (sockaddr_in6)
        with pytest.raises(ValueError):
            core.send_rtp(sender.fileno(), address, fast.address, header, 2, 1920, b"y" * 1900)  # too long
        dead = sender.fileno()
        sender.close()
        with pytest.raises(OSError):
            core.send_rtp(dead, address, fast.address, header, 3, 2880, b"z")
    finally:
        receiver.close()
        sender.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll and SO_TIMESTAMPNS are Linux's")
def test_the_c_core_drains_stamped_datagrams_and_reports_a_sockets_error():
    import errno
    import select

    core = _native()
    epoll = select.epoll()
    a, b = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_TIMESTAMPNS", 35), 1)
            epoll.register(s.fileno(), select.EPOLLIN)
        out.bind(("127.0.0.1", 0))
        offset = time.time() - time.monotonic()
        sent = time.monotonic()
        for k in range(3):
            out.sendto(b"a%d" % k, a.getsockname())
        out.sendto(b"b", b.getsockname())
        out.sendto(b"x" * 9000, b.getsockname())  # longer than any media datagram: dropped
        got = core.drain(epoll.fileno(), 2, offset, -1.0)
        assert [(fd, data) for fd, data, _, _ in got] == [(a.fileno(), b"a0"), (b.fileno(), b"b"), (a.fileno(), b"a1")]
        assert all(addr == out.getsockname() for _, _, addr, _ in got)
        assert all(abs(at - sent) < 1.0 for *_, at in got)  # stamped by the kernel (not "now": -1)
        assert [data for _, data, _, _ in core.drain(epoll.fileno(), 64, offset, -1.0)] == [b"a2"]
        assert core.drain(epoll.fileno(), 64, offset, -1.0) == []
        # a connected socket whose peer is gone: the kernel's error comes out as such
        gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        gone.bind(("127.0.0.1", 0))
        b.connect(gone.getsockname())
        gone.close()
        b.send(b"anyone?")
        deadline = time.monotonic() + TIMEOUT
        while not (errors := core.drain(epoll.fileno(), 1, offset, 5.0)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert errors == [(b.fileno(), None, errno.ECONNREFUSED, 5.0)]
    finally:
        for s in (a, b, out):
            s.close()
        epoll.close()


def test_fast_srtp_falls_back_to_the_session_without_pylibsrtp_internals():
    class Other:
        def protect(self, data):
            return data

    other = Other()
    assert aiortc_hooks.fast_srtp(other) is other


def test_a_closed_event_loop_is_not_kept_alive_by_its_ticker():
    import gc
    import weakref

    async def use_the_ticker():
        ticker = FrameTicker.current()
        ticker.add(tick := lambda now, late, frames: None)
        await asyncio.sleep(0.05)  # (a tick or two)
        ticker.remove(tick)

    loops = []
    for _ in range(3):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(use_the_ticker())
        loop.close()
        loops.append(weakref.ref(loop))
        del loop
    gc.collect()
    assert [ref() for ref in loops] == [None, None, None]


def test_the_c_core_is_one_switch_at_run_time_and_by_environment():
    import subprocess

    core = _native()
    try:
        assert rtpcore.enable(False) is True and rtpcore.core is None
        assert rtpcore.enable(True) is False and rtpcore.core is core
    finally:
        rtpcore.enable(True)
    probe = "import media.rtpcore as r; print(r.core is None)"
    for value, off in (("0", "True"), ("off", "True"), ("1", "False")):
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "WACALL_NATIVE_RTP": value},
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == off, (value, out.stdout, out.stderr)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll and SO_TIMESTAMPNS are Linux's")
def test_the_c_core_unprotects_and_parses_a_routed_sockets_rtp_and_hands_on_the_rest():
    """A routed socket: its SRTP packets of the routed payload types come back clear and
    parsed, with the owner and their length on the wire; other payload types, STUN-like
    datagrams and another socket's packets come back as they were read; a forged packet
    is dropped (as aiortc drops what libsrtp refuses)."""
    import select

    core = _native()
    tx, rx = _srtp_pair()
    fast_tx, fast_rx = aiortc_hooks.fast_srtp(tx), aiortc_hooks.fast_srtp(rx)
    epoll = select.epoll()
    routed_sock, plain_sock, out = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3))
    owner = object()
    try:
        for s in (routed_sock, plain_sock):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            epoll.register(s.fileno(), select.EPOLLIN)
        routes = {routed_sock.fileno(): (fast_rx.address, bytes(pt in (111, 126) for pt in range(128)), owner)}
        audio = fast_tx.protect(_rtp(1, b"\x78opus"))
        other_pt = fast_tx.protect(RtpPacket(payload_type=0, sequence_number=2, ssrc=0x1234, payload=b"pcmu").serialize())
        forged = bytearray(fast_tx.protect(_rtp(3, b"\x78forged")))
        forged[-1] ^= 1
        stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
        for data in (audio, other_pt, bytes(forged), stun):
            out.sendto(data, routed_sock.getsockname())
        out.sendto(audio, plain_sock.getsockname())  # same bytes, socket not routed
        others, parsed = core.drain(epoll.fileno(), 8, time.time() - time.monotonic(), 0.0, routes)
        assert len(parsed) == 1
        got_owner, plain, view, wire, at = parsed[0]
        assert got_owner is owner and plain == _rtp(1, b"\x78opus") and wire == len(audio) and at == 0.0  # (unstamped: now)
        assert (view.payload_type, view.sequence_number, view.payload) == (111, 1, b"\x78opus")
        assert sorted((fd, data) for fd, data, _, _ in others) == sorted(
            [(routed_sock.fileno(), other_pt), (routed_sock.fileno(), stun), (plain_sock.fileno(), audio)])
        assert core.drain(epoll.fileno(), 8, 0.0, 0.0, routes) == ([], [])
    finally:
        for s in (routed_sock, plain_sock, out):
            s.close()
        epoll.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll is Linux's")
def test_the_c_core_survives_any_datagram_on_a_routed_socket():
    """Hypothesis throws datagrams at a routed socket: real SRTP packets (with payloads of
    any length, CSRCs, extensions, padding bits set at random) mixed with garbage that
    looks like RTP, and anything else. Each comes back exactly once, parsed or as read,
    or is dropped only when libsrtp refuses it; the process never crashes."""
    import select

    from hypothesis import HealthCheck

    core = _native()
    tx, rx = _srtp_pair()
    fast_tx, fast_rx = aiortc_hooks.fast_srtp(tx), aiortc_hooks.fast_srtp(rx)
    epoll = select.epoll()
    sock, out = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    epoll.register(sock.fileno(), select.EPOLLIN)
    routes = {sock.fileno(): (fast_rx.address, bytes(pt in (111, 126) for pt in range(128)), "owner")}
    seq = iter(range(1, 1 << 30))

    def real(first: int, payload: bytes) -> bytes:
        import pylibsrtp

        number = next(seq) & 0xFFFF
        header = bytearray(_rtp(number, b""))
        header[0] = 0x80 | (first & 0x3F)  # CSRC count, extension and padding bits at random
        try:
            return fast_tx.protect(bytes(header) + payload)
        except pylibsrtp.Error:  # (libsrtp refuses to protect a header that overruns the packet)
            return fast_tx.protect(_rtp(number, payload))

    datagram = st.one_of(
        st.builds(real, st.integers(0, 63), st.binary(max_size=300)),
        st.builds(lambda head, rest: bytes([0x80 | (head & 0x3F), 111]) + rest, st.integers(0, 255),
                  st.binary(max_size=120)),  # looks like our audio, is not SRTP
        st.binary(min_size=1, max_size=200),
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(datagram, min_size=1, max_size=8))
    def check(batch):
        for data in batch:
            out.sendto(data, sock.getsockname())
        others, parsed = core.drain(epoll.fileno(), 64, 0.0, 0.0, routes)
        assert len(others) + len(parsed) <= len(batch)
        for _, data, _, _ in others:
            assert data in batch
        for owner, plain, view, wire, _ in parsed:
            assert owner == "owner" and wire >= len(plain) and (view is None or len(view.payload) <= len(plain) - 12)
        # what was dropped is only what libsrtp refuses: garbage aimed at a routed payload type
        for data in batch:
            if not any(data == d for _, d, _, _ in others):
                assert len(data) >= 12 and 127 < data[0] < 192 and (data[1] & 0x7F) in (111, 126)

    try:
        check()
    finally:
        sock.close()
        out.close()
        epoll.close()
