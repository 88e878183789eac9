"""Soak: does a gateway that churns calls for minutes keep its memory, threads and FDs flat?

Three processes, as an operator runs wacall: the *provider* (``wacall serve --sandbox``:
the emulated 360dialog calling API and its simulated users' phones), the *gateway*
(``wacall serve``, pointed at the provider, webhooks signed with a shared app secret),
and this driver, which talks to both over HTTP only and reads the gateway's RSS,
threads and open FDs from ``/proc``.

``--live`` calls are up at any time, each held ``--hold`` seconds, for ``--minutes``.
The mix (per 10 calls): 4 business calls that play a file and record, hung up through
the API; 2 the user hangs up; 1 the user rejects; 2 inbound calls the gateway answers
with the file and records; 1 bridged to a voice bot (an echo bot in this process,
Twilio Media Streams protocol) and recorded. Every call gets a fresh number (the seed's
5 calls per user and day hold). Each call's end reason is checked; any other counts as
a failure.

Printed every 30 s: calls finished, RSS, threads, FDs. At the end: the growth per
finished call after the warm-up (least-squares slope of RSS over calls finished; the
same for the lowest RSS of each 30 s window, which the gateway's heap trimming makes
the live set; and first-to-last), threads and FDs (min/max after warm-up), failures.

    python bench/soak.py [--minutes 10] [--live 10] [--hold 6] [--warmup 1]

The gateway keeps bounded histories (``WACALL_CALL_HISTORY``, ``WACALL_EVENT_HISTORY``,
set to 100 here so that they are full by the end of the warm-up: growth after it is a
leak, not a cache filling) and recordings are kept to the newest 200 call directories.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from load import free_port, wait_healthy  # noqa: E402

from gateway.sandbox.browser import write_tone_wav  # noqa: E402

TOKEN = "soak-token-0123456789abcdef"
SECRET = "soak-app-secret-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: One round of the mix, 10 calls.
MIX = ["business"] * 4 + ["user_hangup"] * 2 + ["rejected"] + ["inbound"] * 2 + ["bot"]
EXPECTED = {"business": "business_hangup", "user_hangup": "user_hangup", "rejected": "rejected",
            "inbound": "user_hangup", "bot": "business_hangup"}


def proc_sample(pid: int) -> tuple[float, int, int]:
    """``(RSS MB, threads, open FDs)`` of a process."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))


