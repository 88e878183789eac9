"""The sandbox's messaging and permission side: what the provider does around calls.

* ``POST /messages`` (360dialog) and ``POST /{version}/{phone_number_id}/messages``
  (Meta): an interactive ``call_permission_request`` or a template message. A request is
  checked against the provider's rules (138011 when over the limit, 138017 when a
  permanent permission exists), acknowledged with a ``wamid``, reported ``sent`` and
  ``delivered`` on the ``messages`` field, and answered by the simulated user per its
  ``on_permission_request`` (grant, reject, ignore; after ``permission_after_ms``).
* templates: ``POST /v1/configs/templates`` (360dialog) and
  ``POST /{version}/{waba_id}/message_templates`` (Meta); the sandbox approves at once.
* the permission-state endpoint (``GET /calling/permissions/{user}``,
  ``GET /{version}/{phone_number_id}/call_permissions?user_wa_id=``) and the call
  settings (``callback_permission_status``).

The provider's truth is a :class:`~gateway.permissions.PermissionLedger` of its own (in
memory), fed only by what the provider sees; the gateway keeps its own ledger from what
it is told, and the two must agree.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import ProviderError
from ..permissions import DAY, PermissionLedger, PermissionLimits, PermissionState
from ..redact import mask_phone
from ..store import MemoryPermissionStore
from ..numbers import is_bsuid
from .users import UserDirectory

log = logging.getLogger(__name__)

Deliver = Callable[..., Awaitable[bool]]


class SandboxClock:
    """Real time plus an offset that tests move forward (``POST /sandbox/clock``).

    The gateway's ledger reads the same clock in ``serve --sandbox``, so a jump of
    seven days expires permissions on both sides at once."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.offset += seconds
        return self.now()


class Refusal(Exception):
    """A request the provider refuses; the emulator turns it into a Graph error."""

    def __init__(self, http_status: int, code: int, message: str, details: str | None = None):
        super().__init__(message)
        self.http_status, self.code, self.message, self.details = http_status, code, message, details

    @classmethod
    def from_error(cls, error: ProviderError, http_status: int = 400) -> Refusal:
        return cls(http_status, error.code or 100, error.message, error.details)

    def response(self) -> web.Response:
        """The Graph error envelope Meta answers with."""
        error: dict[str, Any] = {"message": self.message, "type": "OAuthException", "code": self.code,
                                 "fbtrace_id": "sandbox-" + secrets.token_hex(6)}
        if self.details:
            error["error_data"] = {"details": self.details}
        return web.json_response({"error": error}, status=self.http_status)


