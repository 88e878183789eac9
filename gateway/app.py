"""The aiohttp application and the service that runs it.

One HTTP port serves the provider webhooks (``POST /webhooks/whatsapp``), the control API
(``/v1``), health and metrics and, with ``--sandbox``, the embedded provider emulator under
``/sandbox``. The :class:`Service` binds the port first, so the sandbox (which must know
where to send webhooks) and the provider client (which must know the sandbox's URL) can
be built before the first request.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import socket
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from media.pool import WorkerPool

from .api.routes import ControlApi, auth_middleware, json_errors
from .console import Console, ConsoleAuth
from .console.session import COOKIE as CONSOLE_COOKIE
from .bots import BotPolicy
from .calls import CallManager, InboundPlan, InboundPolicy
from .config import ConfigError, Settings
from .disk import DiskGuard, default_min_free_mb
from .eventbus import EventFanout
from .gatekeeper import Gatekeeper
from .permissions import PermissionLedger, PermissionLimits, SystemClock
from .metrics import Metrics, metrics_handler
from .telemetry import CallTelemetry
from .media_library import MediaLibrary
from .memory import HeapTrimmer
from .providers import CallingProvider, make_provider
from .recordings import ProviderRecording
from .sip.spec import SipSpec
from .siptrunk import SipTrunk
from .store.redis import RedisPermissionStore, RedisStore
from .store.sqlite import SQLiteStore
from .webhook_auth import MISSING_AUTH, WebhookAuth
from .webhooks import webhook_routes

if TYPE_CHECKING:  # imported at run time only by a sandbox server (Service(sandbox=True))
    from .sandbox.emulator import Sandbox

log = logging.getLogger(__name__)

MANAGER = web.AppKey("manager", CallManager)
SANDBOX_PREFIX = "/sandbox"
#: With Redis: how long an instance's save holds a call (a dead instance's calls are
#: taken over within this plus a third of it).
LEASE_S = 9.0


def inbound_policy(settings: Settings, library: MediaLibrary) -> InboundPolicy:
    """The configured answer to a user's call: play ``inbound_play`` and record, or reject."""

    bot = None
    if settings.inbound_bot_url:
        from .bots import BotSpec

        bot = BotSpec.from_dict({"protocol": settings.inbound_bot_protocol, "url": settings.inbound_bot_url})

    sip = None
    if settings.inbound_sip_uri:
        sip = SipSpec.from_dict({"uri": settings.inbound_sip_uri, "codecs": settings.sip_codecs,
                                 **({"username": settings.inbound_sip_username,
                                     "password": settings.inbound_sip_password}
                                    if settings.inbound_sip_username else {})})
    recording = None
    if settings.inbound_provider_recording:
        recording = ProviderRecording.from_dict(json.loads(settings.inbound_provider_recording))

    def policy(event) -> InboundPlan | None:
        if settings.inbound == "reject":
            return None
        return InboundPlan(sources=library.sources(settings.inbound_play), record=bool(settings.inbound_record),
                           record_required=settings.inbound_record == "required", bot=bot,
                           provider_recording=recording, sip=sip)

    return policy


