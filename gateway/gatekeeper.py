"""The permission side of calling: ask users, learn their answers, gate every dial.

The :class:`Gatekeeper` joins the :class:`~gateway.permissions.PermissionLedger` (the
rules) to the provider (sending requests, reading its permission state) and to the
webhooks (the user's replies, message delivery), and watches the calls (placed,
answered or not, inbound) so the ledger counts what the provider counts.

* :meth:`check_call` refuses locally, before any network call, with the code the
  provider would return (138006, 138010, 138012), each carrying ``retry_at``.
* :meth:`request` sends a call-permission request (interactive or template), refusing
  with 138011 (or 138017 when a permanent permission exists) first.
* :meth:`wait_for_reply` lets a parked call wait for the user's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .domain import events as ev
from .calls.live import LiveCall as Call
from .errors import ProviderError
from .events import CallConnect, CallStatus, Direction, MessageStatus, PermissionReply, PermissionResponse
from .permissions import PermissionLedger, PermissionState
from .providers.base import CallingProvider
from .redact import mask_phone
from .numbers import is_bsuid, normalize_recipient

log = logging.getLogger(__name__)

#: Provider codes that correct the ledger when the provider refuses anyway.
LEDGER_CODES = {138006, 138010, 138011, 138012, 138009, 138017}
DEFAULT_REQUEST_TEXT = "May we call you on WhatsApp about your request?"


@dataclass(slots=True)
class PermissionRequest:
    """How to ask: the interactive message, or an approved template."""

    via: str = "interactive"
    text: str = DEFAULT_REQUEST_TEXT
    template: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict | None) -> PermissionRequest:
        data = data or {}
        if not isinstance(data, dict):
            raise ValueError("a permission request must be an object")
        via = data.get("via", "interactive")
        if via == "interactive":
            text = data.get("text", DEFAULT_REQUEST_TEXT)
            if not isinstance(text, str) or not text.strip():
                raise ValueError("text must be a non-empty string")
            return cls("interactive", text)
        if via == "template":
            template = data.get("template")
            if not isinstance(template, dict) or not isinstance(template.get("name"), str):
                raise ValueError("a template request needs template.name (and language, parameters)")
            parameters = template.get("parameters") or []
            if not isinstance(parameters, (list, dict)):
                raise ValueError("template.parameters must be a list or an object")
            return cls("template", template=template)
        raise ValueError("via must be 'interactive' or 'template'")


class Gatekeeper:
    def __init__(self, ledger: PermissionLedger, provider: CallingProvider, *, reconcile: bool = False):
        self.ledger = ledger
        self.provider = provider
        #: Ask the provider's permission-state endpoint before refusing for lack of
        #: permission (useful when this ledger may have missed webhooks).
        self.reconcile = reconcile
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._deciding: dict[str, asyncio.Lock] = {}
        if provider is not None:  # (a sent message's response names the user both ways)
            provider.on_contact = self._learn

    # -- gates ---------------------------------------------------------------------------

    #: How long one decision may hold a user (check -> call placed); a crashed holder's
    #: lock expires after it.
    DECIDING_TTL_S = 30.0

    @contextlib.asynccontextmanager
    async def deciding(self, user: str):
        """One call to ``user`` at a time from the check of the rules to the call being
        placed (counted), in this process and, with a ledger shared through Redis, across
        instances: two dials of one user at once cannot both pass a limit only one fits."""
        user = self.key(user)
        local = self._deciding.setdefault(user, asyncio.Lock())
        try:
            async with local:
                shared = getattr(self.ledger.store, "try_lock", None)
                token = secrets.token_hex(8)
                if shared is not None:
                    deadline = time.monotonic() + self.DECIDING_TTL_S
                    while not shared(user, token, self.DECIDING_TTL_S):
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"another instance is deciding about {mask_phone(user)}")
                        await asyncio.sleep(0.02)
                try:
                    yield
                finally:
                    if shared is not None:
                        self.ledger.store.unlock(user, token)
        finally:
            if not local.locked() and self._deciding.get(user) is local:
                del self._deciding[user]  # (no lock left behind per user)

    async def check_call(self, user: str) -> None:
        user = self.key(user)
        try:
            self.ledger.check_call(user)
        except ProviderError as exc:
            if not (self.reconcile and exc.code in (138006, 138010)):
                raise
            await self.refresh(user)
            self.ledger.check_call(user)

    async def refresh(self, user: str) -> None:
        """Reconcile the ledger with the provider's permission-state endpoint."""
        user = self.key(user)
        state = await self.provider.get_permission_state(user)
        self.ledger.apply_provider_state(user, state)

    async def request(self, user: str, how: PermissionRequest | None = None) -> str:
        """Send a call-permission request; the ``wamid`` of the message."""
        user = self.key(user)
        how = how or PermissionRequest()
        self.ledger.check_request(user)
        try:
            if how.via == "template":
                template = how.template
                message_id = await self.provider.send_template(
                    user, template["name"], template.get("language", "en"), template.get("parameters"))
            else:
                message_id = await self.provider.send_permission_request(user, how.text)
        except ProviderError as exc:
            self.refused(user, exc)
            raise
        self.ledger.request_sent(user, message_id)
        log.info("permission request %s sent to %s", message_id, mask_phone(user))
        return message_id

    def refused(self, user: str, error: ProviderError) -> None:
        """The provider refused a call or request anyway: correct the ledger."""
        if error.code in LEDGER_CODES:
            self.ledger.provider_refused(self.key(user), error.code, getattr(error, "retry_at", None))

    # -- replies ---------------------------------------------------------------------------

    async def wait_for_reply(self, user: str, timeout: float) -> bool | None:
        """True when the user grants, False when they decline, None on timeout."""
        user = self.key(user)
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(user, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(user, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(user, None)  # no key left behind per user asked

    def key(self, user: str) -> str:
        """The ledger's name for ``user`` (a phone number, or a BSUID not linked to one)."""
        return self.ledger.key(normalize_recipient(user))

    def _learn(self, phone: str | None, bsuid: str | None) -> None:
        """A webhook named the user both ways: one ledger entry for the two from now on."""
        if phone and bsuid and not is_bsuid(phone):
            try:
                if self.ledger.link(bsuid, normalize_recipient(phone)):
                    log.info("%s is %s", mask_phone(bsuid), mask_phone(phone))
            except ValueError:
                pass  # (a malformed number: nothing to link)

    def handle_event(self, event) -> bool:
        """Apply a permission webhook; True if it was one. (Call webhooks that name the
        user by number and by BSUID link the two, and go on to the calls.)"""
        if isinstance(event, CallConnect):
            self._learn(event.to if event.direction is Direction.BUSINESS_INITIATED else event.from_, event.user_id)
            return False
        if isinstance(event, CallStatus):
            self._learn(event.recipient_id, event.user_id)
            return False
        if isinstance(event, PermissionReply):
            self._learn(event.user, event.user_id)
            user = self.key(event.user)
            if event.response is PermissionResponse.GRANTED:
                self.ledger.reply(user, True, permanent=event.permanent, expires_at=event.expires_at,
                                  source=event.source, message_id=event.message_id, at=event.timestamp)
            elif event.response is PermissionResponse.REJECTED:
                self.ledger.reply(user, False, source="user_action", message_id=event.message_id,
                                  at=event.timestamp)
            elif event.response is PermissionResponse.REVOKED:
                self.ledger.revoked(user, at=event.timestamp, key=event.message_id)
            else:
                return True
            self._wake(user, self.ledger.status(user).status is PermissionState.GRANTED)
            log.info("permission %s from %s", event.response.value, mask_phone(user))
            return True
        if isinstance(event, MessageStatus):
            self._learn(event.recipient, event.user_id)
            recipient = event.recipient or event.user_id
            if event.status == "delivered" and recipient:
                self.ledger.request_delivered(self.key(recipient), event.message_id, at=event.timestamp)
            return True
        return False

    def _wake(self, user: str, granted: bool) -> None:
        for future in self._waiters.pop(user, []):
            if not future.done():
                future.set_result(granted)

    # -- calls -----------------------------------------------------------------------------

    def watch(self, manager) -> None:
        """Count calls as the provider does, from the manager's typed call events."""
        manager.on(ev.CallCreated, ev.OfferSent, ev.Accepted, ev.CallEnded, handler=self.observe)

    def observe(self, call: Call, event: ev.CallEvent) -> None:
        """A call event: placed, answered, unanswered or refused (outbound); received
        and answered (inbound)."""
        if not call.user or not call.wacid and not isinstance(event, ev.CallEnded):
            return
        try:
            user = self.key(call.user)
        except ValueError:
            return
        if call.direction is Direction.BUSINESS_INITIATED:
            if isinstance(event, ev.OfferSent):
                self.ledger.call_placed(user, call.wacid)
            elif isinstance(event, ev.Accepted):
                self.ledger.call_answered(user, call.wacid)
            elif isinstance(event, ev.CallEnded):
                if call.error is not None:
                    self.refused(user, call.error)
                if call.wacid and call.elapsed_until("accepted") is None:
                    self.ledger.call_unanswered(user, call.wacid)
        elif isinstance(event, ev.CallCreated):
            self.ledger.inbound_call(user, call.wacid)
        elif isinstance(event, ev.Accepted):
            self.ledger.inbound_call(user, call.wacid, answered=True)
