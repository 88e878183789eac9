"""SIP transactions (RFC 3261 §17, with the RFC 6026 "Accepted" state for INVITE 2xx).

Four state machines, driven by received messages and timers on the event loop
(``loop.call_later``, no tasks): retransmissions happen over UDP only; the INVITE client
transaction builds and sends the ACK of a non-2xx final response itself. A client
transaction that times out, or whose transport fails, hands its user a synthetic 408 or
503 response, so callers see a single kind of outcome.

The timers, with ``T1``/``T2``/``T4`` from :class:`Timers`:

=====  ==========================================  ==========================
timer  what                                        value
=====  ==========================================  ==========================
A      INVITE request retransmission (UDP)         T1, doubling
B      INVITE transaction timeout                  64*T1
D      wait for final response retransmissions     ``timer_d`` (UDP), 0 (TCP)
E      non-INVITE request retransmission (UDP)     T1, doubling up to T2
F      non-INVITE transaction timeout              64*T1
G      INVITE final response retransmission (UDP)  T1, doubling up to T2
H      wait for ACK                                64*T1
I      wait for ACK retransmissions                T4 (UDP), 0 (TCP)
J      wait for non-INVITE request retransmissions 64*T1 (UDP), 0 (TCP)
K      wait for response retransmissions           T4 (UDP), 0 (TCP)
L/M    RFC 6026 Accepted state (2xx)               64*T1
=====  ==========================================  ==========================
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.sip.message import (
    Request,
    Response,
    make_response,
    reason_phrase,
    serialize,
)
from gateway.sip.transport import Peer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Timers:
    """RFC 3261 timer base values in seconds (defaults from §17.1.1.1); tests use small
    ones. ``timer_d`` is Timer D over UDP (at least 32 s in the RFC)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_d: float = 32.0

    @property
    def b(self) -> float:
        """64*T1: Timers B, F, H, J, L and M."""
        return 64 * self.t1


class State(enum.Enum):
    """Transaction states (RFC 3261 §17 and RFC 6026)."""

    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    ACCEPTED = "accepted"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


Send = Callable[[bytes, Peer], None]


