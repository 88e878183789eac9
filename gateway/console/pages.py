"""The console's pages: calls, one call, permissions, and logging in and out.

Server-rendered HTML (Jinja2, autoescaped) over the same objects the control API uses
(:class:`~gateway.api.routes.ControlApi`): nothing here has its own view of a call. The
little JavaScript there is (``static/console.js``) reads the API with the session cookie
(GET only: recordings, waveforms, the event stream) and never changes state; hanging up
is a form post with a CSRF token.

Every page answers with a strict Content-Security-Policy (scripts and styles from the
console itself only, no inline code), ``no-store`` caching and no referrer across sites.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from ..api.routes import MAX_PAGE, BadRequest, ControlApi, iso_seconds
from ..calls import CallState
from ..domain import events as call_events
from ..numbers import display, normalize_recipient
from ..permissions import span
from ..redact import mask_phone
from .session import COOKIE, ConsoleAuth, Session

__all__ = ["Console"]

log = logging.getLogger(__name__)

PAGE_SIZE = 50
WAVEFORM_WIDTH = 1000
#: A transcript larger than this is offered as a download only.
MAX_TRANSCRIPT_BYTES = 1 << 20
#: Failed logins per client address before it waits (:data:`LOCKOUT_S`).
MAX_FAILED_LOGINS = 10
LOCKOUT_S = 60.0
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
DIRECTIONS = (("BUSINESS_INITIATED", "outbound"), ("USER_INITIATED", "inbound"))
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; media-src 'self'; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


def _event_names() -> list[str]:
    """Every public event name a page listens for (``call.<name>``)."""
    names: set[str] = set()
    pending = [call_events.CallEvent]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.name:
            names.add(f"call.{cls.name}")
    for kind in ("recording", "transcription"):
        names.update({f"call.{kind}_available", f"call.{kind}_failed"})
    return sorted(names)


# -- template filters ----------------------------------------------------------------------


def _when(value: Any, none: str = "—") -> str:
    if not value:
        return none
    return str(value).replace("T", " ").removesuffix("Z").split(".")[0]


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "—"
    try:
        total = round(float(seconds))
    except (TypeError, ValueError):
        return "—"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _filesize(size: Any) -> str:
    size = float(size or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""  # pragma: no cover


def _direction(value: Any) -> str:
    return dict(DIRECTIONS).get(str(value), str(value or ""))


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested media statistics as ``("a.b", "value")`` rows."""
    rows: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            rows += _flatten(value, f"{prefix}{key}." if isinstance(value, (dict, list)) else f"{prefix}{key}")
        return rows
    if isinstance(data, list):
        if all(not isinstance(v, (dict, list)) for v in data):
            return [(prefix.rstrip("."), ", ".join(str(v) for v in data))]
        for i, value in enumerate(data):
            rows += _flatten(value, f"{prefix}{i}.")
        return rows
    if isinstance(data, float):
        data = round(data, 4)
    return [(prefix, "—" if data is None else str(data))]


def _quality(media: dict) -> list[tuple[str, str]]:
    """The few numbers QA looks at first: packets, loss, jitter, round trip, codec, path."""
    if not media:
        return []

    def ms(value: Any) -> str:
        return "—" if value is None else f"{float(value) * 1000:.1f} ms"

    sent, received, lost = media.get("packets_sent"), media.get("packets_received"), media.get("packets_lost") or 0
    expected = (received or 0) + lost
    loss = f"{lost} ({100.0 * lost / expected:.2f} %)" if expected else "—"
    playout = media.get("playout") if isinstance(media.get("playout"), dict) else {}
    return [
        ("Packets sent / received", f"{sent if sent is not None else '—'} / {received if received is not None else '—'}"),
        ("Packets lost", loss),
        ("Jitter", ms(media.get("jitter_s"))),
        ("Round trip", ms(media.get("round_trip_s"))),
        ("Concealed frames", str(playout.get("frames_concealed", "—"))),
        ("Rebuilt from FEC", str(playout.get("frames_fec", "—"))),
        # (a WhatsApp leg carries Opus only: the SDP wacall accepts has nothing else)
        ("Codec", str(media.get("codec") or "Opus 48 kHz")),
        ("Candidate pair", str(media.get("candidate_pair") or "—")),
    ]


