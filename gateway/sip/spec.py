"""A SIP party as data: where to dial, with what credentials and headers (the SIP leg's
*leg spec*, parsed once at the edge: ``POST /v1/calls`` ``"sip": {...}`` or
``WACALL_INBOUND_SIP_URI``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import unquote

__all__ = ["SipSpec", "parse_uri"]

#: ``sip:`` / ``sips:`` URIs: ``[user@]host[:port][;params]`` (no headers part).
_URI = re.compile(r"(?P<scheme>sips?):(?:(?P<user>[^@\s;?]+)@)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)"
                  r"(?::(?P<port>\d{1,5}))?(?P<params>(?:;[^\s;?]+)*)")
#: Header names a caller may add (RFC 3261 token); the ones wacall writes itself are refused.
_TOKEN = re.compile(r"[A-Za-z0-9!%*_+`'~.-]+")
_RESERVED = {"via", "from", "to", "call-id", "cseq", "contact", "content-length", "content-type", "max-forwards",
             "route", "record-route", "authorization", "proxy-authorization", "x-wacall-call-id",
             "x-whatsapp-call-id", "session-expires", "min-se", "supported", "require", "allow"}
MAX_HEADERS = 20
MAX_VALUE = 256
CODECS = ("opus", "G722", "PCMU", "PCMA")


def parse_uri(uri: str) -> dict[str, Any]:
    """``sip:ivr@pbx.example:5060;transport=tcp`` → scheme, user, host, port, params
    (``ValueError`` when it is not a SIP URI)."""
    if not isinstance(uri, str):
        raise ValueError("must be a sip: or sips: URI")
    match = _URI.fullmatch(uri.strip())
    if match is None:
        raise ValueError(f"not a sip: or sips: URI: {uri[:80]!r}")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"bad port in {uri[:80]!r}")
    params = {}
    for item in filter(None, (match["params"] or "").split(";")):
        name, _, value = item.partition("=")
        params[name.lower()] = value
    transport = params.get("transport", "tls" if match["scheme"] == "sips" else "udp").lower()
    if transport not in ("udp", "tcp", "tls"):
        raise ValueError(f"transport must be udp, tcp or tls, got {transport!r}")
    return {"scheme": match["scheme"], "user": unquote(match["user"]) if match["user"] else None,
            "host": match["host"].strip("[]"), "port": port or (5061 if transport == "tls" else 5060),
            "transport": transport, "params": params}


@dataclass(frozen=True, slots=True)
class SipSpec:
    """Dial ``uri`` once the WhatsApp user picked up, and join the two legs.

    ``username``/``password`` answer the far side's digest challenge; ``headers`` are
    added to the INVITE (wacall adds ``X-Wacall-Call-Id`` and ``X-WhatsApp-Call-Id``
    itself); ``codecs`` is the offer's preference order; ``answer_timeout_s`` bounds the
    ringing on the SIP side; ``probe`` sends OPTIONS before the WhatsApp call is placed
    (no answer at all: no call), off for a party that does not answer OPTIONS."""

    kind: ClassVar[str] = "sip"

    uri: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict)
    codecs: tuple[str, ...] = CODECS
    answer_timeout_s: float = 30.0
    probe: bool = True

    @classmethod
    def from_dict(cls, data: Any) -> SipSpec:
        if not isinstance(data, dict):
            raise ValueError("sip must be an object: {'uri', 'username'?, 'password'?, 'headers'?, 'codecs'?, "
                             "'answer_timeout_s'?, 'probe'?}")
        unknown = sorted(set(data) - {"uri", "username", "password", "headers", "codecs", "answer_timeout_s",
                                      "probe"})
        if unknown:
            raise ValueError(f"unknown sip fields: {', '.join(unknown)}")
        uri = data.get("uri")
        try:
            parse_uri(uri)
        except ValueError as exc:
            raise ValueError(f"sip.uri: {exc}") from None
        username, password = data.get("username"), data.get("password")
        for name, value in (("username", username), ("password", password)):
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_VALUE
                                      or not value.isprintable()):
                raise ValueError(f"sip.{name} must be 1 to {MAX_VALUE} printable characters")
        if (username is None) != (password is None):
            raise ValueError("sip.username and sip.password go together")
        headers = data.get("headers") or {}
        if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
            raise ValueError(f"sip.headers must be an object of at most {MAX_HEADERS} headers")
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name) or name.lower() in _RESERVED:
                raise ValueError(f"sip.headers: {name[:40]!r} is not a header wacall lets you set")
            if not isinstance(value, str) or len(value) > MAX_VALUE or not value.isprintable():
                raise ValueError(f"sip.headers[{name!r}] must be a line of at most {MAX_VALUE} characters")
        codecs = data.get("codecs", CODECS)
        if isinstance(codecs, str):
            codecs = [c.strip() for c in codecs.split(",") if c.strip()]
        if not isinstance(codecs, (list, tuple)) or not codecs:
            raise ValueError(f"sip.codecs must be a list of {', '.join(CODECS)}")
        known = {c.lower(): c for c in CODECS}
        chosen = []
        for codec in codecs:
            name = known.get(str(codec).lower())
            if name is None:
                raise ValueError(f"sip.codecs: {str(codec)[:20]!r} is not one of {', '.join(CODECS)}")
            if name not in chosen:
                chosen.append(name)
        timeout = data.get("answer_timeout_s", 30.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 1 <= timeout <= 600:
            raise ValueError("sip.answer_timeout_s must be a number of seconds from 1 to 600")
        probe = data.get("probe", True)
        if not isinstance(probe, bool):
            raise ValueError("sip.probe must be true or false")
        return cls(uri.strip(), username, password, dict(headers), tuple(chosen), float(timeout), probe)

    def to_dict(self) -> dict[str, Any]:
        """As ``from_dict`` takes it (the password included: a parked call keeps it)."""
        out: dict[str, Any] = {"uri": self.uri, "headers": dict(self.headers), "codecs": list(self.codecs),
                               "answer_timeout_s": self.answer_timeout_s, "probe": self.probe}
        if self.username is not None:
            out.update(username=self.username, password=self.password)
        return out

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username is not None and self.password is not None else None

    @property
    def target(self) -> str:
        """The URI as logs and events show it: no user part (it may be a phone number)."""
        parts = parse_uri(self.uri)
        return f"{parts['scheme']}:{'…@' if parts['user'] else ''}{parts['host']}:{parts['port']}"
