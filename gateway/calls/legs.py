"""Legs: the parties on a call.

Every call has the WhatsApp user's leg, :class:`WhatsAppLeg`: the provider's signalling
(``connect``, ``pre_accept``/``accept``, ``terminate``/``reject``) and the user's
:class:`~media.session.MediaSession`. It may join that leg's audio to another party:
today a voice bot (:class:`BotLeg`, over the WebSocket/TCP bridges of
:mod:`media.bridges`); next a SIP/IVR leg, a person in the browser, a speech-to-speech
model. Each other party is described by a *leg spec*, parsed once at the edge with
``from_dict`` (:class:`gateway.bots.BotSpec` for bots), and driven through the same small
protocol, :class:`Leg`: ``join`` the user's media, ``hangup``, and ``ended`` (who ended it
and why). Moving the user from one leg to another (transfer) or adding a listener is
joining another leg to the same media.

The WhatsApp leg's setup procedures (:meth:`WhatsAppLeg.dial`, :meth:`~WhatsAppLeg.answer`,
:meth:`~WhatsAppLeg.bring_up`) are async generators: they do the I/O and yield, step by
step, the :mod:`gateway.domain.call` input that says what just happened, so the call
service feeds each to the :class:`~gateway.domain.call.Call` and stops as soon as the call
is ending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from media.session import MediaSession

from ..domain.call import AcceptSent, AnswerMade, Dialed, MediaReady, OfferMade, PreAcceptSent
from ..errors import ProviderError, ProviderUnavailableError
from ..providers.base import CallingProvider
from ..sip import CallFailed, EndKind
from ..sip.spec import parse_uri

__all__ = ["BotLeg", "Leg", "LegEnded", "LegSpec", "SipContext", "SipLeg", "SipUnreachable", "WhatsAppLeg",
           "tag_of", "tagged"]

#: wacall's mark in ``biz_opaque_callback_data`` (the provider echoes it in every webhook
#: about the call): a call whose ``connect`` outcome was unknown is recognised by it.
TAG_PREFIX = "wacall="
#: Meta's limit on ``biz_opaque_callback_data``.
BIZ_OPAQUE_MAX = 512


def tagged(call_id: str, data: str | None) -> str:
    """``data`` with wacall's tag for ``call_id`` in front (untagged if it would not fit)."""
    tag = f"{TAG_PREFIX}{call_id};"
    if data is None:
        return tag
    return tag + data if len(tag) + len(data) <= BIZ_OPAQUE_MAX else data


def tag_of(data: str | None) -> str | None:
    """The call id in a tagged ``biz_opaque_callback_data``, if any."""
    if not data or not data.startswith(TAG_PREFIX):
        return None
    call_id, sep, _ = data[len(TAG_PREFIX):].partition(";")
    return call_id if sep and call_id else None


#: How a hang-up at the provider is retried: attempts, and the first pause (doubling).
HANGUP_ATTEMPTS = 6
HANGUP_FIRST_PAUSE_S = 0.25

log = logging.getLogger(__name__)

#: How long a bot's last words may play after it hung up, before the call ends.
GOODBYE_S = 10.0


@dataclass(frozen=True, slots=True)
class LegEnded:
    """How a leg ended: ``by`` is ``"remote"`` (the party hung up), ``"local"`` (we did)
    or ``"failure"`` (unreachable, broke its protocol, went idle)."""

    by: str
    reason: str


@runtime_checkable
class LegSpec(Protocol):
    """What a party on a call is, as data: parsed once at the edge (the API body, a
    setting) with ``from_dict`` (a clear ``ValueError`` for bad input), serialisable back
    with ``to_dict`` (a call parked across a restart keeps it). The call service makes it
    live as its :class:`Leg` (a :class:`gateway.bots.BotSpec` becomes a :class:`BotLeg`)."""

    kind: ClassVar[str]

    @classmethod
    def from_dict(cls, data: Any) -> LegSpec: ...

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class Leg(Protocol):
    kind: str

    async def join(self, media: MediaSession, *, call_id: str, parameters: dict[str, str]) -> None:
        """Connect this party to the user's media (raises when it cannot be reached)."""
        ...

    async def ended(self) -> LegEnded: ...

    async def hangup(self, reason: str) -> None: ...


