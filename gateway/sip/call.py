"""SIP calls: an INVITE session seen from our side, outgoing (:class:`OutgoingCall`, we
sent the INVITE) or incoming (:class:`IncomingCall`, we received it).

A call owns its dialog and the in-dialog requests (BYE, re-INVITE, UPDATE, INFO,
OPTIONS), the 2xx retransmission of the UAS until the ACK, the ACK of a 2xx as UAC, and
the RFC 4028 session timer. SDP bodies are opaque bytes. ``ended`` resolves, once, with an
:class:`EndReason`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from gateway.redact import mask_text
from gateway.sip.dialog import Dialog
from gateway.sip.message import (
    HeaderItems,
    Request,
    Response,
    header_items,
    make_response,
    serialize,
    set_body,
)
from gateway.sip.transaction import ServerTransaction
from gateway.sip.transport import Peer

#: The :class:`gateway.sip.ua.UserAgent` this works for (not imported: it imports us).
UserAgent = Any

log = logging.getLogger(__name__)


class EndKind(enum.Enum):
    """Why a call ended."""

    LOCAL_BYE = "local_bye"
    REMOTE_BYE = "remote_bye"
    FAILED = "failed"                  # a final non-2xx to our INVITE, or our reject()
    CANCELLED = "cancelled"            # CANCEL (ours or the caller's) before the answer
    SESSION_EXPIRED = "session_expired"  # RFC 4028: refresh failed or never came
    NO_ACK = "no_ack"                  # our 2xx was never ACKed
    CLOSED = "closed"                  # the user agent was closed


@dataclass(frozen=True, slots=True)
class EndReason:
    """How a call ended: ``code``/``phrase`` of the final response for failures, the
    ``Reason`` and ``Warning`` header values when the peer sent them."""

    kind: EndKind
    code: int | None = None
    phrase: str = ""
    reason: str | None = None
    warning: str | None = None

    @classmethod
    def from_message(cls, kind: EndKind, msg: Request | Response | None) -> EndReason:
        if msg is None:
            return cls(kind)
        code, phrase = (msg.code, msg.phrase) if isinstance(msg, Response) else (None, "")
        return cls(kind, code, phrase, msg.headers.get("Reason"), msg.headers.get("Warning"))


class CallFailed(Exception):
    """An outgoing call ended before it was answered."""

    def __init__(self, reason: EndReason) -> None:
        super().__init__(f"{reason.kind.value} {reason.code or ''} {reason.phrase}".strip())
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Provisional:
    """A provisional response (180, 183, …) to our INVITE; ``sdp`` when it had one."""

    code: int
    phrase: str
    sdp: bytes | None
    response: Response


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A DTMF digit received in an INFO (``application/dtmf-relay`` or ``application/dtmf``)."""

    digit: str
    duration_ms: int | None = None


_DTMF_EVENTS = "0123456789*#ABCD"


def parse_dtmf(content_type: str, body: bytes) -> Dtmf | None:
    """The digit of an INFO body, or ``None`` if it is not DTMF."""
    ctype = content_type.split(";")[0].strip().lower()
    text = body.decode("utf-8", "replace").strip()
    if ctype == "application/dtmf-relay":
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition("=") for line in re.split(r"[\r\n]+", text)) if k}
        signal = fields.get("signal", "")
        duration = fields.get("duration")
        if signal.isdigit() and int(signal) > 9 and int(signal) < 16:
            signal = _DTMF_EVENTS[int(signal)]
        if len(signal) == 1 and signal.upper() in _DTMF_EVENTS:
            return Dtmf(signal.upper(), int(duration) if duration and duration.isdigit() else None)
        return None
    if ctype == "application/dtmf":
        if text.isdigit() and len(text) > 1 and int(text) < 16:
            text = _DTMF_EVENTS[int(text)]
        if len(text) == 1 and text.upper() in _DTMF_EVENTS:
            return Dtmf(text.upper())
    return None


