"""The receive playout runs on the loop's shared 20 ms ticker (media.lean.FrameTicker).

Every call's :class:`media.receiver.OpusReceiver` used to keep a timer of its own (one
``loop.call_at`` per call per 20 ms); now one timer per event loop wakes every call's
sending and receiving. Checked here: N receivers cost one timer, their schedules lie on
the ticker's grid, a late loop catches up (and a stalled one resyncs, as before), and on
a lossy, jittery stream of real Opus the ticker-driven playout does what the per-call
schedule did (the same arrivals replayed through the old schedule: frames, concealment,
the tone found by FFT)."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from media import analysis
from media.frames import SAMPLE_RATE
from media.lean import FrameTicker
from media.receiver import RESYNC_S, OpusReceiver
from media_call import started_receiver, tone_packets

FRAME_S = 0.02
TONE_HZ = 600


class _RecordingPushes:
    """A playout buffer (the C core's cannot take attributes) that notes each push."""

    def __init__(self, buffer, arrivals: list) -> None:
        object.__setattr__(self, "_buffer", buffer)
        object.__setattr__(self, "_arrivals", arrivals)

    def __getattr__(self, name: str):
        return getattr(self._buffer, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._buffer, name, value)

    def __len__(self) -> int:
        return len(self._buffer)

    def push(self, seq, timestamp, payload, now, ssrc=0):
        self._arrivals.append((now, seq, timestamp, payload))
        return self._buffer.push(seq, timestamp, payload, now, ssrc)


class Leg:
    """An OpusReceiver on a real aiortc RTCRtpReceiver (stub transport, no sockets), fed
    RTP at wall-clock times; it records what it delivers and when packets arrived."""

    def __init__(self, ssrc: int = 42) -> None:
        self.ssrc = ssrc
        self.frames: list[tuple[np.ndarray, int | None]] = []
        self.delivered_at: list[float] = []
        self.arrivals: list[tuple[float, int, int, bytes]] = []
        self.rx = OpusReceiver(self._deliver)
        self.loop = asyncio.get_running_loop()

    def _deliver(self, pcm, pts) -> None:
        self.frames.append((pcm.copy(), pts))
        self.delivered_at.append(self.loop.time())

    async def start(self) -> None:
        self.receiver = await started_receiver(self.rx)
        self.rx.buffer = _RecordingPushes(self.rx.buffer, self.arrivals)

    async def feed(self, seq: int, payload: bytes) -> None:
        from aiortc.rtp import RtpPacket

        packet = RtpPacket(payload_type=111, sequence_number=seq & 0xFFFF, timestamp=(960 * seq) & 0xFFFFFFFF,
                           ssrc=self.ssrc, payload=payload)
        await self.receiver._handle_rtp_packet(packet, arrival_time_ms=0)

    async def stop(self) -> None:
        self.rx.close()
        self.rx.release()
        await self.receiver.stop()


async def send(legs: list[Leg], payloads: list[bytes], *, loss: float = 0.0, jitter_s: float = 0.0,
               seed: int = 1, stall_at: dict[int, float] | None = None) -> None:
    """Packets ``i`` sent at ``t0 + 20 ms × i`` to every leg, each delayed by up to
    ``jitter_s`` (so reordered) and lost with probability ``loss``; ``stall_at``: after
    sending packet ``i``, hold the event loop up for that many seconds."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    t0 = loop.time() + 0.01
    schedule = []
    for leg in legs:
        for i, payload in enumerate(payloads):
            if rng.random() < loss:
                continue
            schedule.append((t0 + i * FRAME_S + rng.uniform(0, jitter_s), i, leg, payload))
    schedule.sort(key=lambda item: item[0])
    for at, i, leg, payload in schedule:
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await leg.feed(i, payload)
        if stall_at and leg is legs[-1] and i in stall_at:
            time.sleep(stall_at.pop(i))  # noqa: ASYNC251 - the event loop is held up, on purpose


def count_timers(loop: asyncio.AbstractEventLoop) -> list:
    """The owners (``callback.__self__``) of the timers ``loop.call_at`` (and so
    ``call_later``) sets from now on."""
    owners = []
    original = loop.call_at

    def call_at(when, callback, *args, **kwargs):
        owners.append(getattr(callback, "__self__", None))
        return original(when, callback, *args, **kwargs)

    loop.call_at = call_at
    return owners


async def test_n_receivers_share_one_timer_on_the_ticker_grid():
    loop = asyncio.get_running_loop()
    legs = [Leg(ssrc=100 + k) for k in range(8)]
    for leg in legs:
        await leg.start()
    ticker = FrameTicker.current()
    payloads = tone_packets(TONE_HZ, 0.6)
    ticks = ticker.ticks
    timers = count_timers(loop)
    try:
        await send(legs, payloads)
        await asyncio.sleep(0.15)
        for leg in legs:
            assert leg.rx._timer is not None and leg.rx._timer.ticker is ticker
            assert leg.rx._on_ticker in ticker.subscribers
            # the schedule lies on the ticker's grid
            grid = ticker.next_due
            assert (grid - leg.rx._due) / FRAME_S == pytest.approx(round((grid - leg.rx._due) / FRAME_S), abs=1e-6)
        await asyncio.sleep(0.4)  # everything played: playout stops, the receivers leave the ticker
    finally:
        del loop.call_at
    n = len(payloads)
    for leg in legs:
        # every packet played in order (then a few concealed frames until playout stops)
        assert [pts for _, pts in leg.frames[:n]] == [960 * i for i in range(n)]
        stats = leg.rx.stats()
        assert stats["frames_played"] == n and stats["packets_lost"] == 0 and leg.rx.resyncs == 0
        assert leg.rx._timer is None and leg.rx._on_ticker not in ticker.subscribers
        tone = np.concatenate([pcm for pcm, _ in leg.frames[3:n]]).astype(np.float32) / 32768
        assert analysis.dominant_frequency(tone, SAMPLE_RATE) == pytest.approx(TONE_HZ, abs=5)
    # 8 calls × ~40 frames: one timer per tick, the ticker's, none of the receivers'
    played = sum(len(leg.frames) for leg in legs)
    assert played >= len(legs) * n
    assert not any(isinstance(owner, OpusReceiver) for owner in timers)
    assert sum(owner is ticker for owner in timers) == ticker.ticks - ticks < played / len(legs) + 5
    # the legs' frames come out in the ticker's ticks (a leg whose first packet came
    # after the grid point its buffer's start needed starts a tick later: its phase)
    at = np.sort(np.concatenate([leg.delivered_at for leg in legs]))
    bunches = 1 + int(np.sum(np.diff(at) > 0.005))
    assert bunches <= ticker.ticks - ticks and bunches < played / 4
    assert ticker._handle is None and not ticker.subscribers  # idle: no timer left
    for leg in legs:
        await leg.stop()


async def test_receivers_tick_before_senders():
    ticker = FrameTicker(asyncio.get_running_loop())
    order: list[str] = []
    done = asyncio.Event()

    def sender(now, late, frames):
        order.append("send")
        if len(order) >= 4:
            done.set()

    def receiver(now, late, frames):
        order.append("receive")

    ticker.add(sender)
    ticker.add(receiver, first=True)
    try:
        await asyncio.wait_for(done.wait(), 2)
    finally:
        ticker.remove(sender)
        ticker.remove(receiver)
    assert order[:4] == ["receive", "send", "receive", "send"]
    assert ticker._handle is None


async def test_a_late_loop_catches_up_and_a_stalled_loop_resyncs():
    leg = Leg()
    await leg.start()
    payloads = tone_packets(TONE_HZ, 1.6)
    # held up for 40 ms (under RESYNC_S: the backlog is played back to back), then for
    # 150 ms (a new schedule: the stall becomes delay, no burst)
    assert 0.04 < RESYNC_S < 0.15
    await send([leg], payloads, stall_at={30: 0.04, 55: 0.15})
    await asyncio.sleep(0.5)
    rx = leg.rx
    assert rx.resyncs == 1
    # every packet was played, in order, none lost to the stalls
    pts = [p for _, p in leg.frames if p is not None]
    assert pts == sorted(pts)
    stats = rx.stats()
    # (played, or dropped to take the stall's extra delay back, as before)
    assert stats["frames_played"] + stats["frames_discarded"] == len(payloads) and stats["packets_late"] == 0
    # the 50 ms stall: the frames due meanwhile came out at once afterwards
    gaps = np.diff(leg.delivered_at)
    bursts = [i for i, g in enumerate(gaps) if g < 0.005]
    assert bursts, "no catch-up after the short stall"
    # the 150 ms stall: one frame, then the pace again (no run of 7 back to back)
    longest = run = 0
    for g in gaps:
        run = run + 1 if g < 0.005 else 0
        longest = max(longest, run)
    assert longest <= round(RESYNC_S / FRAME_S)
    await leg.stop()


def _replay_per_call_schedule(arrivals: list[tuple[float, int, int, bytes]]) -> tuple[OpusReceiver, list]:
    """The same arrivals through the schedule the receiver had before the shared ticker:
    its own timer, tick 0 at the buffer's ``start_at``, tick n 20 ms × n later."""
    frames: list[tuple[np.ndarray, int | None]] = []
    rx = OpusReceiver(lambda pcm, pts: frames.append((pcm.copy(), pts)))
    i, due = 0, None
    while i < len(arrivals) or due is not None:
        if due is not None and (i == len(arrivals) or due <= arrivals[i][0]):
            if rx.play(due):
                due += FRAME_S
            else:
                start = rx.buffer.start_at
                due = None if start is None else max(start, due)
            continue
        at, seq, ts, payload = arrivals[i]
        rx.buffer.push(seq, ts, payload, at)
        i += 1
        if due is None and rx.buffer.start_at is not None:
            due = rx.buffer.start_at
    return rx, frames


@pytest.mark.parametrize("seed", [1, 2])
async def test_lossy_jittery_stream_plays_as_with_the_per_call_timer(seed):
    leg = Leg()
    await leg.start()
    payloads = tone_packets(TONE_HZ, 3.0)
    await send([leg], payloads, loss=0.05, jitter_s=0.04, seed=seed)
    await asyncio.sleep(0.5)
    ours = leg.rx.stats()
    ref_rx, ref_frames = _replay_per_call_schedule(leg.arrivals)
    ref = ref_rx.stats()
    n = len(payloads)
    assert ours["packets_received"] == ref["packets_received"] == len(leg.arrivals)
    assert ours["resyncs"] == 0
    # in order, as many packets played
    ours_pts = [p for _, p in leg.frames if p is not None]
    assert ours_pts == sorted(ours_pts)
    assert ours["frames_played"] >= ref["frames_played"] - 2
    # concealment no worse: our ticks run up to 20 ms after the per-call schedule's
    # (the ticker's phase), so a packet has as long or longer to come
    assert ours["frames_concealed"] <= ref["frames_concealed"] + 2
    assert ours["packets_late"] <= ref["packets_late"] + 1
    assert abs(len(leg.frames) - len(ref_frames)) <= 3
    for frames in (leg.frames, ref_frames):
        tone = np.concatenate([pcm for pcm, _ in frames[5:]]).astype(np.float32) / 32768
        assert analysis.dominant_frequency(tone, SAMPLE_RATE) == pytest.approx(TONE_HZ, abs=5)
        assert analysis.tone_seconds(tone, SAMPLE_RATE, TONE_HZ) >= 0.85 * n * FRAME_S
    ref_rx.close()
    await leg.stop()
