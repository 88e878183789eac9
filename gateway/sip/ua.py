"""The SIP user agent: transports, transactions, calls, registrations and keepalives of
one endpoint, and the routing of every message between them (RFC 3261 §8, §12-18).

Usage::

    ua = UserAgent(UserAgentConfig(udp_port=5060), on_invite=handle)
    await ua.start()
    call = ua.invite("sip:ivr@pbx.example.com", sdp_offer, auth=("user", "secret"))
    answer_sdp = await call.wait_answered(30)
    ...
    await call.bye()
    await ua.close()
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.redact import mask_text
from gateway.sip.auth import DigestServer, Verdict, authorization, best_challenge
from gateway.sip.call import Call, IncomingCall, OutgoingCall
from gateway.sip.dialog import Dialog, destination
from gateway.sip.message import (
    URI,
    HeaderItems,
    Request,
    Response,
    Via,
    header_items,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse,
    serialize,
    set_body,
    split_header,
)
from gateway.sip.transaction import ClientTransaction, Timers, TransactionLayer
from gateway.sip.transport import Peer, TcpTransport, Transport, UdpTransport

log = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE"
SUPPORTED = "timer"

InviteHandler = Callable[[IncomingCall], Awaitable[None] | None]


@dataclass
class UserAgentConfig:
    """How a :class:`UserAgent` listens and presents itself.

    Attributes:
        host: the address to bind (and to advertise unless ``advertised_host``).
        udp_port, tcp_port, tls_port: ports to listen on (0: any free one; ``None``: no
            such transport). TLS needs ``tls_server`` (and ``tls_client`` to connect).
        user: the user part of our Contact and default From.
        domain: the host part of our default From (default: the advertised host).
        display_name: the display name of our From.
        users: name -> password; when set, INVITEs must carry Digest credentials
            (401 challenge, 403 on a wrong password).
        realm, auth_algorithm, nonce_ttl: the Digest server's realm, ``MD5`` or
            ``SHA-256``, and nonce lifetime in seconds (then ``stale=true``).
        timers: RFC 3261 T1/T2/T4/Timer D.
        session_expires, min_se: RFC 4028 interval we ask for (``None``: no session
            timer from us) and the smallest we accept (smaller: 422).
        refresh_with: ``"INVITE"`` or ``"UPDATE"`` for the session refreshes we send.
        outbound_proxy: a URI every out-of-dialog request is sent through (loose route).
        user_agent: the User-Agent/Server header.
    """

    host: str = "127.0.0.1"
    advertised_host: str | None = None
    udp_port: int | None = 0
    tcp_port: int | None = None
    tls_port: int | None = None
    tls_server: ssl.SSLContext | None = None
    tls_client: ssl.SSLContext | None = None
    user: str = "wacall"
    domain: str | None = None
    display_name: str = ""
    users: dict[str, str] | None = None
    realm: str = "wacall"
    auth_algorithm: str = "MD5"
    nonce_ttl: float = 300.0
    timers: Timers = field(default_factory=Timers)
    session_expires: int | None = 1800
    min_se: int = 90
    refresh_with: Literal["INVITE", "UPDATE"] = "INVITE"
    outbound_proxy: str | None = None
    user_agent: str = "wacall"


class UserAgent:
    """One SIP endpoint. ``on_invite`` is called (sync or async) with each new
    :class:`IncomingCall`; without it, INVITEs are answered 480."""

    def __init__(self, config: UserAgentConfig | None = None, *, on_invite: InviteHandler | None = None) -> None:
        self.config = config or UserAgentConfig()
        self.on_invite = on_invite
        self.timers = self.config.timers
        self.allow = ALLOW
        self.transports: dict[str, Transport] = {}
        self.layer = TransactionLayer(self.timers, self.send_raw)
        self.calls: dict[tuple[str, str, str], Call] = {}
        self._by_call_id: dict[str, Call] = {}
        self._incoming: dict[tuple, IncomingCall] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closeables: list[Any] = []
        self._closed = False
        self.digest = (DigestServer(self.config.realm, self.config.users, algorithm=self.config.auth_algorithm,
                                    nonce_ttl=self.config.nonce_ttl) if self.config.users else None)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the configured transports."""
        c = self.config
        if c.udp_port is not None:
            self.transports["UDP"] = UdpTransport(c.host, c.udp_port, self._on_data, self._on_transport_error)
        if c.tcp_port is not None:
            self.transports["TCP"] = TcpTransport(c.host, c.tcp_port, self._on_data, self._on_transport_error)
        if c.tls_port is not None:
            self.transports["TLS"] = TcpTransport(c.host, c.tls_port, self._on_data, self._on_transport_error,
                                                  ssl_server=c.tls_server, ssl_client=c.tls_client)
        for t in self.transports.values():
            await t.start()
        log.info("sip ua listening on %s", ", ".join(f"{t.name.lower()}:{t.host}:{t.port}"
                                                     for t in self.transports.values()))

    async def close(self, timeout: float = 2.0) -> None:
        """Hang up every call (BYE, CANCEL or 480), un-REGISTER, stop keepalives, then
        cancel every timer and task and close the sockets."""
        if self._closed:
            return
        waits: list[Awaitable[Any]] = []
        for closeable in list(self._closeables):
            waits.append(closeable.close())
        for call in list({id(c): c for c in [*self.calls.values(), *self._by_call_id.values()]}.values()):
            if call.ended.done():
                continue
            if isinstance(call, IncomingCall) and not call._final_sent:
                call.reject(480, "Temporarily Unavailable")
            elif isinstance(call, OutgoingCall) and not call.answered.done():
                call.cancel()
                waits.append(asyncio.wait([call.ended]))
            else:
                waits.append(call.bye())
        if waits:
            await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=timeout)
        self._closed = True
        for call in list({id(c): c for c in [*self.calls.values(), *self._by_call_id.values()]}.values()):
            call._end(_closed_reason())
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.layer.close()
        for t in self.transports.values():
            await t.close()
        log.info("sip ua closed")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sip task failed", exc_info=task.exception())

    # -- addresses -----------------------------------------------------------------------

    @property
    def advertised_host(self) -> str:
        return self.config.advertised_host or self.config.host

    def port(self, transport: str = "UDP") -> int:
        """The bound port of a transport."""
        return self.transports[transport.upper()].port

    def contact(self, transport: str = "UDP") -> str:
        """Our Contact header value for ``transport``."""
        t = self.transports.get(transport) or next(iter(self.transports.values()))
        scheme = "sips" if t.name == "TLS" else "sip"
        param = ";transport=tcp" if t.name == "TCP" else ""
        return f"<{scheme}:{self.config.user}@{self.advertised_host}:{t.port}{param}>"

    def uri(self, user: str | None = None, transport: str = "UDP") -> str:
        """A SIP URI reaching this UA (``user`` defaults to ours)."""
        t = self.transports.get(transport) or next(iter(self.transports.values()))
        param = ";transport=tcp" if t.name == "TCP" else ""
        return f"sip:{user or self.config.user}@{self.advertised_host}:{t.port}{param}"

    def _default_transport(self) -> str:
        return "UDP" if "UDP" in self.transports else next(iter(self.transports))

    def _from(self, from_uri: str | None, display: str | None) -> str:
        uri = from_uri or f"sip:{self.config.user}@{self.config.domain or self.advertised_host}"
        name = display if display is not None else self.config.display_name
        return (f'"{name}" ' if name else "") + f"<{uri}>"

    # -- sending ---------------------------------------------------------------------------

    def send_raw(self, data: bytes, peer: Peer) -> None:
        """Send bytes to a peer over its transport."""
        transport = self.transports.get(peer.transport)
        if transport is None:
            log.warning("sip: no %s transport to reach %s", peer.transport, peer)
            self.layer.transport_error(peer)
            return
        transport.send(data, peer)

    def _add_via(self, req: Request, peer: Peer, branch: str | None = None) -> None:
        transport = self.transports.get(peer.transport)
        port = transport.port if transport is not None else 0
        via = f"SIP/2.0/{peer.transport} {self.advertised_host}:{port};rport;branch={branch or new_branch()}"
        req.headers.remove("Via")
        values = [via]
        items = [(k, req.headers.getlist(k)) for k in req.headers.keys()]  # noqa: SIM118 - not iterable
        for k, _ in items:
            req.headers.remove(k)
        req.headers.setlist("Via", values)
        for k, v in items:
            req.headers.setlist(k, list(v))
        if req.headers.get("User-Agent") is None:
            req.headers.set("User-Agent", self.config.user_agent)

    def _client(self, req: Request, peer: Peer, on_response: Callable[[Response], None], *,
                keep_via: bool = False) -> ClientTransaction:
        """Start a client transaction (a new Via unless ``keep_via``, for CANCEL)."""
        if not keep_via:
            self._add_via(req, peer)
        log.debug("sip -> %s %s to %s", req.method, mask_text(str(req.uri)), peer)
        return self.layer.client(req, peer, on_response)

    def send_stateless(self, req: Request, peer: Peer) -> bytes:
        """Send a request outside any transaction (the ACK of a 2xx); its bytes."""
        self._add_via(req, peer)
        data = serialize(req)
        self.send_raw(data, peer)
        return data

    async def _transact(self, req: Request, peer: Peer, on_2xx: Callable[[Response], None] | None = None) -> Response:
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def on_response(resp: Response) -> None:
            if resp.code >= 200:
                if on_2xx is not None and resp.code < 300:
                    on_2xx(resp)
                if not fut.done():
                    fut.set_result(resp)

        self._client(req, peer, on_response)
        return await fut

    def clone_request(self, req: Request, cseq: int) -> Request:
        """A copy of ``req`` without Via and credentials, with CSeq ``cseq``."""
        new = Request(req.method, req.uri, req.body)
        for k in req.headers.keys():  # noqa: SIM118 - Headers is not iterable
            if k.lower() not in ("via", "authorization", "proxy-authorization"):
                new.headers.setlist(k, list(req.headers.getlist(k)))
        new.headers.set("CSeq", f"{cseq} {req.method}")
        return new

    async def send_request(self, req: Request, peer: Peer, *, auth: tuple[str, str] | None = None,
                           dialog: Dialog | None = None,
                           on_2xx: Callable[[Response], None] | None = None) -> Response:
        """Send a request (new transaction) and return its final response, answering a
        401/407 Digest challenge with ``auth`` (once per challenge; a stale nonce again).
        Timeouts and transport errors come back as 408/503 responses."""
        resp = await self._transact(req, peer, on_2xx)
        answered: set[str] = set()
        while resp.code in (401, 407) and auth is not None:
            name = "WWW-Authenticate" if resp.code == 401 else "Proxy-Authenticate"
            challenge = best_challenge(resp.headers.getlist(name))
            if challenge is None or (challenge.realm in answered and not challenge.stale):
                break
            answered.add(challenge.realm)
            if dialog is not None:
                dialog.local_seq += 1
                seq = dialog.local_seq
            else:
                seq = req.cseq.sequence + 1
            req = self.clone_request(req, seq)
            user, password = auth
            req.headers.set("Authorization" if resp.code == 401 else "Proxy-Authorization",
                            authorization(challenge, username=user, password=password, method=req.method,
                                          uri=str(req.uri), body=req.body))
            resp = await self._transact(req, peer, on_2xx)
        return resp

    def new_request(self, method: str, uri: str | URI, *, from_uri: str | None = None, display: str | None = None,
                    to: str | None = None, call_id: str | None = None, cseq: int = 1,
                    headers: HeaderItems | None = None, body: bytes | str | None = None,
                    content_type: str | None = None, transport: str | None = None) -> tuple[Request, Peer]:
        """An out-of-dialog request and where to send it (through ``outbound_proxy`` if
        configured)."""
        target = uri if isinstance(uri, URI) else URI.parse(uri)
        req = Request(method, target)
        default = transport or self._default_transport()
        peer = destination(target, default)
        if self.config.outbound_proxy:
            proxy = URI.parse(self.config.outbound_proxy)
            req.headers.set("Route", f"<{self.config.outbound_proxy};lr>" if "lr" not in proxy.parameters
                            else f"<{self.config.outbound_proxy}>")
            peer = destination(proxy, default)
        req.headers.set("Max-Forwards", "70")
        req.headers.set("From", f"{self._from(from_uri, display)};tag={new_tag()}")
        req.headers.set("To", to or f"<{target}>")
        req.headers.set("Call-ID", call_id or new_call_id(self.advertised_host))
        req.headers.set("CSeq", f"{cseq} {method}")
        if method in ("INVITE", "REGISTER", "SUBSCRIBE", "UPDATE"):
            req.headers.set("Contact", self.contact(peer.transport))
        for name, value in header_items(headers):
            req.headers.add(name, value)
        set_body(req, body, content_type)
        return req, peer

    async def request(self, method: str, uri: str, *, headers: HeaderItems | None = None,
                      body: bytes | str | None = None, content_type: str | None = None,
                      auth: tuple[str, str] | None = None) -> Response:
        """Send an out-of-dialog request (OPTIONS, MESSAGE, …); its final response."""
        req, peer = self.new_request(method, uri, headers=headers, body=body, content_type=content_type)
        return await self.send_request(req, peer, auth=auth)

    async def options(self, uri: str) -> Response:
        """Send OPTIONS to ``uri``; its final response."""
        return await self.request("OPTIONS", uri, headers={"Accept": "application/sdp"})

    # -- calls -----------------------------------------------------------------------------

    def invite(self, uri: str, sdp: bytes | str | None, *, headers: HeaderItems | None = None,
               auth: tuple[str, str] | None = None, from_uri: str | None = None, display: str | None = None,
               transport: str | None = None) -> OutgoingCall:
        """Place a call to ``uri`` with the SDP offer ``sdp``; the call object at once (the
        INVITE is on its way). ``auth`` answers a 401/407 challenge."""
        req, peer = self.new_request("INVITE", uri, from_uri=from_uri, display=display, headers=headers,
                                     body=sdp, transport=transport)
        req.headers.set("Allow", self.allow)
        req.headers.set("Supported", SUPPORTED)
        if self.config.session_expires:
            req.headers.set("Session-Expires", str(self.config.session_expires))
            req.headers.set("Min-SE", str(self.config.min_se))
        call = OutgoingCall(self, req, peer, auth)
        self._by_call_id[call.call_id] = call
        log.info("sip call %s: INVITE %s", call.call_id[:12], mask_text(uri))
        call._start()
        return call

    def _remember_call(self, call: Call) -> None:
        if call.dialog is not None:
            self.calls[call.dialog.id] = call
        self._by_call_id[call.call_id] = call

    def _forget_call(self, call: Call) -> None:
        for key, value in list(self.calls.items()):
            if value is call:
                del self.calls[key]
        if self._by_call_id.get(call.call_id) is call and call.ended.done():
            del self._by_call_id[call.call_id]
        for key, value in list(self._incoming.items()):
            if value is call:
                del self._incoming[key]

    # -- services --------------------------------------------------------------------------

    def register(self, registrar: str, *, user: str, password: str | None = None, expires: int = 3600,
                 aor: str | None = None):
        """Keep a registration with ``registrar`` (see :class:`Registration`); start it
        with ``await reg.start()``."""
        from gateway.sip.registration import Registration

        reg = Registration(self, registrar, user=user, password=password, expires=expires, aor=aor)
        self._closeables.append(reg)
        return reg

    def keepalive(self, uri: str, *, interval: float = 30.0):
        """OPTIONS pings to ``uri`` every ``interval`` seconds (see :class:`Keepalive`);
        started at once."""
        from gateway.sip.keepalive import Keepalive

        ka = Keepalive(self, uri, interval=interval)
        self._closeables.append(ka)
        ka.start()
        return ka

    def _options_response(self, req: Request) -> Response:
        resp = make_response(req, 200, headers={"Allow": self.allow, "Accept": "application/sdp",
                                                "Supported": SUPPORTED})
        resp.headers.set("Server", self.config.user_agent)
        return resp

    # -- receiving -------------------------------------------------------------------------

    def _on_transport_error(self, peer: Peer, exc: Exception) -> None:
        log.info("sip: transport error to %s: %s", peer, exc)
        self.layer.transport_error(peer)

    def _on_data(self, data: bytes, peer: Peer) -> None:
        if self._closed:
            return
        try:
            msg = parse(data)
        except ValueError as exc:
            log.debug("sip: dropped %d bytes from %s: %s", len(data), peer, exc)
            return
        try:
            if isinstance(msg, Response):
                self._on_response(msg)
            else:
                self._on_request(msg, peer)
        except Exception:
            log.exception("sip: error handling a message from %s", peer)

    def _on_response(self, resp: Response) -> None:
        tx = self.layer.match_response(resp)
        if tx is not None:
            tx.receive(resp)
            return
        if 200 <= resp.code < 300 and resp.cseq.method == "INVITE":
            call = self._by_call_id.get(resp.call_id) or self.calls.get(
                (resp.call_id, resp.from_address.parameters.get("tag") or "",
                 resp.to_address.parameters.get("tag") or ""))
            if call is not None and call.dialog is not None:
                call._ack_2xx(resp)  # a 2xx retransmitted after the transaction ended

    def _stamp_via(self, req: Request, peer: Peer) -> None:
        """RFC 3261 §18.2.1 and RFC 3581: ``received`` and ``rport`` on the top Via."""
        values = req.headers.getlist("Via")
        parts = split_header(values[0])
        via = Via.parse(parts[0])
        changes: dict[str, str | None] = {}
        if "rport" in via.parameters:
            changes["rport"] = str(peer.port)
            changes["received"] = peer.host
        elif via.host != peer.host:
            changes["received"] = peer.host
        if changes:
            parts[0] = str(Via(via.transport, via.host, via.port, via.parameters.replace(**changes)))
            values[0] = ", ".join(parts)

    def _response_peer(self, req: Request, peer: Peer) -> Peer:
        """Where responses to ``req`` go (RFC 3261 §18.2.2, RFC 3581)."""
        if peer.transport != "UDP":
            return peer
        via = req.via[0]
        if "rport" in via.parameters:
            return peer
        host = via.parameters.get("received") or via.host
        return Peer("UDP", host, via.port or 5060)

    def _find_call(self, req: Request) -> Call | None:
        key = (req.call_id, req.to_address.parameters.get("tag") or "",
               req.from_address.parameters.get("tag") or "")
        return self.calls.get(key)

    def _on_request(self, req: Request, peer: Peer) -> None:
        self._stamp_via(req, peer)
        log.debug("sip <- %s %s from %s", req.method, mask_text(str(req.uri)), peer)
        if req.method == "ACK":
            tx = self.layer.match_invite(req)
            if tx is not None and tx.final is not None and tx.final.code >= 300:
                tx.ack()
                return
            call = self._find_call(req)
            if call is not None:
                call._on_ack(req)
            return
        tx = self.layer.match_request(req)
        if tx is not None:
            tx.retransmission()
            return
        tx = self.layer.server(req, self._response_peer(req, peer))
        if req.method == "CANCEL":
            invite_tx = self.layer.match_invite(req)
            incoming = self._incoming.get(invite_tx.key) if invite_tx is not None else None
            if incoming is None:
                tx.respond(make_response(req, 481))
                return
            tx.respond(make_response(req, 200))
            incoming._on_cancel(req)
            return
        if req.to_address.parameters.get("tag"):
            call = self._find_call(req)
            if call is None:
                tx.respond(make_response(req, 481))
            else:
                call._on_request(req, tx)
            return
        if req.method == "INVITE":
            self._on_invite(req, tx)
        elif req.method == "OPTIONS":
            tx.respond(self._options_response(req))
        elif req.method in ("BYE", "INFO", "UPDATE", "PRACK"):
            tx.respond(make_response(req, 481))
        elif req.method in ALLOW:
            tx.respond(make_response(req, 405, headers={"Allow": self.allow}))
        else:
            tx.respond(make_response(req, 501, headers={"Allow": self.allow}))

    def _on_invite(self, req: Request, tx) -> None:
        tx.respond(make_response(req, 100))
        unsupported = [o for o in req.require if o.lower() not in ("timer",)]
        if unsupported:
            tx.respond(make_response(req, 420, to_tag=new_tag(), headers={"Unsupported": ", ".join(unsupported)}))
            return
        if self.digest is not None:
            verdict, user = self.digest.verify("INVITE", req.headers.get("Authorization"), req.body)
            if verdict in (Verdict.MISSING, Verdict.STALE):
                tx.respond(make_response(req, 401, to_tag=new_tag(), headers={
                    "WWW-Authenticate": self.digest.challenge(stale=verdict is Verdict.STALE)}))
                return
            if verdict is Verdict.INVALID:
                log.info("sip: INVITE with wrong credentials (user %s)", mask_text(user or ""))
                tx.respond(make_response(req, 403, to_tag=new_tag()))
                return
        se = req.headers.get("Session-Expires")
        if se:
            try:
                interval = int(se.split(";")[0])
            except ValueError:
                interval = 0
            if interval < self.config.min_se:
                tx.respond(make_response(req, 422, to_tag=new_tag(), headers={"Min-SE": str(self.config.min_se)}))
                return
        call = IncomingCall(self, req, tx, new_tag())
        self._incoming[tx.key] = call
        self._remember_call(call)
        log.info("sip call %s: INVITE for %s", call.call_id[:12], mask_text(call.user or ""))
        if self.on_invite is None:
            call.reject(480)
            return
        result = self.on_invite(call)
        if inspect.isawaitable(result):
            self._spawn(_run_handler(result, call))


async def _run_handler(result: Awaitable[None], call: IncomingCall) -> None:
    try:
        await result
    except Exception:
        log.exception("sip: INVITE handler failed")
        call.reject(500)


def _closed_reason():
    from gateway.sip.call import EndKind, EndReason

    return EndReason(EndKind.CLOSED)
