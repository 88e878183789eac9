"""The control API: ``/v1`` routes that let other programs place, watch and end calls.

Handlers are thin: parse and validate the JSON, call the :class:`CallManager`, serialise.
Every error has one shape: ``{"error": {"code", "message", "resolution"?}}``.
Authentication is a bearer token (``WACALL_API_TOKEN``) compared in constant time; with
no token configured the API refuses every request rather than running open.
"""

from __future__ import annotations

import asyncio

import hashlib
import hmac
import json
import logging
import math
import time
from datetime import UTC, datetime
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from media.errors import MediaFileError
from media.session import RECORDING_FORMATS

from media.bridges import BridgeUnavailable

from ..bots import BotTargetRefused

from ..calls import CallManager, CallState, CapacityError, LiveCall as Call
from ..calls.legs import SipUnreachable
from ..sip.spec import SipSpec
from ..disk import LowDiskError
from ..errors import ProviderError, refusal_kind
from ..media_library import MediaLibrary, MediaPathError
from ..numbers import display, is_bsuid, normalize_recipient
from ..recordings import MAX_WIDTH, ProviderRecording, RecordingBusy, Recordings
from ..logs import redact_text
from ..store.base import VersionConflict

log = logging.getLogger(__name__)

MAX_PAGE = 200
#: How long an ``Idempotency-Key`` is remembered, and after how long an attempt that
#: never finished (the process died) may be made again.
IDEMPOTENCY_TTL_S = 24 * 3600.0
IDEMPOTENCY_STALE_S = 120.0
#: How many stored calls ``GET /v1/calls`` pages through (beyond this process's own).
MAX_STORED = 1000


def error_response(status: int, code: str | int, message: str, resolution: str | None = None,
                   **extra: Any) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if resolution:
        error["resolution"] = resolution
    error.update({k: v for k, v in extra.items() if v is not None})
    return web.json_response({"error": error}, status=status)


def _retry_at(exc: ProviderError) -> str | None:
    from ..permissions import iso

    retry_at = getattr(exc, "retry_at", None)
    return iso(retry_at) if retry_at is not None else None


def provider_error_response(exc: ProviderError, redact: Callable[[str], str] | None = None,
                            **extra: Any) -> web.Response:
    """The provider's error as our JSON error, with ``redact`` applied to what the
    provider wrote (a provider may echo credentials or numbers back)."""
    clean = redact or (lambda text: text)
    status = {"unavailable": 503, "forbidden": 403, "too_many": 429, "conflict": 409}.get(refusal_kind(exc), 502)
    response = error_response(status, exc.code if exc.code is not None else "provider_unavailable",
                              clean(exc.message or ""), exc.resolution,
                              details=clean(exc.details) if exc.details else None, retry_at=_retry_at(exc),
                              **extra)
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:  # the provider's Retry-After, passed on
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


class BadRequest(Exception):
    def __init__(self, message: str, code: str = "bad_request", status: int = 400):
        super().__init__(message)
        self.message, self.code, self.status = message, code, status


def auth_middleware(token: str | None, prefix: str = "/v1/",
                    cookie_ok: Callable[[web.Request], bool] | None = None) -> Callable:
    """Bearer-token auth for ``prefix``. ``cookie_ok`` (the console's session check) lets a
    logged-in browser *read* (GET/HEAD: recordings for ``<audio>``, the event stream)
    without the header; changing state always takes the bearer token."""
    public = {"/v1/openapi.json"}

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable]) -> web.StreamResponse:
        if not request.path.startswith(prefix) or request.path in public:
            return await handler(request)
        if token and cookie_ok is not None and request.method in ("GET", "HEAD") \
                and "Authorization" not in request.headers and cookie_ok(request):
            return await handler(request)
        if not token:
            return error_response(401, "unauthorized", "the control API is disabled",
                                  "set WACALL_API_TOKEN and send it as a bearer token")
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        given_bytes = given.strip().encode("utf-8", "surrogateescape")  # (any bytes: they just do not match)
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, token.encode()):
            return error_response(401, "unauthorized", "missing or wrong bearer token",
                                  "send 'Authorization: Bearer <WACALL_API_TOKEN>'")
        return await handler(request)

    return middleware


