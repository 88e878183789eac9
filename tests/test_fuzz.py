"""Fuzzing the edges: the webhook endpoint and the control API of a running service
(gateway + sandbox, real HTTP). Seeded and bounded (a few hundred cases each, well under a
minute): no input gets a 500 or a traceback in the log, and input that is refused changes
nothing (no call, no permission, no stored event).

The service runs on its own event loop in a thread for the whole module; hypothesis
drives it from the test thread over HTTP, as a provider or a client would."""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from gateway.app import Service
from gateway.config import Settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted((ROOT / "fixtures" / "webhooks").glob("*.json"))
TOKEN = "fuzz-token-0123456789abcdef"
SEED_PAYLOADS = [json.loads(p.read_text()) for p in FIXTURES] + [
    {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp", "contacts": [{"wa_id": "4915100000001"}], "messages": [{
            "from": "4915100000001", "id": "wamid.f", "timestamp": "1749197000", "type": "interactive",
            "interactive": {"type": "call_permission_reply", "call_permission_reply": {
                "response": "accept", "is_permanent": False, "expiration_timestamp": "1749797000"}}}]}}]}]},
    {"event": "call_permission_status", "status": "GRANTED", "recipient": "4915100000002", "timestamp": "1"},
]

FUZZ = hsettings(derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                        HealthCheck.data_too_large])


class Tracebacks(logging.Handler):
    """Every log record that carries a traceback (a bug, whatever the input was)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class Running:
    """A Service on an event loop in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = settings
        self.service: Service | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fuzzed service", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self.service = await Service(self.settings, sandbox=True).start()
            # simulated users who neither answer permission requests nor calls: fuzzed
            # requests must not start real media
            users = self.service.sandbox.users
            users.default = replace(users.default, on_permission_request="ignore", on_call="reject")
            self._ready.set()
            await self._stop.wait()
            await self.service.stop()

        self.loop.run_until_complete(main())
        self.loop.close()

    def start(self) -> Running:
        self.thread.start()
        assert self._ready.wait(60), "the service did not start"
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(60)

    def on_loop(self, fn) -> Any:
        """``fn()`` on the service's loop (its state is not for other threads)."""
        async def call():
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        host, port = self.service.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def state(self) -> tuple:
        """What input could change: calls, permission ledger users, events published."""
        service = self.service
        return self.on_loop(lambda: (len(service.manager.calls), tuple(sorted(service.ledger.store.users())),
                                     service.events.bus.published))


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("fuzz") / "data", port=0, api_token=TOKEN,
                        media_addresses=["127.0.0.1"], inbound="reject", max_calls=20, speech_events=False)
    tracebacks = Tracebacks()
    for name in ("gateway", "media"):
        logging.getLogger(name).addHandler(tracebacks)
    server = Running(settings).start()
    server.tracebacks = tracebacks
    yield server
    server.stop()
    for name in ("gateway", "media"):
        logging.getLogger(name).removeHandler(tracebacks)


# -- webhooks ----------------------------------------------------------------------------------

#: Values that break parsers and what comes after them (dates, ledgers, dict keys).
NASTY = st.sampled_from([float("inf"), float("-inf"), float("nan"), 10**20, -1, 2**63, 0, True, None, [], {},
                         "", "\u0661\u0662\u0663", "１２３", "1e400", "Infinity", "NaN", "-", "0x10", " 42 ", "9" * 40])
LEAF = st.one_of(
    NASTY, st.none(), st.booleans(), st.integers(min_value=-(10**25), max_value=10**25),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=24),
    st.sampled_from(["", "wacid.x", "connect", "terminate", "RINGING", "ACCEPTED", "TERMINATE", "call_permission_reply",
                     "4915112345678", "\u0664\u0669\u0661\u0665\u0661\u0661\u0662\u0663\u0664\u0665", "1e400",
                     "USER_INITIATED", "BUSINESS_INITIATED", "v=0\r\n", "\x00", "𝟘𝟙"]))
JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, path + (index,))
    return out


def _get(root: Any, path: tuple) -> Any:
    for step in path:
        root = root[step]
    return root


def _set(root: Any, path: tuple, new: Any, delete: bool) -> Any:
    if not path:
        return new
    parent = root
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return root


@st.composite
def mutated_webhooks(draw) -> Any:
    payload = copy.deepcopy(draw(st.sampled_from(SEED_PAYLOADS)))
    for _ in range(draw(st.integers(1, 6))):
        paths = _paths(payload)
        leaves = [p for p in paths if not isinstance(_get(payload, p), (dict, list))]
        numeric = [p for p in leaves if p and str(p[-1]) in NUMERIC_KEYS]
        pick = draw(st.integers(0, 3))  # numbers people parse, any leaf, anything
        pool = numeric if pick == 0 and numeric else leaves if pick < 3 and leaves else paths
        path = draw(st.sampled_from(pool))
        value = draw(NASTY) if draw(st.booleans()) else draw(JSON)
        payload = _set(payload, path, value, delete=bool(path) and draw(st.integers(0, 4)) == 0)
    return payload