def _day(text: str, name: str, *, end: bool = False) -> float | None:
    """``YYYY-MM-DD`` (a date input) or an ISO time → unix seconds; a day's end with ``end``."""
    text = text.strip()
    if not text:
        return None
    try:
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
            return day.timestamp() + (86400.0 if end else 0.0)
        return iso_seconds(text)
    except ValueError:
        raise BadRequest(f"{name} must be a date (YYYY-MM-DD)") from None


class Console:
    """The QA console at ``/console`` (see the module docstring). ``api`` is the control
    API it shows; ``auth`` decides who may see it (off without an API token)."""

    def __init__(self, api: ControlApi, auth: ConsoleAuth) -> None:
        self.api = api
        self.auth = auth
        self.event_names = _event_names()
        self._failures: dict[str, collections.deque[float]] = {}
        self._static: dict[str, tuple[bytes, str]] = {}
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("gateway.console", "templates"),
            autoescape=jinja2.select_autoescape(["html"], default=True),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True, lstrip_blocks=True,
        )
        self.env.filters.update(when=_when, duration=_duration, filesize=_filesize, direction=_direction)
        self.env.globals["static"] = self._static_url

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/console", self._page(self.calls)),
            web.get("/console/", self._redirect_home),
            web.get("/console/login", self.login_page),
            web.post("/console/login", self.login),
            web.post("/console/logout", self._page(self.logout)),
            web.get("/console/calls/{id}", self._page(self.call)),
            web.post("/console/calls/{id}/hangup", self._page(self.hangup)),
            web.get("/console/permissions", self._page(self.permissions)),
            web.get("/console/static/{name}", self.static),
        ]

    # -- plumbing ----------------------------------------------------------------------

    def _static_url(self, name: str) -> str:
        body, etag = self._static_file(name)
        return f"/console/static/{name}?v={etag[:12]}"

    def _static_file(self, name: str) -> tuple[bytes, str]:
        cached = self._static.get(name)
        if cached is None:
            body = resources.files(__package__).joinpath("static", name).read_bytes()
            cached = self._static[name] = (body, hashlib.sha256(body).hexdigest()[:32])
        return cached

    def render(self, template: str, *, status: int = 200, session: Session | None = None,
               headers: dict[str, str] | None = None, **context: Any) -> web.Response:
        context.setdefault("flash", None)
        context.setdefault("flash_kind", None)
        html = self.env.get_template(template).render(
            session=session, csrf=self.auth.csrf(session) if session else "",
            page=template.removesuffix(".html"), **context)
        response = web.Response(text=html, content_type="text/html", charset="utf-8", status=status)
        response.headers.update(SECURITY_HEADERS)
        if headers:
            response.headers.update(headers)
        return response

    def error_page(self, status: int, heading: str, message: str,
                   session: Session | None = None) -> web.Response:
        return self.render("error.html", status=status, session=session, heading=heading,
                           message=message)

    def _disabled(self) -> web.Response:
        return self.error_page(404, "The console is off",
                               "Set WACALL_API_TOKEN to turn on the console (it logs in with that token).")

    def _page(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Auth (cookie or bearer), CSRF on posts, and HTML errors around a page handler."""

        async def page(request: web.Request) -> web.StreamResponse:
            if not self.auth.enabled:
                return self._disabled()
            session = self.auth.request_session(request.headers, request.cookies)
            if session is None:
                if request.method == "GET":
                    target = request.rel_url.path_qs
                    raise web.HTTPSeeOther("/console/login?" + urlencode({"next": target}))
                return self.error_page(401, "Not logged in", "Log in again, then repeat what you did.")
            if request.method == "POST":
                form = await request.post()
                if not self.auth.csrf_ok(session, form.get("csrf") if isinstance(form.get("csrf"), str) else None):
                    log.warning("console: a form without a valid CSRF token was refused (%s)", request.path)
                    return self.error_page(403, "Refused", "The form had no valid CSRF token. Reload the "
                                           "page and try again.", session)
            try:
                return await handler(request, session)
            except BadRequest as exc:
                return self.error_page(exc.status, "Cannot show that", exc.message, session)

        page.__name__ = handler.__name__
        return page

    async def _redirect_home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/console")

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            return self.error_page(404, "Not found", "There is no such console file.")
        body, etag = self._static_file(name)
        quoted = f'"{etag}"'
        headers = {"ETag": quoted, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("If-None-Match") == quoted:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=STATIC[name], charset="utf-8", headers=headers)

    # -- logging in --------------------------------------------------------------------

    def _client(self, request: web.Request) -> str:
        return request.remote or "?"

    def _locked(self, client: str, now: float) -> bool:
        failures = self._failures.get(client)
        if not failures:
            return False
        while failures and failures[0] < now - LOCKOUT_S:
            failures.popleft()
        if not failures:
            del self._failures[client]
        return len(failures) >= MAX_FAILED_LOGINS

    def _failed(self, client: str, now: float) -> None:
        if len(self._failures) > 10_000:  # (bounded: an attack from many addresses)
            self._failures.clear()
        self._failures.setdefault(client, collections.deque(maxlen=MAX_FAILED_LOGINS)).append(now)

    @staticmethod
    def _next(target: Any) -> str:
        """Where to go after logging in: a console page of this site, nothing else."""
        target = target if isinstance(target, str) else ""
        if target == "/console" or (target.startswith("/console/") and not target.startswith("/console/login")):
            return target if "\\" not in target and "//" not in target else "/console"
        return "/console"

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        if not self.auth.enabled:
            return self._disabled()
        session = self.auth.request_session(request.headers, request.cookies)
        if session is not None:
            raise web.HTTPSeeOther(self._next(request.query.get("next")))
        return self.render("login.html", next=self._next(request.query.get("next")),
                           session_hours=round(self.auth.session_s / 3600))

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not self.auth.enabled:
            return self._disabled()
        client, now = self._client(request), time.monotonic()
        form = await request.post()
        target = self._next(form.get("next"))
        if self._locked(client, now):
            return self.render("login.html", status=429, next=target, session_hours=round(self.auth.session_s / 3600),
                               flash=f"Too many failed attempts: wait {LOCKOUT_S:.0f} seconds.", flash_kind="error")
        token = form.get("token")
        if not isinstance(token, str) or not self.auth.token_matches(token):
            self._failed(client, now)
            log.warning("console: failed login from %s", client)
            return self.render("login.html", status=401, next=target, session_hours=round(self.auth.session_s / 3600),
                               flash="That is not the API token.", flash_kind="error")
        self._failures.pop(client, None)
        response = web.HTTPSeeOther(target)
        secure = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        response.set_cookie(COOKIE, self.auth.issue(), max_age=int(self.auth.session_s), path="/",
                            httponly=True, samesite="Strict", secure=secure)
        log.info("console: logged in from %s", client)
        raise response

    async def logout(self, request: web.Request, session: Session) -> web.StreamResponse:
        response = web.HTTPSeeOther("/console/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    # -- calls -------------------------------------------------------------------------

    async def calls(self, request: web.Request, session: Session) -> web.StreamResponse:
        query = request.query
        filters = {name: query.get(name, "").strip()[:64] for name in ("user", "state", "direction", "since", "until")}
        flash = None
        try:
            user = normalize_recipient(filters["user"]) if filters["user"] else None
            state = filters["state"] or None
            if state is not None and state not in {s.value for s in CallState}:
                raise BadRequest(f"unknown state {state!r}")
            direction = filters["direction"] or None
            if direction is not None and direction not in dict(DIRECTIONS):
                raise BadRequest(f"unknown direction {direction!r}")
            found = await self.api.find_calls(state=state, user=user, direction=direction,
                                              since=_day(filters["since"], "From"),
                                              until=_day(filters["until"], "To", end=True))
        except (BadRequest, ValueError) as exc:
            flash = exc.message if isinstance(exc, BadRequest) else f"User: {exc}"
            found = []
        cursor = query.get("cursor")
        if cursor:
            ids = [c.get("id") for c in found]
            found = found[ids.index(cursor) + 1:] if cursor in ids else found
        page = found[:PAGE_SIZE]
        for call in page:
            call["recorded"] = bool(call.get("recordings") or (call.get("recording") or {}).get("files"))
        next_cursor = page[-1]["id"] if len(found) > PAGE_SIZE else None
        more = {k: v for k, v in filters.items() if v}
        if next_cursor:
            more["cursor"] = next_cursor
        live = sum(1 for c in self.api.manager.calls.values() if not c.ended)
        return self.render("calls.html", session=session, calls=page, filters=filters,
                           filtered=any(filters.values()), states=[s.value for s in CallState],
                           directions=DIRECTIONS, next_cursor=next_cursor, more_url="/console?" + urlencode(more),
                           live=live, event_names=self.event_names, flash=flash,
                           flash_kind="error" if flash else None)

    def _files(self, call_id: str) -> tuple[list[dict], list[dict] | None, str | None]:
        """The call's recording files, its transcript's segments (if any), and why there
        are no files (the recorder's error)."""
        data = self.api.recordings.sidecar(call_id)
        if data is None:
            return [], None, None
        item = self.api.recordings.item(data)
        files = [{**f, "audio": f["format"] in ("wav", "ogg")} for f in item["files"]]
        transcript = None
        for f in item["files"]:
            if f["kind"] == "whatsapp_transcription" and f["size"] <= MAX_TRANSCRIPT_BYTES:
                info = self.api.recordings.file(call_id, f["name"])
                try:
                    document = json.loads(info.path.read_text()) if info is not None else None
                except (OSError, ValueError):
                    document = None
                segments = document.get("segments") if isinstance(document, dict) else None
                if isinstance(segments, list):
                    transcript = [{"speaker": str(s.get("speaker", "")), "start_s": s.get("start_s"),
                                   "text": str(s.get("text", ""))} for s in segments if isinstance(s, dict)]
        error = item.get("error")
        note = (error.get("message") if isinstance(error, dict) else str(error)) if error else None
        return files, transcript, note

    async def call(self, request: web.Request, session: Session) -> web.StreamResponse:
        call_id = request.match_info["id"]
        summary = await self.api.call_summary(call_id)
        if summary is None:
            return self.error_page(404, "No such call", f"This gateway knows no call {call_id[:64]!r}.", session)
        files, transcript, note = self._files(call_id)
        timeline = []
        for entry in summary.get("timeline") or []:
            detail = {k: v for k, v in entry.items() if k not in ("name", "at", "elapsed_s")}
            timeline.append({"name": entry.get("name"), "at": entry.get("at"), "elapsed_s": entry.get("elapsed_s"),
                             "detail": json.dumps(detail, separators=(", ", ": ")) if detail else ""})
        return self.render("call.html", session=session, call=summary, live=summary.get("state") != "ended",
                           recordings=files, transcript=transcript, recording_note=note, timeline=timeline,
                           media=_flatten(summary.get("media") or {}), quality=_quality(summary.get("media") or {}),
                           waveform_width=WAVEFORM_WIDTH, sip=summary.get("sip"),
                           sip_media=_flatten((summary.get("sip") or {}).get("media") or {}),
                           event_names=self.event_names)

    async def hangup(self, request: web.Request, session: Session) -> web.StreamResponse:
        call_id = request.match_info["id"]
        response = await self.api.hangup(request)
        if response.status >= 400 and response.status != 502:
            return self.error_page(response.status, "Could not hang up",
                                   json.loads(response.text)["error"]["message"], session)
        log.info("console: call %s hung up from the console", call_id)
        raise web.HTTPSeeOther(f"/console/calls/{call_id}")

    # -- permissions -------------------------------------------------------------------

    async def permissions(self, request: web.Request, session: Session) -> web.StreamResponse:
        gate = self.api.gate
        ledger = gate.ledger
        limits = ledger.limits
        week = max(limits.request_limits, key=lambda r: r.window_s) if limits.request_limits else None
        rows = []
        now = time.time()
        for user in ledger.list():
            raw = ledger.status(user)
            status = raw.to_dict()
            for name in ("next_call_allowed_at", "next_request_allowed_at"):
                at = getattr(raw, name)
                if at is not None and at <= now:  # (a moment passed since: allowed now)
                    status[name] = None
            rows.append({
                **status,
                "user": mask_phone(display(user)),
                "requests_left": max(0, week.max_allowed - status["requests_last_7d"]) if week else "—",
                "calls_left": max(0, limits.max_calls - status["calls_last_24h"]),
            })
        rules = {
            "validity": span(limits.validity_s),
            "requests": "; ".join(f"{r.max_allowed} requests per {span(r.window_s)}" for r in limits.request_limits)
                        or "requests unlimited",
            "calls": f"{limits.max_calls} {'connected ' if limits.count_only_connected_calls else ''}calls per "
                     f"{span(limits.call_window_s)}",
            "unanswered": limits.unanswered_revoke_after,
        }
        return self.render("permissions.html", session=session, permissions=rows[:MAX_PAGE * 5], limits=rules)

