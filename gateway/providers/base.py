"""The calling-provider interface: the five call actions over HTTPS.

Every action is one ``POST`` to the provider's calls endpoint with
``messaging_product: "whatsapp"`` and an ``action``. Provider limits that matter
to callers:

* ``biz_opaque_callback_data`` is at most 512 characters; Meta echoes it on
  ``statuses`` and on the ``terminate`` webhook.
* The SDP answer to ``connect`` arrives by webhook, not in the HTTP response.
* ``pre_accept`` and ``accept`` send ``sdp_type: "answer"`` (some reference
  tables say "offer"; the examples and working clients use "answer"), and
  ``accept`` must carry the same SDP as ``pre_accept``.
* A ``connect`` that fails with :class:`ProviderUnavailableError` has an unknown
  outcome: the phone may already ring, so do not retry it blindly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from abc import ABC, abstractmethod
from email.utils import parsedate_to_datetime
from collections.abc import Callable
from typing import Any, ClassVar

import aiohttp

from gateway.errors import ProviderError, ProviderUnavailableError, error_for
from gateway.numbers import is_bsuid, normalize_recipient
from gateway.redact import mask_phone, mask_secret, mask_text

#: Requests that change nothing (reads) are retried this often on a network error, a
#: 5xx or a 429, after ``READ_PAUSE_S`` doubling, with jitter (or the provider's
#: ``Retry-After``, up to ``MAX_RETRY_AFTER_S``).
READ_ATTEMPTS = 3
READ_PAUSE_S = 0.2
MAX_RETRY_AFTER_S = 5.0
#: What a connect that failed with a 5xx (of any shape) says to do: not to retry it.
CONNECT_UNKNOWN = "Check connectivity and provider status; do not blindly retry a connect"

__all__ = ["CallingProvider", "MAX_CALLBACK_DATA"]

log = logging.getLogger(__name__)

MAX_CALLBACK_DATA = 512
_CODE_IN_TEXT = (re.compile(r"#(\d+)"), re.compile(r"(?<!\d)(13\d{4})(?!\d)"))
_SNIPPET = 200


class CallingProvider(ABC):
    """Base class of the Meta Graph and 360dialog call-action clients.

    ``session`` may be shared with the rest of the application; when ``None``,
    the provider creates its own on first use and :meth:`close` closes it.
    ``timeout`` (seconds) bounds each request.
    """

    name: ClassVar[str] = "provider"

    def __init__(
        self,
        *,
        base_url: str,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = session
        self._owns_session = session is None

    def __repr__(self) -> str:  # credentials never appear here
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    @property
    @abstractmethod
    def calls_url(self) -> str:
        """Absolute URL of the provider's call-actions endpoint."""

    @abstractmethod
    def _auth_headers(self) -> dict[str, str]:
        """Headers that authenticate a request."""

    # -- actions -------------------------------------------------------------

    async def connect(
        self, to: str, sdp: str, biz_opaque_callback_data: str | None = None, *,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Start a business-initiated call to ``to``; return its ``wacid.…`` id.

        ``to`` is the user's number with country code; a leading ``+`` and spaces
        are removed. Requires the user's call permission (else 138006).
        """
        whom = self._recipient(to)
        digits = next(iter(whom.values()))
        _require(sdp, "sdp")
        body = {"messaging_product": "whatsapp", **whom, "action": "connect",
                "session": {"sdp_type": "offer", "sdp": sdp}, **self._call_options(extra)}
        _add_callback_data(body, biz_opaque_callback_data)
        try:
            data = await self._post(body)
        except ProviderError as exc:
            if exc.http_status is not None and exc.http_status >= 500:
                exc.resolution = CONNECT_UNKNOWN  # (the call may be placed all the same)
            raise
        calls = data.get("calls")
        call_id = None
        if isinstance(calls, list) and calls and isinstance(calls[0], dict):
            call_id = calls[0].get("id")
        if not isinstance(call_id, str) or not call_id:
            raise ProviderError(f"{self.name} accepted connect but returned no call id")
        log.info("%s connect to=%s call_id=%s", self.name, mask_phone(digits), call_id)
        return call_id

    async def pre_accept(self, call_id: str, sdp: str) -> None:
        """Send the SDP answer for an incoming call so ICE/DTLS can start early."""
        _require(call_id, "call_id")
        _require(sdp, "sdp")
        await self._post({"messaging_product": "whatsapp", "call_id": call_id,
                          "action": "pre_accept",
                          "session": {"sdp_type": "answer", "sdp": sdp}})
        log.info("%s pre_accept call_id=%s", self.name, call_id)

    async def accept(
        self, call_id: str, sdp: str, biz_opaque_callback_data: str | None = None, *,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Answer an incoming call; send media only after this returns."""
        _require(call_id, "call_id")
        _require(sdp, "sdp")
        body = {"messaging_product": "whatsapp", "call_id": call_id, "action": "accept",
                "session": {"sdp_type": "answer", "sdp": sdp}, **self._call_options(extra)}
        _add_callback_data(body, biz_opaque_callback_data)
        await self._post(body)
        log.info("%s accept call_id=%s", self.name, call_id)

    async def reject(self, call_id: str) -> None:
        """Decline an incoming call (within ~30-60 s of the connect webhook)."""
        await self._simple_action(call_id, "reject")

    async def terminate(self, call_id: str) -> None:
        """End a call from the business side (needed for accurate billing)."""
        await self._simple_action(call_id, "terminate")

    async def close(self) -> None:
        """Close the HTTP session if this provider created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- call permissions (see gateway.permissions for the rules) -----------------

    @property
    @abstractmethod
    def messages_url(self) -> str:
        """Where messages (interactive permission requests, templates) are sent."""

    @abstractmethod
    def _permissions_request(self, user: str) -> tuple[str, dict[str, str] | None]:
        """URL and query of the permission-state lookup for ``user``."""

    @property
    @abstractmethod
    def settings_url(self) -> str:
        """The call-settings endpoint."""

    @abstractmethod
    def _templates_url(self, waba_id: str | None) -> str:
        """Where message templates are created."""

    #: How this provider spells the template component (Meta: lower case).
    permission_component = "call_permission_request"

    async def send_permission_request(self, to: str, body_text: str) -> str:
        """Send the interactive call-permission-request message; return its ``wamid``.
        Free-form, so only inside the customer-service window (else 131047)."""
        whom = self._recipient(to)
        digits = next(iter(whom.values()))
        _require(body_text, "body_text")
        data = await self._request("POST", self.messages_url, {
            "messaging_product": "whatsapp", "recipient_type": "individual", **whom,
            "type": "interactive",
            "interactive": {"type": "call_permission_request",
                            "action": {"name": "call_permission_request"},
                            "body": {"text": body_text}}}, action="call_permission_request")
        message_id = _message_id(self.name, data)
        self._contacts(data)
        log.info("%s permission request to=%s message_id=%s", self.name, mask_phone(digits), message_id)
        return message_id

    async def send_template(self, to: str, name: str, language: str,
                            parameters: list[str] | dict[str, str] | None = None) -> str:
        """Send an approved template (e.g. one with a call-permission-request component)
        with body parameters: a list (positional ``{{1}}``) or a dict (named)."""
        whom = self._recipient(to)
        digits = next(iter(whom.values()))
        _require(name, "name")
        template: dict[str, Any] = {"name": name, "language": {"code": language}}
        if parameters:
            if isinstance(parameters, dict):
                values = [{"type": "text", "parameter_name": k, "text": str(v)} for k, v in parameters.items()]
            else:
                values = [{"type": "text", "text": str(v)} for v in parameters]
            template["components"] = [{"type": "body", "parameters": values}]
        data = await self._request("POST", self.messages_url, {
            "messaging_product": "whatsapp", "recipient_type": "individual", **whom,
            "type": "template", "template": template}, action="template")
        message_id = _message_id(self.name, data)
        self._contacts(data)
        log.info("%s template %s to=%s message_id=%s", self.name, name, mask_phone(digits), message_id)
        return message_id

    async def create_permission_template(
        self, *, name: str, language: str, body_text: str, example_values: list[str] | None = None,
        footer: str | None = None, category: str = "UTILITY", waba_id: str | None = None,
    ) -> dict[str, Any]:
        """Create a template with a call-permission-request component (category
        MARKETING or UTILITY; send it only once it is APPROVED)."""
        if category not in ("MARKETING", "UTILITY"):
            raise ValueError("category must be MARKETING or UTILITY")
        body: dict[str, Any] = {"type": "BODY", "text": body_text}
        if example_values:
            body["example"] = {"body_text": [list(example_values)]}
        components = [body]
        if footer:
            components.append({"type": "FOOTER", "text": footer})
        components.append({"type": self.permission_component})
        return await self._request("POST", self._templates_url(waba_id), {
            "name": name, "language": language, "category": category, "components": components},
            action="create_template")

    async def get_permission_state(self, user: str) -> dict[str, Any]:
        """The provider's truth about ``user``: ``permission`` and ``actions[]`` with
        ``can_perform_action`` and ``limits`` (see gateway.permissions)."""
        whom = self._recipient(user)
        url, params = self._permissions_request(next(iter(whom.values())))
        return await self._request("GET", url, params=params, action="call_permissions")

    async def update_call_settings(self, calling: dict[str, Any]) -> None:
        """``POST`` the ``calling`` settings object (e.g. ``{"callback_permission_status":
        "ENABLED"}``)."""
        await self._request("POST", self.settings_url, {"calling": calling}, action="settings")

    #: Whether users can be addressed by business-scoped user id (``recipient``).
    supports_bsuid: ClassVar[bool] = False
    #: Whether WhatsApp's own call recording / transcription can be asked for.
    supports_recording: ClassVar[bool] = False
    #: The largest artifact (recording, transcript) :meth:`download` takes.
    MAX_DOWNLOAD = 256 * 1024 * 1024

    def _call_options(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        """Optional ``connect``/``accept`` fields (``recording``, ``transcription``)."""
        if not extra:
            return {}
        if not self.supports_recording:
            raise ValueError(f"{self.name} does not document call recording or transcription fields")
        return dict(extra)

    async def download(self, url: str) -> bytes:
        """An artifact the provider announced (recording, transcript): an authenticated
        GET of its short-lived URL."""
        try:
            async with self._get_session().get(url, headers=self._auth_headers(),
                                               timeout=aiohttp.ClientTimeout(total=max(self.timeout, 60))) as resp:
                if resp.status >= 400:
                    text = await resp.text(errors="replace")
                    err = _error_from(self.name, resp.status, _decode(text), text) or ProviderError(
                        f"{self.name} download failed with HTTP {resp.status}")
                    raise err
                if (resp.content_length or 0) > self.MAX_DOWNLOAD:
                    raise ProviderError(f"{self.name} artifact is larger than {self.MAX_DOWNLOAD} bytes")
                data = await resp.content.read(self.MAX_DOWNLOAD + 1)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ProviderUnavailableError(f"{self.name} unreachable during download: {type(exc).__name__}") from exc
        if len(data) > self.MAX_DOWNLOAD:
            raise ProviderError(f"{self.name} artifact is larger than {self.MAX_DOWNLOAD} bytes")
        return data
    #: Called with ``(phone, bsuid)`` when a response names a user both ways (a sent
    #: message's ``contacts``: ``wa_id`` and ``user_id``); the permission gate links them.
    on_contact: Callable[[str, str], None] | None = None

    def _contacts(self, data: dict[str, Any]) -> None:
        contacts = data.get("contacts")
        if self.on_contact is None or not isinstance(contacts, list):
            return
        for contact in contacts:
            if isinstance(contact, dict) and isinstance(contact.get("wa_id"), str) \
                    and is_bsuid(contact.get("user_id")):
                self.on_contact(contact["wa_id"], contact["user_id"])

    def _recipient(self, to: str) -> dict[str, str]:
        """``{"to": digits}`` for a phone number, ``{"recipient": bsuid}`` for a BSUID
        (:class:`BsuidUnsupported` where the provider does not document it)."""
        if is_bsuid(to):
            if not self.supports_bsuid:
                raise BsuidUnsupported(
                    f"{self.name} does not document business-scoped user ids (recipient); "
                    "call and ask by phone number, or use the Meta backend")
            return {"recipient": normalize_recipient(to)}
        return {"to": _normalise_to(to)}

    # -- transport -------------------------------------------------------------

    async def _simple_action(self, call_id: str, action: str) -> None:
        _require(call_id, "call_id")
        await self._post({"messaging_product": "whatsapp", "call_id": call_id,
                          "action": action})
        log.info("%s %s call_id=%s", self.name, action, call_id)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or (self._owns_session and self._session.closed):
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a call action; return the decoded JSON object or raise a ProviderError."""
        return await self._request("POST", self.calls_url, body, action=str(body.get("action")))

    async def _request(self, method: str, url: str, body: dict[str, Any] | None = None, *,
                       params: dict[str, str] | None = None, action: str) -> dict[str, Any]:
        """One authenticated request; the decoded JSON object, or a typed ProviderError.
        A read (GET) is retried on a network error, a 5xx or a 429 (honouring
        ``Retry-After``); actions are not (a second ``connect`` could ring twice)."""
        attempts = READ_ATTEMPTS if method == "GET" else 1
        pause = READ_PAUSE_S
        for attempt in range(1, attempts + 1):
            try:
                return await self._request_once(method, url, body, params=params, action=action)
            except ProviderError as exc:
                retryable = isinstance(exc, ProviderUnavailableError) or exc.http_status == 429
                if not retryable or attempt == attempts:
                    raise
                wait = getattr(exc, "retry_after_s", None)
                wait = min(wait, MAX_RETRY_AFTER_S) if wait is not None else pause * random.uniform(0.5, 1.0)
                log.info("%s %s: retrying in %.2f s (attempt %d of %d)", self.name, action, wait,
                         attempt + 1, attempts)
                await asyncio.sleep(wait)
                pause *= 2
        raise AssertionError("unreachable")

    def _scrub(self, text: str | None) -> str | None:
        """``text`` without this client's own credentials (a provider may echo them)."""
        if not text:
            return text
        for value in self._auth_headers().values():
            secret = value.removeprefix("Bearer ").strip()
            if len(secret) >= 4 and secret in text:
                text = text.replace(secret, mask_secret(secret))
        return text

    async def _request_once(self, method: str, url: str, body: dict[str, Any] | None, *,
                            params: dict[str, str] | None, action: str) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", **self._auth_headers()}
        try:
            async with self._get_session().request(
                method, url, json=body, params=params, headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                status = resp.status
                text = await resp.text(errors="replace")
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            log.warning("%s %s failed: %s", self.name, action, reason)
            raise ProviderUnavailableError(
                f"{self.name} unreachable during {action}: {reason}") from exc
        data = _decode(text)
        err = _error_from(self.name, status, data, text)
        if err is not None:
            err.message = self._scrub(err.message)
            err.details = self._scrub(err.details)
            err.args = (err._summary(),)
            if status == 429 and retry_after is not None:
                err.retry_after_s = retry_after
                if getattr(err, "retry_at", None) is None:
                    err.retry_at = time.time() + retry_after  # (shown to API callers)
            log.warning("%s %s failed: %s", self.name, action, mask_text(str(err)))
            raise err
        return data if isinstance(data, dict) else {}


def _retry_after(value: str | None) -> float | None:
    """``Retry-After``: seconds, or an HTTP date; ``None`` if absent or nonsense."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), 86400))
    try:
        seconds = parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):
        return None
    return max(0.0, min(seconds, 86400.0))


def _message_id(provider: str, data: dict[str, Any]) -> str:
    messages = data.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        message_id = messages[0].get("id")
        if isinstance(message_id, str) and message_id:
            return message_id
    raise ProviderError(f"{provider} accepted the message but returned no message id")


class BsuidUnsupported(ValueError):
    """A BSUID recipient on a provider that does not document them."""


def _normalise_to(to: str) -> str:
    digits = "".join(str(to).split()).lstrip("+")
    if not digits.isdigit():
        raise ValueError("'to' must be a phone number with country code (digits, "
                         "optional leading '+')")
    return digits


def _require(value: str, field: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field!r} must be a non-empty string")


def _add_callback_data(body: dict[str, Any], data: str | None) -> None:
    if data is None:
        return
    if len(data) > MAX_CALLBACK_DATA:
        raise ValueError(f"biz_opaque_callback_data is {len(data)} chars; "
                         f"the provider limit is {MAX_CALLBACK_DATA}")
    body["biz_opaque_callback_data"] = data


def _decode(text: str) -> Any:
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _code_in(text: str) -> int | None:
    for pattern in _CODE_IN_TEXT:
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    return None


def _details(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, dict) and "details" in value:
        value = value["details"]
    return value if isinstance(value, str) else json.dumps(value)


def _error_from(name: str, status: int, data: Any, text: str) -> ProviderError | None:
    """Map an HTTP response to an error, or ``None`` when it is a success."""
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):  # Graph envelope
            message = err.get("message") if isinstance(err.get("message"), str) else None
            code = _int_or_none(err.get("code"))
            if code is None and message:
                code = _code_in(message)
            return error_for(code, message, http_status=status,
                             details=_details(err.get("error_data")),
                             subcode=_int_or_none(err.get("error_subcode")),
                             fbtrace_id=err.get("fbtrace_id"))
        if isinstance(err, str) and err:  # 360dialog utils.ErrorResp
            return error_for(_code_in(err), err, http_status=status)
        errors = data.get("errors")
        if isinstance(errors, list) and errors:  # list style
            first = errors[0] if isinstance(errors[0], dict) else {}
            message = first.get("message") or first.get("title")
            return error_for(_int_or_none(first.get("code")),
                             message if isinstance(message, str) else None,
                             http_status=status,
                             details=_details(first.get("details") or first.get("error_data")))
        if 200 <= status < 300:
            if data.get("success") is False:
                return ProviderError(f"{name} answered success=false", http_status=status)
            return None
    elif 200 <= status < 300:
        return None  # empty or non-JSON 2xx: the HTTP status is the answer
    if status >= 500 or status < 200:
        snippet = f": {text.strip()[:_SNIPPET]}" if text.strip() else " with an empty body"
        return ProviderUnavailableError(f"{name} answered HTTP {status}{snippet}",
                                        http_status=status)
    snippet = f": {text.strip()[:_SNIPPET]}" if text.strip() else " with an empty body"
    return ProviderError(f"{name} answered HTTP {status}{snippet}", http_status=status)
