"""Provider clients against a real loopback HTTP server with canned answers."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.errors import (
    CallLimitExceededError,
    InvalidSdpError,
    NoPermissionError,
    PermissionExpiredError,
    ProviderError,
    ProviderUnavailableError,
)
from gateway.providers import (
    CallingProvider,
    D360Provider,
    MetaProvider,
    make_provider,
)

API_KEY = "d360-key-0123456789abcdefghijklmnop"
TOKEN = "EAAG-token-0123456789abcdefghijklmnopqrstuvwxyz"
PNID = "436666719526789"
SDP = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
WACID = "wacid.HBgLMTIxODU1NTI4MjgVAgARGCAyODRQIAFRoA"
OK = (200, {"messaging_product": "whatsapp", "success": True})
CONNECTED = (200, {"messaging_product": "whatsapp", "calls": [{"id": WACID}]})


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: dict[str, str] | None = None


class FakeProvider:
    """Records requests; answers each with the next canned response.

    A response is ``(status, body)`` (dict -> JSON, str -> text/html, None ->
    empty), or ``"hang"`` (never answers) or ``"drop"`` (closes the socket).
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.responses: list[Any] = []
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        text = await request.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), body, dict(request.query)))
        answer = self.responses.pop(0) if self.responses else OK
        if answer == "hang":
            await self.release.wait()
            return web.Response(status=204)
        if answer == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=204)
        status, payload, *extra = answer
        headers = extra[0] if extra else None  # (status, body, headers)
        if isinstance(payload, dict):
            return web.json_response(payload, status=status, headers=headers)
        if payload is None:
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, text=payload, content_type="text/html", headers=headers)


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    fp = FakeProvider()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fp.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    fp.url = str(server.make_url("/")).rstrip("/")
    yield fp
    fp.release.set()
    await server.close()


def _build(kind: str, base_url: str, **kw: Any) -> CallingProvider:
    if kind == "360dialog":
        return D360Provider(API_KEY, base_url=base_url, **kw)
    return MetaProvider(TOKEN, PNID, base_url=base_url, **kw)


EXPECTED = {
    "360dialog": ("/calling/calls", "D360-API-KEY", API_KEY),
    "meta": (f"/v23.0/{PNID}/calls", "Authorization", f"Bearer {TOKEN}"),
}


@pytest.fixture(params=["360dialog", "meta"])
async def provider(
    request: pytest.FixtureRequest, fake: FakeProvider
) -> AsyncIterator[CallingProvider]:
    prov = _build(request.param, fake.url, timeout=5.0)
    yield prov
    await prov.close()


def _check_request(fake: FakeProvider, provider: CallingProvider) -> Recorded:
    assert len(fake.requests) == 1
    req = fake.requests[0]
    path, header, value = EXPECTED[provider.name]
    assert req.method == "POST"
    assert req.path == path
    assert req.headers[header] == value
    assert req.headers["Content-Type"].startswith("application/json")
    return req


# -- request shapes ---------------------------------------------------------------


