"""Shared pieces of the SIP tests: user agents with short timers, closed in teardown with
a check that nothing is left running, external tools (missing: skip, but fail in CI), and
processes stopped by pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess

import pytest

from gateway.sip import Timers, UserAgent, UserAgentConfig

TIMEOUT = 10
#: T1 = 50 ms: 64*T1 (Timers B, F, H) is 3.2 s
FAST = Timers(t1=0.05, t2=0.4, t4=0.2, timer_d=0.2)


def sdp(port: int, host: str = "127.0.0.1", session: int = 1) -> str:
    """A PCMU audio offer/answer pointing at ``host:port``."""
    return (f"v=0\r\no=- {session} 1 IN IP4 {host}\r\ns=wacall\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
            f"a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")


def tool(name: str) -> str:
    """The path of an external binary; missing: skip the test, or fail it under CI=true."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install -y baresip sip-tester kamailio)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"SIP interop cannot run in CI: {reason}", pytrace=False)
        pytest.skip(f"SIP interop skipped: {reason}")
    return path


def free_udp_port() -> int:
    """A UDP (and TCP) port of 127.0.0.1 that was free a moment ago."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, SIGKILL after 5 s; by pid."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass


async def wait_exit(proc: subprocess.Popen, timeout: float = TIMEOUT) -> int:
    """The exit code of ``proc`` (bounded wait, polled off the loop)."""
    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)


@contextlib.asynccontextmanager
async def ua_factory():
    """A factory of started user agents (fast timers unless given); all closed at the end,
    and then no task may be left besides the test's own. Each test module makes it its
    ``make_ua`` fixture."""
    made: list[UserAgent] = []

    async def make(on_invite=None, **config) -> UserAgent:
        config.setdefault("timers", FAST)
        ua = UserAgent(UserAgentConfig(**config), on_invite=on_invite)
        await ua.start()
        made.append(ua)
        return ua

    yield make
    for ua in made:
        await asyncio.wait_for(ua.close(), TIMEOUT)
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not left, f"tasks left after close(): {left}"
