"""Call setup time on loopback, through the embedded sandbox.

Places N business-initiated calls one after another and prints percentiles of:
  offer_created  place_call() -> offer ready (aiortc offer, ICE gathered)
  offer_sent     place_call() -> provider answered the connect POST
  media_up       place_call() -> ICE + DTLS connected (the sandbox answers at once)

Run: python bench/setup_time.py [--calls 30]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
from pathlib import Path

from gateway.app import Service
from gateway.calls import CallState
from gateway.config import Settings



def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(data_dir=Path(data), port=0, media_addresses=["127.0.0.1"])
        async with Service(settings, sandbox=True) as service:
            samples: dict[str, list[float]] = {"offer_created": [], "offer_sent": [], "media_up": []}
            for n in range(calls):
                user = f"+1555020{n:04d}"  # one call each: the 5-calls-per-24-h rule applies
                service.sandbox.users.update(user, {"answer_after_ms": 0})
                await service.sandbox.grant(user, permanent=True)
                call = await service.manager.place_call(user)
                await call.wait_state(CallState.MEDIA_CONNECTED, 20)
                for name in samples:
                    samples[name].append(call.elapsed_until(name) * 1000)
                sandbox_call = service.sandbox.calls[call.wacid]
                await call.hangup()
                await asyncio.wait_for(sandbox_call.finished.wait(), 20)
    print(f"call setup on loopback, {calls} calls (ms since place_call)")
    print(f"{'step':<15}{'p50':>8}{'p95':>8}{'max':>8}{'mean':>8}")
    for name, values in samples.items():
        print(f"{name:<15}{pct(values, 50):8.1f}{pct(values, 95):8.1f}{max(values):8.1f}"
              f"{statistics.fmean(values):8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=30)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser.parse_args().calls))
