"""The sandbox as a load-balanced provider: several webhook URLs, taken in turn."""

from __future__ import annotations

from aiohttp import web

from gateway.sandbox.emulator import Sandbox
from gateway.webhook_auth import WebhookAuth


async def test_webhooks_go_round_robin_and_a_retry_goes_to_the_next(tmp_path):
    hits: dict[str, int] = {"a": 0, "b": 0}
    failing = {"b": 1}  # b fails its first delivery: the retry goes to a
    auth = WebhookAuth(header=("X-Hook", "s3cret-value"))

    def receiver(name: str):
        async def handle(request: web.Request) -> web.Response:
            assert auth.check(await request.read(), request.headers) == "header"
            hits[name] += 1
            if failing.get(name):
                failing[name] -= 1
                return web.Response(status=503)
            return web.Response(status=200)
        return handle

    runners, urls = [], []
    for name in ("a", "b"):
        app = web.Application()
        app.router.add_post("/hook", receiver(name))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook")
    sandbox = Sandbox(webhook_url=" , ".join(urls), webhook_auth=auth, recordings_dir=tmp_path)
    try:
        for _ in range(4):
            assert await sandbox._deliver({"statuses": []})
        # a, b (503) -> a, b, a: four webhooks, five attempts, b's failure retried on a
        assert hits == {"a": 3, "b": 2} and sandbox.webhooks_sent == 4
    finally:
        await sandbox.close()
        for runner in runners:
            await runner.cleanup()
