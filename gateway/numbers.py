"""Phone numbers as WhatsApp writes them: E.164 digits without the ``+``."""

from __future__ import annotations

import re

#: ASCII digits only: other scripts' digits (``٤٩١٥…``, ``４９…``) are not a number
#: WhatsApp knows, and would become separate ledger keys.
_E164 = re.compile(r"[1-9][0-9]{7,14}")


def normalize_number(number: str) -> str:
    """``+49 151 1234-5678`` -> ``4915112345678``; ValueError if not an E.164 number."""
    if not isinstance(number, str):
        raise ValueError(f"a phone number is a string, not {type(number).__name__}")
    digits = re.sub(r"[ \t\-().]", "", number).removeprefix("+")
    if not _E164.fullmatch(digits):
        shown = number if len(number) <= 32 else number[:32] + "…"
        raise ValueError(f"not an E.164 phone number: {shown!r}")
    return digits
