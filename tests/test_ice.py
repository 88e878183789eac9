"""Network settings of a media peer: UDP port range, advertised (1:1 NAT) address, bounded
gathering; and the aioice internals media/ice.py hooks into."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import time
from pathlib import Path

import aioice
import aioice.ice
import aioice.turn
import pytest

from media import analysis, ice
from media import sdp as sdp_rules
from media.peer import IceServer, MediaError, MediaPeer, PeerConfig
from media.sinks.wav import WavSink
from media.sources.tone import ToneSource

LOOPBACK = ["127.0.0.1"]
TIMEOUT = 20

# Port ranges below the kernel's ephemeral range (32768+), derived from the pid so that
# concurrent test runs rarely meet; each test takes its own slice of this block.
_BLOCK = 10000 + (os.getpid() % 700) * 30


def ports(offset: int, count: int) -> tuple[int, int]:
    assert offset + count <= 30
    return _BLOCK + offset, _BLOCK + offset + count - 1


def inside(port: int, port_range: tuple[int, int]) -> bool:
    return port_range[0] <= port <= port_range[1]


# -- what the process has actually bound (independent of aioice) ------------------------


def bound_udp_ports() -> set[int]:
    """Local ports of every UDP socket this process holds (/proc: Linux)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return found


needs_proc = pytest.mark.skipif(not Path("/proc/net/udp").exists(), reason="needs Linux /proc")


def connection(peer: MediaPeer) -> aioice.Connection:
    """The aioice agent of a peer's (only, bundled) transport."""
    return peer._pc.getTransceivers()[0].sender.transport.transport.iceGatherer._connection


async def drain(peer: MediaPeer, frames: int = 8) -> None:
    target = peer.received.frames + frames

    async def poll():
        while peer.received.frames < target:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), TIMEOUT)


async def call_with_tone(offer_config: PeerConfig, answer_config: PeerConfig, wav: Path):
    """offer → accept_offer → apply_answer → media_up, 1 kHz for 1 s offerer → answerer.
    Returns (offer, answer, offerer, answerer); both peers are closed."""
    offerer = MediaPeer(offer_config, label="offerer")
    answerer = MediaPeer(answer_config, label="answerer")
    try:
        offer = await offerer.create_offer()
        sink = WavSink(wav)
        answerer.add_sink(sink)
        answer = await answerer.accept_offer(offer)
        await offerer.apply_answer(answer)
        await asyncio.gather(offerer.media_up(TIMEOUT), answerer.media_up(TIMEOUT))
        played = offerer.play(ToneSource(1000, 1.0))
        await asyncio.wait_for(played.done, TIMEOUT)
        await drain(answerer)
        nominated = (connection(offerer)._nominated[1], connection(answerer)._nominated[1])
    finally:
        await offerer.close()
        await answerer.close()
    x, rate = analysis.read_audio(wav)
    assert analysis.dominant_frequency(x, rate) == pytest.approx(1000, abs=10)
    assert analysis.tone_seconds(x, rate, 1000) == pytest.approx(1.0, abs=0.1)
    return offer, answer, nominated


# -- the aioice internals media/ice.py relies on -----------------------------------------


def test_aioice_internals_are_still_there():
    """If this fails after an aioice upgrade, media/ice.py's hooks need revisiting (see
    its module docstring): the port range, host addresses or gathering bound would
    otherwise silently stop applying."""
    # 1. host addresses come from a module global function with these keywords.
    assert "get_host_addresses(" in inspect.getsource(aioice.ice.Connection.gather_candidates)
    assert list(inspect.signature(ice._original_get_host_addresses).parameters) == [
        "use_ipv4", "use_ipv6"
    ]
    # 2. binds go through asyncio.get_running_loop().create_datagram_endpoint, port 0.
    source = inspect.getsource(ice._original_get_component_candidates)
    assert "asyncio.get_running_loop()" in source
    assert "create_datagram_endpoint(" in source and "local_addr=(address, 0)" in source
    turn_source = inspect.getsource(aioice.turn.create_turn_endpoint)
    assert "asyncio.get_running_loop()" in turn_source
    assert "create_datagram_endpoint(" in turn_source
    # 3. the STUN/TURN wait is a 'timeout' parameter that gather_candidates leaves default.
    assert "timeout" in inspect.signature(ice._original_get_component_candidates).parameters
    assert "timeout" not in inspect.getsource(aioice.ice.Connection.gather_candidates)
    # The hooks install cleanly on this version.
    with ice.gathering(port_range=ports(0, 1)):
        pass
    for module in ice.PORT_RANGE_MODULES:
        assert isinstance(module.asyncio, ice._AsyncioView)
    assert aioice.ice.get_host_addresses is ice._get_host_addresses
    assert aioice.ice.Connection.get_component_candidates is ice._get_component_candidates