def serve(env: dict, log: Path, sandbox: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "gateway.cli", "serve"] + (["--sandbox"] if sandbox else [])
    return subprocess.Popen(args, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"))


class EchoBot:
    """A Twilio Media Streams bot that says back what it hears."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sessions = 0
        self._runner: web.AppRunner | None = None

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sessions += 1
        sid = None
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            if event.get("event") == "start":
                sid = event.get("streamSid")
            elif event.get("event") == "media" and sid:
                await ws.send_json({"event": "media", "streamSid": sid,
                                    "media": {"payload": event["media"]["payload"]}})
            elif event.get("event") == "stop":
                break
        return ws

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/media", self._ws)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return f"ws://127.0.0.1:{self.port}/media"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Soak:
    def __init__(self, args, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.numbers = (f"+1555{n:07d}" for n in itertools.count(1))
        self.finished = 0
        self.failures: list[str] = []
        self.by_kind: dict[str, int] = {}
        self.stop_at = 0.0

    async def setup(self, http: aiohttp.ClientSession) -> None:
        work = self.workdir
        media = work / "media"
        media.mkdir()
        write_tone_wav(media / "prompt.wav", 1000.0, self.args.hold + 10, amplitude=0.3)
        self.say = write_tone_wav(work / "say.wav", 600.0, self.args.hold + 10, amplitude=0.3)
        self.bot = EchoBot()
        self.bot_url = await self.bot.start()
        gateway_port, provider_port = free_port(), free_port()
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        self.provider_url = f"http://127.0.0.1:{provider_port}"
        common = {"WACALL_APP_SECRET": SECRET, "WACALL_HOST": "127.0.0.1", "WACALL_LOG_FORMAT": "json"}
        self.provider = serve({**common, "WACALL_PORT": str(provider_port),
                               "WACALL_DATA_DIR": str(work / "provider"),
                               "WACALL_SANDBOX_WEBHOOK_URL": f"{self.gateway_url}/webhooks/whatsapp"},
                              work / "provider.log", sandbox=True)
        self.gateway = serve({**common, "WACALL_PORT": str(gateway_port), "WACALL_API_TOKEN": TOKEN,
                              "WACALL_PROVIDER": "360dialog", "WACALL_D360_API_KEY": "sandbox-key",
                              "WACALL_BASE_URL": f"{self.provider_url}/sandbox",
                              "WACALL_DATA_DIR": str(work / "gateway"), "WACALL_MEDIA_DIR": str(media),
                              "WACALL_MEDIA_ADDRESSES": "127.0.0.1", "WACALL_MAX_CALLS": str(self.args.live + 10),
                              "WACALL_INBOUND_PLAY": "prompt.wav", "WACALL_INBOUND_RECORD": "true",
                              "WACALL_CALL_HISTORY": "100", "WACALL_EVENT_HISTORY": "100",
                              "WACALL_RECORDING_MAX_COUNT": "200", "WACALL_SPEECH_EVENTS": "true"},
                             work / "gateway.log", sandbox=False)
        await wait_healthy(http, self.provider_url, self.provider)
        await wait_healthy(http, self.gateway_url, self.gateway)

    async def user(self, http, **behaviour) -> str:
        number = next(self.numbers)
        base = f"{self.provider_url}/sandbox/users/{number}"
        async with http.post(base, json={"answer_after_ms": 0, "say": str(self.say), **behaviour}) as r:
            r.raise_for_status()
        async with http.post(f"{base}/permission", json={"granted": True, "permanent": True}) as r:
            r.raise_for_status()
        return number

    async def call_state(self, http, call_id: str) -> dict:
        async with http.get(f"{self.gateway_url}/v1/calls/{call_id}", headers=AUTH) as r:
            r.raise_for_status()
            return await r.json()

    async def until_state(self, http, call_id: str, states: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            call = await self.call_state(http, call_id)
            if call["state"] in states or time.monotonic() > deadline:
                return call
            await asyncio.sleep(0.2)

    async def place(self, http, number: str, **body) -> str:
        async with http.post(f"{self.gateway_url}/v1/calls", headers=AUTH,
                             json={"to": number, "record": True, **body}) as r:
            data = await r.json()
            if r.status != 201:
                raise RuntimeError(f"POST /v1/calls -> {r.status}: {data}")
            return data["id"]

    async def one(self, http, kind: str) -> None:
        hold = self.args.hold
        if kind == "inbound":
            number = await self.user(http)
            async with http.post(f"{self.provider_url}/sandbox/users/{number}/call",
                                 json={"hangup_after_s": hold}) as r:
                wacid = (await r.json())["id"]
            deadline = time.monotonic() + hold + 30
            while True:  # the gateway's record of the call, by the WhatsApp call id
                try:
                    call = await self.call_state(http, wacid)
                except aiohttp.ClientResponseError:
                    call = {"state": "unknown"}
                if call["state"] == "ended" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
        else:
            behaviour = {"hangup_after_s": hold} if kind == "user_hangup" else (
                {"on_call": "reject"} if kind == "rejected" else {})
            number = await self.user(http, **behaviour)
            extra = {"bot": {"protocol": "twilio", "url": self.bot_url}} if kind == "bot" else {"play": "prompt.wav"}
            call_id = await self.place(http, number, **extra)
            if kind in ("business", "bot"):
                call = await self.until_state(http, call_id, {"media_connected", "ended"}, 30)
                if call["state"] == "media_connected":
                    await asyncio.sleep(hold)
                    async with http.delete(f"{self.gateway_url}/v1/calls/{call_id}", headers=AUTH) as r:
                        await r.read()
            call = await self.until_state(http, call_id, {"ended"}, hold + 30)
        self.finished += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if call.get("end_reason") != EXPECTED[kind]:
            self.failures.append(f"{kind}: {call.get('state')} {call.get('end_reason')} {call.get('detail') or ''}"[:200])

    async def worker(self, http, offset: int) -> None:
        for kind in itertools.islice(itertools.cycle(MIX), offset, None):
            if time.monotonic() >= self.stop_at:
                return
            try:
                await self.one(http, kind)
            except Exception as exc:  # noqa: BLE001 - count it and go on
                self.failures.append(f"{kind}: {type(exc).__name__}: {exc}"[:200])

    async def run(self) -> dict:
        args = self.args
        samples: list[tuple[float, int, float, int, int]] = []  # (t, finished, rss, threads, fds)
        async with aiohttp.ClientSession() as http:
            await self.setup(http)
            try:
                start = time.monotonic()
                self.stop_at = start + args.minutes * 60
                workers = [asyncio.ensure_future(self.worker(http, i * 3)) for i in range(args.live)]
                next_print = start
                while not all(w.done() for w in workers):
                    now = time.monotonic()
                    samples.append((now - start, self.finished, *proc_sample(self.gateway.pid)))
                    if now >= next_print:
                        t, n, rss, threads, fds = samples[-1]
                        print(f"{t:6.0f} s  {n:5d} calls finished  RSS {rss:7.1f} MB  threads {threads:3d}  "
                              f"FDs {fds:4d}  failures {len(self.failures)}", flush=True)
                        next_print += 30
                    await asyncio.sleep(0.5)  # often enough to see each trim's floor
                await asyncio.sleep(3.0)  # the last calls' tasks run out
                samples.append((time.monotonic() - start, self.finished, *proc_sample(self.gateway.pid)))
            finally:
                for proc in (self.gateway, self.provider):
                    proc.send_signal(signal.SIGTERM)
                for proc in (self.gateway, self.provider):
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                await self.bot.stop()
        return self.report(samples)

    def report(self, samples) -> dict:
        warm = [s for s in samples if s[0] >= self.args.warmup * 60]
        if len(warm) < 2 or warm[-1][1] == warm[0][1]:
            return {"error": "not enough calls after the warm-up", "samples": len(samples)}
        xs = [s[1] for s in warm]
        ys = [s[2] for s in warm]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))
        calls_after = warm[-1][1] - warm[0][1]
        # The heap is trimmed every 10 s (gateway.memory), so RSS saw-tooths; the floor
        # of each 30 s window is what stays live. Its slope is the leak, if any.
        floors: dict[int, tuple[float, int]] = {}
        for t, n, rss, _, _ in warm:
            window = int(t // 30)
            if window not in floors or rss < floors[window][0]:
                floors[window] = (rss, n)
        fx = [n for _, n in floors.values()]
        fy = [rss for rss, _ in floors.values()]
        fmx, fmy = sum(fx) / len(fx), sum(fy) / len(fy)
        floor_slope = (sum((x - fmx) * (y - fmy) for x, y in zip(fx, fy))
                       / max(1e-9, sum((x - fmx) ** 2 for x in fx)))
        return {
            "minutes": self.args.minutes, "live": self.args.live, "hold_s": self.args.hold,
            "finished": self.finished, "by_kind": self.by_kind, "failures": self.failures[:20],
            "failed": len(self.failures),
            "rss_mb": {"start": round(samples[0][2], 1), "after_warmup": round(warm[0][2], 1),
                       "end": round(warm[-1][2], 1), "max": round(max(s[2] for s in samples), 1)},
            "growth_kb_per_call_slope": round(slope * 1024, 2),
            "growth_kb_per_call_floor_slope": round(floor_slope * 1024, 2),
            "rss_floor_mb": {"first_window": round(fy[0], 1), "last_window": round(fy[-1], 1),
                             "min": round(min(fy), 1), "max": round(max(fy), 1)},
            "growth_kb_per_call_floor_endpoints": round((fy[-1] - fy[0]) * 1024 / max(1, fx[-1] - fx[0]), 2),
            "growth_kb_per_call_endpoints": round((warm[-1][2] - warm[0][2]) * 1024 / calls_after, 2),
            "calls_after_warmup": calls_after,
            "threads_after_warmup": [min(s[3] for s in warm), max(s[3] for s in warm)],
            "fds_after_warmup": [min(s[4] for s in warm), max(s[4] for s in warm)],
            "threads_end": warm[-1][3], "fds_end": warm[-1][4],
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--live", type=int, default=10, help="calls up at any time")
    parser.add_argument("--hold", type=float, default=6.0, help="seconds each call is held")
    parser.add_argument("--warmup", type=float, default=1.0, help="minutes before growth is measured")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (logs, recordings) and keep it")
    args = parser.parse_args()
    if args.keep:
        workdir = Path(args.keep)
        workdir.mkdir(parents=True, exist_ok=True)
        result = await Soak(args, workdir).run()
    else:
        with tempfile.TemporaryDirectory(prefix="wacall-soak-") as tmp:
            result = await Soak(args, Path(tmp)).run()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
