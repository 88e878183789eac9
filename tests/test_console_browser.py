"""The QA console in a real browser: headless Chromium (Playwright) against a real
``wacall serve --sandbox`` process. Logs in, watches a call appear in the list live and end,
opens it, plays its recording (``currentTime`` advances), sees the waveform drawn and seeks
by clicking it, hangs up a live call from its page, reads the permissions; a browser
without the cookie is sent to the login and refused by the API. Screenshots of every page
go to ``test-artifacts/console/`` (``WACALL_TEST_ARTIFACTS`` to move it).

Like the Chromium interop tests: skipped without Chromium/Playwright, failing in CI."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest

from gateway.sandbox.browser import CHROMIUM_ARGS, DEFAULT_CHROMIUM, write_tone_wav
from tests.helpers import free_port
from tests.processes import ROOT, poll_until, serve, stop, wait_healthy

TOKEN = "console-browser-token-0123456789abcdef"
USER = "+4915112345612"
TIMEOUT = 30
MS = TIMEOUT * 1000
ARTIFACTS = Path(os.environ.get("WACALL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "console"


def unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the console browser tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"console browser tests skipped: {reason}")


@pytest.fixture
async def browser():
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        unavailable("playwright is not installed (tools/install-chromium.sh)")
    executable = os.environ.get("WACALL_CHROMIUM") or DEFAULT_CHROMIUM
    if not os.access(executable, os.X_OK):
        unavailable(f"no Chromium at {executable} (tools/install-chromium.sh)")
    playwright = await async_playwright().start()
    try:
        args = [a for a in CHROMIUM_ARGS if not a.startswith("--use-f")]
        instance = await playwright.chromium.launch(executable_path=executable, args=args, timeout=MS)
        try:
            yield instance
        finally:
            await instance.close()
    finally:
        await playwright.stop()


class Gateway:
    """``wacall serve --sandbox`` (gateway and provider in one process) with a token."""

    def __init__(self, tmp_path: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.data = tmp_path / "data"
        media = self.data / "media"
        media.mkdir(parents=True)
        write_tone_wav(media / "tone-1000.wav", 1000.0, 2.5, amplitude=0.3)
        write_tone_wav(media / "long-1000.wav", 1000.0, 60.0, amplitude=0.3)
        self.say = write_tone_wav(tmp_path / "say-600.wav", 600.0, 60.0, amplitude=0.3)
        self.env = {"WACALL_PORT": self.url.rsplit(":", 1)[1], "WACALL_DATA_DIR": str(self.data),
                    "WACALL_API_TOKEN": TOKEN, "WACALL_MEDIA_ADDRESSES": "127.0.0.1", "WACALL_WORKERS": "1"}
        self.log = tmp_path / "serve.log"
        self.api = aiohttp.ClientSession(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"})

    async def json(self, method: str, path: str, body: dict | None = None, status: int | None = None) -> dict:
        async with self.api.request(method, path, json=body) as resp:
            data = await resp.json()
            assert status is None or resp.status == status, (resp.status, data)
            return data

    async def call(self, play: str, *, record: bool) -> str:
        call = await self.json("POST", "/v1/calls", {"to": USER, "play": [play], "record": record}, status=201)
        return call["id"]

    async def state(self, call_id: str) -> dict:
        return await self.json("GET", f"/v1/calls/{call_id}")


@pytest.fixture
async def gateway(tmp_path):
    gw = Gateway(tmp_path)
    proc = serve(gw.env, sandbox=True, log=gw.log)
    try:
        await wait_healthy(gw.url, proc)
        await gw.json("POST", f"/sandbox/users/{USER}", {"answer_after_ms": 0, "say": str(gw.say)})
        await gw.json("POST", f"/sandbox/users/{USER}/permission", {"permanent": True})
        await poll_until(lambda: gw.json("GET", f"/v1/permissions/{USER}"), lambda p: p["status"] == "granted")
        yield gw
    finally:
        await gw.api.close()
        stop(proc)


# (The pages' CSP forbids eval, so waiting is done with selectors and eval_on_selector
# polls, never page.wait_for_function with a string.)


async def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_console_in_chromium(browser, gateway):
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # log in: the console sends us to the login page, then back
    await page.goto(f"{gateway.url}/console", timeout=MS)
    assert page.url.startswith(f"{gateway.url}/console/login")
    await shot(page, "login")
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{gateway.url}/console", timeout=MS)

    # a recorded call appears in the open list without a reload, and ends there
    call_id = await gateway.call("tone-1000.wav", record=True)
    row = f'#calls tr[data-call-id="{call_id}"]'
    await page.wait_for_selector(row, timeout=MS)
    await page.wait_for_selector(f'{row}[data-state="media_connected"]', timeout=MS)
    await poll_until(lambda: gateway.state(call_id), lambda c: (c["connected_seconds"] or 0) >= 2.6, TIMEOUT)
    await gateway.json("DELETE", f"/v1/calls/{call_id}", status=200)
    await page.wait_for_selector(f'{row}[data-state="ended"]', timeout=MS)
    assert "business_hangup" in await page.inner_text(row)

    # its page: waveform drawn (not blank), audio plays, a click on the waveform seeks
    await page.click(f"{row} a")
    await page.wait_for_url(f"{gateway.url}/console/calls/{call_id}", timeout=MS)
    stereo = 'figure.recording[data-file="stereo.wav"]'
    await page.wait_for_selector(f'{stereo} canvas[data-drawn="true"]', timeout=MS)
    inked = await page.eval_on_selector(f"{stereo} canvas", """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n / (c.width * c.height); }""")
    assert inked > 0.05, f"the waveform is (nearly) blank: {inked:.3f} of its pixels inked"
    await page.eval_on_selector(f"{stereo} audio", "a => a.play()")
    await poll_until(lambda: page.eval_on_selector(f"{stereo} audio", "a => a.currentTime"),
                     lambda t: t > 0.5, TIMEOUT)
    await page.eval_on_selector(f"{stereo} audio", "a => a.pause()")
    duration = await page.eval_on_selector(f"{stereo} audio", "a => a.duration")
    assert 2.3 < duration < 4.0
    box = await page.locator(f"{stereo} canvas").bounding_box()
    await page.mouse.click(box["x"] + box["width"] * 0.75, box["y"] + box["height"] / 2)
    position = await page.eval_on_selector(f"{stereo} audio", "a => a.currentTime")
    assert abs(position - 0.75 * duration) < 0.25, (position, duration)
    assert "media_connected" in await page.inner_text("table.timeline")
    await shot(page, "call")

    # a live call: hung up from its page
    live_id = await gateway.call("long-1000.wav", record=False)
    await poll_until(lambda: gateway.state(live_id), lambda c: c["state"] == "media_connected", TIMEOUT)
    await page.goto(f"{gateway.url}/console/calls/{live_id}", timeout=MS)
    await shot(page, "live-call")
    await page.click("form.hangup button")
    ended = await poll_until(lambda: gateway.state(live_id), lambda c: c["state"] == "ended", TIMEOUT)
    assert ended["end_reason"] == "business_hangup"
    await page.wait_for_selector("#call-state.state-ended", timeout=MS)

    await page.goto(f"{gateway.url}/console", timeout=MS)
    await shot(page, "calls")
    await page.goto(f"{gateway.url}/console/permissions", timeout=MS)
    assert "granted" in await page.inner_text("table.permissions")
    await shot(page, "permissions")
    assert not errors, errors

    # a browser without the cookie: pages send it to the login, the API refuses it
    stranger = await browser.new_context()
    other = await stranger.new_page()
    await other.goto(f"{gateway.url}/console/calls/{call_id}", timeout=MS)
    assert other.url.startswith(f"{gateway.url}/console/login")
    resp = await other.request.get(f"{gateway.url}/v1/calls/{call_id}/recordings/stereo.wav")
    assert resp.status == 401
    await stranger.close()
    await context.close()


async def test_chromium_plays_stereo_ogg_as_two_channels(browser, tmp_path):
    """The claim that any Ogg/Opus player takes stereo.ogg: Chromium's own decoder
    (``decodeAudioData``) gets two channels, the user's 600 Hz on the left and the
    business's 1 kHz on the right, a silence gap where the user sent nothing."""
    import asyncio
    import base64

    import numpy as np

    from media import analysis
    from media.opus import OpusEncoder
    from media.sinks.stereo_opus import AlignedOpusRecorder

    now = [0.0]
    recorder = AlignedOpusRecorder(tmp_path / "stereo.ogg", clock=lambda: now[0])
    user, business = OpusEncoder(), OpusEncoder()
    n = np.arange(960)
    for k in range(100):
        now[0] = k * 0.02
        left = (8000 * np.sin(2 * np.pi * 600 * (n + k * 960) / 48000)).astype(np.int16)
        right = (8000 * np.sin(2 * np.pi * 1000 * (n + k * 960) / 48000)).astype(np.int16)
        if not 50 <= k < 75:  # the user silent (sends nothing) from 1.0 to 1.5 s
            recorder.left.write_packet(user.encode(left), k * 960, now[0])
        recorder.right.write_packet(business.encode(right), k * 960, now[0])
    recorder.close()
    page = await browser.new_page()
    try:
        decoded = await asyncio.wait_for(page.evaluate(
            """async (b64) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const ctx = new OfflineAudioContext(2, 48000, 48000);
                const buffer = await ctx.decodeAudioData(bytes.buffer);
                return {channels: buffer.numberOfChannels, rate: buffer.sampleRate,
                        data: [0, 1].map(c => Array.from(buffer.getChannelData(c)))};
            }""", base64.b64encode((tmp_path / "stereo.ogg").read_bytes()).decode()), TIMEOUT)
    finally:
        await page.close()
    assert decoded["channels"] == 2 and decoded["rate"] == 48000
    left, right = (np.asarray(c, dtype=np.float32) for c in decoded["data"])
    assert left.size / 48000 == pytest.approx(2.0, abs=0.03)
    segments = analysis.tone_segments(left, 48000, 600)
    assert [(round(a, 1), round(b, 1)) for a, b in segments] == [(0.0, 1.0), (1.5, 2.0)]
    assert analysis.tone_seconds(right, 48000, 1000) >= 1.95
    assert analysis.tone_seconds(left, 48000, 1000) == analysis.tone_seconds(right, 48000, 600) == 0