async def test_bare_aioice_connection_honours_the_gathering_settings():
    """The hooks, exercised on aioice alone: host address, port range, and nothing
    leaks outside the block (other asyncio users keep the real loop)."""
    port_range = ports(0, 2)
    conn = aioice.Connection(ice_controlling=True)
    try:
        with ice.gathering(host_addresses=LOOPBACK, port_range=port_range, timeout=1):
            assert aioice.ice.asyncio.get_running_loop() is not asyncio.get_running_loop()
            await conn.gather_candidates()
        [candidate] = conn.local_candidates
        assert (candidate.type, candidate.host) == ("host", "127.0.0.1")
        assert inside(candidate.port, port_range)
        [protocol] = conn._protocols
        assert protocol.transport.get_extra_info("sockname") == ("127.0.0.1", candidate.port)
    finally:
        await conn.close()
    # Outside a gathering: aioice sees the real loop, nothing is substituted.
    assert aioice.ice.asyncio.get_running_loop() is asyncio.get_running_loop()
    assert aioice.ice.asyncio.sleep is asyncio.sleep


def test_bad_settings_are_refused_early():
    with pytest.raises(ValueError, match="port_range"):
        PeerConfig(port_range=(5000, 4000))
    with pytest.raises(ValueError, match="port_range"):
        PeerConfig(port_range=(0, 10))
    with pytest.raises(ValueError):
        PeerConfig(advertised_address="gateway.example.com")
    assert PeerConfig(port_range=[40000, 40010]).port_range == (40000, 40010)


# -- port range ----------------------------------------------------------------------------


@needs_proc
async def test_concurrent_offers_bind_distinct_ports_inside_the_range():
    port_range = ports(2, 6)
    config = PeerConfig(host_addresses=LOOPBACK, port_range=port_range)
    # A peer without a range, gathering at the same time, is not affected.
    free = MediaPeer(PeerConfig(host_addresses=LOOPBACK))
    peers = [MediaPeer(config) for _ in range(4)]
    before = bound_udp_ports()
    try:
        offers = await asyncio.wait_for(
            asyncio.gather(*(p.create_offer() for p in [*peers, free])), TIMEOUT
        )
        new_sockets = bound_udp_ports() - before
        sdp_ports = [port for o in offers[:4] for _, port in sdp_rules.host_candidates(o)]
        [(_, free_port)] = sdp_rules.host_candidates(offers[4])
        agent_ports = [
            pr.transport.get_extra_info("sockname")[1]
            for p in peers
            for pr in connection(p)._protocols
        ]
    finally:
        for p in [*peers, free]:
            await p.close()
    assert len(sdp_ports) == 4 and len(set(sdp_ports)) == 4
    assert all(inside(p, port_range) for p in sdp_ports), sdp_ports
    assert sorted(agent_ports) == sorted(sdp_ports)
    # What the kernel says this process bound: the four range ports, and the free peer's.
    assert new_sockets == {*sdp_ports, free_port}
    assert not inside(free_port, port_range)
    assert not bound_udp_ports() & set(sdp_ports)  # closed with the peers