class BotLeg:
    """A voice bot on the call (a :class:`~gateway.bots.BotSpec` made live)."""

    kind = "bot"

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.bridge = spec.bridge()

    @property
    def protocol(self) -> str:
        return self.spec.protocol

    async def join(self, media: MediaSession, *, call_id: str, parameters: dict[str, str]) -> None:
        self.bridge = await media.start_bridge(self.bridge, call_id=call_id,
                                               parameters={**parameters, **self.spec.parameters})

    async def ended(self) -> LegEnded:
        """Resolves when the bot's side ends; a bot that hung up first gets its last
        words played (up to :data:`GOODBYE_S`)."""
        bridge = self.bridge
        reason = await bridge.closed
        by = {"bot": "remote", "local": "local"}.get(bridge.ended_by, "failure")
        if by == "remote":
            try:
                await asyncio.wait_for(asyncio.shield(bridge.playback.done), GOODBYE_S)
            except (asyncio.TimeoutError, AttributeError):
                pass
        return LegEnded(by, str(reason))

    async def hangup(self, reason: str) -> None:
        """The user hung up (or we did): the bot gets its stop message."""
        await self.bridge.stop(reason)


class SipUnreachable(RuntimeError):
    """The SIP party could not be reached or did not answer (``str``: why)."""


@dataclass
class SipContext:
    """What SIP legs share: the process's user agent, the RTP options for each leg's
    media (:class:`media.rtp.RtpBridge`'s: host, port range, advertised address,
    inactivity timeout) and where SIP targets may be (``policy``)."""

    ua: Any  # gateway.sip.UserAgent
    rtp: dict[str, Any]
    policy: Any = None  # gateway.bots.BotPolicy
    #: How long a probe (OPTIONS) of a target may take.
    probe_timeout_s: float = 5.0

    async def probe(self, spec: Any) -> None:
        """Before a call is placed: may ``spec``'s target be dialled, and (unless
        ``spec.probe`` is off) does it answer OPTIONS at all (any response but a timeout
        or 503)? Raises :class:`SipUnreachable` (or ``BotTargetRefused``)."""
        parts = parse_uri(spec.uri)
        if self.policy is not None:
            await self.policy.check(parts["host"], parts["port"])
        if not spec.probe:
            return
        try:
            response = await asyncio.wait_for(self.ua.options(spec.uri), self.probe_timeout_s)
        except (asyncio.TimeoutError, OSError) as exc:
            raise SipUnreachable(f"SIP party at {spec.target} unreachable: "
                                 f"{'no answer to OPTIONS' if isinstance(exc, asyncio.TimeoutError) else exc}") from None
        if response.code in (408, 503):
            raise SipUnreachable(f"SIP party at {spec.target} unreachable: {response.code} {response.phrase}")


