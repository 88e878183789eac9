"""Real processes for end-to-end tests: ``wacall serve`` (the gateway) and ``wacall serve
--sandbox`` (the provider) on free ports of 127.0.0.1, started, waited for, stopped by pid."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20


def serve(env: dict, *, sandbox: bool, log: Path) -> subprocess.Popen:
    """``wacall serve [--sandbox]`` with ``env`` over ours; its log appended to ``log``
    (``WACALL_TEST_VERBOSE=1``: debug logs)."""
    verbose = ["-vv"] if os.environ.get("WACALL_TEST_VERBOSE") else []
    args = [sys.executable, "-m", "gateway.cli", *verbose, "serve"] + (["--sandbox"] if sandbox else [])
    full = {**os.environ, "WACALL_LOG_FORMAT": "text", "WACALL_HOST": "127.0.0.1", **env}
    return subprocess.Popen(args, env=full, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("a"))


async def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``url``/healthz answers 200 (fails at once if the process exits)."""

    async def poll():
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.poll() is None, f"{url}: the process exited with {proc.returncode}"
                try:
                    async with http.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (graceful), SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def poll_until(fetch: Callable[[], Awaitable[Any]], predicate: Callable[[Any], bool],
                     timeout: float = TIMEOUT) -> Any:
    """``await fetch()`` until ``predicate`` holds for what it returns; that value."""

    async def poll():
        while True:
            value = await fetch()
            if predicate(value):
                return value
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), timeout)


class ProviderAndGateway:
    """A sandbox provider process and a gateway process wired to each other (its webhooks
    authenticated with ``common`` settings); ``async with`` starts both and stops both."""

    def __init__(self, tmp_path: Path, *, token: str, common: dict | None = None,
                 gateway_env: dict | None = None) -> None:
        provider_port, gateway_port = free_port(), free_port()
        self.provider_url = f"http://127.0.0.1:{provider_port}"
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        self.api = {"Authorization": f"Bearer {token}"}
        self.logs = tmp_path
        common = common or {}
        self._provider_env = {**common, "WACALL_PORT": str(provider_port), "WACALL_WORKERS": "0",
                              "WACALL_DATA_DIR": str(tmp_path / "provider"),
                              "WACALL_SANDBOX_WEBHOOK_URL": f"{self.gateway_url}/webhooks/whatsapp"}
        self.gateway_env = {**common, "WACALL_PORT": str(gateway_port), "WACALL_DATA_DIR": str(tmp_path / "gateway"),
                            "WACALL_API_TOKEN": token, "WACALL_D360_API_KEY": "sandbox-key",
                            "WACALL_BASE_URL": f"{self.provider_url}/sandbox", "WACALL_MEDIA_ADDRESSES": "127.0.0.1",
                            **(gateway_env or {})}
        self.provider: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.http: aiohttp.ClientSession | None = None

    @property
    def gateway_log(self) -> Path:
        return self.logs / "gateway.log"

    async def __aenter__(self) -> ProviderAndGateway:
        self.http = aiohttp.ClientSession()
        self.provider = serve(self._provider_env, sandbox=True, log=self.logs / "provider.log")
        self.gateway = serve(self.gateway_env, sandbox=False, log=self.gateway_log)
        await wait_healthy(self.provider_url, self.provider)
        await wait_healthy(self.gateway_url, self.gateway)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in (self.gateway, self.provider):
            if proc is not None:
                stop(proc)
        if self.http is not None:
            await self.http.close()

    def kill_gateway(self) -> None:
        os.kill(self.gateway.pid, signal.SIGKILL)
        self.gateway.wait(10)

    def stop_gateway(self) -> None:
        stop(self.gateway)

    def start_gateway(self) -> None:
        self.gateway = serve(self.gateway_env, sandbox=False, log=self.gateway_log)

    async def gateway_healthy(self) -> None:
        await wait_healthy(self.gateway_url, self.gateway)

    async def get(self, url: str, *, api: bool = True) -> Any:
        async with self.http.get(url, headers=self.api if api else {}) as resp:
            return await resp.json()

    async def user(self, user: str, **behaviour: Any) -> None:
        """The simulated user's behaviour (answer after, what they say, ...)."""
        async with self.http.post(f"{self.provider_url}/sandbox/users/{user}", json=behaviour) as resp:
            assert resp.status == 200, await resp.text()

    async def grant(self, user: str) -> None:
        """The user grants a permanent permission; wait until the gateway knows."""
        async with self.http.post(f"{self.provider_url}/sandbox/users/{user}/permission",
                                  json={"permanent": True}) as resp:
            assert resp.status == 200, await resp.text()
        await poll_until(lambda: self.get(f"{self.gateway_url}/v1/permissions/{user}"),
                         lambda p: p["status"] == "granted")

    async def calls_at_provider(self, user: str) -> list[dict]:
        return (await self.get(f"{self.provider_url}/sandbox/users/{user}/calls", api=False))["calls"]

    async def call(self, call_id: str) -> dict:
        return await self.get(f"{self.gateway_url}/v1/calls/{call_id}")
