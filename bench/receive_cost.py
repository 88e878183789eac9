"""CPU cost of receiving one call's audio: aiortc 1.16's receive path vs wacall's
(media.receiver), per received 20 ms frame.

Both run against a real ``aiortc.RTCRtpReceiver`` (with a stub DTLS transport: no SRTP,
no sockets) fed parsed ``RtpPacket`` objects carrying real Opus payloads, exactly where
the DTLS transport hands them over (``receiver._handle_rtp_packet``), with the RTP tap
installed as MediaPeer installs it and a no-op sink taking each frame.

* **aiortc** — aiortc's receiver as MediaPeer used it: per packet its statistics, its
  ``JitterBuffer(capacity=16, prefetch=4)``, a queue to the decoder thread (stereo
  libopus), ``run_coroutine_threadsafe`` back to the loop, ``track.recv()``,
  ``frame.to_ndarray()``.
* **wacall** — our hook: receiver statistics (RTCP), ``PlayoutBuffer.push``; per tick
  ``pop``, mono libopus decode on the loop, delivery.

Two measurements:

1. *lockstep* — one packet in, one frame out, back to back, for ``--frames`` frames
   (timers not involved: our ticks are called directly; aiortc's thread round trip is
   awaited per frame). Process CPU time (all threads) per frame.
2. *real time* — ``--calls`` concurrent receivers for ``--seconds`` of wall-clock time,
   each fed a packet every 20 ms by a timer (staggered); ours ticks on its own
   ``loop.call_at`` clock, aiortc's has a decoder thread and a pump task per call.
   Process CPU per frame minus a feed-only baseline, and the share of one core.

Payloads: speech-like audio encoded by wacall's encoder (CELT, ``audio``, 32 kbit/s)
and as ``voip`` (SILK/hybrid, what WhatsApp and browsers send).

Run: python bench/receive_cost.py [--frames 3000] [--calls 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))

from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpReceiveParameters  # noqa: E402
from aiortc.rtcrtpreceiver import RemoteStreamTrack, RTCRtpReceiver  # noqa: E402
from aiortc.rtp import RtpPacket  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402

from media.frames import FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402
from media.opus import OpusEncoder, OpusSettings  # noqa: E402
from media.receiver import OpusReceiver  # noqa: E402
from media.taps import RtpTap  # noqa: E402
# bench/ is on sys.path when this runs as a script
from media_cost import speechlike  # noqa: E402
# the stub DTLS transport the tests' receivers start on (tests/ is on sys.path above)
from media_call import StubTransport  # noqa: E402

FRAME_S = 0.02
PT = 111


def opus_payloads(settings: OpusSettings, seconds: float = 10.0) -> list[bytes]:
    pcm = speechlike(seconds)
    enc = OpusEncoder(settings)
    return [bytes(enc.encode(pcm[i : i + FRAME_SAMPLES])) for i in range(0, pcm.size, FRAME_SAMPLES)]


class NullSink:
    frames = 0

    def write(self, pcm, sample_rate, channels=1) -> None:
        self.frames += 1

    def close(self) -> None:
        pass


class Leg:
    """One received stream through either path."""

    def __init__(self, path: str, payloads: list[bytes], ssrc: int) -> None:
        self.path = path
        self.payloads = payloads
        self.ssrc = ssrc
        self.index = 0
        self.sink = NullSink()
        self.received = 0
        self.pump: asyncio.Task | None = None
        self._waiter: tuple[int, asyncio.Future] | None = None

    async def start(self) -> None:
        receiver = self.receiver = RTCRtpReceiver("audio", StubTransport())
        receiver._track = RemoteStreamTrack(kind="audio")
        self.ours = None
        if self.path == "wacall":
            self.ours = OpusReceiver(self._deliver)
            self.ours.install(receiver)
        self.tap = RtpTap()
        self.tap.install(receiver)
        codec = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=PT)
        await receiver.receive(RTCRtpReceiveParameters(codecs=[codec]))
        if self.path == "aiortc":
            self.pump = asyncio.ensure_future(self._pump(receiver.track))

    def _deliver(self, pcm, pts) -> None:
        self.received += 1
        self.sink.write(pcm, SAMPLE_RATE, 1)

    async def _pump(self, track) -> None:  # MediaPeer._receive, aiortc mode
        try:
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray().reshape(-1)
                self.received += 1
                self.sink.write(pcm, frame.sample_rate, len(frame.layout.channels))
                if self._waiter is not None and self.received >= self._waiter[0]:
                    self._waiter[1].set_result(None)
                    self._waiter = None
        except MediaStreamError:
            pass

    async def frames(self, n: int) -> None:
        """Until ``n`` frames came through (the loop sleeps meanwhile: no spinning)."""
        if self.received < n:
            fut = asyncio.get_running_loop().create_future()
            self._waiter = (n, fut)
            await fut

    def packet(self) -> RtpPacket:
        i = self.index
        self.index += 1
        return RtpPacket(payload_type=PT, sequence_number=i & 0xFFFF, timestamp=(960 * i) & 0xFFFFFFFF,
                         ssrc=self.ssrc, payload=self.payloads[i % len(self.payloads)])

    async def feed(self) -> None:
        await self.receiver._handle_rtp_packet(self.packet(), arrival_time_ms=0)

    async def stop(self) -> None:
        if self.ours is not None:
            self.ours.close()
        await self.receiver.stop()
        if self.pump is not None:
            self.pump.cancel()
            await asyncio.gather(self.pump, return_exceptions=True)


async def lockstep(path: str, payloads: list[bytes], frames: int) -> float:
    """CPU µs per frame, one packet in / one frame out."""
    leg = Leg(path, payloads, ssrc=1)
    await leg.start()
    fake = [1000.0]
    if leg.ours is not None:
        leg.ours._clock = lambda: fake[0]
    warm = 50
    gc.collect()
    start_cpu = None
    for n in range(frames + warm):
        if n == warm:
            start_cpu = time.process_time()
        await leg.feed()
        if path == "wacall":
            fake[0] += FRAME_S
            if leg.ours.buffer.start_at is not None and leg.ours._timer is not None:
                leg.ours._timer.cancel()  # we drive the ticks ourselves
                leg.ours._timer = None
            leg.ours.play(fake[0] - 0.06)
        else:
            await leg.frames(n - 3)  # aiortc releases a frame once 4 more are buffered
    cpu = time.process_time() - start_cpu
    await leg.stop()
    return cpu / frames * 1e6


async def realtime(path: str | None, payloads: list[bytes], calls: int, seconds: float) -> tuple[float, int]:
    """(process CPU seconds, frames delivered) for ``calls`` legs over ``seconds``;
    ``path=None``: only the feeding (baseline)."""
    loop = asyncio.get_running_loop()
    legs = [Leg(path or "none", payloads, ssrc=1000 + k) for k in range(calls)]
    if path is not None:
        for leg in legs:
            await leg.start()
    handles = []

    def feeder(k: int, leg: Leg, due: float) -> None:
        if path is not None:
            # what the DTLS transport does: run the receiver coroutine as a step of its task
            coro = leg.receiver._handle_rtp_packet(leg.packet(), arrival_time_ms=0)
            try:
                coro.send(None)
            except StopIteration:
                pass
        else:
            leg.packet()
        handles[k] = loop.call_at(due + FRAME_S, feeder, k, leg, due + FRAME_S)

    t0 = loop.time() + 0.1
    for k, leg in enumerate(legs):
        due = t0 + FRAME_S * k / calls
        handles.append(loop.call_at(due, feeder, k, leg, due))
    await asyncio.sleep(0.5)  # warm-up
    frames0 = sum(leg.received for leg in legs)
    cpu0 = time.process_time()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - cpu0
    frames = sum(leg.received for leg in legs) - frames0
    for h in handles:
        h.cancel()
    if path is not None:
        for leg in legs:
            await leg.stop()
    return cpu, frames


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    payload_sets = {
        "audio 32k (CELT)": opus_payloads(OpusSettings()),
        "voip 32k (SILK/hybrid)": opus_payloads(OpusSettings(application="voip", complexity=10)),
    }
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; CPU time of the whole process (all threads)\n")
    print(f"1. lockstep, {args.frames} frames: CPU µs per received 20 ms frame")
    print(f"   {'payload':<26}{'aiortc':>10}{'wacall':>10}{'saved':>9}")
    for name, payloads in payload_sets.items():
        a = await lockstep("aiortc", payloads, args.frames)
        w = await lockstep("wacall", payloads, args.frames)
        print(f"   {name:<26}{a:>10.1f}{w:>10.1f}{1 - w / a:>9.0%}")
    print(f"\n2. real time, {args.calls} concurrent calls for {args.seconds:g} s "
          "(minus feeding: creating and handing over the packets)")
    print(f"   {'payload':<26}{'path':<8}{'µs/frame':>10}{'core %':>9}{'calls/core':>12}{'delivered':>11}")
    for name, payloads in payload_sets.items():
        base_cpu, _ = await realtime(None, payloads, args.calls, args.seconds)
        for path in ("aiortc", "wacall"):
            cpu, frames = await realtime(path, payloads, args.calls, args.seconds)
            net = max(cpu - base_cpu, 0.0)
            per_frame = net / frames * 1e6 if frames else float("nan")
            share = net / args.seconds
            per_call = share / args.calls
            expected = args.calls * args.seconds / FRAME_S
            calls_per_core = 1 / per_call if per_call else float("inf")
            print(f"   {name:<26}{path:<8}{per_frame:>10.1f}{share:>9.0%}{calls_per_core:>12.0f}"
                  f"{frames / expected:>11.0%}")
    print("\n   delivered: frames out / frames due; below 100 % the path could not keep up (then its")
    print("   µs/frame and calls/core are per frame it did deliver).")


if __name__ == "__main__":
    asyncio.run(main())
