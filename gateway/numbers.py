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


#: A business-scoped user id: an ISO 3166 alpha-2 country code, ``.``, up to 128 letters and
#: digits; a parent (enterprise) id has ``ENT.`` after the country: ``US.ENT.1181…``.
_BSUID = re.compile(r"([A-Za-z]{2})\.(ENT\.)?([A-Za-z0-9]{1,128})", re.IGNORECASE)


def is_bsuid(value: object) -> bool:
    """Whether ``value`` is a business-scoped user id (``US.13491208655302741918``)."""
    return isinstance(value, str) and _BSUID.fullmatch(value.strip()) is not None


def normalize_recipient(value: str) -> str:
    """Whom a call or permission request goes to: a BSUID (country code and ``ENT``
    upper-cased, the id as given) or a phone number's E.164 digits; ValueError otherwise."""
    if isinstance(value, str):
        match = _BSUID.fullmatch(value.strip())
        if match is not None:
            country, parent, local = match.groups()
            return f"{country.upper()}.{'ENT.' if parent else ''}{local}"
    try:
        return normalize_number(value)
    except ValueError:
        shown = value if not isinstance(value, str) or len(value) <= 32 else value[:32] + "…"
        raise ValueError(f"not an E.164 phone number or a BSUID (CC.id): {shown!r}") from None


def display(user: str) -> str:
    """How a user is written in the API: ``+4915112345678``, or the BSUID as it is."""
    return user if is_bsuid(user) else "+" + user.lstrip("+")