def create_app(settings: Settings, manager: CallManager, library: MediaLibrary, metrics: Metrics,
               events: EventFanout, gate: Gatekeeper, sandbox: Sandbox | None = None, *,
               webhook_auth: WebhookAuth | None = None, store=None,
               workers: WorkerPool | None = None) -> web.Application:
    console_auth = ConsoleAuth(settings.api_token)

    def console_cookie(request: web.Request) -> bool:
        return console_auth.session(request.cookies.get(CONSOLE_COOKIE)) is not None

    app = web.Application(middlewares=[json_errors, auth_middleware(settings.api_token, cookie_ok=console_cookie)])
    app[MANAGER] = manager

    async def dispatch(event) -> None:
        if not gate.handle_event(event):
            await manager.handle_event(event)

    auth = webhook_auth if webhook_auth is not None else WebhookAuth.from_settings(settings)
    app.add_routes(webhook_routes(dispatch, verify_token=settings.verify_token, auth=auth,
                                  dedupe_store=store, observe=metrics.webhook))
    api = ControlApi(manager, library, gate, secrets=settings.secret_values())
    app.add_routes(api.routes())
    app.add_routes(Console(api, console_auth).routes())
    app.add_routes(events.routes())
    app.router.add_get("/metrics", metrics_handler(metrics))

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(request: web.Request) -> web.Response:
        live = len(manager.live_calls)
        reasons = []
        if manager.closing:
            reasons.append("shutting down")
        if live >= manager.max_calls:
            reasons.append(f"at capacity ({live} of {manager.max_calls} calls live)")
        body = {"ready": not reasons, "live_calls": live, "max_calls": manager.max_calls}
        pool = workers
        if pool is not None:
            body["media_workers"] = {"running": pool.alive, "size": pool.size, "sessions": pool.load(),
                                     "restarts": pool.restarts}
            if not pool.alive:
                reasons.append("no media worker is running")
        if manager.disk is not None:
            body["disk"] = disk = manager.disk.status()
            if disk["low"]:
                reasons.append(f"low disk: {disk['free_mb']} MB free in the data dir, "
                               f"below WACALL_MIN_FREE_MB={disk['min_free_mb']}")
        body["ready"] = not reasons
        if reasons:
            body["reason"] = "; ".join(reasons)
        return web.json_response(body, status=200 if not reasons else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if sandbox is not None:
        app.add_subapp(SANDBOX_PREFIX, sandbox.app())
    return app


class AccessLog(AbstractAccessLogger):
    """One line per HTTP request (``gateway.access``): method, path, status, bytes, time;
    query values that look like secrets masked (``hub.verify_token`` and the like)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        query = "&".join(f"{k}={'***' if _SECRET_PARAM.search(k) else v}" for k, v in request.query.items())
        self.logger.info("%s %s%s %s %s B %.1f ms", request.method, request.path, f"?{query}" if query else "",
                         response.status, response.body_length, time * 1000,
                         extra={"event": "http", "status": response.status})


_SECRET_PARAM = re.compile(r"token|secret|key|password|signature|auth", re.IGNORECASE)


class Service:
    """Gateway (and optionally the sandbox) on one port; an async context manager."""

    def __init__(self, settings: Settings, *, sandbox: bool = False):
        self.settings = settings
        self.use_sandbox = sandbox
        self.sandbox: Sandbox | None = None
        self.provider: CallingProvider | None = None
        self.manager: CallManager | None = None
        self.app: web.Application | None = None
        self.metrics = Metrics()
        self.events: EventFanout | None = None
        self.library: MediaLibrary | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Service:
        """Bind the port, build the parts (no I/O), then start them in the order of
        :meth:`_lifecycle` through aiohttp's ``cleanup_ctx`` (stopped in reverse)."""
        sock = self._bind()
        try:
            self._build()
        except BaseException:
            sock.close()  # (a refused start leaves no socket behind)
            raise
        self.app = create_app(self.settings, self.manager, self.library, self.metrics, self.events,
                              self.gate, self.sandbox, webhook_auth=self.webhook_auth, store=self.store,
                              workers=self.workers)
        self.app.cleanup_ctx.extend(self._lifecycle())
        self._runner = web.AppRunner(self.app, access_log=logging.getLogger("gateway.access"),
                                     access_log_class=AccessLog, handle_signals=False)
        await self._runner.setup()  # runs each context up to its ``yield``, in order
        await web.SockSite(self._runner, sock).start()
        # Everything alive now (modules, settings, the app) lives as long as the
        # process: move it out of the cyclic GC's reach, so a full collection (which
        # frees a finished call's cycles) walks only what calls created: ~60-85 ms -> a
        # few ms measured in the test process, below the playout's 60 ms resync.
        gc.freeze()
        if self.sandbox is not None and self.settings.callback_permission:
            await self._enable_callback_permission()  # the sandbox answers only now
        log.info("wacall listening on %s (provider %s%s)", self.url, self.settings.provider,
                 ", sandbox" if self.sandbox else "")
        return self

    def _bind(self) -> socket.socket:
        """Bind first: the sandbox must know where its webhooks go, the provider client
        where the sandbox is, before anything serves."""
        settings = self.settings
        sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host, settings.port))
        except (OSError, OverflowError) as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        port = sock.getsockname()[1]
        local_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        self.url = f"http://{local_host}:{port}"
        return sock

    @property
    def _delivers_to_self(self) -> bool:
        return self.use_sandbox and not self.settings.sandbox_webhook_url

    def _webhook_auth(self) -> WebhookAuth:
        """How this server authenticates webhooks. Configured: as configured. Not
        configured: refused (:data:`MISSING_AUTH`), unless ``WACALL_WEBHOOK_AUTH=none``
        (then a warning), or a sandbox delivering to this very process (then a random
        header secret the two share)."""
        auth = WebhookAuth.from_settings(self.settings)
        if auth.configured:
            log.info("webhooks authenticated by %s", ", ".join(auth.methods))
            return auth
        if auth.disabled:
            log.warning("WACALL_WEBHOOK_AUTH=none: webhooks are NOT authenticated; anyone who can reach "
                        "/webhooks/whatsapp can end calls and change call permissions")
            return auth
        if self._delivers_to_self:
            return WebhookAuth.generated()
        raise ConfigError(MISSING_AUTH)

    def _build(self) -> None:
        """Every part, wired, without I/O: sandbox, provider client, permissions,
        disk guard, calls, events."""
        settings = self.settings
        self.webhook_auth = self._webhook_auth()
        # (created private: it holds numbers, recordings and call history)
        Path(settings.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        limits = PermissionLimits.meta() if settings.permission_limits == "meta" else PermissionLimits.seed()
        if self.use_sandbox:
            from .sandbox.emulator import Sandbox

            self.sandbox = Sandbox(
                permission_limits=limits,
                webhook_url=settings.sandbox_webhook_url or f"{self.url}/webhooks/whatsapp",
                webhook_auth=self.webhook_auth if self._delivers_to_self else WebhookAuth.from_settings(settings),
                recordings_dir=Path(settings.data_dir) / "sandbox",
                lean_phones=settings.sandbox_phones == "lean",
                # Simulated phones live on loopback unless told otherwise.
                peer_config=replace(settings.peer_config(),
                                    host_addresses=settings.media_addresses or ["127.0.0.1"]),
            )
            self.sandbox.public_url = f"{self.url}{SANDBOX_PREFIX}"  # (artifact URLs)
            # The provider client speaks to the sandbox with the sandbox's credentials,
            # in whichever URL shape (360dialog or Meta Graph) the settings chose.
            settings = replace(settings, base_url=f"{self.url}{SANDBOX_PREFIX}",
                               d360_api_key=self.sandbox.api_key, meta_token=self.sandbox.token,
                               phone_number_id=self.sandbox.phone_number_id,
                               media_addresses=(["127.0.0.1"] if settings.media_addresses is None
                                                else settings.media_addresses))
            self.settings = settings
        self.library = MediaLibrary(settings.media_root)
        self.provider = make_provider(settings.provider, **settings.provider_kwargs())
        clock = self.sandbox.clock if self.sandbox else SystemClock()
        if settings.redis_url:  # one ledger for every instance
            self.ledger = PermissionLedger(RedisPermissionStore(settings.redis_url), clock, limits,
                                           callback_enabled=settings.callback_permission)
        else:
            self.ledger = PermissionLedger.in_data_dir(settings.data_dir, clock, limits,
                                                       callback_enabled=settings.callback_permission)
        self.gate = Gatekeeper(self.ledger, self.provider, reconcile=settings.permission_reconcile)
        #: Calls (durable), webhook de-duplication, the event log: ``<data dir>/wacall.sqlite3``.
        self.store = (RedisStore(settings.redis_url) if settings.redis_url
                      else SQLiteStore.in_data_dir(settings.data_dir))
        min_free_mb = settings.min_free_mb
        if min_free_mb is None:
            min_free_mb = default_min_free_mb(settings.max_calls, sandbox=self.use_sandbox)
        self.disk = DiskGuard(settings.data_dir, min_free_mb)
        self.metrics.watch_disk(self.disk.free_bytes, self.disk.min_free_bytes)
        self.manager = CallManager(
            self.provider, peer_config=settings.peer_config(),
            ring_timeout_s=settings.ring_timeout_s, max_duration_s=settings.max_duration_s,
            rtp_timeout_s=settings.rtp_timeout_s, max_calls=settings.max_calls, recordings_dir=Path(settings.data_dir) / "recordings",
            inbound_policy=inbound_policy(settings, self.library), gate=self.gate,
            speech_events=settings.speech_events,
            recording_format=settings.recording_format,
            permission_wait_s=settings.permission_wait_s, history=settings.call_history,
            disk=self.disk, store=self.store, owner=settings.instance,
            hangup_attempts=settings.hangup_attempts,
            lease_s=LEASE_S if settings.redis_url else None)
        self.gate.watch(self.manager)
        self.manager.sources_for = self.library.sources
        #: Media worker processes (``WACALL_WORKERS``); ``None``: media in this process.
        self.workers: WorkerPool | None = None
        if settings.workers:
            self.workers = WorkerPool(settings.workers)
            self.manager.media_sessions = self.workers.session
            self.metrics.watch_workers(self.workers)
        try:
            self.manager.bot_policy = BotPolicy.parse(settings.bot_allow, own_port=int(self.url.rsplit(":", 1)[1]))
        except ValueError as exc:
            raise ConfigError(f"WACALL_BOT_ALLOW: {exc}") from None
        self.trimmer = HeapTrimmer()
        self.manager.subscribe(self._after_call)
        self.events = EventFanout(settings.event_webhooks, settings.event_secret,
                                  history=settings.event_history, store=self.store,
                                  instance=settings.instance if settings.redis_url else None)
        telemetry = CallTelemetry(self.manager, self.metrics, self.events)
        self.manager.subscribe(telemetry)
        self.manager.on_recovered = telemetry.recovered
        self.manager.on_routed = self.metrics.routed_seconds
        self.manager.on_artifact = self._artifact_event
        #: SIP legs' user agent and the SIP trunk (``WACALL_SIP_LISTEN``); ``None``: no SIP.
        self.sip: SipTrunk | None = SipTrunk(settings, self.manager) if settings.sip_listen else None

    def _lifecycle(self) -> list:
        """The parts' startup and shutdown, in startup order (shutdown runs backwards).
        Live calls are hung up before this, in :meth:`stop`, while the port still
        serves (an embedded sandbox receives those hang-ups)."""

        async def store(app: web.Application):
            yield
            # the last to go: calls and events write to it until then
            closing = getattr(self.store, "aclose", None)
            await closing() if closing is not None else self.store.close()

        async def sandbox(app: web.Application):
            yield
            if self.sandbox is not None:
                await self.sandbox.close()

        async def provider(app: web.Application):
            yield
            await self.provider.close()

        async def permissions(app: web.Application):
            if self.settings.callback_permission and self.sandbox is None:
                await self._enable_callback_permission()  # (a sandbox: once it serves)
            yield
            self.ledger.store.close()

        async def events(app: web.Application):
            await self.events.recover()  # what a previous process left undelivered goes first
            self.events.start()
            following = asyncio.ensure_future(self.events.follow())  # (other instances' events)
            yield
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await self.events.close(timeout_s=10.0)  # deliver the last events

        async def recordings(app: web.Application):
            self._recordings_maintenance(startup=True)  # repair what a crash left
            lag = asyncio.ensure_future(self.metrics.watch_loop_lag())
            yield
            lag.cancel()
            await asyncio.gather(lag, return_exceptions=True)

        async def media_workers(app: web.Application):
            if self.workers is not None:
                await self.workers.start()
                log.info("media runs in %d worker process(es)", self.workers.size)
            yield
            if self.workers is not None:
                await self.workers.close()  # (calls were hung up before: sessions are closed)

        async def sip(app: web.Application):
            if self.sip is not None:
                await self.sip.start()
            yield
            if self.sip is not None:
                await self.sip.close()  # (calls were hung up before: BYEs are sent)

        async def calls(app: web.Application):
            # calls a killed process left live: finished at the provider (in the
            # background: a slow provider must not hold the service up), then retention
            finishing = asyncio.ensure_future(self._calls_maintenance())
            yield
            finishing.cancel()
            await asyncio.gather(finishing, return_exceptions=True)

        return [store, sandbox, provider, permissions, events, recordings, media_workers, sip, calls]

    async def _calls_maintenance(self) -> None:
        """At startup: finish the calls a previous process left live; then, hourly,
        forget ended calls older than ``WACALL_CALL_RETENTION_DAYS``."""
        import time

        try:
            await self.manager.reconcile()
        except Exception:
            log.exception("finishing the calls a previous process left live failed")
        if self.manager.lease_s is not None:  # several instances: keep ours, take the orphaned,
            # and handle what the others forward (webhooks and commands for our calls)
            leases = asyncio.gather(self.manager.keep_leases(), self.manager.route_inbox())
        else:
            leases = None
        try:
            while True:
                try:
                    cutoff = time.time() - self.settings.call_retention_days * 86400
                    forgotten = await self.store.forget_calls(ended_before=cutoff)
                    if forgotten:
                        log.info("call retention: forgot %d call(s) older than %g days", forgotten,
                                 self.settings.call_retention_days)
                except Exception as exc:
                    log.warning("call retention failed: %s", exc)
                try:  # (recordings too, also when no call ends for a long time)
                    await asyncio.to_thread(self.sweep_recordings)
                except Exception as exc:
                    log.warning("recording retention failed: %s", exc)
                await asyncio.sleep(3600)
        finally:
            if leases is not None:
                leases.cancel()
                await asyncio.gather(leases, return_exceptions=True)

    def _after_call(self, call, entry) -> None:
        """A call ended: retention (at most once a minute), and give the heap memory it
        freed back to the system (at most every 10 s, after this callback)."""
        if entry.name == "ended":
            self._recordings_maintenance()
            asyncio.get_running_loop().call_soon(self.trimmer.maybe_trim)

    def _recordings_maintenance(self, startup: bool = False) -> None:
        """Repair recordings a killed process left behind (at startup), and apply the
        retention settings (at startup, then at most once a minute after calls)."""
        import time

        from media.recordings import repair_directory

        directory = Path(self.settings.data_dir) / "recordings"
        if not directory.exists():
            return
        now = time.monotonic()
        if startup or now - getattr(self, "_retention_at", 0.0) >= 60:
            self._retention_at = now
            self.sweep_recordings()
        if startup:  # after retention: repairing touches the files it keeps
            result = repair_directory(directory)
            if result["repaired"] or result["recovered"]:
                log.warning("repaired %d recording file(s) of %d interrupted call(s)",
                            len(result["repaired"]), len(result["recovered"]))

    def _artifact_event(self, call_id: str, outcome: dict) -> None:
        """``call.recording_available`` / ``call.transcription_available`` (or ``…_failed``)."""
        kind = outcome.get("kind", "recording")
        name = f"call.{kind}_{'failed' if outcome.get('error') else 'available'}"
        data = dict(outcome)
        if outcome.get("file"):
            data["url"] = f"/v1/calls/{call_id}/recordings/{outcome['file']}"
        self.events.publish(name, data, call_id=call_id)

    def sweep_recordings(self) -> list[Path]:
        """Apply the recording retention settings now (the calls' records stay)."""
        from media.recordings import apply_retention

        settings, directory = self.settings, Path(self.settings.data_dir) / "recordings"
        ages = [a for a in (settings.recording_max_age_s,
                            settings.recording_retention_days and settings.recording_retention_days * 86400) if a]
        max_age = min(ages) if ages else None
        if not (max_age or settings.recording_max_count or settings.recording_max_bytes) or not directory.exists():
            return []
        removed = apply_retention(directory, max_age, settings.recording_max_count, settings.recording_max_bytes)
        if removed:
            log.info("retention removed %d old recording(s)", len(removed))
        return removed

    async def _enable_callback_permission(self) -> None:
        try:
            await self.provider.update_call_settings({"callback_permission_status": "ENABLED"})
        except Exception as exc:  # a settings failure must not stop the gateway
            log.warning("could not enable callback_permission_status at the provider: %s", exc)

    async def stop(self) -> None:
        """Graceful: hang up live calls through the provider (recordings are closed with
        them) while the port still serves, then stop serving and the parts, in reverse
        order of :meth:`_lifecycle` (the last events are delivered)."""
        if self.manager is not None:
            await self.manager.shutdown()
        if self.events is not None:
            # the calls' last events are out: end the SSE streams now (a client that went
            # away is noticed only at the next heartbeat), the webhooks drain later
            self.events.bus.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Service:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
