"""Calls through a bad network: the sandbox's phone behind a UDP impairment relay
(gateway.sandbox.netem) that drops, delays, reorders, duplicates or blackholes packets.

The relay unit tests use plain UDP sockets; the call tests run real calls through
``Service(settings, sandbox=True)`` with ``Sandbox.phone_factory`` swapped for
:func:`~gateway.sandbox.netem.impaired_phone_factory`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from gateway.app import Service
from gateway.calls import CallState, EndReason
from gateway.config import Settings
from gateway.sandbox.netem import (
    Impairment,
    NetemRelay,
    impaired_phone_factory,
    point_candidates_at,
)
from media import analysis
from media.opus import OpusSettings
from media.sinks.wav import WavSink
from media.sources.file import FileSource
from media.sources.tone import SilenceSource, ToneSource
from tests.helpers import drain, segments_frequency, tone_frequency, tone_seconds
from tests.media_call import read_wav

USER = "+4915112345678"
TIMEOUT = 30
SEED = 20240611

# -- the relay on its own ------------------------------------------------------------------

SDP_TEMPLATE = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio {port} UDP/TLS/RTP/SAVPF 96\r\n"
    "c=IN IP4 127.0.0.1\r\na=candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host\r\n"
    "a=candidate:2 1 udp 1694498815 203.0.113.9 40000 typ srflx raddr 127.0.0.1 rport {port}\r\n"
    "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdef0123456789\r\na=rtpmap:96 opus/48000/2\r\n"
)


class Endpoint(asyncio.DatagramProtocol):
    """A UDP socket that remembers what it received, and when."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, tuple[str, int], float]] = []
        self.changed = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.got.append((data, (addr[0], addr[1]), time.monotonic()))
        self.changed.set()

    @property
    def address(self) -> tuple[str, int]:
        return self.transport.get_extra_info("sockname")[:2]

    def payloads(self) -> list[bytes]:
        return [d for d, _, _ in self.got]

    async def wait_for(self, predicate, timeout: float = 5.0) -> None:
        async def wait() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_count(self, n: int, timeout: float = 5.0) -> None:
        await self.wait_for(lambda: len(self.got) >= n, timeout)


@dataclass
class Net:
    relay: NetemRelay
    gateway: Endpoint
    phone: Endpoint
    closers: list = field(default_factory=list)

    def to_phone(self, data: bytes) -> None:
        self.gateway.transport.sendto(data, self.relay.gateway_side_address)

    def to_gateway(self, data: bytes) -> None:
        self.phone.transport.sendto(data, self.relay.phone_side_address)


async def make_net(**relay_kwargs) -> Net:
    loop = asyncio.get_running_loop()
    _, gateway = await loop.create_datagram_endpoint(Endpoint, local_addr=("127.0.0.1", 0))
    _, phone = await loop.create_datagram_endpoint(Endpoint, local_addr=("127.0.0.1", 0))
    relay = await NetemRelay(**relay_kwargs).start()
    # The SDPs teach the relay where each side is, as in a call.
    relay.sdp_for_phone(SDP_TEMPLATE.format(port=gateway.address[1]))
    relay.sdp_for_gateway(SDP_TEMPLATE.format(port=phone.address[1]))
    return Net(relay, gateway, phone)


@pytest.fixture
async def net_factory():
    nets: list[Net] = []

    async def factory(**kwargs) -> Net:
        net = await make_net(**kwargs)
        nets.append(net)
        return net

    yield factory
    for net in nets:
        net.relay.close()
        net.gateway.transport.close()
        net.phone.transport.close()


def numbered(n: int) -> list[bytes]:
    return [b"pkt%05d" % i for i in range(n)]


async def send_paced(net: Net, packets: list[bytes], direction: str, batch: int = 10) -> dict[bytes, float]:
    """Send ``packets`` one way, ``batch`` at a time, each batch once the relay has taken
    the previous one (so no socket buffer overflows); returns when each was sent."""
    send = net.to_phone if direction == "to_phone" else net.to_gateway
    stats = net.relay.stats()[direction]
    sent_at: dict[bytes, float] = {}
    first = stats.received
    for i in range(0, len(packets), batch):
        for p in packets[i: i + batch]:
            sent_at[p] = time.monotonic()
            send(p)
        target = first + min(i + batch, len(packets))
        await asyncio.wait_for(_until(lambda: stats.received >= target), 5)
    return sent_at


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.001)


