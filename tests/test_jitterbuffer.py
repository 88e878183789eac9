"""media.jitterbuffer (the playout buffer, simulated with explicit arrival and tick
times) and media.receiver (decoding, concealment, the aiortc wiring) — plus calls over
loopback with our receive path and with aiortc's."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from media import analysis
from media.frames import FRAME_SAMPLES, SAMPLE_RATE
from media.jitterbuffer import (
    CONCEAL,
    DISCARD,
    GAP,
    IDLE,
    PLAY,
    STRETCH,
    JitterStats,
    PlayoutBuffer,
    opus_samples,
    playout_buffer,
)
from media.opus import OpusSettings
from media.peer import PeerConfig
from media.receiver import OpusDecoder, OpusReceiver, aiortc_problems
from media.sources.tone import ToneSource
from media_call import TIMEOUT, FrameGate, call_pair, started_receiver, tone_packets

FRAME_S = 0.02
T0 = 1000.0


@pytest.fixture(autouse=True)
def _either_buffer(rtp_core, monkeypatch):
    """Every test here runs with the C core's PlayoutBuffer (what the receiver makes
    where the core was built), then with this module's reference one."""
    monkeypatch.setitem(globals(), "PlayoutBuffer", playout_buffer if rtp_core == "native" else _PyPlayoutBuffer)
    return rtp_core


_PyPlayoutBuffer = PlayoutBuffer


# -- a deterministic simulation: arrivals and 20 ms ticks on one timeline ---------------


@dataclass
class Packet:
    index: int  # frame index at the sender
    seq: int
    ts: int
    payload: bytes
    ssrc: int = 1


def packet(index: int, *, seq0: int = 1000, ts0: int = 5000, ssrc: int = 1, toc: int = 0xF8, step: int = 960) -> Packet:
    """Frame ``index`` of a stream; the payload names the index (CELT 20 ms TOC)."""
    return Packet(index, (seq0 + index) & 0xFFFF, (ts0 + step * index) & 0xFFFFFFFF,
                  bytes([toc]) + index.to_bytes(4, "big"), ssrc)


def index_of(payload: bytes) -> int:
    return int.from_bytes(payload[1:5], "big")


@dataclass
class Played:
    t: float
    kind: int
    index: int | None  # sender frame index of a played packet
    pts: int | None


@dataclass
class Sim:
    buffer: PlayoutBuffer
    out: list[Played] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)
    tick: float | None = None

    def run(self, arrivals: list[tuple[float, Packet]], until: float) -> Sim:
        """Arrivals (time, packet) and ticks in time order (an arrival first on a tie,
        like the event loop running I/O callbacks before timers), as media.receiver
        schedules ticks: at ``start_at``, then every 20 ms while playing. May be called
        again with later arrivals: the clock goes on."""
        buf = self.buffer
        arrivals = sorted(arrivals, key=lambda a: a[0])
        i = 0
        while True:
            t_arr = arrivals[i][0] if i < len(arrivals) else float("inf")
            tick = self.tick
            if tick is not None and tick < t_arr:
                if tick > until:
                    break
                kind, payload, pts = buf.pop(tick)
                while kind == DISCARD:
                    self.discarded.append(index_of(payload))
                    kind, payload, pts = buf.pop(tick)
                if kind == IDLE:
                    self.tick = None if buf.start_at is None else max(buf.start_at, tick)
                    continue
                self.out.append(Played(tick, kind, index_of(payload) if payload else None, pts))
                self.tick = tick + FRAME_S
            elif i < len(arrivals):
                if t_arr > until:
                    break
                p = arrivals[i][1]
                buf.push(p.seq, p.ts, p.payload, t_arr, p.ssrc)
                i += 1
                if self.tick is None and buf.start_at is not None:
                    self.tick = buf.start_at
            else:
                break
        return self

    @property
    def played(self) -> list[int]:
        return [p.index for p in self.out if p.kind == PLAY]

    def kinds(self, kind: int, before_pts: int | None = None) -> list[Played]:
        """Output of one kind (``before_pts``: only slots before that stream position,
        i.e. not the concealment after the stream ended)."""
        return [
            p for p in self.out
            if p.kind == kind and (before_pts is None or (p.pts is not None and p.pts < before_pts))
        ]


def paced(n: int, delays=None, **kw) -> list[tuple[float, Packet]]:
    """``n`` packets sent every 20 ms from T0, each arriving ``delays[i]`` later."""
    return [(T0 + FRAME_S * i + (delays[i] if delays is not None else 0.0), packet(i, **kw)) for i in range(n)]