async def test_connect_request_and_call_id(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append(CONNECTED)
    call_id = await provider.connect("+49 151 1234 5678", SDP, "campaign=42;lead=9913")
    assert call_id == WACID
    req = _check_request(fake, provider)
    assert req.body == {
        "messaging_product": "whatsapp",
        "to": "4915112345678",
        "action": "connect",
        "session": {"sdp_type": "offer", "sdp": SDP},
        "biz_opaque_callback_data": "campaign=42;lead=9913",
    }


async def test_connect_without_callback_data(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append(CONNECTED)
    await provider.connect("4915112345678", SDP)
    assert "biz_opaque_callback_data" not in _check_request(fake, provider).body


async def test_pre_accept(fake: FakeProvider, provider: CallingProvider) -> None:
    assert await provider.pre_accept(WACID, SDP) is None
    assert _check_request(fake, provider).body == {
        "messaging_product": "whatsapp", "call_id": WACID, "action": "pre_accept",
        "session": {"sdp_type": "answer", "sdp": SDP},
    }


async def test_accept(fake: FakeProvider, provider: CallingProvider) -> None:
    await provider.accept(WACID, SDP, biz_opaque_callback_data="ticket=5512")
    assert _check_request(fake, provider).body == {
        "messaging_product": "whatsapp", "call_id": WACID, "action": "accept",
        "session": {"sdp_type": "answer", "sdp": SDP},
        "biz_opaque_callback_data": "ticket=5512",
    }


@pytest.mark.parametrize("action", ["reject", "terminate"])
async def test_reject_and_terminate(
    fake: FakeProvider, provider: CallingProvider, action: str
) -> None:
    fake.responses.append((200, {"success": True}))
    await getattr(provider, action)(WACID)
    assert _check_request(fake, provider).body == {
        "messaging_product": "whatsapp", "call_id": WACID, "action": action,
    }


async def test_meta_custom_version(fake: FakeProvider) -> None:
    prov = MetaProvider(TOKEN, PNID, base_url=fake.url + "/", version="v25.0")
    try:
        await prov.terminate(WACID)
    finally:
        await prov.close()
    assert fake.requests[0].path == f"/v25.0/{PNID}/calls"


async def test_default_urls() -> None:
    assert D360Provider(API_KEY).calls_url == "https://waba-v2.360dialog.io/calling/calls"
    assert (MetaProvider(TOKEN, PNID).calls_url
            == f"https://graph.facebook.com/v23.0/{PNID}/calls")


# -- validation before any network call -----------------------------------------------


async def test_callback_data_limit(fake: FakeProvider, provider: CallingProvider) -> None:
    with pytest.raises(ValueError, match="512"):
        await provider.connect("4915112345678", SDP, "x" * 513)
    with pytest.raises(ValueError, match="512"):
        await provider.accept(WACID, SDP, "x" * 513)
    assert fake.requests == []
    fake.responses.append(CONNECTED)
    await provider.connect("4915112345678", SDP, "x" * 512)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("to", ["", "+", "49-151-1234", "U.1349", "US13491208655302741918"])
async def test_connect_rejects_non_digit_numbers(fake: FakeProvider, provider: CallingProvider,
                                                 to: str) -> None:
    with pytest.raises(ValueError):
        await provider.connect(to, SDP)
    assert fake.requests == []


async def test_a_bsuid_is_the_recipient_on_meta_and_refused_by_360dialog(
        fake: FakeProvider, provider: CallingProvider) -> None:
    from gateway.providers.base import BsuidUnsupported

    bsuid = "US.ENT.11815799212886844830"
    if provider.name == "360dialog":
        for attempt in (provider.connect(bsuid, SDP), provider.send_permission_request(bsuid, "May we call?"),
                        provider.get_permission_state(bsuid)):
            with pytest.raises(BsuidUnsupported, match="does not document business-scoped user ids"):
                await attempt
        assert fake.requests == []
        return
    fake.responses.append(CONNECTED)
    await provider.connect(bsuid, SDP)
    body = fake.requests[0].body
    assert body["recipient"] == bsuid and "to" not in body
    fake.responses.append((200, {"messaging_product": "whatsapp", "messages": [{"id": "wamid.X"}]}))
    await provider.send_permission_request(bsuid, "May we call?")
    assert fake.requests[1].body["recipient"] == bsuid and "to" not in fake.requests[1].body
    fake.responses.append((200, {"messaging_product": "whatsapp", "permission": {"status": "no_permission"}}))
    await provider.get_permission_state(bsuid)
    assert fake.requests[2].query == {"recipient": bsuid}


async def test_empty_ids_rejected(fake: FakeProvider, provider: CallingProvider) -> None:
    with pytest.raises(ValueError):
        await provider.terminate("")
    with pytest.raises(ValueError):
        await provider.pre_accept(WACID, "")
    assert fake.requests == []


# -- error shapes ----------------------------------------------------------------------


GRAPH_138006 = {"error": {"message": "(#138006) No approved call permission",
                          "type": "OAuthException", "code": 138006,
                          "error_data": {
                              "messaging_product": "whatsapp",
                              "details": "No approved call permission from the recipient"},
                          "fbtrace_id": "AvQ3zL0xYbC"}}


async def test_graph_envelope(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append((401, GRAPH_138006))
    with pytest.raises(NoPermissionError) as info:
        await provider.connect("4915112345678", SDP)
    err = info.value
    assert err.code == 138006
    assert err.http_status == 401
    assert err.message == "(#138006) No approved call permission"
    assert err.resolution == "Request call permission (CPR) before initiating a call"
    assert err.details == "No approved call permission from the recipient"
    assert err.fbtrace_id == "AvQ3zL0xYbC"


async def test_graph_sdp_error_with_subcode(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append((400, {"error": {
        "message": "SDP validation error", "type": "OAuthException",
        "code": 138008, "error_subcode": 2593093, "fbtrace_id": "x"}}))
    with pytest.raises(InvalidSdpError) as info:
        await provider.connect("4915112345678", SDP)
    assert info.value.code == 138008 and info.value.subcode == 2593093


async def test_graph_code_100_details(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append((400, {"error": {
        "message": "(#100) Invalid parameter", "type": "OAuthException",
        "code": 100, "error_data": {"details": "Invalid SDP: ice-pwd"}}}))
    with pytest.raises(ProviderError) as info:
        await provider.pre_accept(WACID, SDP)
    assert type(info.value) is ProviderError
    assert info.value.code == 100
    assert info.value.to_dict() == {"code": 100, "message": "(#100) Invalid parameter",
                                    "resolution": info.value.resolution,
                                    "details": "Invalid SDP: ice-pwd"}


@pytest.mark.parametrize(("text", "cls", "code"), [
    ("(#138006) No approved call permission", NoPermissionError, 138006),
    ("Business call limit exceeded: 138012", CallLimitExceededError, 138012),
    ("(#138014) Invalid SDP", InvalidSdpError, 138014),
    ("Invalid api key", ProviderError, None),
])
async def test_360dialog_string_error(fake: FakeProvider, provider: CallingProvider,
                                      text: str, cls: type, code: int | None) -> None:
    fake.responses.append((400, {"error": text}))
    with pytest.raises(ProviderError) as info:
        await provider.connect("4915112345678", SDP)
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.message == text
    assert info.value.resolution
    assert info.value.http_status == 400


async def test_errors_list(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append((400, {"errors": [{"code": 138010, "title": "CPR expired",
                                             "details": "ask again"}]}))
    with pytest.raises(PermissionExpiredError) as info:
        await provider.connect("4915112345678", SDP)
    assert info.value.message == "CPR expired"
    assert info.value.details == "ask again"


async def test_json_500_with_code_is_typed(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append((500, {"error": {"message": "Connection error", "code": 138004}}))
    with pytest.raises(ProviderError) as info:
        await provider.connect("4915112345678", SDP)
    assert not isinstance(info.value, ProviderUnavailableError)
    assert info.value.code == 138004 and info.value.http_status == 500


@pytest.mark.parametrize(("status", "body", "unavailable"), [
    (502, "<html><body>Bad Gateway</body></html>", True),
    (503, None, True),
    (500, {"unexpected": True}, True),
    (400, "<html>Bad Request</html>", False),
    (404, None, False),
])
async def test_non_json_and_empty_http_errors(fake: FakeProvider, provider: CallingProvider,
                                              status: int, body: Any, unavailable: bool) -> None:
    fake.responses.append((status, body))
    with pytest.raises(ProviderError) as info:
        await provider.terminate(WACID)
    assert isinstance(info.value, ProviderUnavailableError) is unavailable
    assert info.value.code is None
    assert info.value.http_status == status
    assert str(status) in info.value.message
    if body is None:
        assert "empty body" in info.value.message


async def test_2xx_without_call_id(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append((200, {"messaging_product": "whatsapp", "calls": []}))
    with pytest.raises(ProviderError, match="no call id") as info:
        await provider.connect("4915112345678", SDP)
    assert not isinstance(info.value, ProviderUnavailableError)


async def test_2xx_non_json_connect_has_no_call_id(
    fake: FakeProvider, provider: CallingProvider
) -> None:
    fake.responses.append((200, "ok"))
    with pytest.raises(ProviderError, match="no call id"):
        await provider.connect("4915112345678", SDP)


async def test_success_false(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append((200, {"success": False}))
    with pytest.raises(ProviderError, match="success=false"):
        await provider.reject(WACID)


async def test_error_envelope_in_200(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append((200, GRAPH_138006))
    with pytest.raises(NoPermissionError):
        await provider.connect("4915112345678", SDP)


# -- network failures ------------------------------------------------------------------


async def test_timeout(fake: FakeProvider) -> None:
    fake.responses.append("hang")
    prov = _build("meta", fake.url, timeout=0.2)
    try:
        with pytest.raises(ProviderUnavailableError) as info:
            await prov.connect("4915112345678", SDP)
    finally:
        await prov.close()
    assert info.value.code is None
    assert "Timeout" in info.value.message
    assert len(fake.requests) == 1


async def test_server_drops_connection(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.append("drop")
    with pytest.raises(ProviderUnavailableError):
        await provider.terminate(WACID)


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prov = _build("360dialog", f"http://127.0.0.1:{port}", timeout=2.0)
    try:
        with pytest.raises(ProviderUnavailableError) as info:
            await prov.connect("4915112345678", SDP)
    finally:
        await prov.close()
    assert info.value.__cause__ is not None


# -- sessions, logging, factory ----------------------------------------------------------


async def test_shared_session_is_not_closed(fake: FakeProvider) -> None:
    async with aiohttp.ClientSession() as session:
        prov = _build("360dialog", fake.url, session=session)
        await prov.terminate(WACID)
        await prov.close()
        assert not session.closed


async def test_owned_session_is_closed(fake: FakeProvider) -> None:
    prov = _build("meta", fake.url)
    await prov.terminate(WACID)
    session = prov._session
    assert session is not None and not session.closed
    await prov.close()
    assert session.closed
    await prov.close()  # idempotent


async def test_logs_mask_phone_and_never_show_credentials(
    fake: FakeProvider, provider: CallingProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.responses.extend([CONNECTED, (401, GRAPH_138006)])
    await provider.connect("4915112345678", SDP)
    with pytest.raises(NoPermissionError):
        await provider.connect("4915112345678", SDP)
    text = caplog.text
    assert "*********5678" in text and WACID in text
    assert "4915112345678" not in text
    assert API_KEY not in text and TOKEN not in text
    assert API_KEY not in repr(provider) and TOKEN not in repr(provider)


@pytest.mark.parametrize(("name", "kw", "cls"), [
    ("360dialog", {"api_key": API_KEY}, D360Provider),
    ("d360", {"api_key": API_KEY}, D360Provider),
    (" D360 ", {"api_key": API_KEY}, D360Provider),
    ("meta", {"token": TOKEN, "phone_number_id": PNID}, MetaProvider),
])
def test_make_provider(name: str, kw: dict[str, str], cls: type) -> None:
    prov = make_provider(name, **kw)
    assert type(prov) is cls
    assert prov.name in {"360dialog", "meta"}


def test_make_provider_unknown_name() -> None:
    with pytest.raises(ValueError, match="360dialog.*d360.*meta"):
        make_provider("twilio", api_key="x")


def test_constructor_requires_credentials() -> None:
    with pytest.raises(ValueError):
        D360Provider("")
    with pytest.raises(ValueError):
        MetaProvider("", PNID)
    with pytest.raises(ValueError):
        MetaProvider(TOKEN, "")


# -- call permissions ---------------------------------------------------------------

SENT = (200, {"messaging_product": "whatsapp", "contacts": [{"wa_id": "4915112345678"}],
              "messages": [{"id": "wamid.cpr1"}]})
MESSAGES_PATH = {"360dialog": "/messages", "meta": f"/v23.0/{PNID}/messages"}


async def test_interactive_permission_request(provider: CallingProvider, fake: FakeProvider) -> None:
    fake.responses.append(SENT)
    assert await provider.send_permission_request("+49 1511 2345678", "May we call you?") == "wamid.cpr1"
    [req] = fake.requests
    assert (req.method, req.path) == ("POST", MESSAGES_PATH[provider.name])
    assert req.body == {
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": "4915112345678",
        "type": "interactive",
        "interactive": {"type": "call_permission_request", "action": {"name": "call_permission_request"},
                        "body": {"text": "May we call you?"}}}


async def test_template_with_positional_and_named_parameters(provider: CallingProvider,
                                                             fake: FakeProvider) -> None:
    fake.responses += [SENT, SENT]
    await provider.send_template("4915112345678", "sample_cpr_template_test", "en", ["ON-12345", "Avocados"])
    await provider.send_template("4915112345678", "order_call_ok", "en_US", {"first_name": "Ana"})
    first, second = (r.body["template"] for r in fake.requests)
    assert first == {"name": "sample_cpr_template_test", "language": {"code": "en"}, "components": [
        {"type": "body", "parameters": [{"type": "text", "text": "ON-12345"},
                                        {"type": "text", "text": "Avocados"}]}]}
    assert second["components"][0]["parameters"] == [
        {"type": "text", "parameter_name": "first_name", "text": "Ana"}]
    assert all(r.body["type"] == "template" and r.path == MESSAGES_PATH[provider.name] for r in fake.requests)


async def test_create_permission_template(provider: CallingProvider, fake: FakeProvider) -> None:
    fake.responses.append((200, {"id": "tpl1", "status": "PENDING", "category": "MARKETING"}))
    result = await provider.create_permission_template(
        name="sample_cpr_template_test", language="en", category="MARKETING",
        body_text="We would like to call you about Order {{1}} containing {{2}}. Can we call you?",
        example_values=["ON-12345", "Avocados"], footer="Talk to you soon!", waba_id="366634483210360")
    assert result["status"] == "PENDING"
    [req] = fake.requests
    component = "CALL_PERMISSION_REQUEST" if provider.name == "360dialog" else "call_permission_request"
    assert req.path == ("/v1/configs/templates" if provider.name == "360dialog"
                        else "/v23.0/366634483210360/message_templates")
    assert req.body["components"] == [
        {"type": "BODY", "text": "We would like to call you about Order {{1}} containing {{2}}. Can we call you?",
         "example": {"body_text": [["ON-12345", "Avocados"]]}},
        {"type": "FOOTER", "text": "Talk to you soon!"},
        {"type": component}]
    with pytest.raises(ValueError):
        await provider.create_permission_template(name="x", language="en", body_text="b", category="AUTH")


async def test_permission_state_and_settings(provider: CallingProvider, fake: FakeProvider) -> None:
    state = {"messaging_product": "whatsapp", "permission": {"status": "temporary", "expiration_time": 1767225600},
             "actions": [{"action_name": "start_call", "can_perform_action": True,
                          "limits": [{"time_period": "PT24H", "max_allowed": 100, "current_usage": 1}]}]}
    fake.responses += [(200, state), OK]
    assert await provider.get_permission_state("+4915112345678") == state
    await provider.update_call_settings({"callback_permission_status": "ENABLED"})
    get, post = fake.requests
    if provider.name == "360dialog":
        assert (get.method, get.path) == ("GET", "/calling/permissions/4915112345678")
        assert post.path == "/calling/settings"
    else:
        assert (get.method, get.path) == ("GET", f"/v23.0/{PNID}/call_permissions")
        assert post.path == f"/v23.0/{PNID}/settings"
    assert post.body == {"calling": {"callback_permission_status": "ENABLED"}}


async def test_permission_request_refused_is_typed(provider: CallingProvider, fake: FakeProvider) -> None:
    from gateway.errors import TooManyPermissionRequestsError

    fake.responses.append((400, {"error": {"message": "Too many CPR requests", "code": 138011}}))
    with pytest.raises(TooManyPermissionRequestsError) as info:
        await provider.send_permission_request("4915112345678", "May we call?")
    assert info.value.resolution


# -- provider faults ---------------------------------------------------------------------------


async def test_reads_are_retried_with_backoff(fake: FakeProvider, provider: CallingProvider) -> None:
    fake.responses.extend([(503, None), "drop", (200, {"data": [{"permission": {"status": "granted"}}]})])
    state = await provider.get_permission_state("+4915112345678")
    assert len(fake.requests) == 3 and all(r.method == "GET" for r in fake.requests)
    assert state


async def test_a_429_retry_after_is_honoured_and_surfaced(fake: FakeProvider, provider: CallingProvider) -> None:
    import time as _time

    limited = (429, {"error": {"message": "slow down", "code": 4}}, {"Retry-After": "0"})
    fake.responses.extend([limited, (200, {"data": []})])
    await provider.get_permission_state("+4915112345678")  # retried after Retry-After: 0
    assert len(fake.requests) == 2
    fake.responses.append((429, {"error": {"message": "slow down", "code": 4}}, {"Retry-After": "7"}))
    with pytest.raises(ProviderError) as info:
        await provider.connect("+4915112345678", "v=0")  # an action: not retried
    assert info.value.retry_after_s == 7.0
    assert 5.0 < info.value.retry_at - _time.time() <= 7.0


async def test_a_5xx_on_connect_says_do_not_retry_blindly(fake: FakeProvider, provider: CallingProvider) -> None:
    for answer in [(500, {"error": {"message": "Internal", "code": 131000}}), (502, "<html>bad gateway</html>")]:
        fake.responses.append(answer)
        with pytest.raises(ProviderError) as info:
            await provider.connect("+4915112345678", "v=0")
        assert "do not blindly retry" in info.value.resolution
    assert len(fake.requests) == 2  # never retried


async def test_an_error_echoing_our_credentials_is_scrubbed(fake: FakeProvider, provider: CallingProvider) -> None:
    secret = API_KEY if isinstance(provider, D360Provider) else TOKEN
    fake.responses.append((401, {"error": {"message": f"bad key {secret}", "code": 190,
                                           "error_data": {"details": f"key={secret}"}}}))
    with pytest.raises(ProviderError) as info:
        await provider.terminate("wacid.X")
    assert secret not in info.value.message and secret not in (info.value.details or "")
    assert secret not in str(info.value)