async def test_a_full_range_fails_the_offer_clearly_and_a_freed_port_is_reused():
    port_range = ports(8, 3)
    blockers = []
    for port in range(port_range[0], port_range[1] + 1):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):  # taken by someone else: occupied all the same
            s.bind(("127.0.0.1", port))
        blockers.append(s)
    config = PeerConfig(host_addresses=LOOPBACK, port_range=port_range)
    peer = MediaPeer(config)
    try:
        with pytest.raises(MediaError, match=r"no free UDP port in the media port range "
                                            rf"{port_range[0]}-{port_range[1]} on 127\.0\.0\.1"):
            await asyncio.wait_for(peer.create_offer(), TIMEOUT)
    finally:
        await peer.close()
    blockers[1].close()
    peer = MediaPeer(config)
    try:
        offer = await asyncio.wait_for(peer.create_offer(), TIMEOUT)
        assert sdp_rules.host_candidates(offer) == [("127.0.0.1", port_range[0] + 1)]
    finally:
        await peer.close()
        for s in blockers:
            s.close()


async def test_port_range_exhausted_is_the_cause():
    port_range = ports(11, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
        with contextlib.suppress(OSError):
            blocker.bind(("127.0.0.1", port_range[0]))
        peer = MediaPeer(PeerConfig(host_addresses=LOOPBACK, port_range=port_range))
        try:
            with pytest.raises(MediaError) as info:
                await asyncio.wait_for(peer.create_offer(), TIMEOUT)
        finally:
            await peer.close()
    cause = info.value.__cause__
    assert isinstance(cause, ice.PortRangeExhausted) and isinstance(cause, RuntimeError)
    assert cause.port_range == port_range and cause.address == "127.0.0.1"
    assert "all 1 ports are in use" in str(cause)


async def test_exhaustion_on_a_second_address_releases_the_first_one():
    """Linux routes all of 127/8 to lo: two host addresses, the range full on the
    second only. The gathering fails and the socket already bound on the first address
    is released at once (aioice had not recorded it yet)."""
    port_range = ports(25, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
        with contextlib.suppress(OSError):
            blocker.bind(("127.0.0.2", port_range[0]))
        peer = MediaPeer(PeerConfig(host_addresses=["127.0.0.1", "127.0.0.2"],
                                    port_range=port_range))
        try:
            with pytest.raises(MediaError, match=r"on 127\.0\.0\.2"):
                await asyncio.wait_for(peer.create_offer(), TIMEOUT)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", port_range[0]))  # free again, before close()
        finally:
            await peer.close()


async def test_turn_client_socket_binds_inside_the_range():
    """aioice's TURN/UDP client socket (no local_addr) also takes a port from the range.
    The 'server' just records where the first Allocate came from."""
    port_range = ports(12, 2)
    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    try:
        with ice.gathering(port_range=port_range):
            client = asyncio.ensure_future(
                aioice.turn.create_turn_endpoint(
                    asyncio.DatagramProtocol,
                    server_addr=server.getsockname(),
                    username="user",
                    password="secret",
                )
            )
        _, source = await asyncio.wait_for(loop.sock_recvfrom(server, 2048), TIMEOUT)
        assert inside(source[1], port_range), source
        client.cancel()
        with pytest.raises(asyncio.CancelledError):
            await client
    finally:
        server.close()


async def test_turn_server_in_peer_config_uses_the_range_too():
    port_range = ports(14, 3)
    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    host, port = server.getsockname()
    config = PeerConfig(
        ice_servers=[IceServer(f"turn:{host}:{port}?transport=udp", "user", "secret")],
        host_addresses=LOOPBACK, port_range=port_range, gather_timeout_s=1.0,
    )
    peer = MediaPeer(config)
    try:
        offer_task = asyncio.ensure_future(peer.create_offer())
        _, source = await asyncio.wait_for(loop.sock_recvfrom(server, 2048), TIMEOUT)
        offer = await asyncio.wait_for(offer_task, TIMEOUT)  # the TURN server never answers
    finally:
        await peer.close()
        server.close()
    [(_, host_port)] = sdp_rules.host_candidates(offer)
    assert inside(source[1], port_range) and inside(host_port, port_range)
    assert source[1] != host_port


async def test_no_port_left_for_turn_keeps_the_host_candidate(caplog):
    """The TURN client cannot get a port (the host candidate took the only one): the
    relay candidate is skipped with a warning, the host socket stays open and usable."""
    port_range = ports(24, 1)
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    host, port = server.getsockname()
    config = PeerConfig(
        ice_servers=[IceServer(f"turn:{host}:{port}?transport=udp", "user", "secret")],
        host_addresses=LOOPBACK, port_range=port_range, gather_timeout_s=1.0,
    )
    peer = MediaPeer(config)
    try:
        offer = await asyncio.wait_for(peer.create_offer(), TIMEOUT)
        [protocol] = connection(peer)._protocols
        assert not protocol.transport.is_closing()
    finally:
        await peer.close()
        server.close()
    assert sdp_rules.host_candidates(offer) == [("127.0.0.1", port_range[0])]
    assert "TURN" in caplog.text and "no free UDP port" in caplog.text


async def test_call_with_port_ranges_on_both_sides_carries_audio(tmp_path):
    offer_range, answer_range = ports(17, 2), ports(19, 2)
    offer, answer, (offer_pair, answer_pair) = await call_with_tone(
        PeerConfig(host_addresses=LOOPBACK, port_range=offer_range),
        PeerConfig(host_addresses=LOOPBACK, port_range=answer_range),
        tmp_path / "heard.wav",
    )
    assert all(inside(p, offer_range) for _, p in sdp_rules.host_candidates(offer))
    assert all(inside(p, answer_range) for _, p in sdp_rules.host_candidates(answer))
    # Media really went between the range ports.
    assert inside(offer_pair.local_addr[1], offer_range)
    assert inside(offer_pair.remote_addr[1], answer_range)
    assert inside(answer_pair.local_addr[1], answer_range)


# -- advertised address --------------------------------------------------------------------

SAMPLE = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    "m=audio 50000 UDP/TLS/RTP/SAVPF 96\r\n"
    "c=IN IP4 10.0.0.5\r\n"
    "a=rtcp:9 IN IP4 0.0.0.0\r\n"
    "a=candidate:1 1 udp 2130706431 10.0.0.5 50000 typ host\r\n"
    "a=candidate:2 1 udp 2130706431 fd00::5 50002 typ host\r\n"
    "a=candidate:3 1 udp 1694498815 198.51.100.7 61000 typ srflx raddr 10.0.0.5 rport 50000\r\n"
    "a=candidate:4 1 udp 16777215 203.0.113.9 3478 typ relay raddr 10.0.0.5 rport 50004\r\n"
    "a=candidate:5 1 udp 2130706431 abc.local 50006 typ host\r\n"
    "a=end-of-candidates\r\n"
)


def test_advertise_address_rewrites_only_host_candidates_of_the_same_family():
    out = sdp_rules.advertise_address(SAMPLE, "198.51.100.7")
    assert sdp_rules.host_candidates(out) == [
        ("198.51.100.7", 50000), ("fd00::5", 50002), ("abc.local", 50006)
    ]
    assert "c=IN IP4 198.51.100.7\r\n" in out
    # srflx / relay (and their related addresses), o=, a=rtcp, m= port: untouched.
    for line in SAMPLE.split("\r\n"):
        if "typ srflx" in line or "typ relay" in line or line.startswith(("o=", "a=rtcp", "m=")):
            assert line in out.split("\r\n")
    assert out.endswith("\r\n") and out.count("\r\n") == SAMPLE.count("\r\n")


def test_advertise_address_ipv6():
    out = sdp_rules.advertise_address(SAMPLE, "2001:db8::1")
    assert sdp_rules.host_candidates(out) == [
        ("10.0.0.5", 50000), ("2001:db8::1", 50002), ("abc.local", 50006)
    ]
    assert "c=IN IP4 10.0.0.5\r\n" in out  # the default candidate is the IPv4 one
    v6_default = SAMPLE.replace("c=IN IP4 10.0.0.5", "c=IN IP6 fd00::5")
    assert "c=IN IP6 2001:db8::1\r\n" in sdp_rules.advertise_address(v6_default, "2001:db8::1")


def test_advertise_address_leaves_a_c_line_naming_another_candidate():
    relay_default = SAMPLE.replace("c=IN IP4 10.0.0.5", "c=IN IP4 203.0.113.9")
    out = sdp_rules.advertise_address(relay_default, "198.51.100.7")
    assert "c=IN IP4 203.0.113.9\r\n" in out


def test_advertise_address_refuses_a_name():
    with pytest.raises(ValueError):
        sdp_rules.advertise_address(SAMPLE, "gateway.example.com")


async def test_advertised_address_in_the_sdp_and_the_call_uses_it(tmp_path):
    """Bound on the wildcard, which is no address to give anyone; advertised as
    127.0.0.1, which reaches a wildcard socket on the same port (as a 1:1 NAT forwards
    the public address to the bound one). The far side's checks go to the advertised
    candidate and that is the pair it nominates (no peer-reflexive detour)."""
    offer_range = ports(21, 2)
    offer, answer, (offer_pair, answer_pair) = await call_with_tone(
        PeerConfig(host_addresses=["0.0.0.0"], port_range=offer_range,
                   advertised_address="127.0.0.1"),
        PeerConfig(host_addresses=LOOPBACK),
        tmp_path / "heard.wav",
    )
    [(address, port)] = sdp_rules.host_candidates(offer)
    assert address == "127.0.0.1" and inside(port, offer_range)
    summary = [line for line in offer.split("\r\n") if line.startswith("c=")]
    assert summary == ["c=IN IP4 127.0.0.1"]
    assert "0.0.0.0 " + str(port) not in offer
    # The offerer's socket is the wildcard one; the answerer reached it as advertised.
    assert offer_pair.local_addr == ("0.0.0.0", port)
    assert answer_pair.remote_candidate.type == "host"
    assert answer_pair.remote_addr == ("127.0.0.1", port)


async def test_answerer_advertised_address(tmp_path):
    offer, answer, (offer_pair, _) = await call_with_tone(
        PeerConfig(host_addresses=LOOPBACK),
        PeerConfig(host_addresses=["0.0.0.0"], advertised_address="127.0.0.1"),
        tmp_path / "heard.wav",
    )
    [(address, port)] = sdp_rules.host_candidates(answer)
    assert address == "127.0.0.1"
    assert "c=IN IP4 127.0.0.1" in answer.split("\r\n")
    assert offer_pair.remote_candidate.type == "host"
    assert offer_pair.remote_addr == ("127.0.0.1", port)


# -- bounded gathering ---------------------------------------------------------------------


class _Blackhole(asyncio.DatagramProtocol):
    """A 'STUN server' that reads every request and never answers."""

    def __init__(self):
        self.requests = 0
        self.first = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr):
        self.requests += 1
        if not self.first.done():
            self.first.set_result(addr)