def steady() -> PlayoutBuffer:
    """A buffer whose target stays at 60 ms (for ordering / loss tests: it never needs
    to shrink, so every packet is played)."""
    return PlayoutBuffer(min_delay_s=0.06, initial_delay_s=0.06)


def uniform_delays(n: int, spread_s: float, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [rng.random() * spread_s for _ in range(n)]


# -- opus_samples ------------------------------------------------------------------------


@pytest.mark.parametrize("payload, samples", [
    (bytes([0xF8, 1, 2]), 960),  # CELT FB 20 ms
    (bytes([0xF0, 1]), 480),  # CELT FB 10 ms
    (bytes([0x08, 1]), 960),  # SILK NB 20 ms
    (bytes([0x10, 1]), 1920),  # SILK NB 40 ms
    (bytes([0x18, 1]), 2880),  # SILK NB 60 ms
    (bytes([0x78, 1]), 960),  # Hybrid FB 20 ms
    (bytes([0xF9, 1, 2]), 1920),  # code 1: two 20 ms frames
    (bytes([0xFB, 0x03, 1]), 2880),  # code 3: three 20 ms frames
    (b"", 960),
    (bytes([0xFB]), 960),  # code 3 without its count byte: malformed
])
def test_opus_samples_reads_the_toc(payload, samples):
    assert opus_samples(payload) == samples


# -- ordering, wraparound, duplicates ----------------------------------------------------


def test_in_order_stream_plays_every_packet_once_after_the_initial_delay():
    sim = Sim(steady()).run(paced(100), until=T0 + 3)
    assert sim.played == list(range(100))
    first = sim.out[0]
    assert first.t == pytest.approx(T0 + 0.06)  # initial delay
    # one frame per tick, 20 ms apart, stream positions 960 apart
    pts = [p.pts for p in sim.out if p.kind == PLAY]
    assert pts == [960 * i for i in range(100)]
    stats = sim.buffer.stats
    assert stats.packets_lost == stats.packets_late == stats.packets_duplicate == 0
    assert stats.frames_played == 100 and stats.playouts == 1


def test_reordered_packets_are_played_in_sequence_order():
    arrivals = paced(60)
    # swap neighbours: every odd packet overtakes the even one before it by 10 ms
    arrivals = [(t + (0.03 if p.index % 2 == 0 else 0.0), p) for t, p in arrivals]
    sim = Sim(steady()).run(arrivals, until=T0 + 3)
    assert sim.played == list(range(60))
    # (packet 1 came first: it is the timeline's origin, packet 0 is at -960)
    last = max(p.pts for p in sim.out if p.kind == PLAY)
    assert sim.buffer.stats.packets_late == 0 and not sim.kinds(CONCEAL, before_pts=last)


@pytest.mark.parametrize("seq0, ts0", [(65_500, 5000), (1000, 2**32 - 960 * 30), (65_530, 2**32 - 960 * 3)])
def test_sequence_and_timestamp_wraparound(seq0, ts0):
    arrivals = paced(80, uniform_delays(80, 0.03), seq0=seq0, ts0=ts0)
    sim = Sim(steady()).run(arrivals, until=T0 + 3)
    assert sim.played == list(range(80))
    assert [p.pts for p in sim.out if p.kind == PLAY] == [960 * i for i in range(80)]
    stats = sim.buffer.stats
    assert stats.packets_lost == stats.packets_late == stats.packets_duplicate == stats.stream_restarts == 0


def test_duplicates_are_dropped_and_counted():
    arrivals = paced(50)
    dups = [(t + 0.005, p) for t, p in arrivals[::3]]  # a second copy of every third packet
    dups += [(t + 0.3, p) for t, p in arrivals[:10:2]]  # ... and very late copies (already played)
    sim = Sim(steady()).run(arrivals + dups, until=T0 + 3)
    assert sim.played == list(range(50))
    stats = sim.buffer.stats
    assert stats.packets_duplicate == len(dups)
    assert stats.packets_late == 0 and stats.packets_received == 50 + len(dups)


def test_first_packets_out_of_order_start_from_the_earliest():
    arrivals = paced(30)
    arrivals[0] = (arrivals[0][0] + 0.03, arrivals[0][1])  # packet 0 arrives after 1
    sim = Sim(steady()).run(arrivals, until=T0 + 2)
    assert sim.played == list(range(30))


# -- loss, late packets, concealment -----------------------------------------------------


def test_lost_packets_are_concealed_once_each_and_time_keeps_going():
    lost = {7, 20, 21, 22, 50}
    arrivals = [a for a in paced(80) if a[1].index not in lost]
    sim = Sim(steady()).run(arrivals, until=T0 + 3)
    assert sim.played == [i for i in range(80) if i not in lost]
    concealed = sim.kinds(CONCEAL, before_pts=80 * 960)
    assert sorted(p.pts // 960 for p in concealed) == sorted(lost)
    # a frame every 20 ms from the first packet's slot on (then hold_s of concealment)
    assert [p.pts for p in sim.out[:80]] == [960 * i for i in range(80)]
    assert all(abs((b.t - a.t) - FRAME_S) < 1e-9 for a, b in zip(sim.out, sim.out[1:]))
    stats = sim.buffer.stats
    assert stats.packets_lost == len(lost)
    assert stats.frames_concealed == len(lost) + len(sim.out) - 80  # + the tail after the stream
    assert stats.frames_stretched == 0 and stats.packets_late == 0


def test_late_packet_is_concealed_then_dropped_as_late():
    delays = [0.0] * 60
    delays[30] = 0.25  # arrives long after its slot
    sim = Sim(steady()).run(paced(60, delays), until=T0 + 3)
    assert 30 not in sim.played and sim.played == [i for i in range(60) if i != 30]
    assert [p.pts for p in sim.kinds(CONCEAL, before_pts=60 * 960)] == [30 * 960]
    stats = sim.buffer.stats
    assert stats.packets_late == 1 and stats.packets_lost == 0


def test_packets_of_a_slot_played_before_a_stop_are_late():
    arrivals = [a for a in paced(20) if a[1].index != 5]
    # stream stops; frame 5 turns up after playout stopped, then the stream resumes
    arrivals.append((T0 + 1.0, packet(5)))
    arrivals += [(T0 + 2.0 + FRAME_S * k, packet(100 + k)) for k in range(10)]
    sim = Sim(steady()).run(arrivals, until=T0 + 4)
    assert sim.played == [i for i in range(20) if i != 5] + list(range(100, 110))
    assert sim.buffer.stats.packets_late == 1 and sim.buffer.stats.playouts == 2


def _sender_gap(gap: int = 5) -> list[tuple[float, Packet]]:
    """20 packets, then the sender's timestamps jump by ``gap`` frames while sequence
    numbers go on (DTX, or telephone-events replacing audio: media.dtmf closes their
    sequence gap), 20 more packets; sent in real time."""
    arrivals = [(T0 + FRAME_S * i, packet(i)) for i in range(20)]
    for i in range(20, 40):
        j = i + gap  # frame index on the sender's clock
        arrivals.append((T0 + FRAME_S * j, Packet(j, 1000 + i, 5000 + 960 * j, bytes([0xF8]) + j.to_bytes(4, "big"))))
    return arrivals


def test_timestamp_gap_without_sequence_gap_is_not_loss():
    sim = Sim(steady()).run(_sender_gap(), until=T0 + 3)
    assert sim.played == list(range(20)) + list(range(25, 45))
    # Until the next packet shows the sender sent nothing, the empty slots are concealed
    # (it could be loss); from then on they pass without a frame.
    concealed = [p.pts // 960 for p in sim.kinds(CONCEAL, before_pts=45 * 960)]
    skipped = [p.pts // 960 for p in sim.kinds(GAP)]
    assert sorted(concealed + skipped) == [20, 21, 22, 23, 24] and len(skipped) >= 2
    assert sim.buffer.stats.packets_lost == 0 and sim.buffer.stats.frames_skipped == len(skipped)
    # the clock went on: the packets after the gap play at their own time
    resumed = next(p for p in sim.out if p.index == 25)
    assert resumed.t == pytest.approx(T0 + FRAME_S * 25 + 0.06)


def test_slots_replaced_by_telephone_events_pass_without_frames():
    """With the DTMF hint (telephone-events arrive instead of audio), no slot of the
    gap is concealed: no frame at all, as if the audio had been cut out."""
    buf = steady()
    events = {"on": False}
    buf.events_hint = lambda: events["on"]
    arrivals = _sender_gap()
    sim = Sim(buf)
    sim.run(arrivals[:20], until=T0 + FRAME_S * 20)
    events["on"] = True  # the first event packet arrived
    sim.run([], until=T0 + FRAME_S * 25)
    events["on"] = False  # audio again
    sim.run(arrivals[20:], until=T0 + 3)
    assert sim.played == list(range(20)) + list(range(25, 45))
    assert sorted(p.pts // 960 for p in sim.kinds(GAP)) == [20, 21, 22, 23, 24]
    assert not sim.kinds(CONCEAL, before_pts=45 * 960)
    assert buf.stats.frames_skipped == 5 and buf.stats.packets_lost == 0


def test_packet_off_the_20ms_grid_is_played_not_skipped():
    arrivals = paced(10)
    # the sender restarts its timestamps half a frame off the grid (pause of 10 ms)
    arrivals += [
        (T0 + FRAME_S * i + 0.01, Packet(i, 1000 + i, 5000 + 960 * i + 480, bytes([0xF8]) + i.to_bytes(4, "big")))
        for i in range(10, 30)
    ]
    sim = Sim(steady()).run(arrivals, until=T0 + 3)
    assert sim.played == list(range(30))


# -- stream changes ------------------------------------------------------------------


def test_new_ssrc_continues_the_timeline():
    arrivals = paced(30)
    arrivals += [(T0 + FRAME_S * (30 + k), packet(k, seq0=40_000, ts0=123_456_789, ssrc=2)) for k in range(30)]
    sim = Sim(steady()).run(arrivals, until=T0 + 3)
    pts = [p.pts for p in sim.out if p.kind == PLAY]
    assert len(pts) == 60 and pts == sorted(pts) and len(set(pts)) == 60
    stats = sim.buffer.stats
    assert stats.stream_restarts == 1 and stats.packets_lost == 0
    assert len(sim.kinds(CONCEAL, before_pts=max(pts))) <= 1


def test_sequence_restart_is_believed_when_confirmed_a_stray_packet_is_not():
    arrivals = paced(30)
    arrivals.append((T0 + 0.3, packet(3, seq0=20_000)))  # a stray from far away
    arrivals += [(T0 + FRAME_S * (30 + k), packet(k, seq0=50_000, ts0=77)) for k in range(20)]  # restart
    sim = Sim(steady()).run(arrivals, until=T0 + 3)
    stats = sim.buffer.stats
    assert stats.stream_restarts == 1
    assert len(sim.played) == 30 + 19  # the restart's first packet only confirms the jump
    assert stats.packets_lost < 5


# -- adaptive delay ------------------------------------------------------------------


def test_target_delay_follows_the_jitter():
    n = 500
    delays = uniform_delays(n, 0.04, seed=3)
    sim = Sim(PlayoutBuffer()).run(paced(n, delays), until=T0 + 12)
    stats = sim.buffer.stats
    # 97th percentile of U(0, 40 ms) plus the 5 ms margin
    assert 0.035 <= stats.jitter_s <= 0.041
    assert stats.target_delay_s == pytest.approx(stats.jitter_s + 0.005)
    assert stats.packets_late <= 0.02 * n
    assert len(sim.played) >= n - stats.packets_late - stats.frames_discarded


def test_delay_grows_when_jitter_grows_and_shrinks_when_it_falls():
    phases = [("calm", 250, 0.01), ("stormy", 500, 0.12), ("calm again", 500, 0.005)]
    rng = random.Random(5)
    delays = [rng.random() * spread for _, n, spread in phases for _ in range(n)]
    arrivals = paced(len(delays), delays)
    sim = Sim(PlayoutBuffer())
    seen: dict[str, tuple[float, float | None]] = {}
    start = 0
    for name, n, _ in phases:
        end_t = T0 + FRAME_S * (start + n)
        sim.run([a for a in arrivals if start <= a[1].index < start + n], until=end_t)
        seen[name] = (sim.buffer.stats.target_delay_s, sim.buffer.delay(sim.tick))
        start += n
    assert seen["calm"][0] <= 0.025
    assert 0.10 <= seen["stormy"][0] <= 0.13
    assert seen["stormy"][1] >= 0.1
    assert seen["calm again"][0] <= 0.025
    assert seen["calm again"][1] < 0.06
    stats = sim.buffer.stats
    # the delay grew at missing packets (stretch), or by going back to late ones ...
    assert stats.frames_stretched + stats.packets_late_kept >= 3
    assert stats.frames_discarded >= 3  # ... and shrank again
    assert stats.packets_late < 0.05 * 500


def test_target_is_clamped():
    buf = PlayoutBuffer(min_delay_s=0.03, max_delay_s=0.1)
    Sim(buf).run(paced(300, uniform_delays(300, 0.5, seed=9)), until=T0 + 8)
    assert buf.stats.target_delay_s == pytest.approx(0.1)
    buf = PlayoutBuffer(min_delay_s=0.03, max_delay_s=0.1)
    Sim(buf).run(paced(300), until=T0 + 8)
    assert buf.stats.target_delay_s == pytest.approx(0.03)


def test_delay_shrinks_one_frame_at_a_time_and_not_too_often():
    buf = PlayoutBuffer(initial_delay_s=0.2, shrink_interval_s=0.25)
    sim = Sim(buf).run(paced(400), until=T0 + 7.5)
    times = [p.t for p in sim.out]
    assert buf.stats.frames_discarded >= 5
    assert len(sim.discarded) == buf.stats.frames_discarded
    heard = sorted(sim.played + sim.discarded)
    assert heard == list(range(len(heard)))
    assert all(b - a == pytest.approx(FRAME_S) for a, b in zip(times, times[1:]))  # never a burst
    assert buf.delay(times[-1]) < 0.06


# -- start and stop ------------------------------------------------------------------


def test_playout_stops_when_packets_stop_and_restarts_when_they_resume():
    arrivals = paced(50) + [(T0 + 3.0 + FRAME_S * k, packet(200 + k)) for k in range(50)]
    sim = Sim(PlayoutBuffer(hold_s=0.2)).run(arrivals, until=T0 + 6)
    last_arrival = T0 + FRAME_S * 49
    first_gap = [p for p in sim.out if last_arrival < p.t < T0 + 3.0]
    # the last packets play out, then concealment for up to hold_s, then nothing
    assert all(p.t <= last_arrival + 0.2 + FRAME_S + 1e-9 for p in first_gap)
    assert sim.buffer.stats.playouts == 2
    assert sim.played == list(range(50)) + list(range(200, 250))
    # the timeline goes on (pts increase), and restarting took the target delay again
    pts = [p.pts for p in sim.out if p.pts is not None]
    assert pts == sorted(pts)
    restart = next(p for p in sim.out if p.index == 200)
    assert restart.t == pytest.approx(T0 + 3.0 + sim.buffer.target_s, abs=0.03)


def test_dead_network_stops_the_frames():
    sim = Sim(PlayoutBuffer()).run(paced(100, uniform_delays(100, 0.04)), until=T0 + 10)
    last = T0 + FRAME_S * 99 + 0.04
    assert sim.out[-1].t < last + 0.2 + 0.2 + FRAME_S
    assert sim.buffer.pop(T0 + 10) == (IDLE, None, None) and not sim.buffer.playing


def test_drain_hands_out_what_is_buffered_in_order():
    buf = PlayoutBuffer()
    for t, p in paced(5):
        if p.index != 2:
            buf.push(p.seq, p.ts, p.payload, t)
    out = buf.drain()
    assert [(k, index_of(pl) if pl else None) for k, pl, _ in out] == [
        (PLAY, 0), (PLAY, 1), (CONCEAL, None), (PLAY, 3), (PLAY, 4)]
    assert not buf.playing and buf.pop(T0 + 1) == (IDLE, None, None) and buf.drain() == []


def test_stretch_grows_the_delay_at_a_missing_slot_without_skipping_it():
    """When the target rose above the current delay (the estimator saw more jitter), a
    missing slot is concealed *without* moving on: nothing is skipped, the delay grows."""
    buf = steady()
    for t, p in paced(10):
        if p.index != 5:
            buf.push(p.seq, p.ts, p.payload, t)
    t = buf.start_at
    for i in range(5):
        assert buf.pop(t)[0] == PLAY
        t += FRAME_S
    buf.target_s = 0.1  # what _estimate sets after a jitter increase
    assert buf.pop(t) == (STRETCH, None, None)  # slot 5 missing, delay 60 ms < 100 ms
    assert buf.next_pts == 5 * 960 and buf.delay(t + FRAME_S) == pytest.approx(0.08)
    # the packet turns up in time for the next tick: nothing lost
    p = packet(5)
    buf.push(p.seq, p.ts, p.payload, t + 0.01)
    assert buf.pop(t + FRAME_S)[:3:2] == (PLAY, 5 * 960)
    assert buf.stats.frames_stretched == 1 and buf.stats.packets_late == 0


def test_a_delay_spike_grows_the_delay_instead_of_losing_audio():
    delays = [0.0] * 200
    for i in range(100, 200):
        delays[i] = 0.1  # the path gets 100 ms slower for good
    sim = Sim(PlayoutBuffer()).run(paced(200, delays), until=T0 + 6)
    stats = sim.buffer.stats
    # the slots of the spike were concealed, then playout went back to packet 100
    assert stats.packets_late_kept == 1 and stats.packets_late == 0
    assert sorted(sim.played + sim.discarded) == list(range(200))
    spike = [p for p in sim.out if p.kind == CONCEAL and 100 * 960 <= p.pts < 110 * 960]
    assert 2 <= len(spike) <= 5  # ~ (100 ms - delay) / 20 ms


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        PlayoutBuffer(min_delay_s=0.1, initial_delay_s=0.05)
    with pytest.raises(ValueError):
        PlayoutBuffer(quantile=1.0)


# -- decoding and concealment ------------------------------------------------------------


@pytest.mark.parametrize("application", ["audio", "voip"])
def test_decoder_conceals_with_libopus_plc(application):
    packets = tone_packets(600, 0.6, OpusSettings(application=application))
    dec = OpusDecoder()
    for p in packets[:20]:
        pcm = dec.decode(p)
        assert pcm.dtype == np.int16 and pcm.shape == (FRAME_SAMPLES,)
    plc = dec.conceal()
    assert plc.shape == (FRAME_SAMPLES,) and dec.concealed == 1
    # libopus extrapolates the tone: the concealed frame is not silence, and is 600 Hz
    assert analysis.rms_dbfs(plc) > -30
    assert analysis.dominant_frequency(plc, SAMPLE_RATE) == pytest.approx(600, abs=25)
    # decoding goes on normally afterwards
    assert analysis.rms_dbfs(dec.decode(packets[21])) > -30


def test_decoder_survives_garbage_and_conceals_before_any_packet():
    dec = OpusDecoder()
    assert dec.conceal().shape == (FRAME_SAMPLES,)  # no state yet: silence or PLC, no error
    out = dec.decode(b"\xff\xff\xff\xff\xff")  # code 3 with a bad frame count
    assert out is None and dec.errors == 1
    assert dec.decode(tone_packets(600, 0.02)[0]).shape == (FRAME_SAMPLES,)


def _two_frames(a: bytes, b: bytes) -> bytes:
    """One Opus packet holding the 20 ms frames of packets ``a`` and ``b`` (code 2:
    two frames, the first one's size given)."""
    assert a[0] == b[0] and len(a) - 1 < 252
    return bytes([(a[0] & 0xFC) | 2, len(a) - 1]) + a[1:] + b[1:]


async def test_receiver_cuts_40ms_packets_into_20ms_frames():
    frames: list[tuple[np.ndarray, int | None]] = []
    rx = OpusReceiver(lambda pcm, pts: frames.append((pcm.copy(), pts)))
    pk = tone_packets(600, 0.4)
    buf = rx.buffer
    for k in range(len(pk) // 2):
        buf.push(k, 1920 * k, _two_frames(pk[2 * k], pk[2 * k + 1]), T0 + 0.04 * k)
    now = buf.start_at
    while rx.play(now):
        now += FRAME_S
    n = len(pk) // 2 * 2
    assert len(frames) >= n
    assert all(f.shape == (FRAME_SAMPLES,) for f, _ in frames)
    assert [p for _, p in frames[:n]] == [960 * i for i in range(n)]
    assert rx.buffer.stats.frames_concealed == 0 or len(frames) > n
    tone = np.concatenate([f for f, _ in frames[:n]])
    assert analysis.tone_seconds(tone, SAMPLE_RATE, 600) >= 0.3
    rx.close()


# -- aiortc wiring -----------------------------------------------------------------------


def test_aiortc_internals_the_receiver_uses_are_there():
    """If this fails after an aiortc upgrade, media/receiver.py needs revisiting (until
    then MediaPeer falls back to aiortc's receive path when aiortc_problems() reports)."""
    import inspect

    from aiortc.rtcrtpreceiver import RTCRtpReceiver

    assert aiortc_problems() == []
    # receive() starts the decoder thread that __stop_decoder stops
    assert "self.__decoder_thread.start()" in inspect.getsource(RTCRtpReceiver.receive)
    # RTCP receiver reports and getStats() read the per-SSRC statistics we feed
    assert "self.__remote_streams.items()" in inspect.getsource(RTCRtpReceiver._run_rtcp)
    assert "self.__remote_streams.items()" in inspect.getsource(RTCRtpReceiver.getStats)
    assert "self.__remote_streams[packet.ssrc].add(packet)" in inspect.getsource(RTCRtpReceiver._handle_rtp_packet)


async def test_call_with_our_receive_path_keeps_rtcp_and_stats():
    async with call_pair() as (business, user):
        gate = FrameGate()
        business.add_sink(gate)
        said = user.play(ToneSource(600, 1.0))
        await asyncio.wait_for(said.done, TIMEOUT)
        await gate.more(10)
        assert business._receiver is not None and business._receiver.installed
        rtp_receiver = business._pc.getTransceivers()[0].receiver
        assert rtp_receiver._RTCRtpReceiver__decoder_thread is None  # aiortc decodes nothing
        # aiortc's receiver statistics are fed: getStats, and RTCP receiver reports the
        # far side gets (its remote-inbound-rtp comes from our RRs, every 0.5-1.5 s)
        for _ in range(100):  # an RR after the first SR carries LSR: round-trip time
            theirs = await user.get_stats()
            if theirs["round_trip_s"] is not None:
                break
            await asyncio.sleep(0.1)
        assert theirs["fraction_lost"] == 0 and theirs["round_trip_s"] is not None
        ours = await business.get_stats()
        assert ours["packets_received"] > 50 and ours["packets_lost"] == 0 and ours["jitter_s"] is not None
        playout = ours["playout"]
        assert playout["frames_played"] > 50 and playout["packets_late"] == 0
        assert playout["frames_concealed"] == 0
        assert business.received.frames >= playout["frames_played"]
        assert isinstance(business.received.pts, int)


async def test_aiortc_receive_path_is_still_available():
    config = PeerConfig(host_addresses=["127.0.0.1"], receive="aiortc")
    async with call_pair(business_config=config) as (business, user):
        gate = FrameGate()
        business.add_sink(gate)
        user.play(ToneSource(600, 0.5))
        await gate.more(10)
        assert business._receiver is None and business._pump is not None
        assert "playout" not in await business.get_stats()
    with pytest.raises(ValueError):
        PeerConfig(receive="pyav")


async def test_received_frames_stop_when_the_far_side_stops_sending():
    async with call_pair() as (business, user):
        gate = FrameGate()
        business.add_sink(gate)
        await gate.more(10)
        # the user's sender stops (as if the network died): no more RTP
        for transceiver in user._pc.getTransceivers():
            await transceiver.sender.stop()
        await asyncio.sleep(0.5)
        frames = business.received.frames
        await asyncio.sleep(0.5)
        assert business.received.frames == frames
        assert not business._receiver.buffer.playing


# -- OpusReceiver on a real RTCRtpReceiver (stub transport: no sockets) ------------------


def _rtp(i: int, payload: bytes, pt: int = 111):
    from aiortc.rtp import RtpPacket

    return RtpPacket(payload_type=pt, sequence_number=i, timestamp=960 * i, ssrc=42, payload=payload)


async def test_receiver_takes_opus_packets_from_aiortc_and_keeps_its_statistics():
    frames = []
    now = [T0]
    rx = OpusReceiver(lambda pcm, pts: frames.append(pts), clock=lambda: now[0])
    receiver = await started_receiver(rx)
    try:
        assert receiver._RTCRtpReceiver__decoder_thread is None  # stopped: we decode
        packets = tone_packets(600, 0.2)
        for i, payload in enumerate(packets):
            await receiver._handle_rtp_packet(_rtp(i, payload), arrival_time_ms=0)
            now[0] += FRAME_S
        assert len(rx.buffer) == len(packets) and rx._timer is not None  # the clock is set
        rx._timer.cancel()
        rx._timer = None
        t = rx.buffer.start_at
        while rx.play(t) and len(frames) < len(packets):
            t += FRAME_S
        assert frames == [960 * i for i in range(len(packets))]
        # aiortc's statistics (RTCP receiver reports, getStats) saw every packet
        stats = (await receiver.getStats())
        inbound = next(s for s in stats.values() if s.type == "inbound-rtp")
        assert inbound.packetsReceived == len(packets) and inbound.packetsLost == 0
        # another payload type goes on to aiortc (which knows no such codec: dropped)
        await receiver._handle_rtp_packet(_rtp(99, b"\x00", pt=0), arrival_time_ms=0)
        assert rx.buffer.stats.packets_received == len(packets)
    finally:
        rx.close()
        await receiver.stop()


async def test_receiver_falls_back_when_no_opus_is_negotiated():
    called = []
    rx = OpusReceiver(lambda pcm, pts: None, on_fallback=lambda: called.append(True))
    receiver = await started_receiver(rx, mime="audio/PCMU")
    try:
        assert called == [True] and rx.fallback
        assert receiver._RTCRtpReceiver__decoder_thread is not None  # aiortc decodes
        await receiver._handle_rtp_packet(_rtp(1, b"\xff" * 160, pt=0), arrival_time_ms=0)
        assert rx.buffer.stats.packets_received == 0
    finally:
        rx.close()
        await receiver.stop()


async def test_tick_resyncs_after_a_stall_and_survives_a_failing_sink():
    calls = []

    def deliver(pcm, pts):
        calls.append(pts)
        if len(calls) == 3:
            raise RuntimeError("a sink failed")

    now = [T0]
    rx = OpusReceiver(deliver, clock=lambda: now[0])
    for i, payload in enumerate(tone_packets(600, 0.4)):
        rx.buffer.push(i, 960 * i, payload, T0 + FRAME_S * i)
    rx._due = rx.buffer.start_at
    now[0] = rx._due
    for _ in range(4):  # on time; the third frame's sink raises: logged, the clock goes on
        rx._tick()
        assert rx._timer is not None
        rx._timer.cancel()
        now[0] = rx._due
    assert len(calls) == 4 and rx.errors == 1
    now[0] = rx._due + 0.1  # the event loop stalled for 100 ms
    rx._tick()
    rx._timer.cancel()
    assert rx.resyncs == 1 and len(calls) == 5  # one frame, not a burst of five
    assert rx._due == pytest.approx(now[0] + FRAME_S)  # a new schedule from now
    rx.close()


# -- the C core's PlayoutBuffer against this module's ------------------------------------------

_PAYLOADS = [b"\x78" + bytes(20), b"\x79" + bytes(20), b"\x7b\x03" + bytes(9), b"\x0a" + bytes(5), b"", b"\x7b\x00"]
#: Per 20 ms tick: the packets sent (each: how far its sequence number and timestamp
#: move, its payload, the ticks it takes to arrive, its SSRC), maybe a network freeze
#: (nothing arrives for that many ticks), then maybe a pop.
_TICKS = st.lists(
    st.tuples(
        st.lists(st.tuples(st.sampled_from([1] * 12 + [2, 0, -1, -3, 5, 4000, -4000, 200]),
                           st.sampled_from([960] * 12 + [1920, 0, -960, 480, 123_456]),
                           st.sampled_from([_PAYLOADS[0]] * 6 + _PAYLOADS),
                           st.sampled_from([0] * 12 + [1, 2, 3, 6, 12]),
                           st.sampled_from([7] * 20 + [8])),
                 max_size=3),
        st.sampled_from([0] * 30 + [4, 12]),
        st.sampled_from(["pop"] * 8 + ["none", "drain", "hint on", "hint off", "floor"])),
    min_size=1, max_size=250,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_TICKS, st.sampled_from([{}, {"capacity": 4, "window": 10, "warmup": 5}, {"hold_s": 0.05},
                                 {"max_delay_s": 0.1, "initial_delay_s": 0.04}]))
def test_the_c_buffer_plays_as_the_reference_does(_either_buffer, ticks, options):
    from tests.helpers import native_rtp_core

    if _either_buffer != "native":
        return  # (one comparison is enough: it runs under the native parameter)
    core = native_rtp_core()
    buffers = [_PyPlayoutBuffer(**options), core.PlayoutBuffer(JitterStats(), **options)]
    hint = [False]
    for b in buffers:
        b.events_hint = lambda: hint[0]
    seq, ts, tick = 65_500, 4_294_960_000, 1000.0
    in_flight: list[tuple[int, tuple]] = []
    frozen_until = 0
    for n, (sent, freeze, then) in enumerate(ticks):
        tick += FRAME_S
        for dseq, dts, payload, delay, ssrc in sent:
            seq, ts = (seq + dseq) & 0xFFFF, (ts + dts) & 0xFFFFFFFF
            in_flight.append((n + delay, (seq, ts, payload, ssrc)))
        frozen_until = max(frozen_until, n + freeze)
        if n < frozen_until:
            in_flight = [(max(due, frozen_until), packet) for due, packet in in_flight]
        for due, (s, t, payload, ssrc) in [p for p in in_flight if p[0] <= n]:
            kept = [b.push(s, t, payload, tick + 0.0003 * (due % 7), ssrc) for b in buffers]
            assert kept[0] == kept[1]
        in_flight = [p for p in in_flight if p[0] > n]
        if then == "pop":
            out = [b.pop(tick) for b in buffers]
        elif then == "drain":
            out = [b.drain() for b in buffers]
        elif then.startswith("hint"):
            hint[0] = then == "hint on"
            out = [None, None]
        elif then == "floor":
            for b in buffers:
                b.min_delay_s = 0.04
            out = [None, None]
        else:
            out = [None, None]
        assert out[0] == out[1], then
        states = [(b.stats, b.start_at, b.next_pts, b.playing, len(b), b.delay(tick), b.target_s) for b in buffers]
        assert states[0] == states[1]
