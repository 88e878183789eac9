"""The embedded sandbox: an emulator of the provider's calling API, as strict as Meta.

It serves both URL shapes wacall's clients speak:

* 360dialog: ``POST /calling/calls`` with ``D360-API-KEY``;
* Meta Graph: ``POST /{version}/{phone_number_id}/calls`` with a bearer token;

so a provider client pointed at the sandbox's base URL works unchanged. Offers are
checked as Meta checks them (Opus, candidates inside, a single sha-256 fingerprint,
``a=setup:actpass``…) and refused with error 138014 otherwise. Each call rings a
simulated user whose :class:`~gateway.sandbox.phone.Phone` is a real WebRTC peer, and
the provider's webhooks (``connect`` with the answer, ``RINGING``, ``ACCEPTED`` or
``REJECTED``, ``terminate`` with the duration) are POSTed to the gateway's webhook URL.

Admin routes (sandbox only): ``POST /users/{user}`` sets a user's behaviour,
``GET /users/{user}/calls`` lists the calls that user received.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from media import sdp as sdp_rules
from media.peer import MediaError, PeerConfig
from media.sources.prompt import PromptCache

from ..redact import mask_phone
from ..webhook_auth import WebhookAuth
from ..permissions import PermissionLimits
from .messaging import Refusal, SandboxClock, SandboxMessaging
from ..recordings import ANNOUNCEMENT_LANGUAGES
from .phone import Phone
from .users import DEFAULT_ORDER, UserBehaviour, UserDirectory

log = logging.getLogger(__name__)

MAX_CALLBACK_DATA = 512


#: A request the provider refuses; becomes a Graph error response.
SandboxRefusal = Refusal


@dataclass(slots=True)
class SandboxCall:
    wacid: str
    user: str
    behaviour: UserBehaviour
    phone: Phone
    direction: str = "BUSINESS_INITIATED"
    biz_opaque_callback_data: str | None = None
    state: str = "ringing"
    created_at: float = field(default_factory=time.time)
    accepted_at: float | None = None
    ended_at: float | None = None
    end_status: str | None = None
    ended_by: str | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    #: Inbound calls: the SDP answer given in pre_accept (accept must repeat it).
    pre_accept_sdp: str | None = None
    hangup_after_s: float | None = None
    #: WhatsApp's own recording / transcription asked on connect or accept.
    recording: dict | None = None
    transcription: dict | None = None

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    def as_dict(self) -> dict:
        return {
            "id": self.wacid,
            "user": self.user,
            "direction": self.direction,
            "state": self.state,
            "ended_by": self.ended_by,
            "end_status": self.end_status,
            "accepted": self.accepted_at is not None,
            "duration_s": self.duration,
            "phone_recording": str(self.phone.recording_path),
            "heard_seconds": round(self.phone.received.seconds, 3),
            "dtmf_received": "".join(self.phone.dtmf_received),
        }

    @property
    def duration(self) -> int | None:
        if self.accepted_at is None:
            return None
        return int(round((self.ended_at or time.time()) - self.accepted_at))


class Sandbox:
    """The provider emulator and its simulated users. Mount :meth:`app` anywhere."""

    def __init__(
        self,
        *,
        webhook_url: str | None = None,
        api_key: str = "sandbox-key",
        token: str = "sandbox-token",
        phone_number_id: str = "100000000000001",
        display_phone_number: str = "15550001111",
        waba_id: str = "200000000000001",
        webhook_auth: WebhookAuth | None = None,
        recordings_dir: Path = Path("wacall-data/sandbox"),
        peer_config: PeerConfig | None = None,
        ring_timeout_s: float = 60.0,
        media_timeout_s: float = 20.0,
        answer_window_s: float = 60.0,
        phone_factory: Callable[..., Phone] = Phone,
        lean_phones: bool = False,
        clock: SandboxClock | None = None,
        permission_limits: PermissionLimits | None = None,
        permission_webhook_shape: str = "meta",
    ):
        #: Where webhooks go: one URL, or several (comma separated) taken in turn, as a
        #: load balancer in front of several gateways would (a retry goes to the next).
        self.webhook_urls = [u.strip() for u in (webhook_url or "").split(",") if u.strip()]
        self._next_url = 0
        self.api_key = api_key
        self.token = token
        self.phone_number_id = phone_number_id
        self.display_phone_number = display_phone_number
        self.waba_id = waba_id
        #: Signs the webhooks it delivers, as the providers do (same settings as the gateway).
        self.webhook_auth = webhook_auth or WebhookAuth()
        self.recordings_dir = Path(recordings_dir)
        self.peer_config = peer_config or PeerConfig(host_addresses=["127.0.0.1"])
        self.ring_timeout_s = ring_timeout_s
        self.media_timeout_s = media_timeout_s
        self.answer_window_s = answer_window_s
        #: Builds each simulated user's phone: ``factory(peer_config, recording_path=, say=)``.
        #: The default is an aiortc peer; interop tests plug in a browser.
        self.phone_factory = phone_factory
        #: ``lean_phones`` (the default factory only): what a phone hears is kept as the
        #: Opus packets received (``.ogg``), what it says is pre-encoded once for all.
        self.phone_suffix = ".wav"
        if lean_phones and phone_factory is Phone:
            self.phone_factory = functools.partial(Phone, prompts=PromptCache(encode_after=1))
            self.phone_suffix = ".ogg"
        self.users = UserDirectory()
        self.clock = clock or SandboxClock()
        self.messaging = SandboxMessaging(self.users, self.clock, self._deliver, limits=permission_limits,
                                          webhook_shape=permission_webhook_shape)
        #: Calls by WhatsApp call id: live ones and the last ``max_ended_calls`` ended.
        self.calls: dict[str, SandboxCall] = {}
        self.max_ended_calls = 1000
        self._ended: collections.deque[str] = collections.deque()
        self.webhooks_sent = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        #: Provider failures to simulate (``POST /sandbox/faults``): the next ``n`` calling
        #: requests of an action fail. ``terminate``/``reject``/...: answered with ``status``
        #: and nothing done; ``connect`` with ``"lose_response": true``: the call is placed
        #: but the answer is a bare 502 (an outcome the client cannot know).
        self.faults: dict[str, dict[str, Any]] = {}
        #: Announce the next ``n`` recording/transcript artifacts with a wrong sha256.
        self.corrupt_artifacts = 0
        #: Where this provider is reached (artifact URLs point here); set by the service.
        self.public_url = ""
        #: Artifacts to download: media id -> (bytes, mime type, expires at, monotonic).
        self.artifacts: dict[str, tuple[bytes, str, float]] = {}
        #: How long an artifact URL works (Meta: 5 minutes).
        self.artifact_ttl_s = 300.0

    # -- aiohttp -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/calling/calls", self._d360_calls)
        app.router.add_post("/{version}/{phone_number_id}/calls", self._meta_calls)
        app.router.add_post("/users/{user}", self._set_user)
        app.router.add_get("/users/{user}", self._get_user)
        app.router.add_get("/users/{user}/calls", self._user_calls)
        app.router.add_post("/users/{user}/call", self._user_calls_business)
        app.router.add_post("/clock", self._advance_clock)
        app.router.add_post("/users/{user}/permission", self._set_permission)
        app.router.add_post("/calls/{call_id}/dtmf", self._press)
        app.router.add_post("/faults", self._set_faults)
        app.router.add_get("/media/{media_id}", self._artifact)
        app.add_routes(self.messaging.routes(self._authenticated))
        return app

    def _authenticated(self, kind: str, handler):
        """Wrap a messaging handler with the provider's authentication and error shape."""

        async def wrapped(request: web.Request) -> web.Response:
            if kind == "d360":
                ok = hmac.compare_digest(request.headers.get("D360-API-KEY", ""), self.api_key)
            else:
                ok = hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {self.token}")
            if not ok:
                return Refusal(401, 190, "Invalid credentials").response()
            if kind == "meta" and request.match_info.get("phone_number_id") != self.phone_number_id:
                return Refusal(400, 100, "Invalid parameter", "unknown phone number id").response()
            body: dict = {}
            if request.method == "POST":
                try:
                    body = await request.json()
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return Refusal(400, 100, "Invalid parameter", "body is not JSON").response()
                if not isinstance(body, dict):
                    return Refusal(400, 100, "Invalid parameter", "body must be an object").response()
            try:
                return await handler(request, body)
            except Refusal as refusal:
                log.info("sandbox refused: %s %s", refusal.code, refusal.details or refusal.message)
                return refusal.response()

        return wrapped

    async def grant(self, user: str, *, permanent: bool = False, granted: bool = True,
                    notify: bool = True) -> None:
        """Sandbox only: the user grants (or declines) call permission unprompted, e.g.
        from the business profile; ``notify`` sends the webhook as the provider would."""
        user = self.users.canonical(user)
        if notify:
            await self.messaging.user_replies(user, granted, permanent=permanent)
        else:
            self.messaging.ledger.reply(user, granted, permanent=permanent)

    async def _set_permission(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
            if not isinstance(body, dict) or set(body) - {"granted", "permanent", "notify"}:
                raise ValueError("body: {'granted': bool, 'permanent': bool, 'notify': bool}")
            if not all(isinstance(v, bool) for v in body.values()):
                raise ValueError("granted, permanent and notify must be true or false")
            await self.grant(request.match_info["user"], permanent=body.get("permanent", False),
                             granted=body.get("granted", True), notify=body.get("notify", True))
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": {"code": "bad_request", "message": str(exc)}}, status=400)
        return web.json_response(self.messaging.permission_state(request.match_info["user"]))

    async def _press(self, request: web.Request) -> web.Response:
        """Sandbox only: the user presses keys (``{"digits", "mode": "rfc4733"|"inband"}``)."""
        call = self.calls.get(request.match_info["call_id"])
        if call is None or call.ended:
            return web.json_response({"error": {"code": "not_found", "message": "no live call with that id"}},
                                     status=404)
        try:
            body = await request.json()
            digits, mode = body.get("digits"), body.get("mode", "rfc4733")
            if not isinstance(digits, str) or mode not in ("rfc4733", "inband"):
                raise ValueError("body: {'digits': '123#', 'mode': 'rfc4733' | 'inband'}")
            await call.phone.press(digits, inband=mode == "inband")
        except (ValueError, json.JSONDecodeError, RuntimeError) as exc:
            return web.json_response({"error": {"code": "bad_request", "message": str(exc)}}, status=400)
        return web.json_response(call.as_dict())

    async def _set_faults(self, request: web.Request) -> web.Response:
        """``{"terminate": {"fail": 2, "status": 503}, "connect": {"fail": 1, "lose_response": true}}``"""
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be an object of actions")
            corrupt = body.pop("corrupt_artifacts", None)
            if corrupt is not None:
                if isinstance(corrupt, bool) or not isinstance(corrupt, int) or corrupt < 0:
                    raise ValueError("corrupt_artifacts must be a count")
                self.corrupt_artifacts = corrupt
            for action, fault in body.items():
                if action not in ("connect", "terminate", "pre_accept", "accept", "reject"):
                    raise ValueError(f"unknown action {action!r}")
                if not isinstance(fault, dict) or not isinstance(fault.get("fail"), int) or fault["fail"] < 0:
                    raise ValueError(f"{action}: 'fail' must be a count")
                status = fault.get("status", 503)
                if not isinstance(status, int) or not 400 <= status <= 599:
                    raise ValueError(f"{action}: 'status' must be an HTTP error status")
                self.faults[action] = {"fail": fault["fail"], "status": status,
                                       "lose_response": bool(fault.get("lose_response"))}
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": {"code": "bad_request", "message": str(exc)}}, status=400)
        return web.json_response({"faults": self.faults})

    def _fault(self, action: str) -> dict | None:
        fault = self.faults.get(action)
        if not fault or fault["fail"] <= 0:
            return None
        fault["fail"] -= 1
        return fault

    async def _advance_clock(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            seconds = body.get("advance_seconds") if isinstance(body, dict) else None
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise ValueError("advance_seconds must be a number")
            now = self.clock.advance(float(seconds))
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": {"code": "bad_request", "message": str(exc)}}, status=400)
        return web.json_response({"now": now, "offset_s": self.clock.offset})

    async def close(self) -> None:
        await self.messaging.close()
        for call in list(self.calls.values()):
            if not call.ended:
                await self._end(call, ended_by="sandbox", notify=False)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _d360_calls(self, request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.headers.get("D360-API-KEY", ""), self.api_key):
            return SandboxRefusal(401, 190, "Invalid D360-API-KEY").response()
        return await self._calls(request)

    async def _meta_calls(self, request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {self.token}"):
            return SandboxRefusal(401, 190, "Invalid OAuth access token").response()
        if request.match_info["phone_number_id"] != self.phone_number_id:
            return SandboxRefusal(400, 100, "Invalid parameter",
                                  "unknown phone number id").response()
        return await self._calls(request)

    async def _calls(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return SandboxRefusal(400, 100, "Invalid parameter", "body is not JSON").response()
        try:
            if not isinstance(body, dict):
                raise SandboxRefusal(400, 100, "Invalid parameter", "body must be an object")
            if body.get("messaging_product") != "whatsapp":
                raise SandboxRefusal(400, 100, "Invalid parameter",
                                     "messaging_product must be 'whatsapp'")
            action = body.get("action")
            fault = self._fault(action) if isinstance(action, str) else None
            if fault is not None and not fault["lose_response"]:
                log.info("sandbox: simulated %s failure (HTTP %d)", action, fault["status"])
                return web.Response(status=fault["status"], text="simulated provider failure")
            if action == "connect":
                placed = await self._connect(body)
                if fault is not None:  # placed, but the client never learns it
                    log.info("sandbox: simulated lost connect response (HTTP %d)", fault["status"])
                    return web.Response(status=fault["status"], text="simulated lost response")
                return placed
            if action == "terminate":
                return await self._terminate(body)
            if action in ("pre_accept", "accept", "reject"):
                return await self._inbound_action(action, body)
            raise SandboxRefusal(400, 100, "Invalid parameter", f"unknown action {action!r}")
        except SandboxRefusal as refusal:
            log.info("sandbox refused a request: %s %s", refusal.code, refusal.details or refusal.message)
            return refusal.response()

    # -- connect -------------------------------------------------------------------------

    async def _connect(self, body: dict) -> web.Response:
        try:
            # ``to`` wins over ``recipient`` (a BSUID), as at Meta
            user = self.users.canonical(body.get("to") or body.get("recipient") or "")
        except ValueError as exc:
            raise SandboxRefusal(400, 100, "Invalid parameter", str(exc)) from None
        session = body.get("session")
        if not isinstance(session, dict) or session.get("sdp_type") != "offer" \
                or not isinstance(session.get("sdp"), str):
            raise SandboxRefusal(400, 100, "Invalid parameter",
                                 "session must be {'sdp_type': 'offer', 'sdp': '<SDP>'}")
        problems = sdp_rules.whatsapp_problems(session["sdp"], role="offer")
        if problems:
            raise SandboxRefusal(400, 138014, "Invalid SDP", "; ".join(problems))
        callback_data = body.get("biz_opaque_callback_data")
        if callback_data is not None and (not isinstance(callback_data, str)
                                          or len(callback_data) > MAX_CALLBACK_DATA):
            raise SandboxRefusal(400, 100, "Invalid parameter",
                                 f"biz_opaque_callback_data must be a string of at most {MAX_CALLBACK_DATA} chars")
        recording, transcription = _recording_fields(body)
        self.messaging.check_call(user)
        if any(c.user == user and not c.ended for c in self.calls.values()):
            raise SandboxRefusal(400, 138003, "Duplicate call",
                                 "a call with this user is already ongoing")

        behaviour = self.users.get(user)
        wacid = "wacid." + secrets.token_urlsafe(24)
        phone = self.phone_factory(self.peer_config, recording_path=self.recordings_dir / user / f"{wacid}{self.phone_suffix}",
                                   say=behaviour.say)
        call = SandboxCall(wacid, user, behaviour, phone, biz_opaque_callback_data=callback_data,
                           recording=recording, transcription=transcription)
        self.calls[wacid] = call
        try:
            answer = await phone.answer(session["sdp"])
        except MediaError as exc:
            await self._end(call, ended_by="sandbox", notify=False)
            raise SandboxRefusal(400, 138014, "Invalid SDP", str(exc)) from None
        log.info("sandbox: call %s to %s", wacid[:16], mask_phone(user))
        self.messaging.call_placed(user, wacid)

        order = list(behaviour.event_order or DEFAULT_ORDER)
        split = order.index("response")
        for step in order[:split]:
            await self._step(call, step, answer)
        self._spawn(self._run_steps(call, order[split + 1:], answer))
        return web.json_response({"messaging_product": "whatsapp", "calls": [{"id": wacid}]})

    async def _run_steps(self, call: SandboxCall, steps: list[str], answer: str) -> None:
        for step in steps:
            if call.ended:
                return
            await self._step(call, step, answer)
        if call.behaviour.on_call == "ignore" and not call.ended:
            await asyncio.sleep(self.ring_timeout_s)
            if not call.ended:
                await self._end(call, ended_by="ring_timeout")

    async def _step(self, call: SandboxCall, step: str, answer: str) -> None:
        if step == "connect":
            await self._send_calls_event(call, "connect",
                                         session={"sdp_type": "answer", "sdp": answer})
        elif step == "ringing":
            await self._send_status(call, "RINGING")
        elif step == "accepted":
            on_call = call.behaviour.on_call
            if on_call == "ignore":
                return
            await asyncio.sleep(call.behaviour.answer_after_ms / 1000)
            if call.ended:
                return
            if on_call == "reject":
                await self._send_status(call, "REJECTED")
                await self._end(call, ended_by="user_rejected")
                return
            call.state = "accepted"
            call.accepted_at = time.time()
            talking = call.phone.pick_up(self.media_timeout_s)
            talking.add_done_callback(lambda task: self._on_talk_done(call, task))
            self._watch_phone_hangup(call)
            await self._send_status(call, "ACCEPTED")
            if call.behaviour.hangup_after_s:
                self._spawn(self._hang_up_later(call, call.behaviour.hangup_after_s))

    def _watch_phone_hangup(self, call: SandboxCall) -> None:
        """A phone that can hang up by itself (a browser) ends the call like a user."""
        hung_up = getattr(call.phone, "hung_up", None)
        if hung_up is not None:
            hung_up.add_done_callback(
                lambda _: call.ended or self._spawn(self._end(call, ended_by="user_hangup")))

    def _on_talk_done(self, call: SandboxCall, task: asyncio.Task) -> None:
        if task.cancelled() or call.ended:
            return
        if isinstance(task.exception(), MediaError):
            # Like WhatsApp: no media from the business in time -> the client hangs up.
            self._spawn(self._end(call, ended_by="media_timeout", errors=[{
                "code": 138021, "message": "Media receive timeout",
                "error_data": {"details": "the client received no media from the business"}}]))

    async def _hang_up_later(self, call: SandboxCall, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if not call.ended:
            await self._end(call, ended_by="user_hangup")

    # -- user-initiated calls ------------------------------------------------------------

    async def _user_calls_business(self, request: web.Request) -> web.Response:
        """Sandbox only: the simulated user calls the business (``{"say", "hangup_after_s"}``)."""
        try:
            user = self.users.canonical(request.match_info["user"])
            body = await request.json() if request.can_read_body else {}
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            unknown = sorted(set(body) - {"say", "hangup_after_s"})
            if unknown:
                raise ValueError(f"unknown fields: {', '.join(unknown)}")
            behaviour = self.users.get(user).updated(
                {k: body[k] for k in ("say", "hangup_after_s") if k in body})
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": {"code": "bad_request", "message": str(exc)}}, status=400)
        call = await self.user_calls(user, say=behaviour.say, hangup_after_s=behaviour.hangup_after_s)
        return web.json_response(call.as_dict(), status=201)

    async def user_calls(self, user: str, *, say: str | None = None,
                         hangup_after_s: float | None = None) -> SandboxCall:
        """The simulated ``user`` calls the business: a ``connect`` webhook with the
        phone's offer, as the provider delivers it. The business then has
        ``answer_window_s`` to pre_accept/accept or reject."""
        user = self.users.canonical(user)
        wacid = "wacid." + secrets.token_urlsafe(24)
        phone = self.phone_factory(self.peer_config, recording_path=self.recordings_dir / user / f"{wacid}{self.phone_suffix}",
                                   say=say)
        call = SandboxCall(wacid, user, self.users.get(user), phone, direction="USER_INITIATED",
                           hangup_after_s=hangup_after_s)
        self.calls[wacid] = call
        await self.messaging.inbound_call(user, wacid)
        offer = await phone.offer()
        log.info("sandbox: %s calls the business (%s)", mask_phone(user), wacid[:16])
        self._spawn(self._inbound_ring(call, offer))
        return call

    async def _inbound_ring(self, call: SandboxCall, offer: str) -> None:
        await self._send_calls_event(call, "connect", session={"sdp_type": "offer", "sdp": offer})
        await asyncio.sleep(self.answer_window_s)
        if not call.ended and call.accepted_at is None:
            await self._end(call, ended_by="not_answered")

    async def _inbound_action(self, action: str, body: dict) -> web.Response:
        call = self.calls.get(body.get("call_id", ""))
        if call is None:
            raise SandboxRefusal(400, 100, "Invalid parameter", "unknown call_id")
        if call.direction != "USER_INITIATED":
            raise SandboxRefusal(400, 100, "Invalid parameter",
                                 f"{action} is only valid for user-initiated calls")
        if call.ended:
            raise SandboxRefusal(400, 100, "Invalid parameter", "the call has already ended")
        if action == "reject":
            if call.accepted_at is not None:
                raise SandboxRefusal(400, 100, "Invalid parameter", "the call is already accepted")
            self._spawn(self._end(call, ended_by="business_rejected"))
            return web.json_response({"messaging_product": "whatsapp", "success": True})
        session = body.get("session")
        if not isinstance(session, dict) or not isinstance(session.get("sdp"), str):
            raise SandboxRefusal(400, 100, "Invalid parameter", "session.sdp is required")
        if session.get("sdp_type") != "answer":
            raise SandboxRefusal(400, 100, "Invalid parameter",
                                 f"session.sdp_type must be 'answer' for {action}")
        answer = session["sdp"]
        problems = sdp_rules.whatsapp_problems(answer, role="answer")
        if problems:
            raise SandboxRefusal(400, 138014, "Invalid SDP", "; ".join(problems))
        if call.accepted_at is not None:
            raise SandboxRefusal(400, 100, "Invalid parameter", "the call is already accepted")
        if call.pre_accept_sdp is not None and answer != call.pre_accept_sdp:
            raise SandboxRefusal(400, 100, "Invalid parameter",
                                 "the SDP in accept must equal the one sent in pre_accept")
        if call.pre_accept_sdp is None:
            try:
                await call.phone.apply_answer(answer)
            except MediaError as exc:
                raise SandboxRefusal(400, 138014, "Invalid SDP", str(exc)) from None
            call.pre_accept_sdp = answer
        if action == "accept":
            call.recording, call.transcription = _recording_fields(body)
            call.state = "accepted"
            call.accepted_at = time.time()
            call.biz_opaque_callback_data = body.get("biz_opaque_callback_data")
            self.messaging.inbound_answered(call.user, call.wacid)
            talking = call.phone.pick_up(self.media_timeout_s)
            talking.add_done_callback(lambda task: self._on_talk_done(call, task))
            self._watch_phone_hangup(call)
            if call.hangup_after_s:
                self._spawn(self._hang_up_later(call, call.hangup_after_s))
        else:
            call.state = "pre_accepted"
        return web.json_response({"messaging_product": "whatsapp", "success": True})

    # -- terminate -----------------------------------------------------------------------

    async def _terminate(self, body: dict) -> web.Response:
        call = self.calls.get(body.get("call_id", ""))
        if call is None:
            raise SandboxRefusal(400, 100, "Invalid parameter", "unknown call_id")
        if call.ended:
            raise SandboxRefusal(400, 100, "Invalid parameter", "the call has already ended")
        self._spawn(self._end(call, ended_by="business"))
        return web.json_response({"messaging_product": "whatsapp", "success": True})

    async def _end(self, call: SandboxCall, *, ended_by: str, notify: bool = True,
                   errors: list[dict] | None = None) -> None:
        if call.ended:
            return
        call.state = "ended"
        call.ended_by = ended_by
        call.ended_at = time.time()
        call.end_status = "COMPLETED" if call.accepted_at and not errors else "FAILED"
        await call.phone.hang_up()
        self._ended.append(call.wacid)
        while len(self._ended) > self.max_ended_calls:
            self.calls.pop(self._ended.popleft(), None)
        if call.direction == "BUSINESS_INITIATED":
            await self.messaging.call_outcome(call.user, call.wacid, answered=call.accepted_at is not None)
        call.finished.set()
        if notify:
            extra: dict[str, Any] = {"status": call.end_status}
            if call.accepted_at is not None:
                extra.update(start_time=str(int(call.accepted_at)), end_time=str(int(call.ended_at)),
                             duration=call.duration)
            await self._send_calls_event(call, "terminate", errors=errors, **extra)
        if call.recording is not None and call.accepted_at is not None:
            self._spawn(self._deliver_artifacts(call))

    # -- WhatsApp's own recording and transcription -------------------------------------

    async def _deliver_artifacts(self, call: SandboxCall) -> None:
        """After a recorded call: its recording (what the user's phone heard, Ogg/Opus) and
        transcript, behind authenticated URLs that expire, announced by webhook."""
        try:
            audio = await asyncio.to_thread(_ogg_of, call.phone.recording_path)
        except (OSError, ValueError) as exc:
            log.warning("sandbox: no recording artifact for %s: %s", call.wacid[:16], exc)
            return
        await self._announce(call, "call_recording_available", "call_recording", "audio", audio,
                             "audio/ogg; codecs=opus")
        if call.transcription is not None:
            seconds = round(call.duration or 0.0, 1)
            document = json.dumps({"call_id": call.wacid, "language": call.transcription.get("announcement_language"),
                                   "segments": [{"speaker": "business", "start_s": 0.0, "end_s": seconds,
                                                 "text": "(sandbox: simulated transcript, no speech recognition)"}]})
            await self._announce(call, "call_transcription_available", "call_transcript", "document",
                                 document.encode(), "application/json")

    async def _announce(self, call: SandboxCall, event: str, holder: str, item: str, data: bytes, mime: str) -> None:
        media_id = str(secrets.randbelow(10**16))
        self.artifacts[media_id] = (data, mime, time.monotonic() + self.artifact_ttl_s)
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        if self.corrupt_artifacts > 0:
            self.corrupt_artifacts -= 1
            digest = base64.b64encode(hashlib.sha256(data + b"!").digest()).decode()
        await self._send_calls_event(call, event, **{holder: {"type": item if item == "audio" else "document", item: {
            "id": media_id, "sha256": digest, "mime_type": mime, "url": f"{self.public_url}/media/{media_id}"}}})

    async def _artifact(self, request: web.Request) -> web.Response:
        """``GET /media/{id}``: an artifact, with the provider's credentials, while its URL lives."""
        token_ok = hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {self.token}")
        key_ok = hmac.compare_digest(request.headers.get("D360-API-KEY", ""), self.api_key)
        if not (token_ok or key_ok):
            return SandboxRefusal(401, 190, "Invalid OAuth access token").response()
        found = self.artifacts.get(request.match_info["media_id"])
        if found is None or found[2] < time.monotonic():
            self.artifacts.pop(request.match_info["media_id"], None)
            return SandboxRefusal(404, 100, "Invalid parameter", "no such media, or its URL expired").response()
        return web.Response(body=found[0], content_type=found[1].split(";")[0])

    # -- admin ---------------------------------------------------------------------------

    async def _set_user(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            behaviour = self.users.update(request.match_info["user"], changes)
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": {"code": "bad_request", "message": str(exc)}}, status=400)
        return web.json_response(behaviour.as_dict())

    async def _get_user(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self.users.get(request.match_info["user"]).as_dict())
        except ValueError as exc:
            return web.json_response({"error": {"code": "bad_request", "message": str(exc)}}, status=400)

    async def _user_calls(self, request: web.Request) -> web.Response:
        try:
            user = self.users.canonical(request.match_info["user"])
        except ValueError as exc:
            return web.json_response({"error": {"code": "bad_request", "message": str(exc)}}, status=400)
        return web.json_response({"calls": [c.as_dict() for c in self.calls.values() if c.user == user]})

    def calls_to(self, user: str) -> list[SandboxCall]:
        number = self.users.canonical(user)
        return [c for c in self.calls.values() if c.user == number]

    # -- webhooks ------------------------------------------------------------------------

    def _timestamp(self) -> str:
        return str(int(self.clock.now()))

    async def _send_calls_event(self, call: SandboxCall, event: str, *,
                                errors: list[dict] | None = None, **fields: Any) -> None:
        business = self.display_phone_number
        if call.direction == "USER_INITIATED":
            people = {**self.users.ids(call.user, "from", "from_user_id"), "to": business}
        else:
            people = {"from": business, **self.users.ids(call.user, "to", "to_user_id")}
        item: dict[str, Any] = {
            "id": call.wacid, **people,
            "event": event, "timestamp": self._timestamp(), "direction": call.direction, **fields,
        }
        if call.biz_opaque_callback_data is not None:
            item["biz_opaque_callback_data"] = call.biz_opaque_callback_data
        value: dict[str, Any] = {"calls": [item]}
        if errors:
            value["errors"] = errors
        await self._deliver(value)

    async def _send_status(self, call: SandboxCall, status: str) -> None:
        item: dict[str, Any] = {"id": call.wacid, "type": "call", "status": status,
                                "timestamp": self._timestamp(),
                                **self.users.ids(call.user, "recipient_id", "recipient_user_id")}
        if call.biz_opaque_callback_data is not None:
            item["biz_opaque_callback_data"] = call.biz_opaque_callback_data
        await self._deliver({"statuses": [item]})

    async def _deliver(self, value: dict | None, field_name: str = "calls", *, flat: dict | None = None) -> bool:
        """POST one webhook the way Meta does (or ``flat``, a body sent as is, like
        360dialog's ``call_permission_status``); retry with backoff until acknowledged."""
        if not self.webhook_urls:
            log.warning("sandbox has no webhook URL; dropping a %s webhook", field_name)
            return False
        if flat is not None:
            envelope = flat
        else:
            value = {"messaging_product": "whatsapp",
                     "metadata": {"display_phone_number": self.display_phone_number,
                                  "phone_number_id": self.phone_number_id}, **(value or {})}
            envelope = {"object": "whatsapp_business_account",
                        "entry": [{"id": self.waba_id, "changes": [{"field": field_name, "value": value}]}]}
        body = json.dumps(envelope).encode()
        headers = {"Content-Type": "application/json"}
        headers.update(self.webhook_auth.sign(body))
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        delay = 0.05
        for attempt in range(6):
            try:
                url = self.webhook_urls[self._next_url % len(self.webhook_urls)]
                self._next_url += 1
                async with self._session.post(url, data=body, headers=headers) as resp:
                    if 200 <= resp.status < 300:
                        self.webhooks_sent += 1
                        return True
                    log.info("sandbox webhook got HTTP %s (attempt %d)", resp.status, attempt + 1)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.info("sandbox webhook failed: %s (attempt %d)", exc, attempt + 1)
            await asyncio.sleep(delay)
            delay *= 2
        log.warning("sandbox gave up delivering a webhook to %s", ", ".join(self.webhook_urls))
        return False


def _recording_fields(body: dict) -> tuple[dict | None, dict | None]:
    """``recording`` / ``transcription`` of a connect or accept, checked as Meta does."""
    out = []
    for name in ("recording", "transcription"):
        value = body.get(name)
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, dict) or value.get("status") not in ("ENABLED", "DISABLED"):
            raise SandboxRefusal(400, 100, "Invalid parameter", f"{name}.status must be ENABLED or DISABLED")
        if value["status"] == "DISABLED":
            out.append(None)
            continue
        purpose = value.get("purpose")
        if not isinstance(purpose, str) or not purpose.strip() or len(purpose) > 250:
            raise SandboxRefusal(400, 100, "Invalid parameter", f"{name}.purpose is required (at most 250 characters)")
        if value.get("announcement_language", "en_US") not in ANNOUNCEMENT_LANGUAGES:
            raise SandboxRefusal(400, 100, "Invalid parameter", f"{name}.announcement_language is not supported")
        out.append(dict(value))
    if out[1] is not None and out[0] is None:
        raise SandboxRefusal(400, 100, "Invalid parameter", "transcription needs recording")
    return out[0], out[1]


def _ogg_of(wav_path) -> bytes:
    """The WAV the phone recorded, as Ogg/Opus bytes (what WhatsApp's recording is); a
    lean phone's recording is Ogg/Opus already."""
    import tempfile
    import wave as wave_module

    from media.sinks.ogg import OggOpusSink

    if Path(wav_path).suffix == ".ogg":
        return Path(wav_path).read_bytes()

    with wave_module.open(str(wav_path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    if rate != 48000 or channels != 1:
        raise ValueError(f"the phone's recording is {rate} Hz x {channels}, not 48 kHz mono")
    with tempfile.TemporaryDirectory(prefix="wacall-artifact-") as tmp:
        path = Path(tmp) / "recording.ogg"
        sink = OggOpusSink(path)
        for start in range(0, pcm.size - pcm.size % 960, 960):
            sink.write(pcm[start:start + 960], 48000, 1)
        sink.close()
        return path.read_bytes()