#: Fields that hold numbers (times, durations, codes) in the providers' payloads.
NUMERIC_KEYS = {"timestamp", "expiration_timestamp", "start_time", "end_time", "duration", "code",
                "is_permanent", "from", "recipient_id", "wa_id", "recipient"}


@hsettings(FUZZ, max_examples=800)
@given(payload=mutated_webhooks())
def test_fuzzed_webhooks_get_200_or_400_never_500(running, payload):
    service = running.service
    body = json.dumps(payload, allow_nan=True).encode()
    before = running.state()
    status, answer = running.request("POST", "/webhooks/whatsapp", body,
                                     {"Content-Type": "application/json", **service.webhook_auth.sign(body)})
    assert status in (200, 400), (status, answer[:300], body[:300])
    if status == 400:
        assert running.state() == before, "a refused webhook changed something"
    assert not running.tracebacks.records, [r.getMessage() for r in running.tracebacks.records]


@hsettings(FUZZ, max_examples=200)
@given(body=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_fuzzed_raw_bodies_and_unsigned_ones_never_500(running, body):
    service = running.service
    status, _ = running.request("POST", "/webhooks/whatsapp", body, service.webhook_auth.sign(body))
    assert status in (200, 400)
    status, _ = running.request("POST", "/webhooks/whatsapp", body, {"X-Hub-Signature-256": "sha256=00"})
    assert status == 401
    assert not running.tracebacks.records, [r.getMessage() for r in running.tracebacks.records]


# -- the control API --------------------------------------------------------------------------

NUMBERS = st.sampled_from(["+4915112345678", "+4915100000009", "4915100000009", "+49", "", "+\u0664\u0669\u0661\u0665",
                           "+49151000000099999999"]) | LEAF
CALL_FIELDS = {
    "to": NUMBERS, "play": LEAF | st.lists(LEAF, max_size=3), "record": LEAF,
    "biz_opaque_callback_data": LEAF, "ring_timeout_s": LEAF, "max_duration_s": LEAF,
    "bot": LEAF | st.fixed_dictionaries({}, optional={"protocol": LEAF | st.sampled_from(["twilio", "pcm", "audiosocket"]),
                                                      "url": LEAF | st.sampled_from(["ws://127.0.0.1:9/x", "ws://169.254.169.254/",
                                                                                     "tcp://h:0", "ws://:1/"]),
                                                      "parameters": JSON}),
    "if_no_permission": LEAF | st.sampled_from(["fail", "request"]),
    "permission_request": JSON, "permission_wait_s": LEAF,
}
CALL_BODIES = st.fixed_dictionaries({}, optional=CALL_FIELDS) | JSON


@hsettings(FUZZ, max_examples=500)
@given(body=CALL_BODIES)
def test_fuzzed_call_requests_never_500(running, body):
    raw = json.dumps(body, allow_nan=True).encode()  # (NaN and Infinity tokens too)
    status, answer = running.request("POST", "/v1/calls", raw,
                                     {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert status != 500, (answer[:300], raw[:300])
    assert status < 500 or json.loads(answer)["error"]["code"] in ("over_capacity", "bot_unavailable"), answer[:300]
    assert not running.tracebacks.records, [r.getMessage() for r in running.tracebacks.records]


PATHS = st.sampled_from(["/v1/calls", "/v1/calls/call_x", "/v1/calls/call_x/play", "/v1/calls/call_x/dtmf",
                         "/v1/permissions", "/v1/permissions/+4915100000009", "/v1/permissions/xyz/request",
                         "/v1/events?call_id=\x00", "/v1/openapi.json", "/metrics", "/readyz", "/nope", "/v1/",
                         "/webhooks/whatsapp?hub.mode=subscribe&hub.verify_token=x", "/sandbox/clock"])


@hsettings(FUZZ, max_examples=400)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), path=PATHS, body=JSON,
       token=st.sampled_from([TOKEN, "wrong", "", "\u00e9"]))
def test_fuzzed_routes_methods_and_tokens_never_500(running, method, path, body, token):
    if path.startswith("/v1/events") and method == "GET" and token == TOKEN:
        return  # (a stream: it does not end)
    status, answer = running.request(method, path.replace("\x00", "%00"), json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {token}".encode("utf-8").decode("latin-1"),
                                      "Content-Type": "application/json"})
    assert status != 500, answer[:300]
    if status >= 400 and path.startswith("/v1/"):
        assert json.loads(answer)["error"]["code"]
    assert not running.tracebacks.records, [r.getMessage() for r in running.tracebacks.records]


def test_the_fuzzed_service_still_works(running):
    """After all that: the service answers and nothing is stuck."""
    status, answer = running.request("GET", "/readyz")
    assert status in (200, 503)
    status, answer = running.request("GET", "/v1/calls", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
