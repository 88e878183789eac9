"""SIP on the gateway: the user agent SIP legs dial out with, and the *trunk* a PBX places
WhatsApp calls through.

With ``WACALL_SIP_LISTEN`` wacall runs one SIP user agent (:mod:`gateway.sip`, UDP and TCP
on that port). Calls then take a SIP party (``"sip": {"uri": …}`` on ``POST /v1/calls``,
``WACALL_INBOUND_SIP_URI`` for callers): :class:`~gateway.calls.legs.SipLeg` dials it once
the user picked up and joins the audio.

With ``WACALL_SIP_USERNAME``/``WACALL_SIP_PASSWORD`` as well, a PBX may send an INVITE to
``sip:<E.164 number>@<wacall>`` (digest-authenticated): the number passes the permission
gate, the WhatsApp call is placed, the PBX hears 180 when the user's phone rings and gets
200 (with our SDP) when they accept; the audio is bridged. A CANCEL before the answer
ends the WhatsApp call; after it, BYE and ``terminate`` end each other. A refusal is a
SIP error code with the reason: the provider's 138xxx code in a ``Warning`` and a
``Reason`` header (403 no permission, 480 try later with ``Retry-After``, 486 busy, 404
not a WhatsApp number, 488 no common codec, 503 over capacity or provider down). Without
credentials every INVITE from outside is refused (403): nothing unauthenticated places a
call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import Any
from urllib.parse import unquote

from media.rtp.sdp import RtpSdpError, answer_offer

from .calls import CallManager, CapacityError, EndReason, LiveCall
from .calls.legs import SipContext
from .config import Settings
from .errors import ProviderError, refusal_kind
from .numbers import display, normalize_recipient
from .redact import mask_phone
from .sip import IncomingCall, UserAgent, UserAgentConfig

__all__ = ["SipTrunk"]

log = logging.getLogger(__name__)

#: Provider refusals as SIP final responses.
REFUSALS = {"forbidden": (403, "Forbidden"), "too_many": (480, "Temporarily Unavailable"),
            "conflict": (486, "Busy Here"), "unavailable": (503, "Service Unavailable"),
            "failed": (502, "Bad Gateway")}
#: How a WhatsApp call that ended before it was answered ends the PBX's INVITE.
ENDED = {EndReason.REJECTED: (603, "Decline"), EndReason.RING_TIMEOUT: (480, "Temporarily Unavailable"),
         EndReason.NOT_ANSWERED: (480, "Temporarily Unavailable"), EndReason.USER_HANGUP: (603, "Decline"),
         EndReason.BUSINESS_HANGUP: (487, "Request Terminated"), EndReason.SHUTDOWN: (503, "Service Unavailable"),
         EndReason.MEDIA_FAILURE: (500, "Server Internal Error"), EndReason.SIP_FAILURE: (500, "Server Internal Error")}


def _quoted(text: str, limit: int = 200) -> str:
    """``text`` safe inside a quoted header value."""
    return re.sub(r'[\x00-\x1f"\\]', "'", text)[:limit]


def _warning(text: str) -> str:
    return f'399 wacall "{_quoted(text)}"'


class SipTrunk:
    """The gateway's SIP user agent and trunk (see the module docstring)."""

    def __init__(self, settings: Settings, manager: CallManager) -> None:
        host, port = settings.sip_listen
        self.settings = settings
        self.manager = manager
        advertised = settings.sip_advertised_address or (
            host if host not in ("0.0.0.0", "::", "") else (settings.media_addresses or ["127.0.0.1"])[0])
        users = ({settings.sip_username: settings.sip_password}
                 if settings.sip_username and settings.sip_password else None)
        #: PBXs may place calls (digest credentials are configured).
        self.open = users is not None
        self.ua = UserAgent(UserAgentConfig(host=host, advertised_host=advertised, udp_port=port, tcp_port=port,
                                            users=users, realm="wacall", user="wacall"),
                            on_invite=self.on_invite)
        self.codecs = tuple(settings.sip_codecs)
        manager.sip_context = SipContext(self.ua, rtp={
            "host": host, "port_range": settings.sip_rtp_port_range, "advertise_address": advertised,
            "codecs": self.codecs, "inactivity_timeout_s": settings.sip_rtp_timeout_s,
            # a SIP trunk is a LAN or a data centre link: start the playout at 20 ms (it
            # grows with the jitter measured, up to 200 ms)
            "jitter": {"initial_delay_s": 0.02, "min_delay_s": 0.01}}, policy=manager.bot_policy)
        self._pending: dict[str, IncomingCall] = {}  # call id -> the PBX's INVITE, until answered
        self._unsubscribe = manager.subscribe(self._on_entry)
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.ua.start()
        log.info("SIP on %s:%d (UDP, TCP)%s", self.ua.advertised_host, self.ua.port("UDP"),
                 "; PBXs may call in (digest)" if self.open else "; calls from PBXs are refused (no credentials)")

    async def close(self) -> None:
        self._unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ua.close()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- a PBX calls in ------------------------------------------------------------------

    async def on_invite(self, incoming: IncomingCall) -> None:
        if not self.open:
            incoming.reject(403, "Forbidden", headers={"Warning": _warning(
                "this gateway takes no calls from PBXs: set WACALL_SIP_USERNAME and WACALL_SIP_PASSWORD")})
            return
        dialled = unquote(incoming.user or "").strip()
        try:
            to = normalize_recipient(dialled)
        except ValueError:
            incoming.reject(404, "Not Found", headers={"Warning": _warning(
                f"{dialled[:40]!r} is not a WhatsApp number: dial sip:<E.164 number>@wacall")})
            return
        try:
            answer_offer((incoming.offer or b"").decode("utf-8", "replace"), "127.0.0.1", 9, self.codecs)
        except RtpSdpError as exc:
            incoming.reject(488, "Not Acceptable Here", headers={"Warning": _warning(f"{exc}")})
            return
        log.info("SIP trunk: INVITE for %s", mask_phone(to))
        try:
            call = await self.manager.place_call(display(to), sip=incoming)
        except ProviderError as exc:
            self._refuse(incoming, exc)
            return
        except CapacityError as exc:
            incoming.reject(503, "Service Unavailable", headers={"Retry-After": "30", "Warning": _warning(str(exc))})
            return
        except Exception as exc:  # noqa: BLE001 - a PBX gets an answer whatever happened
            log.exception("SIP trunk: placing the call for %s failed", mask_phone(to))
            incoming.reject(500, "Server Internal Error", headers={"Warning": _warning(type(exc).__name__)})
            return
        if call.ended:
            self._ended(call, incoming)
            return
        self._pending[call.id] = incoming
        incoming.ended.add_done_callback(lambda _: self._sip_ended(call, incoming))

    def _refuse(self, incoming: IncomingCall, exc: ProviderError) -> None:
        code, phrase = REFUSALS[refusal_kind(exc)]
        what = f"{exc.code} {exc.message or ''}".strip() if exc.code is not None else (exc.message or "refused")
        headers = {"Warning": _warning(what + (f"; {exc.resolution}" if exc.resolution else "")),
                   "Reason": f'SIP;cause={code};text="{_quoted(what, 120)}"'}
        retry_after = getattr(exc, "retry_after_s", None)
        retry_at = getattr(exc, "retry_at", None)
        if retry_after is None and retry_at is not None:
            retry_after = retry_at - time.time()
        if retry_after is not None and code in (480, 503):
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        log.info("SIP trunk: refused with %d (%s)", code, what[:80])
        incoming.reject(code, phrase, headers=headers)

    def _ended(self, call: LiveCall, incoming: IncomingCall) -> None:
        """The WhatsApp call ended before the PBX got its answer."""
        if call.error is not None:
            self._refuse(incoming, call.error)
            return
        reason = call.end_reason or EndReason.NOT_ANSWERED
        code, phrase = ENDED.get(reason, (480, "Temporarily Unavailable"))
        detail = call.state_machine.end_detail
        incoming.reject(code, phrase, headers={"Warning": _warning(f"{reason.value}" + (f": {detail}" if detail else "")),
                                               "Reason": f'SIP;cause={code};text="{reason.value}"'})

    def _on_entry(self, call: LiveCall, entry: Any) -> None:
        incoming = self._pending.get(call.id)
        if incoming is None:
            return
        if entry.name == "ringing":
            incoming.ring(headers={"X-Wacall-Call-Id": call.id})
        elif entry.name == "media_connected" or incoming.ended.done():
            self._pending.pop(call.id, None)  # (answered by the SIP leg, or gone)
        elif entry.name == "ended":
            self._pending.pop(call.id, None)
            self._ended(call, incoming)

    def _sip_ended(self, call: LiveCall, incoming: IncomingCall) -> None:
        """The PBX gave up (CANCEL) before the answer: the WhatsApp call ends too."""
        if self._pending.pop(call.id, None) is not None and not call.ended:
            log.info("call %s: the PBX cancelled; hanging up", call.id)
            self._spawn(call.hangup())
