"""Who may use the console: the API token, exchanged once for a signed session cookie.

A browser cannot put a bearer header on ``<audio src>`` or ``EventSource``, so the login
page takes the API token and sets a session cookie instead. The cookie is *stateless*:
``<expiry>.<nonce>.<signature>``, signed with a key derived from the API token, so any
instance of a cluster accepts it, a restart keeps it, and rotating the token logs every
browser out. Its CSRF token is derived from the same nonce (a form posted from another
site cannot know it; the cookie itself is ``SameSite=Strict`` as well).

Scripts and proxies may skip the cookie and send ``Authorization: Bearer <token>`` on
console pages as on the API; such requests need no CSRF token (a browser never adds that
header by itself).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COOKIE", "ConsoleAuth", "Session"]

#: The session cookie's name.
COOKIE = "wacall_console"
#: How long a login lasts.
SESSION_S = 12 * 3600.0


@dataclass(frozen=True, slots=True)
class Session:
    """An authenticated console request: by cookie (``nonce`` set, CSRF applies) or by
    bearer header (``nonce`` ``None``)."""

    nonce: str | None
    expires_at: float | None

    @property
    def by_cookie(self) -> bool:
        return self.nonce is not None


class ConsoleAuth:
    """Issues and checks session cookies and CSRF tokens for the API token ``token``.
    With no token the console is off (:attr:`enabled` is false) and nothing verifies."""

    def __init__(self, token: str | None, *, session_s: float = SESSION_S,
                 clock: Callable[[], float] = time.time) -> None:
        self._token = token.encode() if token else None
        self._key = hmac.new(self._token, b"wacall console session v1", hashlib.sha256).digest() \
            if self._token else b""
        self.session_s = session_s
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    # -- login -------------------------------------------------------------------------

    def token_matches(self, given: str) -> bool:
        """Is ``given`` the API token? (Constant time; any bytes simply do not match.)"""
        if self._token is None:
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self._token)

    def issue(self) -> str:
        """A fresh session cookie value."""
        expires = int(self._clock() + self.session_s)
        payload = f"{expires}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{self._sign(payload)}"

    # -- checking ----------------------------------------------------------------------

    def session(self, cookie: str | None) -> Session | None:
        """The session ``cookie`` proves, or ``None`` (missing, forged, expired)."""
        if not self.enabled or not cookie or len(cookie) > 200:
            return None
        payload, _, signature = cookie.rpartition(".")
        expires, _, nonce = payload.partition(".")
        if not nonce or not hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            return None
        try:
            expires_at = float(int(expires))
        except ValueError:
            return None
        if expires_at <= self._clock():
            return None
        return Session(nonce, expires_at)

    def bearer(self, header: str | None) -> Session | None:
        """The session an ``Authorization: Bearer <token>`` header proves, or ``None``."""
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not self.token_matches(given):
            return None
        return Session(None, None)

    def request_session(self, headers, cookies) -> Session | None:
        """A request's session: its bearer header, else its cookie."""
        return self.bearer(headers.get("Authorization")) or self.session(cookies.get(COOKIE))

    def csrf(self, session: Session) -> str:
        """The CSRF token forms of this session carry (empty for bearer requests)."""
        if session.nonce is None:
            return ""
        return self._sign(f"csrf.{session.nonce}")

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        if not session.by_cookie:
            return True  # (a bearer header is never sent by a browser on its own)
        return bool(given) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                   self.csrf(session).encode())
