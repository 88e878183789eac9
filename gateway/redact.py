"""Masking helpers for logs and printed configuration.

Rule for the whole code base: an API key, access token, app secret or a user's
phone number never appears whole in a log line. Pass them through these helpers
first.
"""

from __future__ import annotations

import re

__all__ = ["mask_phone", "mask_secret", "mask_text"]

_KEEP_DIGITS = 4
_SECRET_PREFIX = 4
_SHORT_SECRET = 16  # shorter secrets reveal nothing, not even a prefix
_PHONE_RUN = re.compile(r"\+?\d{7,}")


_BSUID_PREFIX = re.compile(r"[A-Z]{2}\.(?:ENT\.)?(?=[A-Za-z0-9]+$)")


def mask_phone(s: str | int | None) -> str:
    """Mask a phone number (or any id made of digits), keeping the last 4 digits.

    A leading ``+`` and non-digit characters are kept; every other digit becomes ``*``::

        mask_phone("+49 151 12345678") == "+** *** ****5678"
        mask_phone("4915112345678")    == "*********5678"

    ``None`` gives ``""``. A value with 4 digits or fewer is masked entirely, so
    it is never shown whole either.
    """
    if s is None:
        return ""
    text = str(s)
    bsuid = _BSUID_PREFIX.match(text)
    if bsuid is not None:  # a business-scoped user id: its country (and ENT) and last 4 stay
        rest = text[bsuid.end():]
        keep = 4 if len(rest) > 4 else 0
        return bsuid.group(0) + "*" * (len(rest) - keep) + rest[len(rest) - keep:]
    total = sum(ch.isdigit() for ch in text)
    keep = _KEEP_DIGITS if total > _KEEP_DIGITS else 0
    out: list[str] = []
    seen = 0
    for ch in text:
        if ch.isdigit():
            seen += 1
            out.append(ch if seen > total - keep else "*")
        else:
            out.append(ch)
    return "".join(out)


def mask_secret(s: str | None) -> str:
    """Mask an API key, token or secret: at most the first 4 characters survive.

    ``mask_secret("abcd" + 36 * "x") == "abcd…(40 chars)"``. Secrets shorter than
    16 characters are masked completely (``"****(8 chars)"``); ``None`` or an
    empty string gives ``""``.
    """
    if not s:
        return ""
    n = len(s)
    prefix = s[:_SECRET_PREFIX] + "…" if n >= _SHORT_SECRET else "****"
    return f"{prefix}({n} chars)"


def mask_text(s: str | None) -> str:
    """Mask every run of 7+ digits (optionally ``+``-prefixed) in free text.

    Meant for provider error messages, which may quote the callee's number.
    """
    if not s:
        return ""
    return _PHONE_RUN.sub(lambda m: mask_phone(m.group(0)), s)