async def send_with_sentinel(net: Net, packets: list[bytes], direction: str) -> list[bytes]:
    """Send ``packets`` one way, then a sentinel that no impairment touches; return what
    arrived before it (undelayed datagrams on loopback keep their order)."""
    send = net.to_phone if direction == "to_phone" else net.to_gateway
    receiver = net.phone if direction == "to_phone" else net.gateway
    await send_paced(net, packets, direction)
    kept = net.relay.impairment(direction)
    net.relay.set_impairment(**{direction: Impairment()})
    send(b"sentinel")
    await receiver.wait_for(lambda: b"sentinel" in receiver.payloads())
    net.relay.set_impairment(**{direction: kept})
    got = receiver.payloads()
    return got[: got.index(b"sentinel")]


def test_point_candidates_at_rewrites_to_one_host_candidate():
    sdp, first = point_candidates_at(SDP_TEMPLATE.format(port=5000), "127.0.0.1", 6000)
    assert first == ("127.0.0.1", 5000)
    candidates = [line for line in sdp.split("\r\n") if line.startswith("a=candidate:")]
    assert candidates == ["a=candidate:1 1 udp 2130706431 127.0.0.1 6000 typ host"]
    assert "m=audio 6000 UDP/TLS/RTP/SAVPF 96" in sdp and "c=IN IP4 127.0.0.1" in sdp


def test_impairment_validates():
    for bad in ({"loss": 1.5}, {"duplicate": -0.1}, {"jitter_ms": -1}, {"delay_ms": float("nan")}):
        with pytest.raises(ValueError):
            Impairment(**bad)


async def test_clean_relay_forwards_both_ways_and_hides_each_side(net_factory):
    net = await net_factory()
    net.to_phone(b"hello phone")
    await net.phone.wait_count(1)
    data, source, _ = net.phone.got[0]
    assert data == b"hello phone" and source == net.relay.phone_side_address
    net.to_gateway(b"hello gateway")
    await net.gateway.wait_count(1)
    data, source, _ = net.gateway.got[0]
    assert data == b"hello gateway" and source == net.relay.gateway_side_address


async def test_loss_is_seeded_deterministic_and_per_direction(net_factory):
    lossy = Impairment(loss=0.3)
    runs = []
    for seed in (7, 7, 8):
        net = await net_factory(to_phone=lossy, seed=seed)
        runs.append(await send_with_sentinel(net, numbered(400), "to_phone"))
        # the other direction is clean
        assert await send_with_sentinel(net, numbered(50), "to_gateway") == numbered(50)
        stats = net.relay.stats()
        assert stats["to_phone"].dropped == 400 - len(runs[-1])
        assert stats["to_gateway"].dropped == 0
    assert runs[0] == runs[1]  # same seed, same packets lost
    assert runs[0] != runs[2]  # another seed, another pattern
    for kept in runs:
        assert 0.2 < 1 - len(kept) / 400 < 0.4
        assert kept == sorted(kept)  # loss alone never reorders


async def test_duplication(net_factory):
    net = await net_factory(to_gateway=Impairment(duplicate=0.25), seed=1)
    got = await send_with_sentinel(net, numbered(200), "to_gateway")
    duplicated = net.relay.stats()["to_gateway"].duplicated
    assert 20 < duplicated < 80
    assert len(got) == 200 + duplicated
    assert sorted(set(got)) == numbered(200)


async def test_jitter_delays_within_bounds_and_reorders(net_factory):
    net = await net_factory(to_phone=Impairment(delay_ms=10, jitter_ms=40), seed=2)
    packets = numbered(60)
    sent_at = await send_paced(net, packets, "to_phone")
    await net.phone.wait_count(60)
    got = net.phone.payloads()
    assert sorted(got) == packets  # nothing lost
    assert got != packets  # jitter reordered some
    delays = [t - sent_at[d] for d, _, t in net.phone.got]
    assert min(delays) >= 0.009
    assert max(delays) < 0.05 + 0.1  # 10 + 40 ms, and a busy machine's timer slack


