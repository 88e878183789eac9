"""The QA console over HTTP (no browser; tests/test_console_browser.py drives Chromium):
logging in (cookie flags, wrong token, lockout, no open redirect), what the cookie may and
may not do on the API, CSRF on forms, the pages' content (masked users, escaped input,
recordings with their waveform endpoint, permissions with what is left), and the console
being off without an API token."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit
from dataclasses import replace

import aiohttp
import pytest

from gateway.app import Service
from gateway.calls import CallState
from gateway.console.session import COOKIE, ConsoleAuth
from gateway.sandbox.browser import write_tone_wav
from media.sources.tone import ToneSource
from tests.helpers import until

TOKEN = "console-test-token-0123456789abcdef"
USER = "+4915112345611"
TIMEOUT = 20


@pytest.fixture
async def console(settings, tmp_path):
    async with Service(replace(settings, api_token=TOKEN), sandbox=True) as service:
        say = write_tone_wav(tmp_path / "say-600.wav", 600.0, 30.0, amplitude=0.3)
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0, "say": str(say)})
        yield service


def session(service, **kwargs) -> aiohttp.ClientSession:
    # (the cookie jar keeps cookies for 127.0.0.1 only when unsafe=True)
    return aiohttp.ClientSession(base_url=service.url, cookie_jar=aiohttp.CookieJar(unsafe=True), **kwargs)


async def login(http: aiohttp.ClientSession, token: str = TOKEN, next_page: str = "/console") -> aiohttp.ClientResponse:
    async with http.get("/console/login") as resp:
        assert resp.status == 200
    async with http.post("/console/login", data={"token": token, "next": next_page}, allow_redirects=False) as resp:
        await resp.read()
        return resp


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has a CSRF field"
    return found.group(1)


async def recorded_call(service, opaque: str | None = None):
    call = await service.manager.place_call(USER, sources=[ToneSource(1000, 1.0)], record=True,
                                            **({"biz_opaque_callback_data": opaque} if opaque else {}))
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    await call.wait_playback()
    await call.hangup()
    await call.wait_finished(TIMEOUT)
    return call


async def test_login_sets_a_strict_httponly_cookie_and_guards_pages(console):
    async with session(console) as http:
        # no cookie: pages send the browser to the login, the API says 401
        async with http.get("/console/calls/abc?x=1", allow_redirects=False) as resp:
            assert resp.status == 303
            location = urlsplit(resp.headers["Location"])
            assert location.path == "/console/login"
            assert parse_qs(location.query) == {"next": ["/console/calls/abc?x=1"]}
        async with http.get("/v1/recordings") as resp:
            assert resp.status == 401
        async with http.get("/console/static/console.js") as resp:  # (public: no secrets in it)
            assert resp.status == 200 and resp.content_type == "text/javascript"

        wrong = await login(http, token="not-the-token")
        assert wrong.status == 401 and COOKIE not in wrong.cookies
        ok = await login(http, next_page="/console/permissions")
        assert ok.status == 303 and ok.headers["Location"] == "/console/permissions"
        cookie = ok.headers["Set-Cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "path", "max-age"} <= flags
        assert "SameSite=Strict" in cookie and "Path=/" in cookie
        assert TOKEN not in cookie

        async with http.get("/console") as resp:
            assert resp.status == 200
            html = await resp.text()
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["Cache-Control"] == "no-store"
        assert "<script>" not in html  # (no inline script: the CSP forbids it)
        # the cookie reads the API (audio, waveform, events), never changes it
        async with http.get("/v1/recordings") as resp:
            assert resp.status == 200
        async with http.post("/v1/calls", json={"to": USER}) as resp:
            assert resp.status == 401
        async with http.delete("/v1/calls/call_x") as resp:
            assert resp.status == 401

        # logging out ends the session
        async with http.post("/console/logout", data={"csrf": csrf_of(html)}, allow_redirects=False) as resp:
            assert resp.status == 303
        async with http.get("/console", allow_redirects=False) as resp:
            assert resp.status == 303


async def test_forged_cookie_open_redirect_and_lockout(console):
    async with session(console) as http:
        http.cookie_jar.update_cookies({COOKIE: "9999999999.abc.forged"})
        async with http.get("/console", allow_redirects=False) as resp:
            assert resp.status == 303
        for target in ("//evil.example/", "https://evil.example/", "/console/\\evil", "/v1/calls"):
            resp = await login(http, next_page=target)
            assert resp.headers["Location"] == "/console", target
    async with session(console) as http:
        for _ in range(10):
            assert (await login(http, token="guess")).status == 401
        resp = await login(http)  # (locked: even the right token waits)
        assert resp.status == 429


async def test_bearer_header_works_on_pages_without_csrf(console):
    call = await recorded_call(console)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session(console, headers=headers) as http:
        async with http.get(f"/console/calls/{call.id}") as resp:
            assert resp.status == 200
        async with http.get("/console", headers={"Authorization": "Bearer wrong"}, allow_redirects=False) as resp:
            assert resp.status == 303


async def test_call_page_lists_recordings_and_escapes_input(console):
    opaque = '<script>alert("x")</script>'
    call = await recorded_call(console, opaque=opaque)
    async with session(console) as http:
        await login(http)
        async with http.get("/console") as resp:
            listing = await resp.text()
        assert f'data-call-id="{call.id}"' in listing
        assert "+*********5611" in listing and USER not in listing  # masked
        async with http.get(f"/console/calls/{call.id}") as resp:
            assert resp.status == 200
            page = await resp.text()
        assert "<script>alert" not in page and "&lt;script&gt;alert" in page
        assert USER not in page
        for name in ("stereo.wav", "user.ogg"):
            assert f'src="/v1/calls/{call.id}/recordings/{name}"' in page
            assert f"/v1/calls/{call.id}/waveform?file={name}&amp;width=" in page
        assert "business_hangup" in page and "media_connected" in page
        assert "Hang up" not in page  # (ended)
        # what the page points at answers with the cookie alone
        async with http.get(f"/v1/calls/{call.id}/waveform", params={"file": "stereo.wav", "width": "100"}) as resp:
            wave = await resp.json()
            assert resp.status == 200 and wave["channels"] == 2
        async with http.get(f"/v1/calls/{call.id}/recordings/stereo.wav", headers={"Range": "bytes=0-99"}) as resp:
            assert resp.status == 206 and len(await resp.read()) == 100
        async with http.get("/console/calls/call_nope") as resp:
            assert resp.status == 404 and "No such call" in await resp.text()
        async with http.get("/console", params={"since": "yesterday"}) as resp:
            assert resp.status == 200 and "must be a date" in await resp.text()
        async with http.get("/console", params={"state": "ended", "user": USER}) as resp:
            assert call.id in await resp.text()
        async with http.get("/console", params={"state": "ringing"}) as resp:
            assert call.id not in await resp.text()


async def test_hangup_form_needs_its_csrf_token(console):
    call = await console.manager.place_call(USER, sources=[ToneSource(1000, 30.0)])
    await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
    async with session(console) as http:
        await login(http)
        async with http.get(f"/console/calls/{call.id}") as resp:
            page = await resp.text()
        assert "Hang up" in page
        async with http.post(f"/console/calls/{call.id}/hangup", data={"csrf": "forged"}) as resp:
            assert resp.status == 403
        assert not call.ended
        async with http.post(f"/console/calls/{call.id}/hangup", data={"csrf": csrf_of(page)},
                             allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == f"/console/calls/{call.id}"
        await call.wait_finished(TIMEOUT)
        assert call.end_reason.value == "business_hangup"


async def test_permissions_page_shows_what_is_left(console):
    call = await recorded_call(console)
    assert call.ended
    async with session(console) as http:
        await login(http)
        async with http.get("/console/permissions") as resp:
            page = await resp.text()
    row = re.search(r"<tr>\s*<td class=\"user\">\+\*+5611</td>(.*?)</tr>", page, re.S)
    assert row, page
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    assert "granted" in cells[0]
    assert cells[3].strip() == "4"  # calls left of the seed's 5 per 24 h, one made


async def test_console_is_off_without_an_api_token(settings):
    async with Service(replace(settings, api_token=None), sandbox=True) as service:
        async with session(service) as http:
            async with http.get("/console") as resp:
                assert resp.status == 404 and "console is off" in (await resp.text()).lower()
            async with http.post("/console/login", data={"token": ""}) as resp:
                assert resp.status == 404


def test_session_cookie_expires_and_follows_the_token():
    now = [1_000_000.0]
    auth = ConsoleAuth("token-a", session_s=60, clock=lambda: now[0])
    cookie = auth.issue()
    session_ = auth.session(cookie)
    assert session_ is not None and session_.by_cookie
    assert auth.csrf_ok(session_, auth.csrf(session_)) and not auth.csrf_ok(session_, "x")
    assert ConsoleAuth("token-b", clock=lambda: now[0]).session(cookie) is None  # rotated token
    assert auth.session(cookie.replace(".", "x", 1)) is None
    now[0] += 61
    assert auth.session(cookie) is None
    assert ConsoleAuth(None).session(cookie) is None and not ConsoleAuth(None).token_matches("")


async def test_call_page_shows_whatsapps_transcript_and_dtmf(settings, tmp_path):
    from gateway.recordings import ProviderRecording

    async with Service(replace(settings, api_token=TOKEN, provider="meta"), sandbox=True) as service:
        events = []
        service.events.bus.add_listener(events.append)
        await service.sandbox.grant(USER, permanent=True)
        service.sandbox.users.update(USER, {"answer_after_ms": 0})
        call = await service.manager.place_call(
            USER, sources=[ToneSource(1000, 30.0)],
            provider_recording=ProviderRecording("quality assurance", transcription=True))
        await call.wait_state(CallState.MEDIA_CONNECTED, TIMEOUT)
        await service.sandbox.calls[call.wacid].phone.press("42#")
        await until(lambda: "".join(call.dtmf_received) == "42#", TIMEOUT)
        await call.hangup()
        await call.wait_finished(TIMEOUT)
        await until(lambda: any(e.type == "call.transcription_available" for e in events), TIMEOUT)
        async with session(service) as http:
            await login(http)
            async with http.get(f"/console/calls/{call.id}") as resp:
                page = await resp.text()
    assert "<h2>Transcript</h2>" in page and "simulated transcript" in page
    assert '<dd class="dtmf">42#</dd>' in page
    assert 'data-file="whatsapp-recording.ogg"' in page  # WhatsApp's own recording, playable
