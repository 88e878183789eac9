"""Two gateway processes sharing a real redis-server, the sandbox provider delivering its
webhooks round-robin to both (as a load balancer would): a call placed on A carries audio
both ways, is visible from B and can be hung up from B; when A is killed, B finishes A's
call at the provider within 15 s."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from gateway.sandbox.browser import write_tone_wav
from tests.helpers import free_port, tone_seconds
from tests.processes import poll_until, serve, stop, wait_healthy

import aiohttp

TOKEN = "cluster-token-0123456789"
API = {"Authorization": f"Bearer {TOKEN}"}
USER = "+4915112345678"
HOOK = "X-Hook-Token: cluster-" + os.urandom(6).hex()


async def test_two_instances_share_calls_route_webhooks_and_take_over(tmp_path, redis_url):
    redis_db = f"{redis_url.rsplit('/', 1)[0]}/{uuid.uuid4().int % 15 + 1}"
    media = tmp_path / "media"
    media.mkdir()
    write_tone_wav(media / "biz-1k.wav", 1000.0, 30.0, amplitude=0.3)
    say = write_tone_wav(tmp_path / "user-600.wav", 600.0, 60.0, amplitude=0.3)
    ports = {name: free_port() for name in ("provider", "a", "b")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    common = {"WACALL_WEBHOOK_HEADER": HOOK}
    provider = serve({**common, "WACALL_PORT": str(ports["provider"]), "WACALL_DATA_DIR": str(tmp_path / "p"),
                      "WACALL_SANDBOX_WEBHOOK_URL": f"{url['a']}/webhooks/whatsapp,{url['b']}/webhooks/whatsapp"},
                     sandbox=True, log=tmp_path / "provider.log")

    def gateway(name: str):
        return serve({**common, "WACALL_PORT": str(ports[name]), "WACALL_DATA_DIR": str(tmp_path / name),
                      "WACALL_REDIS_URL": redis_db, "WACALL_INSTANCE": name, "WACALL_API_TOKEN": TOKEN,
                      "WACALL_D360_API_KEY": "sandbox-key", "WACALL_BASE_URL": f"{url['provider']}/sandbox",
                      "WACALL_MEDIA_ADDRESSES": "127.0.0.1", "WACALL_MEDIA_DIR": str(media),
                      "WACALL_PERMISSION_RECONCILE": "true"}, sandbox=False, log=tmp_path / f"{name}.log")

    a, b = gateway("a"), gateway("b")
    try:
        async with aiohttp.ClientSession() as http:
            for name, proc in (("provider", provider), ("a", a), ("b", b)):
                await wait_healthy(url[name], proc)

            async def get(target: str, path: str, headers=API):
                async with http.get(f"{url[target]}{path}", headers=headers) as resp:
                    return await resp.json()

            async def post(target: str, path: str, body: dict, headers=API):
                async with http.post(f"{url[target]}{path}", json=body, headers=headers) as resp:
                    return resp.status, await resp.json()

            status, _ = await post("provider", f"/sandbox/users/{USER}/permission", {"permanent": True, "notify": False}, {})
            assert status == 200
            status, _ = await post("provider", f"/sandbox/users/{USER}", {"say": str(say), "answer_after_ms": 0}, {})
            assert status == 200

            # a call placed on A: its webhooks land on A and B alike, B forwards A's
            status, placed = await post("a", "/v1/calls", {"to": USER, "play": "biz-1k.wav", "record": True})
            assert status == 201, placed
            call_id = placed["id"]
            live = await poll_until(lambda: get("a", f"/v1/calls/{call_id}"), lambda c: c["state"] == "media_connected")
            seen_from_b = await poll_until(lambda: get("b", f"/v1/calls/{call_id}"),
                                           lambda c: c["state"] == "media_connected")
            assert seen_from_b["wacid"] == live["wacid"]
            user_wav = Path(live["recording"]["files"]["user_wav"])
            await poll_until(lambda: _size(user_wav), lambda n: n > 44 + 2 * 2 * 48000)  # 2 s of the user
            async with http.delete(f"{url['b']}/v1/calls/{call_id}", headers=API) as resp:  # hung up from B
                assert resp.status == 200
                ended = await resp.json()
            assert ended["state"] == "ended" and ended["end_reason"] == "business_hangup"
            there = next(c for c in (await get("provider", f"/sandbox/users/{USER}/calls", {}))["calls"]
                         if c["id"] == live["wacid"])
            assert there["state"] == "ended" and there["ended_by"] == "business"
            # the audio went both ways: the phone heard the business's 1 kHz, A recorded the user's 600 Hz
            assert tone_seconds(there["phone_recording"], 1000.0) > 1.0
            assert tone_seconds(user_wav, 600.0) > 1.5
            # what B forwarded reached A (webhooks of A's call, the hang-up): how fast
            async with http.get(f"{url['a']}/metrics") as resp:
                routed = _histogram(await resp.text(), "wacall_routed_seconds")
            assert routed["+Inf"] >= 2, routed  # the hang-up at least, and B's share of the webhooks
            print(f"cluster: {int(routed['+Inf'])} messages routed B -> A, "
                  f"{routed['0.005'] / routed['+Inf']:.0%} within 5 ms, {routed['0.002'] / routed['+Inf']:.0%} within 2 ms")

            # a second call on A; A dies: B takes it over and ends it at the provider
            status, placed = await post("a", "/v1/calls", {"to": USER})
            assert status == 201, placed
            second = placed["id"]
            live = await poll_until(lambda: get("a", f"/v1/calls/{second}"), lambda c: c["state"] == "media_connected")
            a.kill()
            a.wait(10)
            killed = time.monotonic()

            async def provider_state():
                calls = (await get("provider", f"/sandbox/users/{USER}/calls", {}))["calls"]
                return next(c for c in calls if c["id"] == live["wacid"])

            there = await poll_until(provider_state, lambda c: c["state"] == "ended", timeout=20)
            took = time.monotonic() - killed
            print(f"cluster: B ended A's call at the provider {took:.1f} s after A was killed")
            assert took < 15.0 and there["ended_by"] == "business"
            finished = await poll_until(lambda: get("b", f"/v1/calls/{second}"), lambda c: c["state"] == "ended")
            assert finished["end_reason"] == "instance_lost"
    finally:
        for proc in (a, b, provider):
            stop(proc)


async def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _histogram(text: str, name: str) -> dict[str, float]:
    """A Prometheus histogram's cumulative buckets by ``le``."""
    out = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out