#: The largest number of seconds any timeout field takes (30 days); each field has its own
#: bound below it (:data:`_LIMITS`).
_MAX_SECONDS = 30 * 86400.0
_LIMITS = {"ring_timeout_s": 3600.0, "max_duration_s": 86400.0, "permission_wait_s": 7 * 86400.0}
#: How many files one request may queue, and how long a file name may be.
MAX_PLAYS = 50
MAX_NAME = 1024
#: How deep a request body may nest (wacall's own are 3 levels deep).
MAX_DEPTH = 8


def _number(body: dict, name: str, *, required: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required")
        return None
    limit = _LIMITS.get(name, _MAX_SECONDS)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0 < value <= limit):
        raise BadRequest(f"{name} must be a number of seconds above 0 and at most {limit:g}")
    return float(value)


def _plays(value: Any) -> list[str]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadRequest("play must be a file name or a list of file names")
    if len(names) > MAX_PLAYS:
        raise BadRequest(f"play takes at most {MAX_PLAYS} files")
    for name in names:
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise BadRequest(f"play: file names are 1 to {MAX_NAME} printable characters")
    return names


#: The query parameters of GET /v1/calls.
LIST_QUERY = ("state", "limit", "cursor", "user", "direction", "since", "until")
RECORDINGS_QUERY = ("call_id", "user", "since", "until", "limit", "cursor")


