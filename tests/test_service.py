"""`wacall serve --sandbox` driven purely over HTTP, as a sidecar's client would drive it."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.eventbus import verify_signature
from gateway.sandbox.browser import write_tone_wav
from media import analysis
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "service-test-token-0123456789"
SECRET = "event-secret-abcdef0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = "+4915112345678"
TIMEOUT = 30


class EventReceiver:
    """An HTTP endpoint for wacall's signed event webhooks that fails the first N tries."""

    def __init__(self, fail_first: int):
        self.fail_first = fail_first
        self.attempts: dict[str, int] = {}
        self.events: list[dict] = []
        self.bad_signatures = 0
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_signature(body, request.headers.get("X-Wacall-Signature"), SECRET):
            self.bad_signatures += 1
            return web.Response(status=401)
        event = json.loads(body)
        assert request.headers["X-Wacall-Event-Id"] == event["id"]
        self.attempts[event["id"]] = self.attempts.get(event["id"], 0) + 1
        if len(self.attempts) == 1 and self.attempts[event["id"]] <= self.fail_first:
            return web.Response(status=500)  # the very first event fails fail_first times
        self.events.append(event)
        self.changed.set()
        return web.Response(status=204)

    async def wait_for(self, predicate, timeout=TIMEOUT):
        async def wait():
            while not predicate(self.events):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