def parse_session_expires(value: str | None) -> tuple[int, str | None] | None:
    """``Session-Expires: 1800;refresher=uac`` -> ``(1800, "uac")``."""
    if not value:
        return None
    head, *params = [p.strip() for p in value.split(";")]
    try:
        interval = int(head)
    except ValueError:
        return None
    refresher = None
    for p in params:
        k, _, v = p.partition("=")
        if k.strip().lower() == "refresher":
            refresher = v.strip().lower()
    return interval, refresher


class Call:
    """What outgoing and incoming calls share. ``on_dtmf`` is called with each
    :class:`Dtmf` received in an INFO."""

    def __init__(self, ua: UserAgent, call_id: str) -> None:
        self.ua = ua
        self.call_id = call_id
        self.dialog: Dialog | None = None
        self.local_sdp: bytes | None = None
        self.remote_sdp: bytes | None = None
        self.ended: asyncio.Future[EndReason] = asyncio.get_running_loop().create_future()
        self.on_dtmf: Callable[[Dtmf], None] | None = None
        self.refreshes_received = 0
        self.refreshes_sent = 0
        self._auth: tuple[str, str] | None = None
        self._se_interval: int | None = None
        self._se_handle: asyncio.TimerHandle | None = None
        self._pending_2xx: dict[int, tuple[bytes, Peer, asyncio.TimerHandle | None, asyncio.TimerHandle]] = {}
        self._acks: dict[int, tuple[bytes, Peer]] = {}
        self._reinviting = False

    @property
    def confirmed_dialog(self) -> bool:
        return self.dialog is not None and not self.ended.done()

    # -- ending ------------------------------------------------------------------------

    def _end(self, reason: EndReason) -> None:
        if self.ended.done():
            return
        log.info("sip call %s ended: %s %s %s", self.call_id[:12], reason.kind.value, reason.code or "",
                 reason.phrase)
        self.ended.set_result(reason)
        if self._se_handle is not None:
            self._se_handle.cancel()
            self._se_handle = None
        for _, _, retrans, give_up in self._pending_2xx.values():
            if retrans is not None:
                retrans.cancel()
            give_up.cancel()
        self._pending_2xx.clear()
        self.ua._forget_call(self)

    async def bye(self, *, headers: HeaderItems | None = None) -> Response | None:
        """Hang up (BYE); ``ended`` resolves at once with ``LOCAL_BYE``. Returns the BYE's
        final response (``None`` if there was no dialog or the call had ended)."""
        if self.ended.done() or self.dialog is None:
            return None
        return await self._bye(EndReason(EndKind.LOCAL_BYE), headers)

    async def _bye(self, reason: EndReason, headers: HeaderItems | None = None) -> Response | None:
        assert self.dialog is not None
        req, peer = self.dialog.request("BYE")
        if reason.kind is EndKind.SESSION_EXPIRED:
            req.headers.set("Reason", 'SIP;cause=408;text="Session Timer Expired"')
        for name, value in header_items(headers):
            req.headers.add(name, value)
        self._end(reason)
        return await self.ua.send_request(req, peer, auth=self._auth, dialog=self.dialog)

    def _bye_soon(self, reason: EndReason) -> None:
        if not self.ended.done() and self.dialog is not None:
            self.ua._spawn(self._bye(reason))

    # -- requests we send inside the dialog -------------------------------------------

    async def info(self, body: bytes | str, content_type: str) -> Response:
        """Send an INFO with ``body``; its final response."""
        assert self.dialog is not None, "no dialog yet"
        req, peer = self.dialog.request("INFO")
        set_body(req, body, content_type)
        return await self.ua.send_request(req, peer, auth=self._auth, dialog=self.dialog)

    async def send_dtmf(self, digit: str, duration_ms: int = 160) -> Response:
        """Send a digit as ``application/dtmf-relay`` INFO."""
        return await self.info(f"Signal={digit}\r\nDuration={duration_ms}\r\n", "application/dtmf-relay")

    async def reinvite(self, sdp: bytes | str | None = None) -> Response:
        """Send a re-INVITE with ``sdp`` (default: the current local SDP) and ACK its 2xx;
        its final response. Carries our Session-Expires when a session timer runs."""
        assert self.dialog is not None, "no dialog yet"
        if sdp is not None:
            self.local_sdp = sdp.encode() if isinstance(sdp, str) else sdp
        req, peer = self.dialog.request("INVITE")
        req.headers.set("Contact", self.ua.contact(self.dialog.transport))
        self._timer_headers(req)
        set_body(req, self.local_sdp)
        self._reinviting = True
        try:
            resp = await self.ua.send_request(req, peer, auth=self._auth, dialog=self.dialog,
                                              on_2xx=self._ack_2xx)
        finally:
            self._reinviting = False
        if 200 <= resp.code < 300:
            self.dialog.update_target(resp)
            if resp.body:
                self.remote_sdp = resp.body
            self._apply_timer(resp.headers.get("Session-Expires"), sent=True)
        return resp

    async def update(self, sdp: bytes | str | None = None) -> Response:
        """Send an UPDATE (without a body unless ``sdp`` is given); its final response."""
        assert self.dialog is not None, "no dialog yet"
        req, peer = self.dialog.request("UPDATE")
        req.headers.set("Contact", self.ua.contact(self.dialog.transport))
        self._timer_headers(req)
        if sdp is not None:
            self.local_sdp = sdp.encode() if isinstance(sdp, str) else sdp
            set_body(req, self.local_sdp)
        resp = await self.ua.send_request(req, peer, auth=self._auth, dialog=self.dialog)
        if 200 <= resp.code < 300:
            if resp.body:
                self.remote_sdp = resp.body
            self._apply_timer(resp.headers.get("Session-Expires"), sent=True)
        return resp

    def _ack_2xx(self, resp: Response) -> None:
        """ACK a 2xx to an INVITE we sent in (or that created) the dialog (§13.2.2.4);
        a retransmitted 2xx gets the same ACK again."""
        assert self.dialog is not None
        seq = resp.cseq.sequence
        known = self._acks.get(seq)
        if known is not None:
            self.ua.send_raw(*known)
            return
        ack, peer = self.dialog.request("ACK", cseq=seq)
        data = self.ua.send_stateless(ack, peer)
        self._acks[seq] = (data, peer)

    # -- session timer (RFC 4028) -------------------------------------------------------

    def _timer_headers(self, req: Request) -> None:
        req.headers.set("Supported", "timer")
        if self._se_interval:
            req.headers.set("Session-Expires", f"{self._se_interval};refresher=uac")
            req.headers.set("Min-SE", str(self.ua.config.min_se))

    def _apply_timer(self, value: str | None, *, sent: bool) -> None:
        """(Re)start the session timer from a Session-Expires value: of a 2xx to a request
        we ``sent``, or of the 2xx we gave to a refresh we received."""
        parsed = parse_session_expires(value)
        if self._se_handle is not None:
            self._se_handle.cancel()
            self._se_handle = None
        if parsed is None or self.ended.done():
            if parsed is None and not sent and self._se_interval:
                parsed = (self._se_interval, None)
            else:
                return
        interval, refresher = parsed
        self._se_interval = interval
        refresher = refresher or "uac"
        we_refresh = (refresher == "uac") == sent
        loop = asyncio.get_running_loop()
        if we_refresh:
            self._se_handle = loop.call_later(interval / 2, self._refresh)
        else:
            self._se_handle = loop.call_later(interval - min(32, interval / 3), self._expire)

    def _refresh(self) -> None:
        self._se_handle = None
        self.ua._spawn(self._do_refresh())

    async def _do_refresh(self) -> None:
        if self.ended.done():
            return
        self.refreshes_sent += 1
        if self.ua.config.refresh_with == "UPDATE":
            resp = await self.update()
        else:
            resp = await self.reinvite()
        if not 200 <= resp.code < 300 and not self.ended.done():
            log.info("sip call %s: session refresh failed with %d", self.call_id[:12], resp.code)
            await self._bye(EndReason(EndKind.SESSION_EXPIRED, resp.code, resp.phrase))

    def _expire(self) -> None:
        self._se_handle = None
        log.info("sip call %s: no session refresh received", self.call_id[:12])
        self._bye_soon(EndReason(EndKind.SESSION_EXPIRED))

    def _answer_timer(self, req: Request, resp: Response) -> None:
        """Session-Expires (and Require: timer) of our 2xx to an INVITE or UPDATE."""
        parsed = parse_session_expires(req.headers.get("Session-Expires"))
        supports = "timer" in req.supported
        if parsed is not None:
            interval, refresher = parsed
        elif self._se_interval:
            interval, refresher = self._se_interval, None
        elif self.ua.config.session_expires and supports:
            interval, refresher = self.ua.config.session_expires, None
        else:
            return
        refresher = refresher or ("uac" if supports else "uas")
        resp.headers.set("Session-Expires", f"{interval};refresher={refresher}")
        if supports:
            resp.headers.set("Require", "timer")

    # -- requests received inside the dialog -------------------------------------------

    def _on_request(self, req: Request, tx: ServerTransaction) -> None:
        assert self.dialog is not None
        if not self.dialog.accept_remote_seq(req):
            tx.respond(make_response(req, 500, "Server Internal Error", headers={"Retry-After": "1"}))
            return
        method = req.method
        if method == "BYE":
            tx.respond(make_response(req, 200))
            self._end(EndReason.from_message(EndKind.REMOTE_BYE, req))
        elif method == "INVITE":
            self._on_reinvite(req, tx)
        elif method == "UPDATE":
            self.refreshes_received += 1
            if req.body:
                self.remote_sdp = req.body
            self.dialog.update_target(req)
            resp = make_response(req, 200, headers={"Contact": self.ua.contact(self.dialog.transport)},
                                 body=self.local_sdp if req.body else None)
            self._answer_timer(req, resp)
            tx.respond(resp)
            self._apply_timer(resp.headers.get("Session-Expires"), sent=False)
        elif method == "INFO":
            ctype = req.headers.get("Content-Type") or ""
            dtmf = parse_dtmf(ctype, req.body) if req.body else None
            if req.body and dtmf is None:
                tx.respond(make_response(req, 415, headers={"Accept": "application/dtmf-relay, application/dtmf"}))
                return
            tx.respond(make_response(req, 200))
            if dtmf is not None:
                log.debug("sip call %s: dtmf %s", self.call_id[:12], dtmf.digit)
                if self.on_dtmf is not None:
                    self.on_dtmf(dtmf)
        elif method == "OPTIONS":
            tx.respond(self.ua._options_response(req))
        else:
            tx.respond(make_response(req, 405, headers={"Allow": self.ua.allow}))

    def _on_reinvite(self, req: Request, tx: ServerTransaction) -> None:
        assert self.dialog is not None
        if self._reinviting or self._pending_2xx:
            tx.respond(make_response(req, 491))
            return
        self.refreshes_received += 1
        if req.body:
            self.remote_sdp = req.body
        self.dialog.update_target(req)
        resp = make_response(req, 200, headers={"Contact": self.ua.contact(self.dialog.transport)},
                             body=self.local_sdp)
        self._answer_timer(req, resp)
        self._send_2xx(tx, resp)
        self._apply_timer(resp.headers.get("Session-Expires"), sent=False)

    def _send_2xx(self, tx: ServerTransaction, resp: Response) -> None:
        """Send a 2xx to an INVITE and retransmit it (UDP) until its ACK (§13.3.1.4)."""
        tx.respond(resp)
        data = serialize(resp)
        seq = resp.cseq.sequence
        loop = asyncio.get_running_loop()
        timers = self.ua.timers
        peer = tx.peer

        def retransmit(interval: float) -> None:
            entry = self._pending_2xx.get(seq)
            if entry is None:
                return
            self.ua.send_raw(data, peer)
            nxt = min(interval * 2, timers.t2)
            self._pending_2xx[seq] = (data, peer, loop.call_later(nxt, retransmit, nxt), entry[3])

        def give_up() -> None:
            entry = self._pending_2xx.pop(seq, None)
            if entry is not None and entry[2] is not None:
                entry[2].cancel()
            log.info("sip call %s: no ACK for our 2xx", self.call_id[:12])
            self._bye_soon(EndReason(EndKind.NO_ACK))

        retrans = None if peer.transport != "UDP" else loop.call_later(timers.t1, retransmit, timers.t1)
        self._pending_2xx[seq] = (data, peer, retrans, loop.call_later(timers.b, give_up))

    def _on_ack(self, req: Request) -> None:
        """An ACK for one of our 2xx."""
        entry = self._pending_2xx.pop(req.cseq.sequence, None)
        if entry is not None:
            if entry[2] is not None:
                entry[2].cancel()
            entry[3].cancel()
        if req.body:
            self.remote_sdp = req.body