class SipLeg:
    """A SIP party on the call (an IVR, a PBX queue): dialled with a
    :class:`~gateway.sip.spec.SipSpec` once the user picked up, or an INVITE a PBX sent
    us (the SIP trunk) answered once the user picked up. Its audio is plain RTP joined to
    the user's media (:meth:`media.session.MediaSession.open_rtp`); DTMF crosses both
    ways (RFC 4733 on the RTP side, SIP INFO from the SIP side)."""

    kind = "sip"

    def __init__(self, context: SipContext, *, spec: Any = None, incoming: Any = None) -> None:
        if (spec is None) == (incoming is None):
            raise ValueError("a SIP leg dials a spec or answers an incoming call")
        self.context = context
        self.spec = spec
        self.incoming = incoming
        self.sip: Any = incoming  # gateway.sip.Call
        self.party: Any = None  # media.rtp.party.RtpParty (or its worker handle)
        self.codec: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._early_sdp: bytes | None = None
        self._joined = False

    @property
    def target(self) -> str:
        if self.spec is not None:
            return self.spec.target
        return "sip trunk"

    async def join(self, media: MediaSession, *, call_id: str, parameters: dict[str, str]) -> None:
        """Dial (or answer) and join the audio; raises :class:`SipUnreachable`."""
        options = dict(self.context.rtp)
        if self.spec is not None:
            options["codecs"] = tuple(self.spec.codecs)
        self.party = party = await media.open_rtp(**options)
        try:
            if self.spec is not None:
                spec = self.spec
                headers = {**spec.headers, "X-Wacall-Call-Id": call_id,
                           "X-WhatsApp-Call-Id": parameters.get("whatsapp_call_id", "")}
                self.sip = self.context.ua.invite(spec.uri, await party.offer(), headers=headers, auth=spec.auth)
                early = asyncio.ensure_future(self._early_media(call_id))
                try:
                    answer = await self._answered(spec)
                except BaseException:
                    early.cancel()
                    await asyncio.gather(early, return_exceptions=True)
                    raise
                # (the provisionals end with the final answer: early media is set up or not)
                try:
                    await asyncio.wait_for(early, 5.0)
                except asyncio.TimeoutError:
                    pass
                if answer != self._early_sdp:  # (the 200's SDP, unless the 183 had the same)
                    self.codec = await party.answer(answer.decode("utf-8", "replace"))
            else:
                offer = (self.incoming.offer or b"").decode("utf-8", "replace")
                answer = await party.accept(offer)
                self.codec = (await party.get_stats()).get("codec") or "?"
                self.incoming.answer(answer, headers={"X-Wacall-Call-Id": call_id,
                                                      "X-WhatsApp-Call-Id": parameters.get("whatsapp_call_id", "")})
        except BaseException as exc:
            if self.incoming is not None:  # (no-op once answered)
                self.incoming.reject(500, "Server Internal Error",
                                     headers={"Warning": f'399 wacall "{type(exc).__name__}"'})
            await party.stop("sip leg failed")
            raise
        self.sip.on_dtmf = self._sip_dtmf
        if not self._joined:
            await party.join(call_id)
            self._joined = True
        if hasattr(party, "on_dtmf") and not party.dtmf_negotiated:
            # no telephone-event on the SIP side: the user's keys go as SIP INFO
            # (media in this process; a worker's digits go as RFC 4733 only)
            party.on_dtmf(self._user_dtmf)

    def _user_dtmf(self, event: Any) -> None:
        sip = self.sip
        if sip is None or sip.ended.done():
            return
        task = asyncio.ensure_future(sip.send_dtmf(event.digit, event.duration_ms or 160))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _answered(self, spec: Any) -> bytes:
        """The SIP party's answer SDP; :class:`SipUnreachable` when it refuses or rings
        too long (then it is cancelled)."""
        try:
            return await self.sip.wait_answered(spec.answer_timeout_s)
        except asyncio.TimeoutError:
            self.sip.cancel()
            raise SipUnreachable(f"SIP party at {spec.target} did not answer within "
                                 f"{spec.answer_timeout_s:g} s") from None
        except CallFailed as exc:
            end = exc.reason
            why = f"{end.code} {end.phrase}".strip() if end.code else end.kind.value
            raise SipUnreachable(f"SIP party at {spec.target} refused the call: {why}") from None

    async def _early_media(self, call_id: str) -> None:
        """A 183 with SDP before the answer (an IVR's "please hold", a queue's music):
        the user hears it at once."""
        async for provisional in self.sip.provisionals():
            if provisional.sdp and self._early_sdp is None:
                self._early_sdp = provisional.sdp
                self.codec = await self.party.answer(provisional.sdp.decode("utf-8", "replace"))
                await self.party.join(call_id)
                self._joined = True
                log.info("call %s: early media from the SIP party (%s %s)", call_id, provisional.code,
                         provisional.phrase)

    def _sip_dtmf(self, dtmf: Any) -> None:
        """A digit in a SIP INFO: on to WhatsApp (in order: one task at a time)."""
        party = self.party
        if party is None:
            return
        task = asyncio.ensure_future(party.receive_dtmf(dtmf.digit, dtmf.duration_ms or 160))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("SIP INFO digit not passed on: %s", task.exception())

    async def ended(self) -> LegEnded:
        """Resolves when the SIP side hangs up (BYE), its session timer lapses or its RTP
        goes silent, or when we hung it up."""
        sip_end, rtp_end = self.sip.ended, self.party.closed
        await asyncio.wait({sip_end, rtp_end}, return_when=asyncio.FIRST_COMPLETED)
        if sip_end.done():
            end = sip_end.result()
            if end.kind is EndKind.REMOTE_BYE:
                return LegEnded("remote", "bye" + (f" ({end.reason})" if end.reason else ""))
            if end.kind in (EndKind.LOCAL_BYE, EndKind.CLOSED):
                return LegEnded("local", end.kind.value)
            return LegEnded("failure", end.kind.value)
        reason = rtp_end.result()
        return LegEnded("failure" if self.party.ended_by == "rtp" else "local", reason)

    async def hangup(self, reason: str) -> None:
        """The user hung up (or we did): BYE (or CANCEL while it rings), then the RTP."""
        sip = self.sip
        try:
            if sip is not None and not sip.ended.done():
                if self.incoming is not None and sip.local_sdp is None:  # (not answered yet)
                    sip.reject(480, "Temporarily Unavailable", headers={"Warning": f'399 wacall "{reason}"'})
                elif self.incoming is None and not sip.answered.done():
                    sip.cancel()
                else:
                    await sip.bye(headers={"Reason": f'Q.850;cause=16;text="{reason}"'})
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self.party is not None:
                await self.party.stop(reason)