def _time(query: Any, name: str) -> float | None:
    """An ISO 8601 time from the query (a ``Z`` or an offset; naive means UTC)."""
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return iso_seconds(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 time, e.g. 2026-12-07T09:00:00Z") from None


def iso_seconds(text: str) -> float:
    """ISO 8601 (``Z`` or an offset; naive is UTC) -> unix seconds; ValueError if not."""
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _created(call: dict) -> float:
    try:
        return iso_seconds(str(call.get("created_at")))
    except ValueError:
        return 0.0


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply ``value`` nests (stops counting past ``limit``)."""
    if limit < 0:
        return 0
    if isinstance(value, dict):
        return 1 + max((_depth(v, limit - 1) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v, limit - 1) for v in value), default=0)
    return 0


async def _json_body(request: web.Request) -> dict:
    try:
        body = json.loads(await request.read(), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):  # (NaN, Infinity, 100k levels)
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if _depth(body) > MAX_DEPTH:
        raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels")
    return body


_ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable]) -> web.StreamResponse:
    """Every error answers the JSON error shape: unknown routes (404), wrong methods (405,
    with ``Allow``), bodies over the size limit (413); an unexpected exception is a 500
    with one logged traceback (a bug to report), never an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, _ERROR_CODES.get(exc.status, "http_error"), exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(500, "internal_error", "an unexpected error (it is logged)",
                              "report it with the log line")


class ControlApi:
    def __init__(self, manager: CallManager, library: MediaLibrary, gate: Any = None,
                 secrets: list[str] | None = None, recordings: Recordings | None = None):
        #: Masks configured secrets and phone numbers in what providers wrote.
        self.redact = lambda text: redact_text(text, secrets or ())
        self.manager = manager
        self.library = library
        self.gate = gate
        #: The QA recordings on disk (:mod:`gateway.recordings`).
        self.recordings = recordings or Recordings(getattr(manager, "recordings_dir", "wacall-data/recordings"))

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/openapi.json", self.openapi),
            web.post("/v1/calls", self._guard(self.create_call)),
            web.get("/v1/calls", self._guard(self.list_calls, query=LIST_QUERY)),
            web.get("/v1/calls/{id}", self._guard(self.get_call)),
            web.delete("/v1/calls/{id}", self._guard(self.hangup)),
            web.post("/v1/calls/{id}/play", self._guard(self.play)),
            web.post("/v1/calls/{id}/dtmf", self._guard(self.dtmf)),
            web.get("/v1/recordings", self._guard(self.list_recordings, query=RECORDINGS_QUERY)),
            web.delete("/v1/calls/{id}/recordings", self._guard(self.erase_recordings)),
            web.get("/v1/calls/{id}/recordings/{file}", self._guard(self.recording_file, query=("format",))),
            web.get("/v1/calls/{id}/waveform", self._guard(self.waveform, query=("file", "width"))),
            web.get("/v1/permissions", self._guard(self.list_permissions)),
            web.get("/v1/permissions/{user}", self._guard(self.get_permission, query=("refresh",))),
            web.post("/v1/permissions/{user}/request", self._guard(self.request_permission)),
        ]

    def _guard(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
               query: tuple[str, ...] = ()):
        async def guarded(request: web.Request) -> web.StreamResponse:
            unknown = sorted(set(request.query) - set(query))
            if unknown:
                return error_response(400, "bad_request", f"unknown query parameters: {', '.join(unknown)[:200]}",
                                      f"this route takes: {', '.join(query) or 'none'}")
            try:
                return await handler(request)
            except BadRequest as exc:
                return error_response(exc.status, exc.code, exc.message)
            except MediaPathError as exc:
                return error_response(400, "bad_media_path", str(exc),
                                      "name a file inside WACALL_MEDIA_DIR")
            except MediaFileError as exc:
                return error_response(400, "bad_media_file", str(exc), "use a file FFmpeg can decode")
            except ProviderError as exc:
                return provider_error_response(exc, self.redact)

        guarded.__name__ = handler.__name__
        return guarded

    async def openapi(self, request: web.Request) -> web.Response:
        text = resources.files(__package__).joinpath("openapi.json").read_text()
        return web.Response(text=text, content_type="application/json")

    def _call(self, request: web.Request) -> Call:
        call = self.manager.get(request.match_info["id"])
        if call is None:
            raise BadRequest(f"no call {request.match_info['id']!r}", "not_found", 404)
        return call

    async def _idempotent(self, request: web.Request, scope: str, body: Any,
                          perform: Callable[[], Awaitable[web.Response]]) -> web.Response:
        """With an ``Idempotency-Key`` header: the first request with that key is
        performed and its answer remembered (in the store, so across restarts, for
        :data:`IDEMPOTENCY_TTL_S`); a retry gets the same answer (the same call, in its
        current state), a different body with the same key a 422, a retry while the
        first is still running a 409. Failed requests are not remembered."""
        key = request.headers.get("Idempotency-Key")
        store = self.manager.store
        if key is None or store is None:
            return await perform()
        if not 1 <= len(key) <= 255 or not key.isascii() or not key.isprintable():
            raise BadRequest("Idempotency-Key must be 1 to 255 printable ASCII characters")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        doc_key = f"idempotency:{scope}:{hashlib.sha256(key.encode()).hexdigest()}"
        doc, version = await store.load(doc_key)
        now = time.time()
        if doc and now - doc.get("at", 0) < IDEMPOTENCY_TTL_S and doc.get("state") != "failed" and not (
                doc.get("state") == "pending" and now - doc.get("at", 0) > IDEMPOTENCY_STALE_S):
            if doc.get("hash") != digest:
                return error_response(422, "idempotency_key_reused",
                                      "this Idempotency-Key was used with a different request body",
                                      "use a new key for a different request")
            if doc.get("state") == "pending":
                return error_response(409, "idempotency_in_progress",
                                      "a request with this Idempotency-Key is still being processed",
                                      "retry in a moment")
            return await self._replay(doc)
        try:
            version = await store.save(doc_key, {"hash": digest, "state": "pending", "at": now},
                                       expected_version=version)
        except VersionConflict:
            return error_response(409, "idempotency_in_progress",
                                  "a request with this Idempotency-Key is being processed", "retry in a moment")
        done = {"hash": digest, "state": "failed", "at": now}
        try:
            response = await perform()
            if 200 <= response.status < 300:
                answer = json.loads(response.text)
                done = {"hash": digest, "state": "done", "at": now, "status": response.status,
                        "call_id": answer.get("id") if scope == "calls" else None, "body": answer}
            return response
        finally:
            try:
                await store.save(doc_key, done, expected_version=version)
            except Exception as exc:  # (a retry then performs the request again)
                log.warning("could not remember an Idempotency-Key: %s", exc)

    async def _replay(self, doc: dict) -> web.Response:
        call_id = doc.get("call_id")
        if call_id:  # the same call, as it is now
            call = self.manager.get(call_id)
            current = call.summary() if call is not None else await self.manager.stored_call(call_id)
            if current is not None:
                return web.json_response(current, status=doc.get("status", 201))
        return web.json_response(doc.get("body"), status=doc.get("status", 200))

    async def create_call(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        return await self._idempotent(request, "calls", body, lambda: self._create_call(body))

    async def _create_call(self, body: dict) -> web.Response:
        unknown = sorted(set(body) - {"to", "recipient", "play", "record", "biz_opaque_callback_data", "provider_recording",
                                      "ring_timeout_s", "max_duration_s", "bot", "sip", "if_no_permission",
                                      "permission_request", "permission_wait_s"})
        if unknown:
            raise BadRequest(f"unknown fields: {', '.join(unknown)}")
        # ``to``: a phone number or a BSUID; ``recipient``: a BSUID (``to`` wins, as at Meta)
        field = "to" if body.get("to") is not None or body.get("recipient") is None else "recipient"
        try:
            to = normalize_recipient(body.get(field, ""))
        except ValueError as exc:
            raise BadRequest(f"{field}: {exc}") from None
        if field == "recipient" and not is_bsuid(to):
            raise BadRequest("recipient: a business-scoped user id (CC.id), not a phone number")
        self._bsuid_supported(to, field)
        bot = None
        if body.get("bot") is not None:
            from ..bots import BotSpec

            try:
                bot = BotSpec.from_dict(body["bot"])
            except ValueError as exc:
                raise BadRequest(f"bot: {exc}") from None
        sip = None
        if body.get("sip") is not None:
            try:
                sip = SipSpec.from_dict(body["sip"])
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            if bot is not None:
                raise BadRequest("a call takes a bot or a sip party, not both")
        record = body.get("record", False)
        if not isinstance(record, bool) and record not in RECORDING_FORMATS:
            raise BadRequest('record must be true, false or a recording format ("wav", "opus" or "both")')
        provider_recording = None
        if body.get("provider_recording") is not None:
            try:
                provider_recording = ProviderRecording.from_dict(body["provider_recording"])
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            provider = self.manager.provider
            if not getattr(provider, "supports_recording", False):
                raise BadRequest(f"provider_recording: {getattr(provider, 'name', 'this provider')} does not "
                                 "document WhatsApp's call recording fields yet; record with \"record\": true")
        callback = body.get("biz_opaque_callback_data")
        if callback is not None and (not isinstance(callback, str) or len(callback) > 512):
            raise BadRequest("biz_opaque_callback_data must be a string of at most 512 characters")
        if_no_permission = body.get("if_no_permission", "fail")
        if if_no_permission not in ("fail", "request"):
            raise BadRequest("if_no_permission must be 'fail' or 'request'")
        from ..gatekeeper import PermissionRequest

        try:
            how = PermissionRequest.from_dict(body.get("permission_request"))
        except ValueError as exc:
            raise BadRequest(f"permission_request: {exc}") from None
        permission_wait_s = _number(body, "permission_wait_s")
        ring_timeout_s = _number(body, "ring_timeout_s")
        max_duration_s = _number(body, "max_duration_s")
        plays = _plays(body.get("play"))
        sources = self.library.sources(plays)
        # (a call parked for a permission request is placed from this after a restart)
        recipe = {"play": plays, "record": record, "bot": bot.to_dict() if bot is not None else None,
                  "sip": sip.to_dict() if sip is not None else None, "ring_timeout_s": ring_timeout_s,
                  "max_duration_s": max_duration_s} if if_no_permission == "request" else None
        try:
            call = await self.manager.place_call(
                display(to), sources=sources, biz_opaque_callback_data=callback,
                ring_timeout_s=ring_timeout_s, max_duration_s=max_duration_s, record=record,
                if_no_permission=if_no_permission, permission_request=how,
                permission_wait_s=permission_wait_s, bot=bot, recipe=recipe,
                provider_recording=provider_recording, sip=sip)
        except CapacityError as exc:
            return error_response(503, "over_capacity", str(exc), "retry when a call has ended")
        except LowDiskError as exc:
            return error_response(507, exc.code, exc.message, exc.resolution)
        except BridgeUnavailable as exc:
            return error_response(502, "bot_unavailable", f"{exc}; the call was not placed",
                                  "check that the bot is running and reachable from wacall")
        except BotTargetRefused as exc:
            what = "sip.uri" if sip is not None else "bot.url"
            return error_response(400, f"{'sip' if sip is not None else 'bot'}_not_allowed",
                                  f"{exc}; the call was not placed",
                                  f"point {what} at an allowed host (WACALL_BOT_ALLOW)")
        except SipUnreachable as exc:
            return error_response(502, "sip_unavailable", f"{exc}; the call was not placed",
                                  "check that the SIP party answers OPTIONS and is reachable from wacall")
        if call.error is not None and call.state is CallState.ENDED:
            return provider_error_response(call.error, self.redact, call_id=call.id)
        return web.json_response(call.summary(), status=201)

    async def list_calls(self, request: web.Request) -> web.Response:
        query = request.query
        state = query.get("state")
        if state is not None and state not in {s.value for s in CallState}:
            raise BadRequest(f"state must be one of {', '.join(s.value for s in CallState)}")
        try:
            limit = int(query.get("limit", "50"))
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        if not 1 <= limit <= MAX_PAGE:
            raise BadRequest(f"limit must be between 1 and {MAX_PAGE}")
        user = query.get("user")
        if user is not None:
            try:
                user = normalize_recipient(user)
            except ValueError as exc:
                raise BadRequest(f"user: {exc}") from None
        direction = query.get("direction")
        if direction is not None and direction not in ("BUSINESS_INITIATED", "USER_INITIATED"):
            raise BadRequest("direction must be BUSINESS_INITIATED or USER_INITIATED")
        since, until = _time(query, "since"), _time(query, "until")
        calls = await self.find_calls(state=state, user=user, direction=direction, since=since, until=until)
        cursor = query.get("cursor")
        if cursor:
            ids = [s.get("id") for s in calls]
            if cursor not in ids:
                raise BadRequest("cursor is not a call id from a previous page")
            calls = calls[ids.index(cursor) + 1:]
        page = calls[:limit]
        next_cursor = page[-1]["id"] if len(calls) > limit else None
        return web.json_response({"calls": page, "next_cursor": next_cursor})

    async def find_calls(self, *, state: str | None = None, user: str | None = None,
                         direction: str | None = None, since: float | None = None,
                         until: float | None = None) -> list[dict]:
        """Call summaries, newest first: this process's calls (live ones first hand), then
        what the store keeps (earlier processes' calls too), filtered. ``user`` is a
        normalised recipient."""
        found = [(c.user, c.summary()) for c in reversed(self.manager.calls.values())]
        known = {s["id"] for _, s in found}
        found += [(u, s) for u, s in await self.manager.stored_calls(MAX_STORED) if s.get("id") not in known]
        found.sort(key=lambda pair: str(pair[1].get("created_at")), reverse=True)
        return [s for u, s in found
                if (state is None or s.get("state") == state)
                and (user is None or str(u).lstrip("+") == user)
                and (direction is None or s.get("direction") == direction)
                and (since is None or _created(s) >= since) and (until is None or _created(s) < until)]

    async def call_summary(self, call_id: str, *, refresh: bool = True) -> dict | None:
        """One call's summary (this process's, else the store's), ``None`` if unknown."""
        call = self.manager.get(call_id)
        if call is None:
            return await self.manager.stored_call(call_id)
        if refresh:
            await call.refresh_stats()
        return call.summary()

    async def get_call(self, request: web.Request) -> web.Response:
        call = self.manager.get(request.match_info["id"])
        if call is None:  # a call an earlier process ran
            stored = await self.manager.stored_call(request.match_info["id"])
            if stored is None:
                self._call(request)  # (404)
            return web.json_response(stored)
        await call.refresh_stats()
        return web.json_response(call.summary())

    async def hangup(self, request: web.Request) -> web.Response:
        call = self.manager.get(request.match_info["id"])
        if call is None and self.manager.routes:  # run by another instance: it hangs up
            ended = await self.manager.hang_up_elsewhere(request.match_info["id"])
            if ended is not None:
                return web.json_response(ended)
        if call is None:
            stored = await self.manager.stored_call(request.match_info["id"])
            if stored is None:
                self._call(request)  # (404)
            return web.json_response(stored)
        if not call.ended:
            await call.hangup()
        hangup = call.provider_hangup
        if hangup is not None and not hangup.get("confirmed"):
            # the call is over here, but the provider did not confirm it: say so
            error = {"code": "hangup_unconfirmed",
                     "message": f"the provider did not confirm the {hangup.get('action')} "
                                f"after {hangup.get('attempts')} attempt(s)",
                     "provider_error": hangup.get("error")}
            return web.json_response({"error": error, "call": call.summary()}, status=502)
        return web.json_response(call.summary())

    async def play(self, request: web.Request) -> web.Response:
        call = self._call(request)
        body = await _json_body(request)
        names = _plays(body.get("play"))
        if not names:
            raise BadRequest("play is required")
        if call.ended:
            raise BadRequest(f"call {call.id} has ended", "call_ended", 409)
        for source in self.library.sources(names):
            call.play(source)
        return web.json_response({"id": call.id, "queued": len(names), "state": call.state.value},
                                 status=202)

    async def dtmf(self, request: web.Request) -> web.Response:
        from media.session import DtmfError

        call = self._call(request)
        body = await _json_body(request)
        digits = body.get("digits")
        if not isinstance(digits, str) or not digits:
            raise BadRequest("digits must be a non-empty string of 0-9 * # A-D")
        duration_ms = body.get("duration_ms", 160)
        if isinstance(duration_ms, bool) or not isinstance(duration_ms, int) or not 40 <= duration_ms <= 2000:
            raise BadRequest("duration_ms must be an integer between 40 and 2000")
        if call.state is not CallState.MEDIA_CONNECTED:
            raise BadRequest(f"call {call.id} is {call.state.value}; DTMF needs a connected call",
                             "not_connected", 409)
        try:
            await call.send_dtmf(digits, duration_ms)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        except DtmfError as exc:
            raise BadRequest(str(exc), "dtmf_unavailable", 409) from None
        return web.json_response({"id": call.id, "sent": digits, "state": call.state.value}, status=202)

    # -- recordings ------------------------------------------------------------------------

    async def list_recordings(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            limit = int(query.get("limit", "50"))
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        if not 1 <= limit <= MAX_PAGE:
            raise BadRequest(f"limit must be between 1 and {MAX_PAGE}")
        user = query.get("user")
        if user is not None:
            try:
                user = normalize_recipient(user)
            except ValueError as exc:
                raise BadRequest(f"user: {exc}") from None
        since, until = _time(query, "since"), _time(query, "until")
        call_id = query.get("call_id")
        found = []
        for data in await asyncio.to_thread(self.recordings.sidecars):
            meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
            if call_id is not None and data.get("call_id") != call_id:
                continue
            if user is not None:
                try:
                    if normalize_recipient(str(meta.get("user") or "")) != user:
                        continue
                except ValueError:
                    continue
            if since is not None or until is not None:
                try:
                    started = iso_seconds(str(data.get("started_at")))
                except ValueError:
                    continue
                if (since is not None and started < since) or (until is not None and started >= until):
                    continue
            found.append(data)
        cursor = query.get("cursor")
        if cursor:
            ids = [str(d.get("call_id")) for d in found]
            if cursor not in ids:
                raise BadRequest("cursor is not a call id from a previous page")
            found = found[ids.index(cursor) + 1:]
        page = [self.recordings.item(d) for d in found[:limit]]
        next_cursor = page[-1]["call_id"] if len(found) > limit else None
        return web.json_response({"recordings": page, "next_cursor": next_cursor})

    def _recording(self, request: web.Request, name: str):
        info = self.recordings.file(request.match_info["id"], name)
        if info is None:
            raise BadRequest(f"call {request.match_info['id']!r} has no recording file {name[:64]!r}",
                             "not_found", 404)
        return info

    async def recording_file(self, request: web.Request) -> web.StreamResponse:
        info = self._recording(request, request.match_info["file"])
        wanted = request.query.get("format")
        if wanted is not None:
            if wanted != "wav":
                raise BadRequest(f"format must be wav (or left out for the file as it is), not {wanted[:20]!r}")
            try:
                info = await asyncio.to_thread(self.recordings.as_wav, info)
            except MediaFileError as exc:
                raise BadRequest(f"cannot decode {info.name}: {exc.reason}", "bad_media_file", 422) from None
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            except OSError as exc:  # (a full disk, the file erased meanwhile)
                raise BadRequest(f"cannot render {info.name}: {exc.strerror or exc}", "storage", 507) from None
        # (aiohttp serves Range requests with 206, and ETag / If-None-Match / If-Range)
        return web.FileResponse(info.path, headers={"Content-Type": info.content_type,
                                                    "Cache-Control": "private, no-cache",
                                                    "Content-Disposition": f'inline; filename="{info.name}"'})

    async def erase_recordings(self, request: web.Request) -> web.Response:
        call_id = request.match_info["id"]
        try:
            erased = await asyncio.to_thread(self.recordings.erase, call_id)
        except RecordingBusy as exc:
            raise BadRequest(str(exc), "recording", 409) from None
        if not erased:
            raise BadRequest(f"call {call_id!r} has no recordings here", "not_found", 404)
        return web.json_response({"call_id": call_id, "erased": True})

    async def waveform(self, request: web.Request) -> web.Response:
        info = self._recording(request, request.query.get("file", "stereo.wav"))
        try:
            width = int(request.query.get("width", "800"))
        except ValueError:
            raise BadRequest("width must be an integer") from None
        if not 1 <= width <= MAX_WIDTH:
            raise BadRequest(f"width must be between 1 and {MAX_WIDTH}")
        if info.kind == "sidecar":
            raise BadRequest("a waveform is drawn from an audio file")
        try:
            peaks = await asyncio.to_thread(self.recordings.waveform, info, width)
        except (OSError, ValueError) as exc:
            raise BadRequest(f"cannot read {info.name}: {exc}", "bad_media_file", 422) from None
        return web.json_response(peaks)

    # -- permissions -----------------------------------------------------------------------

    def _user(self, request: web.Request) -> str:
        try:
            user = normalize_recipient(request.match_info["user"])
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        self._bsuid_supported(user, "user")
        return user

    def _bsuid_supported(self, user: str, field: str) -> None:
        provider = self.manager.provider
        if is_bsuid(user) and not getattr(provider, "supports_bsuid", False):
            raise BadRequest(f"{field}: {getattr(provider, 'name', 'this provider')} does not document "
                             "business-scoped user ids; use the user's phone number (or the Meta backend)")

    async def get_permission(self, request: web.Request) -> web.Response:
        user = self._user(request)
        if request.query.get("refresh") in ("1", "true"):
            await self.gate.refresh(user)
        return web.json_response({"user": display(user), **self.gate.ledger.status(user).to_dict()})

    async def list_permissions(self, request: web.Request) -> web.Response:
        users = self.gate.ledger.list()
        return web.json_response({"permissions": [
            {"user": display(user), **self.gate.ledger.status(user).to_dict()} for user in users]})

    async def request_permission(self, request: web.Request) -> web.Response:
        from ..gatekeeper import PermissionRequest

        user = self._user(request)
        body = await _json_body(request) if request.can_read_body else {}
        try:
            how = PermissionRequest.from_dict(body)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

        async def send() -> web.Response:
            message_id = await self.gate.request(user, how)
            return web.json_response({"user": display(user), "message_id": message_id, "via": how.via,
                                      **self.gate.ledger.status(user).to_dict()}, status=202)

        return await self._idempotent(request, f"permission:{user}", body, send)
