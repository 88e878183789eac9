"""What the SIP/IVR bridge costs: latency it adds each way, and CPU per bridged call.

Everything on 127.0.0.1: a gateway with the embedded sandbox (its simulated WhatsApp
phones are real aiortc peers) and SIP on, and an "IVR" in this process (wacall's SIP user
agent answering every INVITE with a plain-RTP endpoint that plays a tone and listens).

**Latency** (media in this process, so one clock): tone bursts (200 ms every 600 ms) are
played on one side and their onsets timed where the other side hears them (the first
20 ms frame carrying the tone). Each way is measured twice on the same call setup:

* IVR → WhatsApp user: the IVR's RTP endpoint reads a burst at its 20 ms tick and sends it
  → the user hears it; minus the *baseline* wacall → user (a burst wacall itself plays on
  the call). The difference is what the bridge adds: the SIP leg's jitter buffer and the
  wait for the WhatsApp leg's next frame slot.
* WhatsApp user → IVR: the user says a burst → the IVR hears it; minus the baseline user
  → wacall (a sink on wacall's side of the call); minus the IVR's own jitter buffer and
  tick (not wacall's: its endpoint's playout delay is read from its stats).

**CPU** (media in one worker process, whose CPU time is read from /proc): N calls that
play a tone to the user and receive theirs, then N calls bridged to the IVR (same
phones); worker CPU ms per call-second for each, and the difference per bridged call.

Run: python bench/sip_bridge.py [--codec PCMU] [--calls 10] [--seconds 10] [--bursts 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.app import Service  # noqa: E402
from gateway.calls import CallState  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.sip import UserAgent, UserAgentConfig  # noqa: E402
from gateway.sip.spec import SipSpec  # noqa: E402
from media import analysis  # noqa: E402
from media.frames import FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402
from media.rtp import RtpEndpoint  # noqa: E402
from media.sources.tone import ToneSource  # noqa: E402

IVR_HZ, USER_HZ, WACALL_HZ = 1000.0, 600.0, 1400.0
TIMEOUT = 30


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bursts:
    """A Source: 200 ms of a tone every 600 ms; notes ``time.monotonic()`` when each burst's
    first frame is read (that is when it goes out: readers read at their send tick)."""

    channels = 1
    sample_rate = SAMPLE_RATE

    def __init__(self, hz: float, count: int) -> None:
        self.tone = ToneSource(hz, None)
        self.count = count
        self.frame = 0
        self.starts: list[float] = []
        self.silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)

    def read(self):
        k, i = divmod(self.frame, 30)
        self.frame += 1
        if k >= self.count:
            return self.silence if k < self.count + 10 else None
        if i < 10:
            if i == 0:
                self.starts.append(time.monotonic())
            return self.tone.read()
        return self.silence

    def close(self) -> None:
        pass


class Onsets:
    """A Sink: ``time.monotonic()`` of each burst's first frame carrying ``hz`` (after at
    least 200 ms without it)."""

    def __init__(self, hz: float) -> None:
        self.hz = hz
        self.times: list[float] = []
        self._quiet = 99

    def write(self, pcm, sample_rate, channels=1) -> None:
        mono = pcm.reshape(-1, channels)[:, 0] if channels > 1 else pcm
        if analysis.tone_seconds(mono, sample_rate, self.hz) > 0.01:
            if self._quiet >= 10:
                self.times.append(time.monotonic())
            self._quiet = 0
        else:
            self._quiet += 1

    def close(self) -> None:
        pass


def pairs(sent: list[float], heard: list[float]) -> list[float]:
    """Per burst: heard - sent (ms), each heard onset matched to the last send before it."""
    out = []
    for h in heard:
        before = [s for s in sent if s <= h]
        if before and h - before[-1] < 0.5:
            out.append((h - before[-1]) * 1000)
    return out


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


class Ivr:
    def __init__(self, codec: str) -> None:
        self.codec = codec
        self.ua = UserAgent(UserAgentConfig(udp_port=0, user="ivr"), on_invite=self.answer)
        self.endpoints: list[RtpEndpoint] = []
        self.sources: list = []
        self.sinks: list = []
        self.next_source = None
        self.next_sink = None

    async def answer(self, incoming) -> None:
        # (the IVR's own playout: a fixed 20 ms, so what it adds is known and taken out)
        endpoint = RtpEndpoint(codecs=[self.codec], label="ivr",
                               jitter={"initial_delay_s": 0.02, "min_delay_s": 0.02, "max_delay_s": 0.02})
        await endpoint.open()
        source = self.next_source or ToneSource(IVR_HZ, None)
        endpoint.play(source)
        if self.next_sink is not None:
            endpoint.add_sink(self.next_sink)
        self.endpoints.append(endpoint)
        incoming.answer(endpoint.accept_offer(incoming.offer.decode()))

    @property
    def uri(self) -> str:
        return f"sip:ivr@127.0.0.1:{self.ua.port('UDP')}"

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()
        self.endpoints.clear()


def settings(tmp: str, workers: int) -> Settings:
    return Settings(data_dir=Path(tmp), port=0, media_addresses=["127.0.0.1"], workers=workers,
                    ring_timeout_s=30.0, sip_listen=("127.0.0.1", free_port()), max_calls=500)


async def place(service, user: str, **kwargs):
    call = await service.manager.place_call(user, **kwargs)
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    return call


async def latency(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with Service(settings(tmp, 0), sandbox=True) as service:
            ivr = Ivr(args.codec)
            await ivr.ua.start()
            user = "+4915100000001"
            await service.sandbox.grant(user, permanent=True)
            service.sandbox.users.update(user, {"answer_after_ms": 0, "say": None})
            try:
                # baseline: wacall -> user, user -> wacall (no SIP)
                out, back = Bursts(WACALL_HZ, args.bursts), Bursts(USER_HZ, args.bursts)
                call = await place(service, user, sources=[out])
                phone = service.sandbox.calls[call.wacid].phone
                user_ears, wacall_ears = Onsets(WACALL_HZ), Onsets(USER_HZ)
                phone.peer.add_sink(user_ears)
                call.media.peer.add_sink(wacall_ears)
                phone.peer.play(back)
                await asyncio.sleep(args.bursts * 0.6 + 1.0)  # (the bursts' own length: a measurement window)
                base_out, base_back = pairs(out.starts, user_ears.times), pairs(back.starts, wacall_ears.times)
                await call.hangup()

                # bridged: IVR -> user, user -> IVR
                ivr_out, user_back = Bursts(IVR_HZ, args.bursts), Bursts(USER_HZ, args.bursts)
                ivr_ears = Onsets(USER_HZ)
                ivr.next_source, ivr.next_sink = ivr_out, ivr_ears
                spec = SipSpec.from_dict({"uri": ivr.uri, "codecs": [args.codec], "probe": False})
                call = await place(service, user, sip=spec)
                phone = service.sandbox.calls[call.wacid].phone
                user_ears = Onsets(IVR_HZ)
                phone.peer.add_sink(user_ears)
                phone.peer.play(user_back)
                await asyncio.sleep(args.bursts * 0.6 + 1.5)
                sip_out, sip_back = pairs(ivr_out.starts, user_ears.times), pairs(user_back.starts, ivr_ears.times)
                ivr_jb = ivr.endpoints[-1]._jb.stats.delay_s * 1000 if ivr.endpoints[-1]._jb is not None else 0.0
                leg_stats = await call.sip_leg.party.get_stats()
                await call.hangup()
            finally:
                ivr.close()
                await ivr.ua.close()
    med = statistics.median
    print(f"codec {args.codec}, {args.bursts} bursts each way (ms; onset sent -> onset heard)")
    print(f"  wacall -> user (baseline)   p50 {med(base_out):6.1f}  p95 {pct(base_out, 95):6.1f}  n={len(base_out)}")
    print(f"  IVR -> user (bridged)       p50 {med(sip_out):6.1f}  p95 {pct(sip_out, 95):6.1f}  n={len(sip_out)}")
    added_in = [s - med(base_out) for s in sip_out]
    print(f"  added by wacall, SIP -> WhatsApp   p50 {med(added_in):6.1f}  p95 {pct(added_in, 95):6.1f}"
          f"  (SIP leg jitter buffer now {leg_stats['jitter_buffer']['delay_s'] * 1000:.1f} ms)")
    print(f"  user -> wacall (baseline)   p50 {med(base_back):6.1f}  p95 {pct(base_back, 95):6.1f}  n={len(base_back)}")
    print(f"  user -> IVR (bridged)       p50 {med(sip_back):6.1f}  p95 {pct(sip_back, 95):6.1f}  n={len(sip_back)}")
    added_out = [s - med(base_back) - ivr_jb for s in sip_back]
    print(f"  added by wacall, WhatsApp -> SIP   p50 {med(added_out):6.1f}  p95 {pct(added_out, 95):6.1f}"
          f"  (minus the IVR's own jitter buffer, {ivr_jb:.1f} ms)")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cost(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with Service(settings(tmp, 1), sandbox=True) as service:
            ivr = Ivr(args.codec)
            await ivr.ua.start()
            users = [f"+49151000001{i:02d}" for i in range(args.calls)]
            for user in users:
                await service.sandbox.grant(user, permanent=True)
                service.sandbox.users.update(user, {"answer_after_ms": 0, "say": None})
            worker = service.workers.workers[0].pid
            results = {}
            try:
                for kind in ("plain", "bridged"):
                    spec = SipSpec.from_dict({"uri": ivr.uri, "codecs": [args.codec], "probe": False})
                    calls = []
                    for user in users:
                        extra = {"sip": spec} if kind == "bridged" else {"sources": [ToneSource(WACALL_HZ, None)]}
                        calls.append(await place(service, user, **extra))
                    for call in calls:
                        service.sandbox.calls[call.wacid].phone.peer.play(ToneSource(USER_HZ, None))
                    await asyncio.sleep(2.0)  # (settle: bridges joined, buffers filled)
                    c0, t0 = cpu_s(worker), time.monotonic()
                    await asyncio.sleep(args.seconds)  # (the measurement window)
                    c1, t1 = cpu_s(worker), time.monotonic()
                    results[kind] = (c1 - c0) * 1000 / (args.calls * (t1 - t0))
                    for call in calls:
                        await call.hangup()
                    ivr.close()
            finally:
                ivr.close()
                await ivr.ua.close()
    plain, bridged = results["plain"], results["bridged"]
    print(f"CPU in the media worker, {args.calls} calls, {args.seconds:.0f} s, codec {args.codec}:")
    print(f"  plain call (tone out, user in)       {plain:6.2f} ms per call-second")
    print(f"  call bridged to a SIP party          {bridged:6.2f} ms per call-second")
    print(f"  the bridge's cost                    {bridged - plain:6.2f} ms per call-second "
          f"({1000 / bridged:.0f} bridged calls per core)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codec", default="PCMU", choices=["PCMU", "PCMA", "G722", "opus"])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--bursts", type=int, default=30)
    parser.add_argument("--only", choices=["latency", "cost"])
    args = parser.parse_args()
    if args.only != "cost":
        asyncio.run(latency(args))
    if args.only != "latency":
        asyncio.run(cost(args))


if __name__ == "__main__":
    main()
