"""Phone numbers as WhatsApp writes them: E.164 digits without the ``+``."""

from __future__ import annotations

import re

_E164 = re.compile(r"^\d{8,15}$")


def normalize_number(number: str) -> str:
    """``+49 151 1234-5678`` -> ``4915112345678``; ValueError if not an E.164 number."""
    digits = re.sub(r"[\s\-().]", "", str(number)).removeprefix("+")
    if not _E164.match(digits):
        raise ValueError(f"not an E.164 phone number: {number!r}")
    return digits
