"""REGISTER with a registrar (RFC 3261 §10): Digest credentials, refresh before expiry,
un-REGISTER (``Expires: 0``) on close."""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

from gateway.redact import mask_text
from gateway.sip.message import URI, Address, Response, new_call_id, split_header

#: The :class:`gateway.sip.ua.UserAgent` this works for (not imported: it imports us).
UserAgent = Any

log = logging.getLogger(__name__)


class RegistrationState(enum.Enum):
    """Where a registration stands."""

    NEW = "new"
    REGISTERED = "registered"
    FAILED = "failed"
    UNREGISTERED = "unregistered"


class Registration:
    """Keeps ``aor`` (default ``sip:user@<registrar host>``) bound to our Contact at
    ``registrar``. The binding is refreshed at half its granted lifetime; a failed refresh
    is retried after ``retry`` seconds. ``last_response`` is the last final response."""

    def __init__(self, ua: UserAgent, registrar: str, *, user: str, password: str | None = None,
                 expires: int = 3600, aor: str | None = None, retry: float = 30.0) -> None:
        self.ua = ua
        self.registrar = URI.parse(registrar)
        self.user = user
        self._auth = (user, password) if password is not None else None
        self.expires = expires
        self.aor = aor or f"sip:{user}@{self.registrar.host}" + (
            f":{self.registrar.port}" if self.registrar.port else "")
        self.retry = retry
        self.state = RegistrationState.NEW
        self.granted: int | None = None
        self.last_response: Response | None = None
        self.registered = asyncio.Event()
        self._call_id = new_call_id(ua.advertised_host)
        self._cseq = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> Response:
        """REGISTER now, then keep refreshing in the background; the first final response."""
        resp = await self._register(self.expires)
        self._task = self.ua._spawn(self._refresh_loop())
        return resp

    async def _register(self, expires: int) -> Response:
        self._cseq += 1
        req, peer = self.ua.new_request("REGISTER", URI(self.registrar.scheme, self.registrar.host,
                                                        port=self.registrar.port,
                                                        parameters=self.registrar.parameters),
                                        from_uri=self.aor, to=f"<{self.aor}>", call_id=self._call_id,
                                        cseq=self._cseq, headers={"Expires": str(expires)})
        resp = await self.ua.send_request(req, peer, auth=self._auth)
        self._cseq = max(self._cseq, resp.cseq.sequence)
        self.last_response = resp
        if expires == 0:
            self.state = RegistrationState.UNREGISTERED
            self.registered.clear()
        elif 200 <= resp.code < 300:
            self.granted = self._granted(resp, expires)
            self.state = RegistrationState.REGISTERED
            self.registered.set()
            log.info("sip: registered %s for %ss", mask_text(self.aor), self.granted)
        else:
            self.state = RegistrationState.FAILED
            self.registered.clear()
            log.warning("sip: REGISTER %s failed: %d %s", mask_text(self.aor), resp.code, resp.phrase)
        return resp

    def _granted(self, resp: Response, asked: int) -> int:
        ours = self.ua.contact(self.ua._default_transport())
        ours_uri = Address.parse(ours).uri
        for value in resp.headers.getlist("Contact"):
            for item in split_header(value):
                try:
                    addr = Address.parse(item)
                except ValueError:
                    continue
                if addr.uri.host == ours_uri.host and addr.uri.port == ours_uri.port and addr.parameters.get("expires"):
                    return int(addr.parameters["expires"] or asked)
        value = resp.headers.get("Expires")
        return int(value) if value and value.isdigit() else asked

    async def _refresh_loop(self) -> None:
        while True:
            if self.state is RegistrationState.REGISTERED and self.granted:
                delay = max(1.0, self.granted / 2)
            else:
                delay = self.retry
            await asyncio.sleep(delay)
            await self._register(self.expires)

    async def refresh(self) -> Response:
        """REGISTER again now."""
        return await self._register(self.expires)

    async def close(self) -> None:
        """Stop refreshing and remove the binding (``Expires: 0``) if registered."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.state is RegistrationState.REGISTERED:
            await self._register(0)
