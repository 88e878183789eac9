"""How long a webhook takes to reach the instance that owns its call (several instances
on Redis): instance B forwards (XADD to A's inbox), A's inbox reader wakes (XREAD BLOCK)
and decodes it. Starts its own redis-server on a free port; prints percentiles.

    python bench/route_latency.py [--messages 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.events import from_wire, to_wire  # noqa: E402
from gateway.store.redis import RedisStore  # noqa: E402
from gateway.webhooks import parse_webhook  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks" / "status_ringing.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def measure(url: str, n: int) -> list[float]:
    import json

    sender, receiver = RedisStore(url, prefix="bench:"), RedisStore(url, prefix="bench:")
    event = parse_webhook(json.loads(FIXTURE.read_text()))[0]
    latencies: list[float] = []
    done = asyncio.Event()

    async def owner() -> None:
        after = "$"
        while len(latencies) < n:
            for entry_id, message in await receiver.receive("a", after, block_ms=1000):
                after = entry_id
                from_wire(message["event"])
                latencies.append(time.perf_counter() - message["sent_at"])
        done.set()

    reader = asyncio.ensure_future(owner())
    await asyncio.sleep(0.2)  # (the reader is blocked in XREAD)
    for _ in range(n):
        await sender.send("a", {"kind": "event", "event": to_wire(event), "sent_at": time.perf_counter()})
        await asyncio.sleep(0.002)  # webhooks arrive spaced, not in one burst
    await asyncio.wait_for(done.wait(), 30)
    await reader
    await sender.aclose()
    await receiver.aclose()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not installed")
    port = free_port()
    workdir = tempfile.mkdtemp()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
                            stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # until it answers
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("redis-server did not start")
                time.sleep(0.02)
        lat = sorted(asyncio.run(measure(f"redis://127.0.0.1:{port}/0", args.messages)))
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        print(f"routed {len(lat)} webhooks B -> A over Redis: p50 {pick(0.5):.2f} ms, p95 {pick(0.95):.2f} ms, "
              f"p99 {pick(0.99):.2f} ms, max {lat[-1] * 1000:.2f} ms")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
