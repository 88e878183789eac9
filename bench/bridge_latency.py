"""Latency the bot bridges add, each way, on a real call with a local bot.

Setup per protocol: a real aiortc call on 127.0.0.1 (business peer ⇄ user peer, the user
plays a tone), a bridge on the business peer, and a bot in *another process* on
127.0.0.1 (an aiohttp WebSocket server speaking the protocol) that sends 20 ms of audio
every 20 ms on its own clock and timestamps every caller frame it receives. All times
are ``time.monotonic()`` (shared by both processes), so cross-process spans are exact.

Spans reported (milliseconds):

caller → bot
  * ``sink write → WS written``: the receive pump hands the decoded frame to the bridge's
    sink → the message is written to the socket (downmix, 48→8/16 kHz, μ-law/base64/JSON,
    outbox, sender task). Measured inside the bridge (``stats.to_bot``).
  * ``sink write → bot has it``: the same start → the bot's handler got the message
    (adds loopback TCP and the bot's WebSocket parsing: what a bot on this host sees).

bot → caller
  * ``WS received → queued``: message out of the socket → decoded into the playout
    queue (``stats.decode``).
  * ``WS received → handed to track``: → its first sample is read by the paced outbound
    track, which encodes it and hands it to aiortc for RTP right away
    (``stats.to_user``). It includes the wait for the next 20 ms frame slot, which any
    fixed-clock playout has; the two rows below split it:
  * ``  next-slot wait``: received → the next frame slot of the track (0–20 ms, set by
    the phase of the bot's clock against the track's).
  * ``  beyond next slot``: any further wait (audio queued ahead, e.g. after a late
    message grew the queue by a frame). 0 when the bridge adds nothing.
  * ``bot sent → handed to track``: bot's send → track (adds loopback and parsing).

Run: python bench/bridge_latency.py [--seconds 20] [--protocols twilio,pcm16,pcm48]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from media.bridges import PcmBridge, TwilioBridge  # noqa: E402
from media.g711 import encode_ulaw  # noqa: E402
from media.sources.tone import ToneSource  # noqa: E402

PROTOCOLS = {"twilio": ("twilio", 8000), "pcm16": ("pcm", 16000), "pcm48": ("pcm", 48000)}


# -- the bot (child process) ---------------------------------------------------------------


def bot_main(protocol: str, rate: int, port_out, results_out) -> None:
    asyncio.run(_bot(protocol, rate, port_out, results_out))


async def _bot(protocol: str, rate: int, port_out, results_out) -> None:
    from aiohttp import WSMsgType, web

    arrivals: list[float] = []  # caller frame k arrived (monotonic)
    sends: list[float] = []  # bot message j written (monotonic)
    done = asyncio.Event()
    n = rate // 50
    tone = np.round(0.3 * 32767 * np.sin(2 * np.pi * 1000 * np.arange(rate) / rate)).astype(np.int16)

    async def pace(ws) -> None:
        start = time.monotonic()
        j = 0
        while not ws.closed:
            due = start + j * 0.02
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = tone[(j * n) % rate : (j * n) % rate + n]
            if protocol == "twilio":
                payload = base64.b64encode(encode_ulaw(chunk)).decode()
                msg = '{"event":"media","streamSid":"MZx","media":{"payload":"%s"}}' % payload
                sends.append(time.monotonic())
                await ws.send_str(msg)
            else:
                sends.append(time.monotonic())
                await ws.send_bytes(chunk.astype("<i2").tobytes())
            j += 1

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        pacer = None
        async for msg in ws:
            t = time.monotonic()
            if msg.type is WSMsgType.BINARY:
                arrivals.append(t)
            elif msg.type is WSMsgType.TEXT:
                if protocol == "twilio" and msg.data.startswith('{"event":"media"'):
                    arrivals.append(t)
                    continue
                event = json.loads(msg.data)["event"]
                if event == "start" and pacer is None:
                    pacer = asyncio.ensure_future(pace(ws))
                elif event == "stop":
                    break
        if pacer is not None:
            pacer.cancel()
        done.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port_out.send(site._server.sockets[0].getsockname()[1])
    await done.wait()
    results_out.send({"arrivals": arrivals, "sends": sends})
    await runner.cleanup()


# -- the gateway side ------------------------------------------------------------------------


def pct(values, ps=(50, 95, 99)) -> list[float]:
    a = np.asarray(values, dtype=np.float64)
    return [float(np.percentile(a, p)) for p in ps] + [float(a.max())]


class Stamps:
    """A sink on the business peer ahead of the bridge's: each caller frame's write time
    (the pump calls sinks in order, so this is when the bridge's sink is called too)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def write(self, pcm, sample_rate, channels=1) -> None:
        self.times.append(time.monotonic())

    def close(self) -> None:
        pass


class TrackTap:
    """Outbound tap: for each frame sent, its slot time and the bot-audio position after
    the read (wire samples consumed)."""

    def __init__(self, track, bridge) -> None:
        self.track, self.bridge = track, bridge
        self.rows: list[tuple[float, int]] = []

    def write(self, pcm, sample_rate, channels=1) -> None:
        src = self.bridge.source
        self.rows.append((self.track.sent_at, src.consumed if src is not None else 0))

    def close(self) -> None:
        pass


def _traced(cls):
    class Traced(cls):
        """The bridge, recording (queue position, receive time) of each bot message."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.received: list[tuple[int, float]] = []
            self._offset = time.monotonic() - time.perf_counter()

        def _bot_audio(self, pcm, received_at):
            self.received.append((self.source.queued, received_at + self._offset))
            super()._bot_audio(pcm, received_at)

    return Traced


async def run_one(name: str, seconds: float) -> list[tuple[str, str, list[float], int]]:
    from media_call import call_pair

    protocol, rate = PROTOCOLS[name]
    ctx = mp.get_context("spawn")
    port_in, port_out = ctx.Pipe(duplex=False)
    res_in, res_out = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=bot_main, args=(protocol, rate, port_out, res_out), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    port = await loop.run_in_executor(None, port_in.recv)
    url = f"ws://127.0.0.1:{port}/ws"
    bridge = (
        _traced(TwilioBridge)(url, idle_timeout_s=None)
        if protocol == "twilio"
        else _traced(PcmBridge)(url, sample_rate=rate, idle_timeout_s=None)
    )
    stamps = Stamps()
    try:
        async with call_pair() as (business, user):
            tap = TrackTap(business.outbound, bridge)
            business.add_outbound_sink(tap)
            user.play(ToneSource(600, None))
            business.add_sink(stamps)
            await bridge.start(business, call_id="CA" + "0" * 32)
            # start() attached the bridge's sink and returned without yielding: the next
            # frame stamped is the bridge's chunk 1.
            first = len(stamps.times)
            await asyncio.sleep(seconds)  # the measurement window (benchmark, not a test)
            await bridge.stop("user hung up")
        results = await loop.run_in_executor(None, res_in.recv)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    st = bridge.stats
    assert st.frames_dropped == 0, "outbox overflowed"
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    rows = []

    def hist_row(direction, span, h):
        ps = [h.percentile(50), h.percentile(95), h.percentile(99), h.max_ms]
        rows.append((direction, span, ps, h.count))

    hist_row("caller→bot", "sink write → WS written", st.to_bot)
    arrivals = results["arrivals"]
    written = stamps.times[first:]
    k = min(len(arrivals), len(written))
    hop = [a - w for a, w in zip(arrivals[:k], written[:k])]
    rows.append(("caller→bot", "sink write → bot has it", pct(ms(hop)), k))
    hist_row("bot→caller", "WS received → queued", st.decode)
    hist_row("bot→caller", "WS received → handed to track", st.to_user)

    # Split "received → handed" with the tap: next slot after receipt vs actual.
    slots = np.array([t for t, _ in tap.rows])
    consumed = np.array([c for _, c in tap.rows])
    slot_wait, beyond, e2e = [], [], []
    sends = results["sends"]
    for j, (pos, rx) in enumerate(bridge.received):
        i_hand = int(np.searchsorted(consumed, pos + 1))  # first read that took sample pos
        i_next = int(np.searchsorted(slots, rx))  # first slot at/after receipt
        if i_hand >= slots.size or i_next >= slots.size:
            continue
        slot_wait.append(slots[i_next] - rx)
        beyond.append(slots[i_hand] - slots[i_next])
        if j < len(sends):
            e2e.append(slots[i_hand] - sends[j])
    rows.append(("bot→caller", "  next-slot wait", pct(ms(slot_wait)), len(slot_wait)))
    rows.append(("bot→caller", "  beyond next slot", pct(ms(beyond)), len(beyond)))
    rows.append(("bot→caller", "bot sent → handed to track", pct(ms(e2e)), len(e2e)))
    return rows


async def main(seconds: float, protocols: list[str]) -> None:
    print(f"bridge latency: {seconds:g} s of call per protocol, bot in another process on 127.0.0.1 (ms)")
    header = f"{'protocol':<8} {'direction':<11} {'span':<32} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7} {'n':>6}"
    print(header)
    print("-" * len(header))
    for name in protocols:
        for direction, span, ps, n in await run_one(name, seconds):
            cells = " ".join(f"{p:7.2f}" if p is not None else f"{'-':>7}" for p in ps)
            print(f"{name:<8} {direction:<11} {span:<32} {cells} {n:6d}")
        print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--protocols", default="twilio,pcm16,pcm48")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.seconds, [p.strip() for p in args.protocols.split(",") if p.strip()]))