class SandboxMessaging:
    def __init__(self, users: UserDirectory, clock: SandboxClock, deliver: Deliver, *,
                 limits: PermissionLimits | None = None, webhook_shape: str = "meta"):
        self.users = users
        self.clock = clock
        self._deliver = deliver
        self.ledger = PermissionLedger(MemoryPermissionStore(), clock, limits or PermissionLimits.seed())
        #: ``meta``: replies as Meta's ``messages`` webhook; ``360dialog``: the flat
        #: ``call_permission_status`` event.
        self.webhook_shape = webhook_shape
        self.templates: dict[str, dict] = {}
        self.settings: dict[str, Any] = {"status": "ENABLED", "callback_permission_status": "DISABLED"}
        self.sent: list[dict] = []
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- messages ------------------------------------------------------------------------

    async def message(self, body: dict) -> dict:
        try:
            user = self.users.canonical(body.get("to") or body.get("recipient") or "")
        except ValueError as exc:
            raise Refusal(400, 100, "Invalid parameter", str(exc)) from None
        kind = body.get("type")
        if kind == "interactive":
            interactive = body.get("interactive") or {}
            if interactive.get("type") != "call_permission_request":
                raise Refusal(400, 100, "Invalid parameter",
                              "the sandbox only sends call_permission_request interactive messages")
            text = ((interactive.get("body") or {}).get("text") or "")
            if not isinstance(text, str) or not text.strip():
                raise Refusal(400, 100, "Invalid parameter", "interactive.body.text is required")
            is_request = True
        elif kind == "template":
            template = body.get("template") or {}
            known = self.templates.get(str(template.get("name")))
            if known is None:
                raise Refusal(404, 132001, "Template name does not exist in the translation",
                              f"no template {template.get('name')!r}; create it first")
            is_request = known["permission"]
        else:
            raise Refusal(400, 100, "Invalid parameter", f"unsupported message type {kind!r}")
        if is_request:
            try:
                self.ledger.check_request(user)
            except ProviderError as exc:
                raise Refusal.from_error(exc) from None
        message_id = "wamid." + secrets.token_urlsafe(24)
        self.sent.append({"id": message_id, "to": user, "type": kind, "at": self.clock.now()})
        if is_request:
            self.ledger.request_sent(user, message_id)
            self._spawn(self._deliver_and_answer(user, message_id))
        log.info("sandbox: %s message %s to %s", kind, message_id[:16], mask_phone(user))
        contact = self.users.ids(user, "wa_id", "user_id")
        if not is_bsuid(user):
            contact["wa_id"] = user  # (the business wrote the number: the response names it)
        return {"messaging_product": "whatsapp", "contacts": [{"input": body.get("to") or body.get("recipient"),
                                                              **contact}],
                "messages": [{"id": message_id}]}

    async def _deliver_and_answer(self, user: str, message_id: str) -> None:
        for status in ("sent", "delivered"):
            await self._deliver({"statuses": [{
                "id": message_id, "status": status, "timestamp": str(int(self.clock.now())),
                **self.users.ids(user, "recipient_id", "recipient_user_id")}]}, field_name="messages")
        self.ledger.request_delivered(user, message_id)
        behaviour = self.users.get(user)
        if behaviour.on_permission_request == "ignore":
            return
        await asyncio.sleep(behaviour.permission_after_ms / 1000)
        await self.user_replies(user, behaviour.on_permission_request == "grant", context_id=message_id)

    async def user_replies(self, user: str, granted: bool, *, permanent: bool = False,
                           source: str = "user_action", context_id: str | None = None) -> None:
        """The simulated user answers (or the system decides, ``source="automatic"``)."""
        now = self.clock.now()
        expires = None if permanent or not granted else int(now + self.ledger.limits.validity_s)
        reply_id = "wamid." + secrets.token_urlsafe(24)
        self.ledger.reply(user, granted, permanent=permanent, expires_at=expires, source=source,
                          message_id=reply_id)
        if self.webhook_shape == "360dialog":
            status = "GRANTED" if granted else ("REVOKED" if source == "automatic" else "REJECTED")
            await self._deliver(None, flat={"event": "call_permission_status", "status": status,
                                            "recipient": user, "timestamp": str(int(now)), "id": reply_id})
            return
        reply: dict[str, Any] = {"response": "accept" if granted else "reject", "response_source": source}
        if granted:
            reply["is_permanent"] = permanent
            if expires is not None:
                reply["expiration_timestamp"] = str(expires)
        message: dict[str, Any] = {
            **self.users.ids(user, "from", "from_user_id"), "id": reply_id, "timestamp": str(int(now)),
            "type": "interactive", "interactive": {"type": "call_permission_reply", "call_permission_reply": reply}}
        if context_id:
            message["context"] = {"id": context_id}
        await self._deliver({"contacts": [self.users.ids(user, "wa_id", "user_id")], "messages": [message]},
                            field_name="messages")

    # -- calls (called by the emulator) ---------------------------------------------------

    def check_call(self, user: str) -> None:
        try:
            self.ledger.check_call(user)
        except ProviderError as exc:
            raise Refusal.from_error(exc, 401 if exc.code == 138006 else 400) from None

    def call_placed(self, user: str, call_id: str) -> None:
        self.ledger.call_placed(user, call_id)

    async def call_outcome(self, user: str, call_id: str, answered: bool) -> None:
        before = self.ledger.status(user).status
        if answered:
            self.ledger.call_answered(user, call_id)
            return
        self.ledger.call_unanswered(user, call_id)
        if before is PermissionState.GRANTED and self.ledger.status(user).status is PermissionState.REVOKED:
            # 4 unanswered calls in a row: WhatsApp revokes and says so (reject, automatic).
            await self.user_replies(user, False, source="automatic")

    async def inbound_call(self, user: str, call_id: str) -> None:
        """The user called the business: with callback permission on, that grants."""
        self.ledger.callback_enabled = self.settings.get("callback_permission_status") == "ENABLED"
        before = self.ledger.status(user)
        self.ledger.inbound_call(user, call_id)
        after = self.ledger.status(user)
        if self.ledger.callback_enabled and after.status is PermissionState.GRANTED and (
                before.status is not PermissionState.GRANTED or after.expires_at != before.expires_at):
            await self._send_callback_grant(user, call_id, after.expires_at)

    async def _send_callback_grant(self, user: str, call_id: str, expires_at: float | None) -> None:
        if self.webhook_shape == "360dialog":
            await self._deliver(None, flat={"event": "call_permission_status", "status": "GRANTED",
                                            "recipient": user, "timestamp": str(int(self.clock.now()))})
            return
        reply = {"response": "accept", "is_permanent": False, "response_source": "automatic",
                 "expiration_timestamp": str(int(expires_at or self.clock.now() + 7 * DAY))}
        await self._deliver({"contacts": [self.users.ids(user, "wa_id", "user_id")], "messages": [{
            **self.users.ids(user, "from", "from_user_id"), "id": "wamid." + secrets.token_urlsafe(24),
            "timestamp": str(int(self.clock.now())),
            "type": "interactive", "context": {"id": call_id},
            "interactive": {"type": "call_permission_reply", "call_permission_reply": reply}}]},
            field_name="messages")

    def inbound_answered(self, user: str, call_id: str) -> None:
        self.ledger.inbound_call(user, call_id, answered=True)

    # -- templates, permission state, settings --------------------------------------------

    def create_template(self, body: dict) -> dict:
        name = body.get("name")
        if not isinstance(name, str) or not name or len(name) > 512:
            raise Refusal(400, 100, "Invalid parameter", "name is required (at most 512 characters)")
        if body.get("category") not in ("MARKETING", "UTILITY"):
            raise Refusal(400, 100, "Invalid parameter", "category must be MARKETING or UTILITY")
        components = body.get("components")
        if not isinstance(components, list):
            raise Refusal(400, 100, "Invalid parameter", "components must be a list")
        types = [str(c.get("type", "")).upper() for c in components if isinstance(c, dict)]
        texts = [c.get("text") for c in components if isinstance(c, dict) and str(c.get("type")).upper() == "BODY"]
        if not texts or not isinstance(texts[0], str) or not texts[0].strip() or len(texts[0]) > 1024:
            raise Refusal(400, 100, "Invalid parameter", "a non-empty BODY of at most 1024 characters is required")
        permission = "CALL_PERMISSION_REQUEST" in types
        template_id = str(secrets.randbelow(10**15))
        self.templates[name] = {"id": template_id, "permission": permission, "body": body}
        return {"id": template_id, "status": "APPROVED", "category": body["category"]}

    def permission_state(self, user: str) -> dict:
        user = self.users.canonical(user)
        status = self.ledger.status(user)
        if status.status is PermissionState.GRANTED:
            permission: dict[str, Any] = {"status": "permanent" if status.permanent else "temporary"}
            if status.expires_at is not None:
                permission["expiration_time"] = int(status.expires_at)
        else:
            permission = {"status": "no_permission"}
        return {"messaging_product": "whatsapp", "permission": permission, "actions": [
            self._action("send_call_permission_request", self.ledger.check_request, user,
                         status.requests_last_7d, self.ledger.limits.request_limits[0]),
            self._action("start_call", self.ledger.check_call, user, status.calls_last_24h,
                         self.ledger.limits.call_limit)]}

    @staticmethod
    def _action(name: str, check, user: str, usage: int, limit) -> dict:
        try:
            check(user)
            can, expiration = True, None
        except ProviderError as exc:
            can, expiration = False, getattr(exc, "retry_at", None)
        entry: dict[str, Any] = {"time_period": f"PT{int(limit.window_s // 3600)}H", "max_allowed": limit.max_allowed,
                                 "current_usage": usage}
        if expiration is not None and usage >= limit.max_allowed:
            entry["limit_expiration_time"] = int(expiration)
        return {"action_name": name, "can_perform_action": can, "limits": [entry]}

    def update_settings(self, body: dict) -> dict:
        calling = body.get("calling")
        if not isinstance(calling, dict):
            raise Refusal(400, 100, "Invalid parameter", "body must be {'calling': {...}}")
        value = calling.get("callback_permission_status")
        if value is not None and value not in ("ENABLED", "DISABLED"):
            raise Refusal(400, 100, "Invalid parameter", "callback_permission_status must be ENABLED or DISABLED")
        self.settings.update(calling)
        self.ledger.callback_enabled = self.settings.get("callback_permission_status") == "ENABLED"
        return {"success": True}

    # -- routes (mounted by the emulator, which handles auth and errors) -------------------

    def routes(self, wrap) -> list[web.RouteDef]:
        """``wrap(kind, handler)`` adds the provider's authentication for ``kind``."""
        return [
            web.post("/messages", wrap("d360", self._r_message)),
            web.post("/{version}/{phone_number_id}/messages", wrap("meta", self._r_message)),
            web.post("/v1/configs/templates", wrap("d360", self._r_template)),
            web.post("/{version}/{waba_id}/message_templates", wrap("meta_waba", self._r_template)),
            web.get("/calling/permissions/{user}", wrap("d360", self._r_state)),
            web.get("/{version}/{phone_number_id}/call_permissions", wrap("meta", self._r_state)),
            web.post("/calling/settings", wrap("d360", self._r_settings)),
            web.post("/{version}/{phone_number_id}/settings", wrap("meta", self._r_settings)),
            web.get("/calling/settings", wrap("d360", self._r_get_settings)),
            web.get("/{version}/{phone_number_id}/settings", wrap("meta", self._r_get_settings)),
        ]

    async def _r_message(self, request: web.Request, body: dict) -> web.Response:
        return web.json_response(await self.message(body))

    async def _r_template(self, request: web.Request, body: dict) -> web.Response:
        return web.json_response(self.create_template(body))

    async def _r_state(self, request: web.Request, body: dict) -> web.Response:
        user = (request.match_info.get("user") or request.query.get("user_wa_id")
                or request.query.get("recipient", ""))
        try:
            return web.json_response(self.permission_state(user))
        except ValueError as exc:
            raise Refusal(400, 100, "Invalid parameter", str(exc)) from None

    async def _r_settings(self, request: web.Request, body: dict) -> web.Response:
        return web.json_response(self.update_settings(body))

    async def _r_get_settings(self, request: web.Request, body: dict) -> web.Response:
        return web.json_response({"calling": dict(self.settings)})
