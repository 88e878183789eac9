"""Small waits and ports shared by the tests (no sleeps as synchronisation: bounded polls)."""

import asyncio
import socket

TIMEOUT = 20


async def until(predicate, timeout: float = TIMEOUT, interval: float = 0.02) -> None:
    """Wait, at most ``timeout`` seconds, until ``predicate()`` is true."""

    async def poll():
        while not predicate():
            await asyncio.sleep(interval)

    await asyncio.wait_for(poll(), timeout)


async def drain(*peers, frames: int = 8, timeout: float = TIMEOUT) -> None:
    """Wait until each peer has received ``frames`` more frames: whatever was still in
    flight (encoder, network, the receiver's playout buffer) has arrived."""
    targets = [(p, p.received.frames + frames) for p in peers]
    await until(lambda: all(p.received.frames >= target for p, target in targets), timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