class OutgoingCall(Call):
    """A call we placed with :meth:`UserAgent.invite`.

    ``answered`` resolves with the answer SDP (bytes) or raises :class:`CallFailed`;
    provisional responses are passed to ``on_provisional`` and can be iterated with
    ``async for p in call.provisionals()``.
    """

    def __init__(self, ua: UserAgent, request: Request, peer: Peer, auth: tuple[str, str] | None) -> None:
        super().__init__(ua, request.call_id)
        self.request = request
        self.peer = peer
        self._auth = auth
        self.local_sdp = request.body or None
        self.answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.answered.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        self.on_provisional: Callable[[Provisional], None] | None = None
        self._queue: asyncio.Queue[Provisional | None] = asyncio.Queue()
        self._got_response = False
        self._cancelled = False
        self._cancel_sent = False
        self._cancel_guard: asyncio.TimerHandle | None = None
        self._challenges: set[str] = set()
        self._session_retry = False
        self._remote_tag: str | None = None

    def _start(self) -> None:
        self.ua._client(self.request, self.peer, self._on_response)

    async def provisionals(self) -> AsyncIterator[Provisional]:
        """The provisional responses, until the final one."""
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)
                return
            yield item

    async def wait_answered(self, timeout: float | None = None) -> bytes:
        """The answer SDP; raises :class:`CallFailed` (or ``TimeoutError``)."""
        return await asyncio.wait_for(asyncio.shield(self.answered), timeout)

    def cancel(self) -> None:
        """Cancel the call before it is answered (CANCEL is sent once a provisional
        response came, RFC 3261 §9.1). A 200 that crosses the CANCEL is ACKed, then BYE'd;
        ``ended`` resolves with ``CANCELLED`` either way."""
        if self.ended.done() or self.answered.done() or self._cancelled:
            return
        self._cancelled = True
        if self._got_response:
            self._send_cancel()

    def _send_cancel(self) -> None:
        if self._cancel_sent:
            return
        self._cancel_sent = True
        req = self.request
        cancel = Request("CANCEL", req.uri)
        cancel.headers.set("Via", req.headers.getlist("Via")[0])
        if req.headers.getlist("Route"):
            cancel.headers.setlist("Route", list(req.headers.getlist("Route")))
        cancel.headers.set("Max-Forwards", "70")
        for name in ("From", "To", "Call-ID"):
            cancel.headers.set(name, req.headers[name])
        cancel.headers.set("CSeq", f"{req.cseq.sequence} CANCEL")
        cancel.headers.set("Reason", 'SIP;cause=487;text="Request Terminated"')
        self.ua._client(cancel, self.peer, lambda resp: None, keep_via=True)
        self._cancel_guard = asyncio.get_running_loop().call_later(
            self.ua.timers.b, lambda: self._fail(EndReason(EndKind.CANCELLED)))

    def _fail(self, reason: EndReason) -> None:
        if self._cancel_guard is not None:
            self._cancel_guard.cancel()
        if not self.answered.done():
            self.answered.set_exception(CallFailed(reason))
        self._queue.put_nowait(None)
        self._end(reason)

    def _end(self, reason: EndReason) -> None:
        if self._cancel_guard is not None:
            self._cancel_guard.cancel()
        if not self.answered.done():
            self.answered.set_exception(CallFailed(reason))
        self._queue.put_nowait(None)
        super()._end(reason)

    def _on_response(self, resp: Response) -> None:
        self._got_response = True
        if resp.code < 200:
            if self._cancelled:
                self._send_cancel()
            if resp.code == 100:
                return
            tag = resp.to_address.parameters.get("tag")
            if tag and self.dialog is None:
                self.dialog = Dialog.as_uac(self.request, resp, self.peer.transport)
                self.ua._remember_call(self)
            if resp.body:
                self.remote_sdp = resp.body
            p = Provisional(resp.code, resp.phrase, resp.body or None, resp)
            self._queue.put_nowait(p)
            if self.on_provisional is not None:
                self.on_provisional(p)
            return
        if resp.code < 300:
            self._on_2xx(resp)
            return
        if self.ended.done():
            return
        if resp.code in (401, 407) and self._auth is not None and self._retry_auth(resp):
            return
        if resp.code == 422 and not self._session_retry and resp.headers.get("Min-SE"):
            self._session_retry = True
            min_se = resp.headers["Min-SE"].split(";")[0].strip()
            self._retry({"Session-Expires": min_se, "Min-SE": min_se})
            return
        kind = EndKind.CANCELLED if self._cancelled and resp.code == 487 else EndKind.FAILED
        self._fail(EndReason.from_message(kind, resp))

    def _retry_auth(self, resp: Response) -> bool:
        from gateway.sip.auth import authorization, best_challenge

        name = "WWW-Authenticate" if resp.code == 401 else "Proxy-Authenticate"
        challenge = best_challenge(resp.headers.getlist(name))
        if challenge is None or (challenge.realm in self._challenges and not challenge.stale):
            return False
        self._challenges.add(challenge.realm)
        assert self._auth is not None
        user, password = self._auth
        value = authorization(challenge, username=user, password=password, method="INVITE",
                              uri=str(self.request.uri), body=self.request.body)
        self._retry({"Authorization" if resp.code == 401 else "Proxy-Authorization": value})
        return True

    def _retry(self, headers: dict[str, str]) -> None:
        """Send the INVITE again (new branch, next CSeq) with ``headers`` set."""
        req = self.ua.clone_request(self.request, self.request.cseq.sequence + 1)
        for name, value in headers.items():
            req.headers.set(name, value)
        self.request = req
        self._got_response = False
        self.dialog = None
        self._start()

    def _on_2xx(self, resp: Response) -> None:
        tag = resp.to_address.parameters.get("tag") or ""
        if self._remote_tag is not None:
            if tag == self._remote_tag:
                self._ack_2xx(resp)  # a retransmission
            else:
                self._ack_and_bye_fork(resp)
            return
        self._remote_tag = tag
        if self.dialog is None or self.dialog.remote_tag != tag:
            self.ua._forget_call(self)
            self.dialog = Dialog.as_uac(self.request, resp, self.peer.transport)
        else:
            self.dialog.update_target(resp)
            from gateway.sip.dialog import route_values
            self.dialog.route_set = list(reversed(route_values(resp)))
        self.dialog.local_seq = self.request.cseq.sequence
        self.ua._remember_call(self)
        self._ack_2xx(resp)
        if self._cancelled or self.ended.done():
            log.info("sip call %s: 200 crossed our CANCEL: ACK then BYE", self.call_id[:12])
            if self._cancel_guard is not None:
                self._cancel_guard.cancel()
            self.ua._spawn(self._bye(EndReason(EndKind.CANCELLED, 200, resp.phrase)))
            return
        self.remote_sdp = resp.body or None
        self._queue.put_nowait(None)
        if not self.answered.done():
            self.answered.set_result(resp.body)
        log.info("sip call %s to %s answered", self.call_id[:12], mask_text(str(self.request.uri)))
        self._apply_timer(resp.headers.get("Session-Expires"), sent=True)

    def _ack_and_bye_fork(self, resp: Response) -> None:
        """A 2xx from another fork: ACK it and hang that dialog up (RFC 3261 §13.2.2.4)."""
        other = Dialog.as_uac(self.request, resp, self.peer.transport)
        ack, peer = other.request("ACK", cseq=self.request.cseq.sequence)
        self.ua.send_stateless(ack, peer)
        bye, peer = other.request("BYE")
        self.ua._spawn(self.ua.send_request(bye, peer))