async def test_explicit_reordering(net_factory):
    net = await net_factory(to_phone=Impairment(reorder=0.2, reorder_ms=30), seed=3)
    packets = numbered(100)
    await send_paced(net, packets, "to_phone")
    await net.phone.wait_count(100)
    got = net.phone.payloads()
    held = net.relay.stats()["to_phone"].reordered
    assert 5 < held < 40
    assert sorted(got) == packets and got != packets
    # the held-back packets arrive after packets sent after them
    late = {p for i, p in enumerate(got) if any(q > p for q in got[:i])}
    assert len(late) == held


async def test_blackhole_and_restore(net_factory):
    net = await net_factory(seed=4)
    net.relay.blackhole()  # both directions, until restored
    assert net.relay.blackholed()
    await send_paced(net, numbered(20), "to_gateway")
    await send_paced(net, numbered(20), "to_phone")
    assert all(s.blackholed == 20 and s.sent == 0 for s in net.relay.stats().values())
    net.relay.restore()
    assert not net.relay.blackholed()
    net.to_gateway(b"after")
    net.to_phone(b"after")
    await net.gateway.wait_for(lambda: b"after" in net.gateway.payloads())
    await net.phone.wait_for(lambda: b"after" in net.phone.payloads())
    assert net.gateway.payloads() == [b"after"] and net.phone.payloads() == [b"after"]


async def test_blackhole_for_a_while_and_one_direction(net_factory):
    net = await net_factory(seed=5)
    net.relay.blackhole(0.3, direction="to_phone")
    assert net.relay.blackholed("to_phone") and not net.relay.blackholed("to_gateway")
    net.to_gateway(b"up")
    await net.gateway.wait_for(lambda: b"up" in net.gateway.payloads())
    await send_paced(net, [b"lost"], "to_phone")
    assert net.relay.stats()["to_phone"].blackholed == 1
    # it ends by itself: keep sending until something gets through (bounded)
    async def until_through() -> None:
        n = 0
        while not any(p.startswith(b"probe") for p in net.phone.payloads()):
            net.to_phone(b"probe%d" % n)
            n += 1
            await asyncio.sleep(0.02)

    started = time.monotonic()
    await asyncio.wait_for(until_through(), 5)
    assert time.monotonic() - started < 1.0
    assert b"lost" not in net.phone.payloads()


# -- calls through the relay -----------------------------------------------------------

LOSS = 0.05
JITTER_MS = 40.0
BUSINESS_TONE_S = 2.0
USER_TONE_S = 2.0
#: The business keeps talking (silence) this long after its tone: a call of ~8 s.
HOLD_S = 6.0


class FirstFrameClock:
    """A sink that notes when the first received frame was played (loop clock)."""

    def __init__(self):
        self.first_at: float | None = None

    def write(self, pcm, rate, channels) -> None:
        if self.first_at is None:
            self.first_at = asyncio.get_running_loop().time()

    def close(self) -> None:
        pass


@dataclass
class ImpairedCall:
    state_before_hangup: CallState
    end_reason: EndReason | None
    connected_s: float
    recording: Path
    recording_s: float
    phone_recording: Path
    relay_stats: dict
    gateway_frames: int
    phone_frames: int
    media_up_s: float
    #: loop-clock seconds from the first received frame played to the hang-up
    played_span_s: float
    #: the playout buffer's delay when the call was hung up (flushed into the recording)
    final_delay_s: float
    playout: dict
    sidecar: dict
    stereo: Path


