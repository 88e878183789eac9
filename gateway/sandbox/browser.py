"""A simulated user's phone whose WebRTC stack is headless Chromium (interop testing).

:class:`BrowserPhone` has the interface of :class:`~gateway.sandbox.phone.Phone`
(``answer(offer)``, ``pick_up(media_timeout_s)``, ``hang_up()``, ``said``,
``recording_path``, ``peer.received``), but the peer connection lives in a page
(``browser_page.html``) of a Chromium that :class:`ChromiumHost` starts through
Playwright. The page gets wacall's offer exactly as the provider relays it, answers with
a full ICE agent, sends Chromium's fake capture device (a WAV: by default 3 s of 600 Hz)
and analyses what it hears with WebAudio (an ``AnalyserNode``: dominant frequency and
for how long it was present), and records it (an ``AudioWorklet``) to
``recording_path``.

Plugging it into the sandbox (``Sandbox.phone_factory``)::

    async with ChromiumHost() as host:
        sandbox.phone_factory = browser_phone_factory(host, sandbox=sandbox)

With ``sandbox=`` given, the user hanging up in the browser (:meth:`BrowserPhone.user_hang_up`)
makes the sandbox end the call with a ``terminate`` webhook, as WhatsApp does.

The answer is *not* marked ``a=ice-lite``: Chromium is a full ICE agent (and the
controlled one, as the answerer of a full agent's offer). Claiming lite would make the
gateway's agent believe the browser never checks, which is false; aiortc happens to
cope (it is controlling as the offerer anyway), so ``mark_ice_lite=True`` exists to test
exactly that. Chromium's ``a=setup:active`` and its single sha-256 fingerprint are kept.

Chromium must not touch the (closed) network: see :data:`CHROMIUM_ARGS`. Playwright
gives every launch a fresh ``--user-data-dir`` of its own (and removes it afterwards).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import shlex
import shutil
import tempfile
import time
import wave
from pathlib import Path
from typing import Any, Callable

import numpy as np
from aiohttp import web

from media import sdp as sdp_rules
from media.peer import MediaError, PeerConfig

log = logging.getLogger(__name__)

PAGE_PATH = Path(__file__).with_name("browser_page.html")
#: The Chromium binary (Debian's ``chromium`` package); ``WACALL_CHROMIUM`` overrides.
DEFAULT_CHROMIUM = "/usr/bin/chromium"
#: Flags that keep Chromium off the network, headless and fed by fake media devices.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    # WebRTC ignores the loopback interface unless told; the sandbox lives on 127.0.0.1.
    "--allow-loopback-in-peer-connection",
)
#: Chromium's capture tone unless told otherwise.
CAPTURE_HZ = 600.0
CAPTURE_S = 3.0


class ChromiumUnavailable(RuntimeError):
    """Chromium (or Playwright) is missing or would not start; the reason says which."""


def write_tone_wav(path: str | os.PathLike[str], freq_hz: float = CAPTURE_HZ, seconds: float = CAPTURE_S,
                   *, rate: int = 48_000, amplitude: float = 0.5) -> Path:
    """A mono 16-bit WAV of a sine tone (Chromium's fake capture device plays it)."""
    n = int(round(seconds * rate))
    x = np.rint(amplitude * 32767 * np.sin(2 * np.pi * freq_hz * np.arange(n) / rate)).astype("<i2")
    path = Path(path)
    _write_pcm_wav(path, x, rate)
    return path


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


def _write_pcm_wav(path: Path, pcm: np.ndarray, rate: int = 48_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.astype("<i2").tobytes())


class ChromiumHost:
    """One headless Chromium (through Playwright) and the tiny HTTP server of its page.

    ``capture_wav`` is what the fake microphone plays, on a loop (default: a generated
    ``capture_s`` seconds of ``capture_hz``). Every :class:`BrowserPhone` gets its own
    browser context and page; with ``prewarm`` the next page is loaded ahead of time
    (like a phone whose app is open), so an offer meets a ready page. With ``background``
    (the default) Chromium runs niced and without real-time threads (see
    :meth:`_launcher`). Use as an async context manager; :meth:`start` raises
    :class:`ChromiumUnavailable` with the reason when Chromium cannot be used.
    """

    def __init__(
        self,
        *,
        capture_wav: str | os.PathLike[str] | None = None,
        capture_hz: float = CAPTURE_HZ,
        capture_s: float = CAPTURE_S,
        executable_path: str | None = None,
        extra_args: tuple[str, ...] = (),
        launch_timeout_s: float = 30.0,
        prewarm: bool = True,
        background: bool = True,
    ):
        self.prewarm = prewarm
        self.background = background
        #: Whether Chromium runs without CAP_SYS_NICE (no real-time threads); see _launcher.
        self.realtime_dropped = False
        self._warm: asyncio.Future | None = None
        self.executable_path = executable_path or os.environ.get("WACALL_CHROMIUM") or DEFAULT_CHROMIUM
        self.extra_args = tuple(extra_args)
        self.launch_timeout_s = launch_timeout_s
        self._tmp = Path(tempfile.mkdtemp(prefix="wacall-chromium-"))
        if capture_wav is None:
            capture_wav = write_tone_wav(self._tmp / f"capture-{capture_hz:g}hz.wav", capture_hz, capture_s)
            self.capture_hz: float | None = capture_hz
        else:
            self.capture_hz = None  # whatever the file holds
        self.capture_wav = Path(capture_wav)
        self.capture_s = _wav_seconds(self.capture_wav)
        self.browser = None
        self.version: str | None = None
        self.url = ""
        self._playwright = None
        self._runner: web.AppRunner | None = None
        self._files: dict[str, Path] = {}
        self.launch_s: float | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> ChromiumHost:
        try:
            from playwright.async_api import async_playwright
        except ImportError as exc:
            raise ChromiumUnavailable(
                f"Playwright is not installed ({exc}); run tools/install-chromium.sh") from None
        if not (os.path.isfile(self.executable_path) and os.access(self.executable_path, os.X_OK)):
            raise ChromiumUnavailable(
                f"no Chromium at {self.executable_path}; run tools/install-chromium.sh "
                "(or set WACALL_CHROMIUM)")
        await self._serve()
        started = time.monotonic()
        try:
            self._playwright = await async_playwright().start()
            self.browser = await self._playwright.chromium.launch(
                executable_path=await self._launcher(),
                headless=True,
                args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={self.capture_wav}",
                      *self.extra_args],
                timeout=self.launch_timeout_s * 1000,
            )
        except Exception as exc:  # Playwright raises its own Error (and OSError, TimeoutError…)
            await self.close()
            raise ChromiumUnavailable(f"Chromium at {self.executable_path} did not start: {exc}") from exc
        self.launch_s = time.monotonic() - started
        self.version = self.browser.version
        log.info("chromium %s up in %.2f s", self.version, self.launch_s)
        if self.prewarm:
            self._warm = asyncio.ensure_future(self._open_page())
        return self

    async def _launcher(self) -> str:
        """The program Playwright starts: Chromium itself, or (``background``, on Linux)
        a small script that starts it as a background process of this machine.

        The browser plays a phone on *another* device, yet here it shares the gateway's
        cores. Run as root, Chromium gives its audio threads real-time priority
        (SCHED_RR, which needs CAP_SYS_NICE), and while it sets up a call its threads
        pre-empt the gateway for 100-600 ms: the gateway then sends its 20 ms packets late
        in bursts, exactly what a loaded phone would *not* cause. So the script drops
        CAP_SYS_NICE (``setpriv``, no real-time threads; :attr:`realtime_dropped` says
        whether that was possible here) and raises the niceness to 10: the gateway keeps
        its schedule and Chromium still gets every idle cycle. Measured on 2 cores: the
        gateway's send lateness went from up to 640 ms to 0 ms.
        """
        self.realtime_dropped = False
        if os.name == "posix" and os.geteuid() != 0:
            import resource

            # Not root: no CAP_SYS_NICE, and real-time only if RLIMIT_RTPRIO allows it.
            self.realtime_dropped = resource.getrlimit(resource.RLIMIT_RTPRIO)[0] == 0
        if not self.background or os.name != "posix":
            return self.executable_path
        nice = shutil.which("nice")
        if nice is None:
            return self.executable_path
        command = [nice, "-n", "10"]
        setpriv = shutil.which("setpriv")
        if setpriv is not None and os.geteuid() == 0:
            drop = [setpriv, "--bounding-set=-sys_nice", "--inh-caps=-sys_nice"]
            # Dropping from the bounding set needs CAP_SETPCAP (and setpriv may not say
            # when it could not): look at what a program started that way really has.
            probe = await asyncio.create_subprocess_exec(
                *drop, "cat", "/proc/self/status",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            status, _ = await probe.communicate()
            if probe.returncode == 0 and not _has_capability(status.decode(), CAP_SYS_NICE):
                command += drop
                self.realtime_dropped = True
            else:
                log.warning("chromium: cannot drop CAP_SYS_NICE here; its audio threads may "
                            "run real-time and delay the gateway's packets")
        script = self._tmp / "chromium-background"
        quoted = shlex.join([*command, self.executable_path])
        script.write_text(f'#!/bin/sh\nexec {quoted} "$@"\n')
        script.chmod(0o700)
        return str(script)

    async def warm_up(self) -> None:
        """Wait until the pre-loaded page is ready (with ``prewarm``), so that the next
        offer meets an open phone app: measurements then cover WebRTC, not page loads."""
        if self._warm is not None:
            try:
                await asyncio.shield(self._warm)
            except Exception as exc:
                raise ChromiumUnavailable(f"the phone page did not load in Chromium: {_first_line(exc)}") from exc

    async def _serve(self) -> None:
        app = web.Application()

        async def page(request: web.Request) -> web.Response:
            return web.Response(text=PAGE_PATH.read_text(encoding="utf-8"), content_type="text/html",
                                headers={"Cache-Control": "no-store"})

        async def file(request: web.Request) -> web.StreamResponse:
            path = self._files.get(request.match_info["token"])
            if path is None or not path.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(path)

        async def favicon(request: web.Request) -> web.Response:
            return web.Response(status=204)

        app.router.add_get("/", page)
        app.router.add_get("/favicon.ico", favicon)
        app.router.add_get("/files/{token}", file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        # 127.0.0.1 is a secure context: getUserMedia and AudioWorklet work over http.
        self.url = f"http://127.0.0.1:{port}"

    def file_url(self, path: str | os.PathLike[str]) -> str:
        """A URL the page can fetch ``path`` from (e.g. what the user says)."""
        token = secrets.token_urlsafe(12)
        self._files[token] = Path(path).resolve()
        return f"{self.url}/files/{token}"

    async def close(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.cancel()
            [opened] = await asyncio.gather(warm, return_exceptions=True)
            if isinstance(opened, tuple):  # it had finished loading
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(opened[0].close(), 10)
        browser, self.browser = self.browser, None
        if browser is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(browser.close(), 15)
        playwright, self._playwright = self._playwright, None
        if playwright is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(playwright.stop(), 15)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        shutil.rmtree(self._tmp, ignore_errors=True)

    async def __aenter__(self) -> ChromiumHost:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- phones ------------------------------------------------------------------------

    async def new_page(self, on_event: Callable[[str, Any], None]):
        """A fresh browser context with the phone page loaded; returns ``(context, page)``.
        With ``prewarm`` the page was loaded beforehand (an app already open), and the
        next one starts loading now."""
        if self.browser is None:
            raise ChromiumUnavailable("the Chromium host is not started")
        warm, self._warm = self._warm, None
        opened = None
        if warm is not None:
            try:
                opened = await warm
            except Exception as exc:
                log.info("browser phone: the pre-loaded page failed (%s); loading another", _first_line(exc))
        if opened is None:
            opened = await self._open_page()
        context, page, slot = opened
        slot["on_event"] = on_event
        if self.prewarm:
            self._warm = asyncio.ensure_future(self._open_page())
        return context, page

    async def _open_page(self):
        slot: dict[str, Callable[[str, Any], None] | None] = {"on_event": None}

        def dispatch(source, kind, data=None) -> None:
            handler = slot["on_event"]
            if handler is not None:
                handler(kind, data)

        context = await self.browser.new_context()
        try:
            await context.grant_permissions(["microphone"], origin=self.url)
            await context.expose_binding("wacallEvent", dispatch)
            page = await context.new_page()
            page.on("console", lambda message: log.debug("browser phone console: %s", message.text))
            await page.goto(f"{self.url}/", wait_until="load")
            await page.wait_for_function("window.wacall !== undefined", timeout=10_000)
        except BaseException:
            with contextlib.suppress(Exception):
                await context.close()
            raise
        return context, page, slot

    def phone_factory(self, *, sandbox=None, **phone_kwargs) -> Callable[..., BrowserPhone]:
        return browser_phone_factory(self, sandbox=sandbox, **phone_kwargs)


class _Received:
    """``peer.received`` of the aiortc phone: seconds of audio that arrived."""

    def __init__(self) -> None:
        self.packets = 0

    @property
    def seconds(self) -> float:
        return self.packets * 0.02


class _PeerView:
    """The little of :class:`~media.peer.MediaPeer` the sandbox reads from a phone."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.received = _Received()


class BrowserPhone:
    """A WhatsApp user's phone played by a Chromium page (see the module docstring).

    Args:
        host: a started :class:`ChromiumHost`.
        peer_config: the sandbox's; its ``host_addresses`` (default: all) limit the
            candidates the answer advertises (Chromium gathers on every interface).
        recording_path: where what the user heard is written (16-bit mono 48 kHz WAV)
            when the phone hangs up.
        say: a file the user says instead of the capture device (played through
            WebAudio); ``None``: the user says the capture device for ``talk_s``.
        talk_s: seconds of capture-device audio the user says after picking up
            (default: the capture WAV's length); 0 says nothing (silence is still sent).
        mark_ice_lite: add ``a=ice-lite`` to the answer (Chromium is *not* lite).
        await_remote_close_s: on :meth:`hang_up`, wait up to this long for the page to
            see the far end close the connection before closing it ourselves (tests).
    """

    def __init__(
        self,
        host: ChromiumHost,
        peer_config: PeerConfig | None = None,
        *,
        recording_path: str | os.PathLike[str],
        say: str | None = None,
        talk_s: float | None = None,
        mark_ice_lite: bool = False,
        await_remote_close_s: float = 0.0,
        gather_timeout_s: float = 10.0,
    ):
        self.host = host
        self.peer_config = peer_config or PeerConfig()
        self.recording_path = Path(recording_path)
        self.say = say
        self.talk_s = host.capture_s if talk_s is None else float(talk_s)
        self.mark_ice_lite = mark_ice_lite
        self.await_remote_close_s = await_remote_close_s
        self.gather_timeout_s = gather_timeout_s
        self.peer = _PeerView("browser phone")
        self.received = self.peer.received
        loop = asyncio.get_running_loop()
        #: Resolves with the seconds said once the user's audio has been played out.
        self.said: asyncio.Future[float] = loop.create_future()
        #: Resolves with a reason when the user's side ends the call by itself: the user
        #: hung up (:meth:`user_hang_up`) or the page/browser died. Not on :meth:`hang_up`.
        self.hung_up: asyncio.Future[str] = loop.create_future()
        #: Resolves with the page's state when the page sees its connection end without
        #: having closed it itself (the far end closed it, or the network died).
        self.remote_ended: asyncio.Future[str] = loop.create_future()
        self.connected = asyncio.Event()
        #: The page's connection/ICE/DTLS state changes, ``(monotonic time, kind, state)``.
        self.events: list[tuple[float, str, Any]] = []
        #: What the page heard (``report()`` of the page), filled in by :meth:`hang_up`.
        self.heard: dict | None = None
        self.rtp_stats: dict = {}
        self.offer_at: float | None = None
        self.page_ready_at: float | None = None
        self.answered_at: float | None = None
        self.connected_at: float | None = None
        self.answer_sdp: str | None = None
        self._context = None
        self._page = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._closed = False

    # -- events from the page ----------------------------------------------------------

    def _on_event(self, kind: str, data: Any) -> None:
        now = time.monotonic()
        self.events.append((now, kind, data))
        log.debug("browser phone: %s %s", kind, data)
        if kind == "connection" and data == "connected" and not self.connected.is_set():
            self.connected_at = now
            self.connected.set()
        elif kind == "said" and not self.said.done():
            self.said.set_result(float(data or 0.0))
        if self._closing:
            return
        ended = (kind == "connection" and data in ("failed", "closed")) or \
                (kind == "dtls" and data in ("failed", "closed"))
        if ended and not self.remote_ended.done():
            self.remote_ended.set_result(f"{kind} {data}")

    def _on_crash(self, *_: Any) -> None:
        if self._closing:
            return  # our own close
        if not self.hung_up.done():
            self.hung_up.set_result("browser page died")
        if not self.remote_ended.done():
            self.remote_ended.set_result("browser page died")

    # -- the Phone interface -----------------------------------------------------------

    @property
    def media_up_s(self) -> float | None:
        """Seconds from the offer reaching the phone to the page's connection being up."""
        if self.offer_at is None or self.connected_at is None:
            return None
        return self.connected_at - self.offer_at

    def timings(self) -> dict[str, float | None]:
        """Seconds from the offer reaching the phone to: the page being loaded, the
        answer (ICE gathering complete) and the page's connection being up."""
        def since(t: float | None) -> float | None:
            return None if t is None or self.offer_at is None else round(t - self.offer_at, 4)

        return {"page_ready_s": since(self.page_ready_at), "answered_s": since(self.answered_at),
                "connected_s": since(self.connected_at)}

    async def answer(self, offer: str) -> str:
        """Answer the business's offer (passed to the page as relayed) like a browser."""
        self.offer_at = time.monotonic()
        try:
            self._context, self._page = await self.host.new_page(self._on_event)
            self._page.on("crash", self._on_crash)
            self._page.on("close", self._on_crash)
            self.page_ready_at = time.monotonic()
            answer = await self._page.evaluate(
                "([offer, opts]) => window.wacall.answer(offer, opts)",
                [offer, {"gatherTimeoutMs": int(self.gather_timeout_s * 1000)}],
            )
        except MediaError:
            raise
        except Exception as exc:  # Playwright's Error: the page refused the offer
            self._closing = True  # not the user hanging up
            await self._close_page()
            raise MediaError(f"Chromium could not answer the offer: {_first_line(exc)}") from exc
        self.answered_at = time.monotonic()
        answer = self._shape(answer)
        self.answer_sdp = answer
        return answer

    def _shape(self, answer: str) -> str:
        """Only UDP candidates on the sandbox's addresses; sha-256 and ptime as WhatsApp."""
        allowed = set(self.peer_config.host_addresses or [])
        lines = answer.replace("\r\n", "\n").split("\n")
        out = []
        for line in lines:
            if line.startswith("a=candidate:"):
                fields = line[len("a=candidate:"):].split()
                if len(fields) < 8 or fields[2].lower() != "udp":
                    continue
                if allowed and fields[4] not in allowed:
                    continue
            out.append(line)
        if not any(line.startswith("a=candidate:") for line in out):
            out = lines  # better every candidate than none
        shaped = sdp_rules.for_whatsapp("\r\n".join(line for line in out if line) + "\r\n")
        return sdp_rules.mark_ice_lite(shaped) if self.mark_ice_lite else shaped

    async def offer(self) -> str:
        raise NotImplementedError("the browser phone only answers business-initiated calls")

    async def apply_answer(self, answer: str) -> None:
        raise NotImplementedError("the browser phone only answers business-initiated calls")

    def pick_up(self, media_timeout_s: float) -> asyncio.Task:
        """The user accepted: once media is up, talk. The task fails with
        :class:`MediaError` if the page's connection is not up within ``media_timeout_s``."""
        self._task = asyncio.ensure_future(self._talk(media_timeout_s))
        return self._task

    async def _talk(self, media_timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), media_timeout_s)
        except asyncio.TimeoutError:
            raise MediaError(f"the browser's connection was not up within {media_timeout_s:g} s") from None
        if self._page is None or self._closing:
            return
        if self.say is None and self.talk_s <= 0:
            if not self.said.done():
                self.said.set_result(0.0)
            return
        say_url = self.host.file_url(self.say) if self.say else None
        try:
            await self._page.evaluate("([s, url]) => window.wacall.talk(s, url)", [self.talk_s, say_url])
        except Exception as exc:
            if self._closing:
                return
            raise MediaError(f"the browser could not talk: {_first_line(exc)}") from exc
        await asyncio.shield(self.said)

    async def report(self) -> dict:
        """What the page has heard so far (dominant frequency, seconds, segments)."""
        if self._page is None or self._closed:
            return self.heard or {}
        return await asyncio.wait_for(self._page.evaluate("window.wacall.report()"), 10)

    async def stats(self) -> dict:
        """The page's inbound/outbound RTP statistics."""
        if self._page is None or self._closed:
            return self.rtp_stats
        self.rtp_stats = await asyncio.wait_for(self._page.evaluate("window.wacall.stats()"), 10)
        self.peer.received.packets = int(self.rtp_stats.get("packets_received") or 0)
        return self.rtp_stats

    @property
    def stretched_s(self) -> float:
        """Seconds of audio Chromium's jitter buffer (NetEq) made up rather than received,
        from the last :meth:`stats`: concealment of non-silent audio plus time-stretching
        (inserted for deceleration minus removed for acceleration), at 48 kHz. A tone the
        page heard can be this much longer than the tone that was sent."""
        s = self.rtp_stats
        made_up = (s.get("concealed_samples") or 0) - (s.get("silent_concealed_samples") or 0)
        made_up += (s.get("inserted_samples_for_deceleration") or 0)
        made_up -= (s.get("removed_samples_for_acceleration") or 0)
        return max(0.0, made_up / 48000)

    async def press(self, digits: str, *, inband: bool = False) -> None:
        """The user presses keys: ``RTCDTMFSender.insertDTMF`` in the page (RFC 4733)."""
        if inband:
            raise NotImplementedError("the browser phone sends DTMF as RFC 4733 events only")
        if self._page is None or self._closed:
            raise RuntimeError("the browser phone is not in a call")
        await asyncio.wait_for(self._page.evaluate("([d]) => window.wacall.press(d)", [digits]), 30)

    async def user_hang_up(self) -> None:
        """The user presses the red button: the page closes its peer connection
        (``pc.close()``) and :attr:`hung_up` resolves (the sandbox then terminates)."""
        if self._closing:
            return
        await self._collect()
        if self._page is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._page.evaluate("window.wacall.hangUp()"), 10)
        self._closing = True
        if not self.hung_up.done():
            self.hung_up.set_result("user hung up")

    async def hang_up(self) -> None:
        """The call is over (whoever ended it): close the page, write the recording."""
        if self._closed:
            return
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.await_remote_close_s > 0 and self.connected.is_set() and not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.remote_ended), self.await_remote_close_s)
        if not self._closing:
            await self._collect()
        self._closing = True
        pcm = np.zeros(0, dtype=np.int16)
        if self._page is not None:
            try:
                await asyncio.wait_for(self._page.evaluate("window.wacall.hangUp()"), 10)
                data = await asyncio.wait_for(self._page.evaluate("window.wacall.recording()"), 30)
                pcm = np.frombuffer(base64.b64decode(data), dtype="<i2")
            except Exception as exc:
                log.info("browser phone: no recording from the page (%s)", _first_line(exc))
        self._closed = True
        await self._close_page()
        _write_pcm_wav(self.recording_path, pcm)
        if not self.said.done():
            self.said.set_result(0.0)

    async def _collect(self) -> None:
        """Read what the page heard and its RTP stats while it still has them."""
        if self._page is None:
            return
        try:
            self.heard = await self.report()
            await self.stats()
        except Exception as exc:
            log.info("browser phone: no report from the page (%s)", _first_line(exc))

    async def _close_page(self) -> None:
        context, self._context, self._page = self._context, None, None
        if context is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.close(), 10)