class IncomingCall(Call):
    """An INVITE we received; the handler given to the :class:`UserAgent` decides with
    :meth:`ring`, :meth:`progress`, :meth:`answer` or :meth:`reject`.

    ``request`` is the INVITE; ``user`` the user part of its Request-URI (the number
    dialled, e.g. ``+4915112345678``); ``offer`` its SDP (or ``None``); ``confirmed``
    resolves when the ACK of our 2xx arrives. A CANCEL ends the call with ``CANCELLED``
    (487 to the INVITE, 200 to the CANCEL).
    """

    def __init__(self, ua: UserAgent, request: Request, tx: ServerTransaction, local_tag: str) -> None:
        super().__init__(ua, request.call_id)
        self.request = request
        self.tx = tx
        self.offer: bytes | None = request.body or None
        self.remote_sdp = self.offer
        self.dialog = Dialog.as_uas(request, local_tag, tx.peer.transport)
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolves on the ACK of our 2xx; raises :class:`CallFailed` if the call ended first."""
        self._final_sent = False
        tx.on_ack_timeout = lambda: None

    @property
    def user(self) -> str | None:
        """The user part of the Request-URI."""
        return self.request.uri.user

    @property
    def from_uri(self) -> str:
        return str(self.request.from_address.uri)

    @property
    def to_uri(self) -> str:
        return str(self.request.to_address.uri)

    @property
    def headers(self):
        """The INVITE's headers (``sipmessage.Headers``: ``get``, ``getlist``)."""
        return self.request.headers

    def _response(self, code: int, reason: str | None = None, headers: HeaderItems | None = None,
                  body: bytes | str | None = None) -> Response:
        assert self.dialog is not None
        resp = make_response(self.request, code, reason, to_tag=self.dialog.local_tag, headers=headers,
                             body=body)
        if code < 300:
            resp.headers.set("Contact", self.ua.contact(self.dialog.transport))
            resp.headers.set("Allow", self.ua.allow)
        return resp

    def ring(self, headers: HeaderItems | None = None) -> None:
        """Send 180 Ringing."""
        if not self._final_sent:
            self.tx.respond(self._response(180, headers=headers))

    def progress(self, sdp: bytes | str | None = None, headers: HeaderItems | None = None) -> None:
        """Send 183 Session Progress (with early media SDP when given)."""
        if not self._final_sent:
            if sdp is not None:
                self.local_sdp = sdp.encode() if isinstance(sdp, str) else sdp
            self.tx.respond(self._response(183, headers=headers, body=sdp))

    def answer(self, sdp: bytes | str, headers: HeaderItems | None = None) -> None:
        """Send 200 OK with ``sdp``, retransmitted (UDP) until the ACK."""
        if self._final_sent or self.ended.done():
            return
        self._final_sent = True
        self.local_sdp = sdp.encode() if isinstance(sdp, str) else sdp
        resp = self._response(200, headers=headers, body=self.local_sdp)
        self._answer_timer(self.request, resp)
        self._send_2xx(self.tx, resp)
        self._apply_timer(resp.headers.get("Session-Expires"), sent=False)
        log.info("sip call %s to %s answered", self.call_id[:12], mask_text(self.user or ""))

    def reject(self, code: int = 486, reason: str | None = None, headers: HeaderItems | None = None) -> None:
        """Refuse the call with a final response, e.g. ``reject(403, headers={"Reason":
        'Q.850;cause=21;text="Call rejected"'})``."""
        if self._final_sent or self.ended.done():
            return
        self._final_sent = True
        resp = self._response(code, reason, headers)
        self.tx.respond(resp)
        self._end(EndReason.from_message(EndKind.FAILED, resp))

    def _on_cancel(self, cancel: Request) -> None:
        if self._final_sent:
            return
        self._final_sent = True
        self.tx.respond(self._response(487))
        self._end(EndReason.from_message(EndKind.CANCELLED, cancel))

    def _on_ack(self, req: Request) -> None:
        super()._on_ack(req)
        if not self.confirmed.done():
            self.confirmed.set_result(None)

    def _end(self, reason: EndReason) -> None:
        if not self.confirmed.done():
            self.confirmed.set_exception(CallFailed(reason))
            self.confirmed.exception()
        super()._end(reason)
