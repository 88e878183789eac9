"""SIP messages on the wire: parsing (with ``sipmessage``), framing on streams, and the
helpers every layer needs (branches, tags, responses built from requests).

Messages are ``sipmessage.Request`` and ``sipmessage.Response`` objects; header values we
write are kept as raw strings (``Headers.add``), and typed accessors are used to read.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence

from sipmessage import URI, Address, Message, Request, Response, Via

__all__ = [
    "BRANCH_MAGIC",
    "URI",
    "Address",
    "HeaderItems",
    "Request",
    "Response",
    "StreamFramer",
    "Via",
    "header_items",
    "make_response",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse",
    "reason_phrase",
    "serialize",
    "set_body",
    "split_header",
    "top_via",
]

BRANCH_MAGIC = "z9hG4bK"
MAX_MESSAGE = 65535

HeaderItems = Mapping[str, str] | Sequence[tuple[str, str]]
"""Extra headers a caller passes: a mapping, or ``(name, value)`` pairs to repeat a name."""

_PHRASES = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 407: "Proxy Authentication Required",
    408: "Request Timeout", 415: "Unsupported Media Type", 420: "Bad Extension",
    422: "Session Interval Too Small", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error",
    501: "Not Implemented", 503: "Service Unavailable", 504: "Server Time-out", 603: "Decline",
}


def reason_phrase(code: int) -> str:
    """The usual reason phrase of a status code (``"Unknown"`` for others)."""
    return _PHRASES.get(code, "Unknown")


def new_branch() -> str:
    """A fresh RFC 3261 branch (``z9hG4bK`` + 16 random hex digits)."""
    return BRANCH_MAGIC + secrets.token_hex(8)


def new_tag() -> str:
    """A fresh From/To tag."""
    return secrets.token_hex(6)


def new_call_id(host: str) -> str:
    """A fresh Call-ID, ``<random>@host``."""
    return f"{secrets.token_hex(10)}@{host}"


def _content_length(data: bytes) -> int | None:
    m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*\r?$", data)
    return int(m.group(1)) if m else None


def parse(data: bytes) -> Request | Response:
    """Parse one datagram or framed stream message; raises ``ValueError`` when it is not
    SIP, or when Via, From, To, Call-ID or CSeq is missing or malformed. A body longer than
    Content-Length is cut to it (RFC 3261 §18.3)."""
    if len(data) > MAX_MESSAGE:
        raise ValueError("SIP message too large")
    if b"\r\n\r\n" not in data:
        data = data.rstrip(b"\r\n") + b"\r\n\r\n"
    try:
        msg = Message.parse(data)
        for name in ("Via", "From", "To", "Call-ID", "CSeq"):
            if msg.headers.get(name) is None:
                raise ValueError(f"missing {name}")
        msg.via, msg.from_address, msg.to_address, msg.cseq  # noqa: B018 - validates them
    except (ValueError, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed SIP message: {exc}") from exc
    length = msg.content_length
    if length is not None:
        if len(msg.body) < length:
            raise ValueError("SIP body shorter than Content-Length")
        msg.body = msg.body[:length]
    return msg


def serialize(msg: Request | Response) -> bytes:
    """The bytes to send, with Content-Length set to the body's length."""
    msg.headers.set("Content-Length", str(len(msg.body)))
    return bytes(msg)


def header_items(headers: HeaderItems | None) -> Iterable[tuple[str, str]]:
    """``(name, value)`` pairs of a caller's extra headers."""
    if headers is None:
        return ()
    if isinstance(headers, Mapping):
        return headers.items()
    return headers


def set_body(msg: Request | Response, body: bytes | str | None, content_type: str | None = None) -> None:
    """Attach a body (``str`` is UTF-8 encoded) with its Content-Type (default
    ``application/sdp``); ``None`` or empty clears both."""
    if isinstance(body, str):
        body = body.encode()
    msg.body = body or b""
    if msg.body:
        msg.headers.set("Content-Type", content_type or "application/sdp")
    else:
        msg.headers.remove("Content-Type")


def top_via(msg: Request | Response) -> Via:
    """The first Via of a message."""
    return msg.via[0]


def split_header(value: str) -> list[str]:
    """Split a comma-separated header value, respecting quotes and ``<…>``."""
    out, cur, quoted, angle = [], [], False, False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            angle = True
        elif not quoted and ch == ">":
            angle = False
        if ch == "," and not quoted and not angle:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def make_response(request: Request, code: int, reason: str | None = None, *, to_tag: str | None = None,
                  headers: HeaderItems | None = None, body: bytes | str | None = None,
                  content_type: str | None = None) -> Response:
    """A response to ``request`` (RFC 3261 §8.2.6): Via, From, Call-ID and CSeq copied, To
    copied with ``to_tag`` added when it has none (not on 100), Record-Route copied on
    dialog-creating responses."""
    resp = Response(code, reason or reason_phrase(code))
    resp.headers.setlist("Via", list(request.headers.getlist("Via")))
    resp.headers.set("From", request.headers["From"])
    to = request.headers["To"]
    if to_tag and code != 100 and "tag" not in request.to_address.parameters:
        to = f"{to};tag={to_tag}"
    resp.headers.set("To", to)
    resp.headers.set("Call-ID", request.headers["Call-ID"])
    resp.headers.set("CSeq", request.headers["CSeq"])
    if request.method in ("INVITE", "SUBSCRIBE") and 100 < code < 300:
        rr = request.headers.getlist("Record-Route")
        if rr:
            resp.headers.setlist("Record-Route", list(rr))
    for name, value in header_items(headers):
        resp.headers.add(name, value)
    set_body(resp, body, content_type)
    return resp


class StreamFramer:
    """Cuts a TCP/TLS byte stream into SIP messages by Content-Length (RFC 3261 §18.3);
    CRLF keep-alives between messages (RFC 5626) are dropped."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; the complete messages now available."""
        self._buf += data
        out: list[bytes] = []
        while True:
            while self._buf[:2] == b"\r\n":
                del self._buf[:2]
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_MESSAGE:
                    raise ValueError("SIP header too large")
                return out
            head = bytes(self._buf[:end + 4])
            length = _content_length(head)
            if length is None:
                raise ValueError("SIP message on a stream without Content-Length")
            total = end + 4 + length
            if total > MAX_MESSAGE:
                raise ValueError("SIP message too large")
            if len(self._buf) < total:
                return out
            out.append(bytes(self._buf[:total]))
            del self._buf[:total]


def parse_address(value: str) -> Address:
    """An Address (``"Name" <uri>;params`` or a bare URI)."""
    return Address.parse(value)
