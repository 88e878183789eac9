"""A SIP dialog (RFC 3261 §12): its identity, sequence numbers, route set and remote
target, and the requests sent inside it (loose routing with ``;lr``, strict routing
tolerated)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.sip.message import URI, Address, Request, Response, split_header
from gateway.sip.transport import Peer


def destination(uri: URI, default_transport: str = "UDP") -> Peer:
    """Where to send a request for ``uri`` (RFC 3263 without DNS: host, port and
    ``transport`` parameter; ``sips`` means TLS)."""
    transport = (uri.parameters.get("transport") or "").upper()
    if uri.scheme == "sips":
        transport = "TLS"
    transport = transport or default_transport
    port = uri.port or (5061 if transport == "TLS" else 5060)
    host = uri.parameters.get("maddr") or uri.host
    return Peer(transport, host.strip("[]"), port)


def contact_uri(msg: Request | Response) -> URI | None:
    """The URI of a message's first Contact."""
    values = msg.headers.getlist("Contact")
    if not values:
        return None
    try:
        return Address.parse(split_header(values[0])[0]).uri
    except ValueError:
        return None


def route_values(msg: Request | Response, name: str = "Record-Route") -> list[str]:
    """Each entry of the Record-Route (or Route) headers, as written."""
    out: list[str] = []
    for value in msg.headers.getlist(name):
        out += split_header(value)
    return out


@dataclass
class Dialog:
    """One dialog. ``local``/``remote`` are the From/To header values without tags."""

    call_id: str
    local_tag: str
    remote_tag: str
    local: str
    remote: str
    local_seq: int
    remote_seq: int | None
    remote_target: URI
    route_set: list[str] = field(default_factory=list)
    transport: str = "UDP"

    @property
    def id(self) -> tuple[str, str, str]:
        """``(Call-ID, local tag, remote tag)``."""
        return self.call_id, self.local_tag, self.remote_tag

    @classmethod
    def as_uac(cls, request: Request, response: Response, transport: str) -> Dialog:
        """The dialog a 1xx/2xx (with To tag) to our INVITE creates (§12.1.2)."""
        target = contact_uri(response) or request.uri
        return cls(call_id=request.call_id, local_tag=request.from_address.parameters.get("tag") or "",
                   remote_tag=response.to_address.parameters.get("tag") or "",
                   local=_untagged(request.headers["From"]), remote=_untagged(response.headers["To"]),
                   local_seq=request.cseq.sequence, remote_seq=None, remote_target=target,
                   route_set=list(reversed(route_values(response))), transport=transport)

    @classmethod
    def as_uas(cls, request: Request, local_tag: str, transport: str) -> Dialog:
        """The dialog our response to a received INVITE creates (§12.1.1)."""
        target = contact_uri(request) or request.from_address.uri
        return cls(call_id=request.call_id, local_tag=local_tag,
                   remote_tag=request.from_address.parameters.get("tag") or "",
                   local=_untagged(request.headers["To"]), remote=_untagged(request.headers["From"]),
                   local_seq=0, remote_seq=request.cseq.sequence, remote_target=target,
                   route_set=route_values(request), transport=transport)

    def update_target(self, msg: Request | Response) -> None:
        """A target refresh (re-INVITE, UPDATE, their 2xx) may change the remote target."""
        uri = contact_uri(msg)
        if uri is not None:
            self.remote_target = uri

    def request(self, method: str, *, cseq: int | None = None) -> tuple[Request, Peer]:
        """A request inside the dialog (no Via yet) and where to send it (§12.2.1.1).
        ``cseq`` reuses a sequence number (ACK, CANCEL); otherwise the next one is taken."""
        if cseq is None:
            self.local_seq += 1
            cseq = self.local_seq
        routes = list(self.route_set)
        first = _route_uri(routes[0]) if routes else None
        if first is not None and "lr" not in first.parameters:
            uri = first
            routes = routes[1:] + [f"<{self.remote_target}>"]
            peer = destination(first, self.transport)
        else:
            uri = self.remote_target
            peer = destination(first if first is not None else self.remote_target, self.transport)
        req = Request(method, uri)
        if routes:
            req.headers.setlist("Route", routes)
        req.headers.set("Max-Forwards", "70")
        req.headers.set("From", f"{self.local};tag={self.local_tag}")
        req.headers.set("To", f"{self.remote};tag={self.remote_tag}" if self.remote_tag else self.remote)
        req.headers.set("Call-ID", self.call_id)
        req.headers.set("CSeq", f"{cseq} {method}")
        return req, peer

    def accept_remote_seq(self, request: Request) -> bool:
        """Whether an in-dialog request's CSeq is acceptable (greater than the last one,
        §12.2.2; ACK and CANCEL reuse theirs); it is then remembered."""
        seq = request.cseq.sequence
        if request.method in ("ACK", "CANCEL"):
            return True
        if self.remote_seq is not None and seq <= self.remote_seq:
            return False
        self.remote_seq = seq
        return True


def _untagged(value: str) -> str:
    """A From/To value without its tag parameter."""
    addr = Address.parse(value)
    params = {k: v for k, v in addr.parameters.items() if k != "tag"}
    out = f'"{addr.name}" ' if addr.name else ""
    out += f"<{addr.uri}>"
    for k, v in params.items():
        out += f";{k}" + (f"={v}" if v is not None else "")
    return out


def _route_uri(value: str) -> URI | None:
    try:
        return Address.parse(value).uri
    except ValueError:
        return None