class _Transaction:
    """What client and server transactions share: the timers and termination."""

    def __init__(self, layer: TransactionLayer, key: tuple, peer: Peer) -> None:
        self.layer = layer
        self.key = key
        self.peer = peer
        self.reliable = peer.transport != "UDP"
        self.state = State.TRYING
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def timers(self) -> Timers:
        return self.layer.timers

    def _start(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._stop(name)
        self._timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def _stop(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def terminate(self) -> None:
        """Stop every timer and forget the transaction."""
        if self.state is State.TERMINATED:
            return
        self.state = State.TERMINATED
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.layer._forget(self)


class ClientTransaction(_Transaction):
    """An INVITE or non-INVITE client transaction: sends ``request`` to ``peer`` and passes
    every response (and a synthetic 408/503) to ``on_response``."""

    def __init__(self, layer: TransactionLayer, request: Request, peer: Peer,
                 on_response: Callable[[Response], None]) -> None:
        via = request.via[0]
        super().__init__(layer, (via.parameters.get("branch"), request.cseq.method), peer)
        self.request = request
        self.on_response = on_response
        self.invite = request.method == "INVITE"
        self._data = serialize(request)
        self._ack: bytes | None = None
        self._interval = self.timers.t1

    def start(self) -> None:
        """Send the request and arm the timers."""
        self.state = State.CALLING if self.invite else State.TRYING
        self._transmit()
        if not self.reliable:
            self._start("A", self._interval, self._retransmit)
        self._start("B", self.timers.b, self._timeout)

    def _transmit(self) -> None:
        self.layer.send(self._data, self.peer)

    def _retransmit(self) -> None:
        if self.state not in (State.CALLING, State.TRYING, State.PROCEEDING):
            return
        if self.invite and self.state is State.PROCEEDING:
            return
        self._transmit()
        if self.invite:
            self._interval *= 2
        else:
            self._interval = self.timers.t2 if self.state is State.PROCEEDING else min(self._interval * 2, self.timers.t2)
        self._start("A", self._interval, self._retransmit)

    def _timeout(self) -> None:
        if self.state in (State.CALLING, State.TRYING, State.PROCEEDING):
            log.info("sip: %s to %s timed out", self.request.method, self.peer)
            self.terminate()
            self.on_response(self._synthetic(408))

    def transport_error(self) -> None:
        """The transport could not deliver the request (RFC 3261 §8.1.3.1: 503)."""
        if self.state in (State.CALLING, State.TRYING, State.PROCEEDING):
            self.terminate()
            self.on_response(self._synthetic(503))

    def _synthetic(self, code: int) -> Response:
        resp = make_response(self.request, code, reason_phrase(code))
        resp.headers.set("X-Wacall-Local", "1")
        return resp

    def receive(self, resp: Response) -> None:
        """A response matched this transaction."""
        code = resp.code
        if self.state is State.TERMINATED:
            return
        if code < 200:
            if self.state in (State.CALLING, State.TRYING, State.PROCEEDING):
                if self.invite:
                    self._stop("A")
                    self._stop("B")
                self.state = State.PROCEEDING
                self.on_response(resp)
            return
        if self.invite and code < 300:
            if self.state in (State.CALLING, State.PROCEEDING):
                self.state = State.ACCEPTED
                self._stop("A")
                self._stop("B")
                self._start("M", self.timers.b, self.terminate)
            if self.state is State.ACCEPTED:
                self.on_response(resp)
            return
        if self.invite:
            if self.state in (State.CALLING, State.PROCEEDING):
                self._ack = serialize(self._build_ack(resp))
                self.layer.send(self._ack, self.peer)
                self.state = State.COMPLETED
                self._stop("A")
                self._stop("B")
                self._start("D", 0 if self.reliable else self.timers.timer_d, self.terminate)
                self.on_response(resp)
            elif self.state is State.COMPLETED and self._ack is not None:
                self.layer.send(self._ack, self.peer)
            return
        if self.state in (State.TRYING, State.PROCEEDING):
            self.state = State.COMPLETED
            self._stop("A")
            self._stop("B")
            self._start("K", 0 if self.reliable else self.timers.t4, self.terminate)
            self.on_response(resp)

    def _build_ack(self, resp: Response) -> Request:
        """The ACK of a non-2xx final response (RFC 3261 §17.1.1.3)."""
        ack = Request("ACK", self.request.uri)
        ack.headers.set("Via", self.request.headers.getlist("Via")[0])
        for name in ("Route",):
            values = self.request.headers.getlist(name)
            if values:
                ack.headers.setlist(name, list(values))
        ack.headers.set("Max-Forwards", "70")
        ack.headers.set("From", self.request.headers["From"])
        ack.headers.set("To", resp.headers["To"])
        ack.headers.set("Call-ID", self.request.headers["Call-ID"])
        ack.headers.set("CSeq", f"{self.request.cseq.sequence} ACK")
        return ack


class ServerTransaction(_Transaction):
    """An INVITE or non-INVITE server transaction for a received ``request``; its user
    answers with :meth:`respond`. For INVITE, ``on_ack_timeout`` is called when Timer H
    fires (no ACK for a non-2xx final response)."""

    def __init__(self, layer: TransactionLayer, key: tuple, request: Request, peer: Peer) -> None:
        super().__init__(layer, key, peer)
        self.request = request
        self.invite = request.method == "INVITE"
        self.state = State.PROCEEDING if self.invite else State.TRYING
        self.last: bytes | None = None
        self.final: Response | None = None
        self._interval = self.timers.t1
        self.on_ack_timeout: Callable[[], None] | None = None

    def respond(self, resp: Response) -> None:
        """Send a response (provisional or final) through the transaction."""
        if self.state not in (State.TRYING, State.PROCEEDING):
            log.debug("sip: late %d to %s ignored (state %s)", resp.code, self.request.method, self.state.value)
            return
        self.last = serialize(resp)
        self.layer.send(self.last, self.peer)
        if resp.code < 200:
            self.state = State.PROCEEDING
            return
        self.final = resp
        if self.invite and resp.code < 300:
            self.state = State.ACCEPTED
            self._start("L", self.timers.b, self.terminate)
        elif self.invite:
            self.state = State.COMPLETED
            if not self.reliable:
                self._start("G", self._interval, self._retransmit)
            self._start("H", self.timers.b, self._ack_timeout)
        else:
            self.state = State.COMPLETED
            self._start("J", 0 if self.reliable else self.timers.b, self.terminate)

    def _retransmit(self) -> None:
        if self.state is not State.COMPLETED or self.last is None:
            return
        self.layer.send(self.last, self.peer)
        self._interval = min(self._interval * 2, self.timers.t2)
        self._start("G", self._interval, self._retransmit)

    def _ack_timeout(self) -> None:
        if self.state is State.COMPLETED:
            self.terminate()
            if self.on_ack_timeout is not None:
                self.on_ack_timeout()

    def retransmission(self) -> None:
        """The request was received again: resend the last response (§17.2.1, §17.2.2);
        an INVITE in Accepted state is absorbed (the UA core retransmits its 2xx)."""
        if self.state in (State.PROCEEDING, State.COMPLETED) and self.last is not None:
            self.layer.send(self.last, self.peer)

    def ack(self) -> None:
        """The ACK of a non-2xx final response arrived."""
        if self.invite and self.state is State.COMPLETED:
            self.state = State.CONFIRMED
            self._stop("G")
            self._stop("H")
            self._start("I", 0 if self.reliable else self.timers.t4, self.terminate)


class TransactionLayer:
    """The transactions of one user agent, matched as in RFC 3261 §17.1.3 and §17.2.3."""

    def __init__(self, timers: Timers, send: Send) -> None:
        self.timers = timers
        self.send = send
        self.clients: dict[tuple, ClientTransaction] = {}
        self.servers: dict[tuple, ServerTransaction] = {}

    def client(self, request: Request, peer: Peer, on_response: Callable[[Response], None]) -> ClientTransaction:
        """Create, register and start a client transaction."""
        tx = ClientTransaction(self, request, peer, on_response)
        self.clients[tx.key] = tx
        tx.start()
        return tx

    @staticmethod
    def server_key(request: Request, method: str | None = None) -> tuple:
        """The key of the server transaction a request belongs to (ACK: its INVITE's)."""
        via = request.via[0]
        method = method or ("INVITE" if request.method == "ACK" else request.method)
        return via.parameters.get("branch"), via.host, via.port, method

    def server(self, request: Request, peer: Peer) -> ServerTransaction:
        """Create and register the server transaction of a new request."""
        tx = ServerTransaction(self, self.server_key(request), request, peer)
        self.servers[tx.key] = tx
        return tx

    def match_response(self, resp: Response) -> ClientTransaction | None:
        """The client transaction a response belongs to."""
        try:
            branch = resp.via[0].parameters.get("branch")
            return self.clients.get((branch, resp.cseq.method))
        except (ValueError, IndexError):
            return None

    def match_request(self, request: Request) -> ServerTransaction | None:
        """The server transaction a request (a retransmission, an ACK) belongs to."""
        return self.servers.get(self.server_key(request))

    def match_invite(self, request: Request) -> ServerTransaction | None:
        """The INVITE server transaction a CANCEL or an ACK is for: by branch, else (a
        peer not reusing the INVITE's branch) by Call-ID, From tag and CSeq number."""
        tx = self.servers.get(self.server_key(request, "INVITE"))
        if tx is not None:
            return tx
        seq, call_id = request.cseq.sequence, request.call_id
        tag = request.from_address.parameters.get("tag")
        for tx in self.servers.values():
            req = tx.request
            if (tx.invite and req.call_id == call_id and req.cseq.sequence == seq
                    and req.from_address.parameters.get("tag") == tag):
                return tx
        return None

    def transport_error(self, peer: Peer) -> None:
        """Fail the client transactions waiting on ``peer``."""
        for tx in list(self.clients.values()):
            if tx.peer == peer:
                tx.transport_error()

    def _forget(self, tx: _Transaction) -> None:
        if isinstance(tx, ClientTransaction):
            if self.clients.get(tx.key) is tx:
                del self.clients[tx.key]
        elif self.servers.get(tx.key) is tx:
            del self.servers[tx.key]

    def close(self) -> None:
        """Terminate every transaction (timers cancelled)."""
        for tx in [*self.clients.values(), *self.servers.values()]:
            tx.terminate()
