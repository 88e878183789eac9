"""The ``wacall`` command: ``demo``, ``call`` and ``serve``.

Configuration comes from ``WACALL_*`` environment variables (see the README);
command-line options override the few that matter per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from media.errors import MediaFileError
from media.sinks.meter import LevelMeter, MeteredSource
from media.sinks.wav import WavSink
from media.sources.file import FileSource

from . import logs
from .app import Service
from .calls import CallState
from .disk import LowDiskError
from .config import ConfigError, Settings
from .errors import ProviderError
from .permissions import iso
from .progress import ProgressPrinter
from .numbers import normalize_recipient
from .redact import mask_phone

log = logging.getLogger("wacall")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wacall", description="WhatsApp Business calling gateway")
    parser.add_argument("--version", action="version", version=f"wacall {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("--config", type=Path, help="TOML settings file (or WACALL_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, description: str, example: str, parent=sub):
        return parent.add_parser(name, help=summary, description=description,
                                 epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)

    demo = command("demo", "place one call to a simulated user through the embedded sandbox",
                   "Start the gateway and its sandbox in this process, call a simulated WhatsApp user, "
                   "play a 1 kHz tone while the user says a 600 Hz one, record both, and check both "
                   "tones arrived. Needs no account and no network.", "wacall demo --out /tmp/demo")
    demo.add_argument("--play", type=Path, help="what the business plays (default: a 1 kHz tone, gateway/assets/business.ogg)")
    demo.add_argument("--phone-play", type=Path, help="what the simulated user says (default: a 600 Hz tone, gateway/assets/user.ogg)")
    demo.add_argument("--out", type=Path, default=Path("wacall-demo"), help="recordings directory (default: ./wacall-demo)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of live progress")

    call = command("call", "place a real call through the configured provider",
                   "Place one business-initiated call: play the files once the user has picked up and "
                   "media is up, record the user, hang up when playback ends (--stay: when the user "
                   "does). The provider's webhooks must reach --host/--port.",
                   "wacall call --to +4915112345678 --play hello.wav --record out/")
    call.add_argument("--to", required=True, help="the user's number, E.164 (+4915112345678)")
    call.add_argument("--play", type=Path, action="append", default=[], help="file to play (repeatable)")
    call.add_argument("--record", type=Path, help="directory for the recording of the user's audio")
    call.add_argument("--ring-timeout", type=float, help="seconds to ring before giving up")
    call.add_argument("--max-duration", type=float, help="hang up after this many seconds connected")
    call.add_argument("--stay", action="store_true", help="stay on the line after playback until the user hangs up")
    call.add_argument("--callback-data", help="biz_opaque_callback_data (echoed in webhooks)")
    call.add_argument("--host", help="webhook listen address (WACALL_HOST)")
    call.add_argument("--port", type=int, help="webhook listen port (WACALL_PORT)")
    call.add_argument("--json", action="store_true", help="print one JSON object at the end")

    serve = command("serve", "run the gateway: webhooks at POST /webhooks/whatsapp",
                    "Run wacall as a service: provider webhooks, the control API under /v1 "
                    "(WACALL_API_TOKEN), events at /v1/events, /metrics, /healthz, /readyz.",
                    "WACALL_API_TOKEN=$(openssl rand -hex 24) wacall serve --sandbox --port 8080")
    serve.add_argument("--host", help="listen address (WACALL_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (WACALL_PORT, default 8080)")
    serve.add_argument("--sandbox", action="store_true", help="also run the embedded sandbox provider")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="media worker processes (WACALL_WORKERS; default: one per core; 0: media in "
                            "the main process)")

    command("config", "print the effective settings (secrets masked) as JSON",
            "The settings as wacall reads them (defaults, then --config/WACALL_CONFIG, then "
            "WACALL_* variables), with every secret masked.", "WACALL_PORT=9000 wacall config")

    perm = command("permission", "call permissions, through a running `wacall serve`",
                   "Ask a running service (its control API) about call permissions, or send a "
                   "permission request.", "wacall permission status +4915112345678")
    perm.add_argument("--url", default=None, help="the service (WACALL_API_URL, default http://127.0.0.1:8080)")
    perm_sub = perm.add_subparsers(dest="action", required=True)
    req = perm_sub.add_parser("request", help="send a call-permission request")
    req.add_argument("user", help="E.164 number")
    req.add_argument("--text", help="body of the interactive request")
    req.add_argument("--template", help="send this approved template instead")
    req.add_argument("--language", default="en", help="template language (default en)")
    req.add_argument("--param", action="append", default=[], help="template body parameter (repeatable)")
    status = perm_sub.add_parser("status", help="what the rules allow for a user now")
    status.add_argument("user", help="E.164 number")
    status.add_argument("--refresh", action="store_true", help="ask the provider first")
    perm_sub.add_parser("list", help="every user the ledger knows")
    return parser


def _setup_logging(verbose: int, default: int, settings: Settings, json_format: bool) -> None:
    level = default if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logs.configure(json=json_format, level=level, stream=sys.stderr, secrets=settings.secret_values())
    if level > logging.DEBUG:
        for noisy in ("aioice", "aiortc"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wacall")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _port(value: int | None, name: str) -> int | None:
    if value is not None and not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be a port from 0 to 65535, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load(config_file=args.config)
    except ConfigError as exc:
        print(f"wacall: configuration error: {exc}", file=sys.stderr)
        return 2
    handler = {"demo": _demo, "call": _call, "serve": _serve, "config": _config,
               "permission": _permission}[args.command]
    serving = args.command == "serve"
    _setup_logging(args.verbose, logging.INFO if serving else logging.WARNING, settings,
                   json_format=serving and settings.log_format == "json")
    try:
        return asyncio.run(handler(args, settings))
    except (ConfigError, FileNotFoundError, MediaFileError) as exc:
        print(f"wacall: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bad number, a bad option value
        print(f"wacall: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, a directory is not writable...
        print(f"wacall: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 2
    except ProviderError as exc:  # e.g. refused by the permission gate before dialing
        retry = getattr(exc, "retry_at", None)
        print(f"wacall: {exc.code}: {exc.message}" + (f" - {exc.resolution}" if exc.resolution else "")
              + (f" (possible again at {iso(retry)})" if retry else ""), file=sys.stderr)
        return 1
    except LowDiskError as exc:
        print(f"wacall: {exc.message} - {exc.resolution}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _demo(args, settings: Settings) -> int:
    from .demo import run_demo

    summary = await run_demo(settings, play=args.play, phone_play=args.phone_play, out=args.out,
                             quiet=args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_demo_summary(summary)
    return 0 if summary["ok"] else 1


def _print_demo_summary(summary: dict) -> None:
    b2u, u2b = summary["audio"]["business_to_user"], summary["audio"]["user_to_business"]
    setup = summary["setup_ms"]
    print()
    print(f"call {summary['id']} ({summary['wacid']}): {summary['state']}, {summary['end_reason']}")
    if summary.get("error"):
        error = summary["error"]
        print(f"  provider error {error['code']}: {error['message']} - {error.get('resolution', '')}")
    if setup.get("permission_granted") is not None:
        print(f"  permission: requested, granted after {setup['permission_granted']} ms")
    print(f"  setup: offer posted after {setup['offer_sent']} ms, media up after {setup['media_up']} ms")
    for title, side in (("business -> user", b2u), ("user -> business", u2b)):
        if side.get("recorded_s") is None:
            print(f"  {title}: nothing recorded")
            continue
        print(f"  {title}: played {side['played_s']:.2f} s, heard {side['active_s']:.2f} s of sound "
              f"in {side['recorded_s']:.2f} s recorded (peak {side['dominant_hz']} Hz)")
    recordings = summary["recordings"]
    print(f"  recordings: {recordings['gateway']} (what the gateway heard), "
          f"{recordings['phone']} (what the phone heard),")
    print(f"              {recordings['stereo']} (left = user, right = business), "
          f"{recordings['ogg']} (the user's Opus)")


async def _call(args, settings: Settings) -> int:
    settings = replace(settings, host=args.host or settings.host, port=_port(args.port, "--port") or settings.port,
                       workers=0)  # (one call: its media here, where the status line reads its levels)
    normalize_recipient(args.to)  # (a bad number is refused before anything starts)
    user_meter, business_meter = LevelMeter(), LevelMeter()  # (for the status line)
    sources = [MeteredSource(FileSource(path), business_meter) for path in args.play]
    sinks = [WavSink(args.record / "user.wav")] if args.record else []
    sinks.append(user_meter)
    printer = None if args.json else ProgressPrinter()
    async with Service(settings) as service:
        assert service.manager is not None
        # A one-shot process has seen no permission webhooks: ask the provider first.
        service.gate.reconcile = True
        if printer:
            printer.line(f"wacall: webhooks expected at {service.url}/webhooks/whatsapp "
                         f"(provider {settings.provider}); calling {mask_phone(args.to)}")
            service.manager.subscribe(printer)
            if printer.tty:
                for handler in logging.getLogger().handlers:
                    handler.addFilter(printer.guard_logs())
        call = await service.manager.place_call(
            args.to, sources=sources, sinks=sinks, biz_opaque_callback_data=args.callback_data,
            ring_timeout_s=args.ring_timeout, max_duration_s=args.max_duration)
        status = (asyncio.ensure_future(printer.follow(call, user_meter, business_meter))
                  if printer is not None and printer.tty else None)
        stop, interrupted = asyncio.Event(), []
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda sig=sig: (interrupted.append(sig), stop.set()))
        try:
            waiter = asyncio.ensure_future(stop.wait())
            if not args.stay:
                talk = asyncio.ensure_future(_play_then_hangup(call))
            else:
                talk = asyncio.ensure_future(call.finished.wait())
            await asyncio.wait({waiter, talk}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            talk.cancel()
        finally:
            if not call.ended:
                await call.hangup()
            await call.wait_finished(15)
            if status is not None:
                status.cancel()
                await asyncio.gather(status, return_exceptions=True)
    if args.json:
        print(json.dumps(call.summary(), indent=2))
    else:
        _call_summary(call, user_meter, business_meter, args.record)
    if signal.SIGINT in interrupted:
        return 130  # (Ctrl-C: the call was hung up, as the user asked)
    return 0 if call.connected_at is not None else 1


def _call_summary(call, user_meter, business_meter, record: Path | None) -> None:
    """What a person wants to know once the call is over: how it ended, how long it was
    connected, how loud each side was, where the recording is."""
    summary = call.summary()
    connected = summary.get("connected_seconds")
    how = f"{summary['end_reason']}" + (f" after {connected:.1f} s connected" if connected else ", never connected")
    print(f"call {call.id}: {how}")
    if call.error is not None:
        print(f"  error: [{call.error.code}] {call.error.message}")
    for name, meter in (("user", user_meter), ("business", business_meter)):
        levels = meter.levels.as_dict()
        if meter.frames:
            print(f"  {name}: {meter.frames * 0.02:.1f} s of audio, {levels['rms_dbfs']} dBFS RMS, "
                  f"peak {levels['peak_dbfs']} dBFS")
    if record is not None:
        print(f"  recording: {record / 'user.wav'} (what the user said)")


async def _play_then_hangup(call) -> None:
    await call.wait_state(CallState.MEDIA_CONNECTED)
    if not call.ended:
        await call.wait_playback()
        await asyncio.sleep(0.5)
        await call.hangup()


async def _permission(args, settings: Settings) -> int:
    """Thin client of the control API: prints its JSON; exit 1 on an API error."""
    import os

    import aiohttp

    base = (args.url or os.environ.get("WACALL_API_URL") or f"http://127.0.0.1:{settings.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {settings.api_token or ''}"}
    if args.action == "request":
        body: dict = {"via": "interactive"}
        if args.template:
            body = {"via": "template", "template": {"name": args.template, "language": args.language,
                                                    "parameters": args.param}}
        elif args.text:
            body["text"] = args.text
        method, path = "POST", f"/v1/permissions/{args.user}/request"
    elif args.action == "status":
        body, method = None, "GET"
        path = f"/v1/permissions/{args.user}" + ("?refresh=1" if args.refresh else "")
    else:
        body, method, path = None, "GET", "/v1/permissions"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.request(method, base + path, json=body, headers=headers) as resp:
                data = await resp.json(content_type=None)
                ok = resp.status < 400
    except aiohttp.ClientError as exc:
        print(f"wacall: cannot reach {base}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(data, indent=2, ensure_ascii=False), file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


async def _config(args, settings: Settings) -> int:
    print(json.dumps(settings.masked(), indent=2, ensure_ascii=False))
    return 0


async def _serve(args, settings: Settings) -> int:
    settings = replace(settings, host=args.host or settings.host, port=_port(args.port, "--port") or settings.port)
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, not {args.workers}")
    workers = args.workers if args.workers is not None else settings.workers
    settings = replace(settings, workers=workers if workers is not None else (os.cpu_count() or 1))
    stop, interrupted = asyncio.Event(), []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda sig=sig: (interrupted.append(sig), stop.set()))
    async with Service(settings, sandbox=args.sandbox) as service:
        if not settings.api_token:  # (once it runs: a refused start says only why)
            log.warning("WACALL_API_TOKEN is not set: the control API (/v1) refuses every request")
        print(f"wacall serving on {service.url} (webhooks: POST /webhooks/whatsapp"
              f"{', sandbox: /sandbox' if args.sandbox else ''})", flush=True)
        await stop.wait()
        log.info("shutting down: hanging up %d live call(s)", len(service.manager.live_calls))
    # Ctrl-C: 130, as every command interrupted that way; SIGTERM (a service manager): 0
    return 130 if signal.SIGINT in interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