@pytest.mark.parametrize("side", ["offer", "answer"])
async def test_unanswering_stun_server_costs_at_most_the_gather_timeout(side):
    """aioice alone would wait 5 s for the STUN answer (its per-component timeout, while
    the transaction retransmits for up to ~63 s); we bound it at gather_timeout_s and
    the SDP comes out with the host candidate: better than failing the call."""
    loop = asyncio.get_running_loop()
    transport, blackhole = await loop.create_datagram_endpoint(
        _Blackhole, local_addr=("127.0.0.1", 0)
    )
    host, port = transport.get_extra_info("sockname")
    gather_timeout = 1.0
    config = PeerConfig(
        ice_servers=[IceServer(f"stun:{host}:{port}")],
        host_addresses=LOOPBACK, gather_timeout_s=gather_timeout,
    )
    peer = MediaPeer(config)
    other = MediaPeer(PeerConfig(host_addresses=LOOPBACK))
    try:
        remote_offer = await other.create_offer() if side == "answer" else None
        started = time.monotonic()
        if side == "offer":
            sdp = await asyncio.wait_for(peer.create_offer(), TIMEOUT)
        else:
            sdp = await asyncio.wait_for(peer.accept_offer(remote_offer), TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        await peer.close()
        await other.close()
        transport.close()
    assert blackhole.requests >= 1  # the STUN server was asked (and retried)
    assert gather_timeout - 0.1 <= elapsed <= gather_timeout + 0.5, elapsed
    candidates = sdp_rules.parse(sdp).audio.candidates
    assert [c.split()[7] for c in candidates] == ["host"]
    assert sdp_rules.whatsapp_problems(sdp, role=side) == []