class WhatsAppLeg:
    """The WhatsApp user on the call: the provider's signalling for one call and the
    user's media session. Knows nothing of the call's state: the call service drives it
    and feeds what it yields to the :class:`~gateway.domain.call.Call`."""

    kind = "whatsapp"

    def __init__(self, provider: CallingProvider, media: MediaSession | None, *, user: str,
                 wacid: str | None = None, biz_opaque_callback_data: str | None = None,
                 media_timeout_s: float = 10.0):
        self.provider = provider
        self.media = media
        self.user = user
        self.wacid = wacid
        self.biz_opaque_callback_data = biz_opaque_callback_data
        self.media_timeout_s = media_timeout_s
        #: The SDP we sent (offer or answer), as the provider received it.
        self.local_sdp: str | None = None
        #: wacall's call id, tagged into ``connect``'s ``biz_opaque_callback_data``.
        self.call_id: str | None = None
        #: Extra ``connect``/``accept`` fields (WhatsApp's ``recording``/``transcription``).
        self.call_options: dict | None = None
        #: How a hang-up is retried (see :meth:`hangup`).
        self.hangup_attempts = HANGUP_ATTEMPTS
        self.hangup_pause_s = HANGUP_FIRST_PAUSE_S

    async def dial(self) -> AsyncIterator[object]:
        """Outbound: make the offer, ``connect``. Raises ``MediaError``/``ProviderError``."""
        self.local_sdp = await self.media.offer()  # (the media is let go when the call ends)
        yield OfferMade()
        biz = tagged(self.call_id, self.biz_opaque_callback_data) if self.call_id else self.biz_opaque_callback_data
        self.wacid = await self.provider.connect(self.user, self.local_sdp, biz, extra=self.call_options)
        yield Dialed(self.wacid)

    async def answer(self, offer: str) -> AsyncIterator[object]:
        """Inbound: ``pre_accept`` -> media up -> ``accept``, with the same SDP answer both
        times (``sdp_type`` "answer", see the protocol notes)."""
        media = self.media  # (let go when the call ends, maybe while we wait)
        answer = await media.answer(offer)
        self.local_sdp = answer
        yield AnswerMade()
        await self.provider.pre_accept(self.wacid, answer)
        yield PreAcceptSent()
        await media.wait_up(self.media_timeout_s)
        yield MediaReady()
        await self.provider.accept(self.wacid, answer, self.biz_opaque_callback_data, extra=self.call_options)
        yield AcceptSent()

    async def bring_up(self, answer: str) -> AsyncIterator[object]:
        """Outbound: apply the provider's answer and wait for ICE and DTLS."""
        media = self.media  # (let go when the call ends, maybe while we wait)
        await media.apply_answer(answer)
        await media.wait_up(self.media_timeout_s)
        yield MediaReady()

    async def hangup(self, how: str) -> dict:
        """Tell the provider the call is over: ``"terminate"`` or ``"reject"``, retried
        with backoff while the provider is unreachable or busy (network, 5xx, 429),
        until it confirms or says the call is not live there (any other 4xx about the
        call). Returns what happened (``action``, ``confirmed``, ``attempts``, and the
        last ``error`` when not confirmed); never raises."""
        pause, attempts = self.hangup_pause_s, max(1, self.hangup_attempts)
        error: ProviderError | None = None
        for attempt in range(1, attempts + 1):
            try:
                if how == "reject":
                    await self.provider.reject(self.wacid)
                else:
                    await self.provider.terminate(self.wacid)
                return {"action": how, "confirmed": True, "attempts": attempt}
            except ProviderError as exc:
                error = exc
                if not _retryable(exc):
                    if _call_not_live(exc):  # ended there already: nothing is left running
                        return {"action": how, "confirmed": True, "attempts": attempt, "gone": True}
                    break
                log.info("%s of %s failed (attempt %d of %d): %s", how, self.wacid, attempt, attempts, exc)
            if attempt < attempts:
                await asyncio.sleep(pause)
                pause *= 2
        log.warning("%s of %s not confirmed by the provider: %s", how, self.wacid, error)
        return {"action": how, "confirmed": False, "attempts": attempt,
                "error": error.to_dict() if error is not None else None}


def _retryable(exc: ProviderError) -> bool:
    return isinstance(exc, ProviderUnavailableError) or exc.http_status == 429 or (
        exc.http_status is not None and exc.http_status >= 500)


def _call_not_live(exc: ProviderError) -> bool:
    """A refusal that means the call is not (or no longer) live at the provider: an
    unknown or already ended call id (HTTP 400/404 "invalid parameter")."""
    return exc.http_status in (400, 404) and exc.code in (100, None)
