"""Who may POST webhooks: the three ways providers authenticate them.

* **Meta** signs every POST with ``X-Hub-Signature-256: sha256=<hex>``, the HMAC-SHA256
  of the raw body keyed with the app secret (``WACALL_APP_SECRET``).
* **360dialog** signs with ``x-360dialog-signature``, the HMAC-SHA256 of the raw body
  keyed with the webhook secret (``WACALL_D360_WEBHOOK_SECRET``); hex, with or without a
  ``sha256=`` prefix.
* **A custom header** that 360dialog and other BSPs let you attach to the webhook URL
  (``WACALL_WEBHOOK_HEADER="X-My-Token: s3cret"``), compared in constant time.

A request passes when one configured method accepts it; it is checked on the raw bytes,
before anything is parsed. With nothing configured, a server refuses to start unless
``WACALL_WEBHOOK_AUTH=none`` says so explicitly. The sandbox signs the webhooks it
delivers with the same settings (:meth:`WebhookAuth.sign`), so a sandbox in one process
and a gateway in another work with authentication on.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["WebhookAuth", "matches_hmac", "parse_header_setting", "MISSING_AUTH"]

META_HEADER = "X-Hub-Signature-256"
D360_HEADER = "x-360dialog-signature"

#: The one line a server without webhook authentication refuses to start with.
MISSING_AUTH = ("no webhook authentication configured: set WACALL_APP_SECRET (Meta), "
                "WACALL_D360_WEBHOOK_SECRET (360dialog) or WACALL_WEBHOOK_HEADER='Name: value', "
                "or WACALL_WEBHOOK_AUTH=none to accept unauthenticated webhooks")

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)


def parse_header_setting(raw: str) -> tuple[str, str]:
    """``"Name: value"`` -> ``("Name", "value")``; a clear error otherwise."""
    name, sep, value = str(raw).partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _TOKEN.match(name) or not value:
        raise ValueError("must be 'Header-Name: value' (a header name, a colon, a non-empty value)")
    if not value.isascii() or not value.isprintable():
        raise ValueError("the header value must be printable ASCII")
    return name, value


def _hmac_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def matches_hmac(secret: str | None, body: bytes, given: str | None, *, prefix_required: bool = True) -> bool:
    """Does ``given`` (``sha256=<hex>``; the prefix optional unless ``prefix_required``) carry
    the HMAC-SHA256 of ``body`` keyed with ``secret``? Constant time; any bytes refused cleanly."""
    if not given or not secret:
        return False
    given = given.strip()
    head, sep, tail = given.partition("=")
    if sep and head.lower() == "sha256":
        given = tail.strip()
    elif prefix_required:
        return False
    expected = _hmac_hex(secret, body).encode()
    # (any bytes compare in constant time; a non-ASCII header simply does not match)
    return hmac.compare_digest(expected, given.lower().encode("utf-8", "surrogateescape"))


@dataclass(frozen=True, slots=True)
class WebhookAuth:
    app_secret: str | None = None
    d360_secret: str | None = None
    header: tuple[str, str] | None = None
    #: ``WACALL_WEBHOOK_AUTH=none``: the operator accepts unauthenticated webhooks.
    disabled: bool = False

    @classmethod
    def from_settings(cls, settings) -> WebhookAuth:
        return cls(app_secret=settings.app_secret or None,
                   d360_secret=settings.d360_webhook_secret or None,
                   header=settings.webhook_header,
                   disabled=settings.webhook_auth == "none")

    @classmethod
    def generated(cls) -> WebhookAuth:
        """A random header secret, for a sandbox that delivers to its own process."""
        return cls(header=("X-Wacall-Sandbox-Token", secrets.token_urlsafe(24)))

    @property
    def configured(self) -> bool:
        return bool(self.app_secret or self.d360_secret or self.header)

    @property
    def methods(self) -> list[str]:
        out = []
        if self.app_secret:
            out.append(f"meta ({META_HEADER})")
        if self.d360_secret:
            out.append(f"360dialog ({D360_HEADER})")
        if self.header:
            out.append(f"header ({self.header[0]})")
        return out

    def check(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        """The method that authenticates this request (``"meta"``, ``"360dialog"``,
        ``"header"``), or ``None``. Without any method configured every request passes
        as ``"none"`` (the caller decided that is acceptable)."""
        if not self.configured:
            return "none"
        if matches_hmac(self.app_secret, body, headers.get(META_HEADER)):
            return "meta"
        if matches_hmac(self.d360_secret, body, headers.get(D360_HEADER), prefix_required=False):
            return "360dialog"
        if self.header:
            name, value = self.header
            given = headers.get(name)
            if given is not None and hmac.compare_digest(
                    value.encode(), given.strip().encode("utf-8", "surrogateescape")):
                return "header"
        return None

    def sign(self, body: bytes) -> dict[str, str]:
        """The headers that authenticate ``body`` by every configured method (what the
        sandbox sends, as the providers would)."""
        out: dict[str, str] = {}
        if self.app_secret:
            out[META_HEADER] = f"sha256={_hmac_hex(self.app_secret, body)}"
        if self.d360_secret:
            out[D360_HEADER] = _hmac_hex(self.d360_secret, body)
        if self.header:
            out[self.header[0]] = self.header[1]
        return out