async def run_impaired_call(tmp: Path, impairment: Impairment, seed: int, *,
                            phone_opus: OpusSettings | None = None, user_says=None) -> ImpairedCall:
    settings = Settings(data_dir=tmp / "data", port=0, ring_timeout_s=30.0, media_timeout_s=20.0,
                        media_addresses=["127.0.0.1"])
    relays: list[NetemRelay] = []
    async with Service(settings, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        factory = impaired_phone_factory(
            lambda: NetemRelay(to_phone=impairment, to_gateway=impairment, seed=seed),
            on_relay=relays.append)
        if phone_opus is not None:  # the phone encodes as told (e.g. with in-band FEC)
            service.sandbox.phone_factory = lambda config, **kw: factory(replace(config, opus=phone_opus), **kw)
        else:
            service.sandbox.phone_factory = factory
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        recording = tmp / "gateway-heard.wav"
        clock = FirstFrameClock()
        call = await service.manager.place_call(
            USER, sources=[ToneSource(1000, BUSINESS_TONE_S), SilenceSource(HOLD_S)],
            sinks=[WavSink(recording), clock], record=True)
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        sandbox_call = service.sandbox.calls[call.wacid]
        said = sandbox_call.phone.peer.play(user_says() if user_says else ToneSource(600, USER_TONE_S))
        await asyncio.wait_for(said.done, TIMEOUT)
        await asyncio.wait_for(call.wait_playback(), TIMEOUT)
        state = call.state
        playout = (await call.media.get_stats()).get("playout") or {}  # none on aiortc's path
        hangup_at = asyncio.get_running_loop().time()
        await call.hangup()
        await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
        summary = call.summary()
        x, rate = analysis.read_audio(recording)
        return ImpairedCall(
            state_before_hangup=state, end_reason=call.end_reason,
            connected_s=summary["connected_seconds"], recording=recording, recording_s=x.size / rate,
            phone_recording=Path(sandbox_call.phone.recording_path),
            relay_stats={k: v.as_dict() for k, v in relays[0].stats().items()},
            gateway_frames=call.received.frames, phone_frames=sandbox_call.phone.received.frames,
            media_up_s=call.elapsed_until("media_up") - call.elapsed_until("offer_created"),
            played_span_s=hangup_at - clock.first_at, final_delay_s=playout.get("delay_s") or 0.0,
            playout=playout, sidecar=json.loads(call.recording_files["sidecar"].read_text()),
            stereo=call.recording_files["stereo_wav"])


@pytest.fixture(scope="module")
def impaired_call(tmp_path_factory) -> ImpairedCall:
    """One ~8 s call at 5 % loss and 40 ms jitter each way, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("impaired")
    result = asyncio.run(run_impaired_call(tmp, Impairment(loss=LOSS, jitter_ms=JITTER_MS), SEED))
    print(f"\nimpaired call ({LOSS:.0%} loss, {JITTER_MS:g} ms jitter each way): media up after "
          f"{result.media_up_s:.2f} s, connected {result.connected_s:.2f} s, recording "
          f"{result.recording_s:.2f} s; phone heard 1 kHz for "
          f"{tone_seconds(result.phone_recording, 1000):.2f}/{BUSINESS_TONE_S} s, wacall heard "
          f"600 Hz for {tone_seconds(result.recording, 600):.2f}/{USER_TONE_S} s; relay {result.relay_stats}")
    return result


def test_call_stays_up_through_5pct_loss_and_40ms_jitter(impaired_call):
    assert impaired_call.state_before_hangup is CallState.MEDIA_CONNECTED
    assert impaired_call.end_reason is EndReason.BUSINESS_HANGUP
    for direction, stats in impaired_call.relay_stats.items():
        # the impairment really happened, in both directions
        assert stats["received"] > 300, direction
        assert 0.02 < stats["loss_ratio"] < 0.10, (direction, stats)


def test_tones_are_detected_through_5pct_loss_and_40ms_jitter(impaired_call):
    """Each tone is heard at its true pitch at the far end."""
    heard_by_phone = tone_frequency(impaired_call.phone_recording, 1000)
    heard_by_wacall = tone_frequency(impaired_call.recording, 600)
    assert heard_by_phone == pytest.approx(1000, abs=5)
    assert heard_by_wacall == pytest.approx(600, abs=5)
    assert tone_seconds(impaired_call.phone_recording, 1000) >= 0.4 * BUSINESS_TONE_S
    assert tone_seconds(impaired_call.recording, 600) >= 0.4 * USER_TONE_S


def test_tones_are_mostly_intact_through_5pct_loss(impaired_call):
    """5 % loss should cost about 5-10 % of a tone, not more. Fails with aiortc 1.16's
    audio receive path: its JitterBuffer(capacity=16, prefetch=4) releases one frame per
    arriving packet and only with 4 complete frames behind it, so after the first loss it
    runs full and each later lost packet costs ~4 more frames (evicted by smart_remove);
    nothing conceals the gap (no PLC/FEC)."""
    phone = tone_seconds(impaired_call.phone_recording, 1000) / BUSINESS_TONE_S
    wacall = tone_seconds(impaired_call.recording, 600) / USER_TONE_S
    assert phone >= 0.8 and wacall >= 0.8, f"phone heard {phone:.0%} of 1 kHz, wacall {wacall:.0%} of 600 Hz"


async def test_in_band_fec_from_the_phone_rebuilds_lost_packets(tmp_path):
    """The phone encodes as WhatsApp's offer invites (``useinbandfec=1``): SILK
    wideband with in-band FEC. Packets lost on the way to the gateway while the user
    speaks are rebuilt from the next packet's FEC instead of concealed. The user says
    a 600 Hz tone in syllables (4 Hz on and off): libopus codes FEC only while its voice
    detector hears activity, which a steady tone stops being after ~0.7 s."""
    said_s = 5.0
    t = np.arange(int(said_s * 48_000)) / 48_000
    speech = 0.3 * 32767 * np.sin(2 * np.pi * 600 * t) * (np.sin(2 * np.pi * 4 * t) > -0.3)
    path = tmp_path / "syllables.wav"
    with WavSink(path) as sink:
        sink.write(speech.astype(np.int16), 48_000)
    result = await run_impaired_call(tmp_path, Impairment(loss=0.20), SEED, user_says=lambda: FileSource(path),
                                     phone_opus=OpusSettings(application="voip", bitrate=24_000, fec_loss=10))
    dropped = result.relay_stats["to_gateway"]["dropped"]
    fec = result.playout["frames_fec"]
    heard = tone_seconds(result.recording, 600)
    print(f"\nFEC: {dropped} packets to the gateway dropped, {fec} rebuilt from FEC, "
          f"{result.playout['frames_concealed']} concealed in all; 600 Hz heard for {heard:.2f}/{said_s} s")
    assert dropped > 40
    assert 10 <= fec <= dropped
    assert tone_frequency(result.recording, 600) == pytest.approx(600, abs=5)
    assert heard >= 0.5 * said_s


def test_recording_keeps_wall_clock_time_through_loss(impaired_call):
    """Lost packets do not shorten the recording: every 20 ms slot from the first frame
    played to the hang-up is in user.wav (concealed where the packet was lost), plus what
    was still buffered at the hang-up. Fails with aiortc's receive path, which delivers
    no frame for a lost packet (5 % loss: ~0.4 s short on this call)."""
    call = impaired_call
    expected = call.played_span_s + call.final_delay_s
    assert call.recording_s == pytest.approx(expected, abs=0.05), (
        f"recording {call.recording_s:.3f} s vs {call.played_span_s:.3f} s played + "
        f"{call.final_delay_s:.3f} s buffered; playout {call.playout}")
    assert call.playout["frames_concealed"] > 0  # the loss happened and was concealed
    # The recording misses only the audio still in flight when the call connected: the
    # user's first packets cross the 40 ms-jitter relay and the playout delay.
    assert call.connected_s - 0.3 <= call.recording_s <= call.connected_s + 0.1


def test_stereo_recording_is_aligned_on_the_wall_clock_through_loss(impaired_call):
    """The QA file (stereo.wav) lasts as long as the recorder ran, and the user's tone
    sits in its left channel, whole, at its true pitch."""
    call = impaired_call
    durations = call.sidecar["durations_s"]
    started = datetime.fromisoformat(call.sidecar["started_at"])
    ended = datetime.fromisoformat(call.sidecar["ended_at"])
    assert durations["stereo_wav"] == pytest.approx((ended - started).total_seconds(), rel=0.01)
    assert durations["stereo_wav"] >= call.connected_s
    stereo, rate = read_wav(call.stereo)
    x = stereo[:, 0].astype(np.float32) / 32768  # left: the user
    assert analysis.tone_seconds(x, rate, 600) == pytest.approx(USER_TONE_S, abs=0.15)
    assert segments_frequency(x, rate, 600) == pytest.approx(600, abs=5)


# -- a dead network --------------------------------------------------------------------

RTP_TIMEOUT_S = 3.0


@pytest.fixture
async def relayed_service(settings):
    relays: list[NetemRelay] = []
    settings = replace(settings, rtp_timeout_s=RTP_TIMEOUT_S)
    async with Service(settings, sandbox=True) as service:
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.phone_factory = impaired_phone_factory(lambda: NetemRelay(seed=SEED),
                                                               on_relay=relays.append)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        service.relays = relays
        yield service


async def test_blackhole_ends_the_call_as_media_failure(relayed_service):
    service = relayed_service
    call = await service.manager.place_call(USER)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    sandbox_call = service.sandbox.calls[call.wacid]
    await drain(call.media, sandbox_call.phone.peer)  # audio flows both ways
    relay = service.relays[0]
    relay.blackhole(10.0)
    started = time.monotonic()
    await call.wait_state(CallState.ENDED, RTP_TIMEOUT_S + 5)
    noticed_after = time.monotonic() - started
    await call.wait_finished(TIMEOUT)
    print(f"\nblackhole noticed after {noticed_after:.2f} s (rtp_timeout_s={RTP_TIMEOUT_S:g})")
    assert call.end_reason is EndReason.MEDIA_FAILURE
    assert RTP_TIMEOUT_S - 0.1 <= noticed_after <= RTP_TIMEOUT_S + 2.0
    assert relay.blackholed()  # still inside the 10 s outage: noticed, not waited out
    assert relay.stats()["to_gateway"].blackholed > 0
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert sandbox_call.ended_by == "business"  # wacall told the provider (terminate)


async def test_short_outage_is_survived_and_audio_resumes(relayed_service):
    service = relayed_service
    call = await service.manager.place_call(USER)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    sandbox_call = service.sandbox.calls[call.wacid]
    await drain(call.media, sandbox_call.phone.peer)
    relay = service.relays[0]
    relay.blackhole(RTP_TIMEOUT_S / 2)
    # audio resumes on both sides once the outage is over (the relay ends it by itself)
    await drain(call.media, sandbox_call.phone.peer, frames=25)
    assert not relay.blackholed()
    assert relay.stats()["to_gateway"].blackholed > 0 and relay.stats()["to_phone"].blackholed > 0
    assert call.state is CallState.MEDIA_CONNECTED
    await call.hangup()
    assert call.end_reason is EndReason.BUSINESS_HANGUP


async def test_user_initiated_call_through_the_relay(relayed_service):
    """The other SDP direction: the phone's offer and wacall's answer are rewritten too."""
    from gateway.calls import InboundPlan
    from gateway.events import Direction

    service = relayed_service
    service.manager.inbound_policy = lambda event: InboundPlan(sources=[ToneSource(1000, 0.6)])
    created = asyncio.get_running_loop().create_future()

    def on_entry(call, entry):
        if entry.name == "created" and call.direction is Direction.USER_INITIATED and not created.done():
            created.set_result(call)

    unsubscribe = service.manager.subscribe(on_entry)
    try:
        sandbox_call = await service.sandbox.user_calls(USER)
        call = await asyncio.wait_for(created, TIMEOUT)
    finally:
        unsubscribe()
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    await call.wait_playback()
    await drain(call.media, sandbox_call.phone.peer)
    relay = service.relays[0]
    stats = relay.stats()
    # every packet crossed the relay, both ways (nothing went around it)
    assert stats["to_phone"].sent > 30 and stats["to_gateway"].sent > 30
    await call.hangup()
    await asyncio.wait_for(sandbox_call.finished.wait(), TIMEOUT)
    assert call.end_reason is EndReason.BUSINESS_HANGUP
    assert tone_seconds(sandbox_call.phone.recording_path, 1000) == pytest.approx(0.6, abs=0.08)