@pytest.fixture
async def served(tmp_path):
    """`wacall serve --sandbox` in its own process, plus a failing-then-recovering receiver."""
    receiver = EventReceiver(fail_first=2)
    app = web.Application()
    app.router.add_post("/events", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    receiver_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()

    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(ROOT / "gateway/assets/business.ogg", media / "greeting.ogg")
    port = free_port()
    low = 20000 + (os.getpid() * 7) % 10000
    env = {**os.environ, "WACALL_PORT": str(port), "WACALL_API_TOKEN": TOKEN,
           "WACALL_DATA_DIR": str(tmp_path / "data"), "WACALL_MEDIA_DIR": str(media),
           "WACALL_EVENT_WEBHOOKS": f"http://127.0.0.1:{receiver_port}/events",
           "WACALL_EVENT_SECRET": SECRET, "WACALL_INBOUND_PLAY": "greeting.ogg",
           "WACALL_MEDIA_PORT_RANGE": f"{low}-{low + 40}"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--sandbox"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(base_url=base) as http:
        async def healthy():
            while True:
                assert proc.poll() is None, proc.stderr.read()
                try:
                    async with http.get("/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)

        await asyncio.wait_for(healthy(), TIMEOUT)
        try:
            yield http, receiver, proc, (low, low + 40)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(TIMEOUT)
            await runner.cleanup()


async def sse_events(http, connected: asyncio.Event, until, out: list):
    """Collect SSE events into ``out`` until ``until(event)`` is true."""
    async with http.get("/v1/events", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        connected.set()
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                event = json.loads(line[6:])
                out.append(event)
                if until(event):
                    return


async def test_outbound_call_over_http_with_sse_and_signed_webhooks(served):
    http, receiver, proc, (low, high) = served
    async with http.post("/v1/calls", json={"to": USER}) as resp:
        assert resp.status == 401  # no token
    async with http.post("/v1/calls", json={"to": USER}, headers={"Authorization": "Bearer nope"}) as resp:
        assert resp.status == 401
    async with http.post(f"/sandbox/users/{USER}", json={"answer_after_ms": 200}) as resp:
        assert resp.status == 200

    sse: list = []
    call: dict = {}
    connected = asyncio.Event()
    watcher = asyncio.ensure_future(sse_events(
        http, connected, lambda e: e["type"] == "call.ended" and e["call_id"] == call.get("id"), sse))
    await asyncio.wait_for(connected.wait(), TIMEOUT)
    # no permission yet: refused locally with the provider's code, before any network call
    async with http.post("/v1/calls", json={"to": USER}, headers=AUTH) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == 138006
    # ask, then call: the call waits for the GRANTED webhook
    async with http.post("/v1/calls", json={"to": USER, "play": "greeting.ogg", "record": "opus",
                                            "if_no_permission": "request"},
                         headers=AUTH) as resp:
        assert resp.status == 201, await resp.text()
        call.update(await resp.json())
    assert call["state"] == "created"

    async def state():
        async with http.get(f"/v1/calls/{call['id']}", headers=AUTH) as resp:
            return await resp.json()

    await receiver.wait_for(lambda evs: any(e["type"] == "call.media_connected" for e in evs))
    current = await state()
    assert current["state"] == "media_connected"
    assert current["media"]["candidate_pair"] == "host/host"
    assert set(current["recording"]["files"]) == {"stereo_ogg", "sidecar"}  # (its own format, after the wait)
    async with http.delete(f"/v1/calls/{call['id']}", headers=AUTH) as resp:
        ended = await resp.json()
    assert ended["end_reason"] == "business_hangup"

    await asyncio.wait_for(watcher, TIMEOUT)
    await receiver.wait_for(lambda evs: any(e["type"] == "call.ended" for e in evs))
    # SSE: the call's events in order, ending with call.ended
    sse = [e for e in sse if e["call_id"] == call["id"]]
    types = [e["type"] for e in sse]
    for name in ("call.created", "call.permission_requested", "call.permission_granted", "call.offer_sent",
                 "call.ringing", "call.accepted", "call.media_connected", "call.ended"):
        assert name in types
    assert types.index("call.accepted") < types.index("call.media_connected") < types.index("call.ended")
    final = sse[-1]["data"]["call"]
    assert final["end_reason"] == "business_hangup" and final["connected_seconds"] > 0
    assert final["media"]["packets_sent"] > 0 and final["media"]["packets_received"] > 0
    # Webhooks: signed, in order, the first one delivered on the third attempt
    assert receiver.bad_signatures == 0
    first = receiver.events[0]
    assert receiver.attempts[first["id"]] == 3
    # the receiver got exactly the call's events SSE showed, same ids, same order
    assert [e["id"] for e in receiver.events if e["call_id"] == call["id"]] == [e["id"] for e in sse]
    assert len({e["id"] for e in receiver.events}) == len(receiver.events)  # no duplicates

    # Metrics moved, parsed by prometheus_client's own parser
    async with http.get("/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    ended_total = {tuple(sorted(s.labels.items())): s.value
                   for s in families["wacall_calls"].samples if s.name == "wacall_calls_total"}
    assert ended_total[(("direction", "BUSINESS_INITIATED"), ("end_reason", "business_hangup"))] == 1
    webhooks = {(s.labels["kind"], s.labels["result"]): s.value
                for s in families["wacall_webhooks"].samples if s.name == "wacall_webhooks_total"}
    assert webhooks[("connect", "ok")] >= 1 and webhooks[("status", "ok")] >= 2
    setup = [s for s in families["wacall_call_setup_seconds"].samples
             if s.name == "wacall_call_setup_seconds_count"]
    assert setup[0].value == 1
    sent = [s for s in families["wacall_rtp_packets"].samples if s.labels.get("direction") == "sent"]
    assert sent[0].value > 0


async def test_inbound_call_is_answered_and_recorded(served):
    http, receiver, proc, _ = served
    async with http.post(f"/sandbox/users/{USER}/call",
                         json={"say": str(ROOT / "gateway/assets/user.ogg"), "hangup_after_s": 4.0}) as resp:
        assert resp.status == 201, await resp.text()
        wacid = (await resp.json())["id"]
    await receiver.wait_for(lambda evs: any(e["type"] == "call.ended" and e["data"]["call"]["wacid"] == wacid
                                            for e in evs))
    ended = next(e for e in receiver.events if e["type"] == "call.ended")["data"]["call"]
    assert ended["direction"] == "USER_INITIATED" and ended["end_reason"] == "user_hangup"
    names = [t["name"] for t in ended["timeline"]]
    assert names.index("pre_accepted") < names.index("accepted") < names.index("media_connected")
    # what wacall recorded: the user's 600 Hz; what the user heard: the 1 kHz greeting
    recording = next(p for p in ended["recordings"] if p.endswith("user.wav"))
    x, rate = analysis.read_audio(recording)
    assert analysis.tone_seconds(x, rate, 600) == pytest.approx(3.0, rel=0.1)
    async with http.get(f"/sandbox/users/{USER}/calls") as resp:
        [sandbox_call] = (await resp.json())["calls"]
    y, rate = analysis.read_audio(sandbox_call["phone_recording"])
    assert analysis.tone_seconds(y, rate, 1000) == pytest.approx(3.0, rel=0.1)


async def test_sigterm_hangs_up_live_calls_and_delivers_the_last_events(served, tmp_path):
    http, receiver, proc, _ = served
    say = write_tone_wav(tmp_path / "say.wav", 600.0, 30.0, amplitude=0.3)
    async with http.post(f"/sandbox/users/{USER}", json={"answer_after_ms": 0, "say": str(say)}) as resp:
        assert resp.status == 200
    async with http.post(f"/sandbox/users/{USER}/permission", json={"permanent": True}) as resp:
        assert resp.status == 200
    async with http.post("/v1/calls", json={"to": USER, "record": True}, headers=AUTH) as resp:
        call = await resp.json()
    # (the user is heard first: a recording with audio in it is what must survive)
    await receiver.wait_for(lambda evs: any(e["type"] == "call.speech_start" for e in evs))
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, TIMEOUT) == 0
    ended = [e for e in receiver.events if e["type"] == "call.ended" and e["call_id"] == call["id"]]
    assert ended and ended[0]["data"]["call"]["end_reason"] == "shutdown"
    recordings = ended[0]["data"]["call"]["recordings"]
    assert {Path(p).name for p in recordings} == {"user.wav", "stereo.wav", "user.ogg", "recording.json"}
    for path in recordings:
        if path.endswith((".wav", ".ogg")):
            x, rate = analysis.read_audio(path)  # closed properly: readable files
            assert len(x) > 0


async def test_permission_cli_against_the_service(served):
    http, receiver, proc, _ = served
    port = str(http._base_url.port)
    env = {**os.environ, "WACALL_API_TOKEN": TOKEN, "WACALL_API_URL": f"http://127.0.0.1:{port}"}

    async def cli(*args):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "permission", *args, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(child.communicate(), TIMEOUT)
        return child.returncode, json.loads(out or err)

    code, status = await cli("status", USER)
    assert code == 0 and status["status"] == "none" and status["next_call_allowed_at"] is None
    code, sent = await cli("request", USER, "--text", "May we call you?")
    assert code == 0 and sent["message_id"].startswith("wamid.") and sent["requests_last_7d"] == 1

    async def granted():
        while (await cli("status", USER))[1]["status"] != "granted":
            await asyncio.sleep(0.05)

    await asyncio.wait_for(granted(), TIMEOUT)
    code, listing = await cli("list")
    assert code == 0 and [p["user"] for p in listing["permissions"]] == [USER]
    await cli("request", USER)
    code, refused = await cli("request", USER)  # third in 7 days
    assert code == 1 and refused["error"]["code"] == 138011 and refused["error"]["retry_at"].endswith("Z")