#: linux/capability.h
CAP_SYS_NICE = 23


def _has_capability(proc_status: str, cap: int) -> bool:
    """Whether the permitted or bounding set in a ``/proc/<pid>/status`` text has ``cap``."""
    for line in proc_status.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapPrm", "CapBnd") and int(value.strip(), 16) >> cap & 1:
            return True
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def browser_phone_factory(host: ChromiumHost, *, sandbox=None, **phone_kwargs) -> Callable[..., BrowserPhone]:
    """A ``Sandbox.phone_factory`` whose phones are pages of ``host``'s Chromium.

    ``phone_kwargs`` go to :class:`BrowserPhone`. With ``sandbox`` (the
    :class:`~gateway.sandbox.emulator.Sandbox` the factory is plugged into), a user
    hanging up in the browser makes the sandbox end that call with ``terminate``.
    """

    def factory(peer_config: PeerConfig, *, recording_path, say: str | None = None) -> BrowserPhone:
        phone = BrowserPhone(host, peer_config, recording_path=recording_path, say=say, **phone_kwargs)
        if sandbox is not None:
            phone.hung_up.add_done_callback(lambda _: end_call_when_user_hangs_up(sandbox, phone))
        return phone

    return factory


def end_call_when_user_hangs_up(sandbox, phone) -> None:
    """The user hung up on ``phone``: the sandbox ends its call (``terminate`` webhook,
    ``ended_by="user_hangup"``), unless the call is already over."""
    call = next((c for c in sandbox.calls.values() if c.phone is phone), None)
    if call is None or call.ended:
        return
    sandbox._spawn(sandbox._end(call, ended_by="user_hangup"))


__all__ = [
    "BrowserPhone",
    "ChromiumHost",
    "ChromiumUnavailable",
    "browser_phone_factory",
    "end_call_when_user_hangs_up",
    "write_tone_wav",
]
