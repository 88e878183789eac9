"""A voice bot for load benchmarks (``bench/load.py --bot``), in a process of its own.

It speaks wacall's ``pcm`` protocol (``media.bridges.pcm_ws``) at 16 kHz to every call:
each connection gets 20 ms of a 1 kHz tone every 20 ms (one pacing loop for all of
them), and the bot keeps what the first few callers said, so ``GET /heard`` can report
the share of the caller's tone (600 Hz by default) in it (FFT, ``media.analysis``).

    python bench/tone_bot.py [--say-hz 1000] [--hear-hz 600] [--keep 4]

prints ``port N`` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np
from aiohttp import WSMsgType, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media import analysis  # noqa: E402

RATE = 16000
FRAME = RATE // 50


async def serve(say_hz: float, hear_hz: float, keep: int) -> None:
    loop = asyncio.get_running_loop()
    talking: set[web.WebSocketResponse] = set()
    kept: list[list[bytes]] = []
    tone = np.round(0.3 * 32767 * np.sin(2 * np.pi * say_hz * np.arange(RATE) / RATE)).astype("<i2")
    chunks = [tone[i:i + FRAME].tobytes() for i in range(0, RATE, FRAME)]

    async def pace() -> None:
        start, j = loop.time(), 0
        while True:
            j += 1
            delay = start + j * 0.02 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = chunks[j % len(chunks)]
            for ws in tuple(talking):
                if not ws.closed:
                    await ws.send_bytes(chunk)

    async def call(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        heard = None
        if len(kept) < keep:
            heard = []
            kept.append(heard)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.BINARY:
                    if heard is not None:
                        heard.append(msg.data)
                elif msg.type is WSMsgType.TEXT:
                    event = json.loads(msg.data).get("event")
                    if event == "start":
                        talking.add(ws)
                    elif event == "stop":
                        break
        finally:
            talking.discard(ws)
        return ws

    async def report(request: web.Request) -> web.Response:
        shares = []
        for heard in kept:
            x = np.frombuffer(b"".join(heard), dtype="<i2").astype(np.float32) / 32768
            shares.append(round(analysis.tone_seconds(x, RATE, hear_hz) / (x.size / RATE), 3) if x.size else 0.0)
        return web.json_response({"heard": shares})

    app = web.Application()
    app.router.add_get("/ws", call)
    app.router.add_get("/heard", report)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    pacer = asyncio.ensure_future(pace())
    print(f"port {site._server.sockets[0].getsockname()[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        pacer.cancel()
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--say-hz", type=float, default=1000.0)
    parser.add_argument("--hear-hz", type=float, default=600.0)
    parser.add_argument("--keep", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(serve(args.say_hz, args.hear_hz, args.keep))
