"""Media worker processes, seen from the main process.

A :class:`WorkerPool` starts N :mod:`media.worker` processes and hands out
:class:`WorkerMediaSession` objects: the :class:`~media.session.MediaSession` commands
of one call, sent to the worker that runs its media. A new session goes to the worker
with the fewest sessions. When a worker dies, only its own sessions end (their
:attr:`~WorkerMediaSession.ended` resolves with ``"media worker lost: …"``, pending
commands raise :class:`WorkerLost`), and the pool starts a new one in its place (at once
the first time, then with a growing pause if it keeps dying young).

Sources, sinks and bot bridges cross to the worker as what they were made from (see
their ``__reduce__``: a file source by its path and options, a prompt by its file, from
the worker's own prompt cache, pre-encoded once per worker), so hand them over unread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .frames import FRAME_MS, Sink, Source
from .peer import MediaError, PeerConfig, ReceiveStats
from .session import RECORDING_FORMATS, MediaEnded, MediaEvent, RecordSpec
from .sinks.recorder import recording_paths
from .worker import frame, read_message

__all__ = ["WorkerLost", "WorkerMediaSession", "WorkerPool"]

log = logging.getLogger(__name__)

#: A worker that dies younger than this is restarted after a pause (doubling to 30 s).
YOUNG_S = 10.0
MAX_PAUSE_S = 30.0


class WorkerLost(MediaError):
    """The media worker running this session exited."""


class RemotePlayback:
    """A :class:`~media.mix.Playback` whose source plays in a worker."""

    def __init__(self, source: Source) -> None:
        self.name = repr(source)
        self.frames = 0
        self.packets = 0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    @property
    def seconds(self) -> float:
        return self.frames * FRAME_MS / 1000

    @property
    def finished(self) -> bool:
        return self.done.done()

    def _finish(self, frames: int | None = None, packets: int | None = None) -> None:
        if frames is not None:
            self.frames, self.packets = frames, packets or 0
        if not self.done.done():
            self.done.set_result(self.seconds)

    def __repr__(self) -> str:
        return f"RemotePlayback({self.name}, frames={self.frames}, done={self.done.done()})"


class _Done:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()


class RemoteBridge:
    """A bot bridge running in a worker: ``closed`` (the reason), ``ended_by``, the
    bot's ``playback.done`` (its last words played) and :meth:`stop`."""

    def __init__(self, session: WorkerMediaSession) -> None:
        loop = asyncio.get_running_loop()
        self._session = session
        self.closed: asyncio.Future[str] = loop.create_future()
        self.ended_by: str | None = None
        self.playback = _Done(loop)

    def _closed(self, reason: str | None, ended_by: str | None) -> None:
        if not self.closed.done():
            self.ended_by = ended_by
            self.closed.set_result(reason or "closed")

    def _goodbye(self) -> None:
        if not self.playback.done.done():
            self.playback.done.set_result(None)

    async def stop(self, reason: str = "user hung up") -> str:
        try:
            result = await self._session._call("stop_bridge", reason)
        except MediaError as exc:
            result = str(exc)
        self._closed(result, "local")
        self._goodbye()
        return result


class RemoteRtpParty(RemoteBridge):
    """A plain-RTP party (:class:`media.rtp.party.RtpParty`) running in a worker: the
    same commands, sent over the worker's socket."""

    def _command(name: str):  # noqa: N805 - builds the methods below
        async def command(self, *args: Any) -> Any:
            return await self._session._call("rtp", name, *args)

        command.__name__ = name
        command.__doc__ = f"``RtpParty.{name}`` in the worker."
        return command

    offer = _command("offer")
    accept = _command("accept")
    answer = _command("answer")
    join = _command("join")
    send_dtmf = _command("send_dtmf")
    receive_dtmf = _command("receive_dtmf")
    get_stats = _command("get_stats")
    del _command


class WorkerMediaSession:
    """A :class:`~media.session.MediaSession` whose media runs in a worker process."""

    def __init__(self, worker: MediaWorker, sid: int, label: str) -> None:
        self.worker = worker
        self.sid = sid
        self.label = label
        #: Set by the gateway: its log lines from the worker carry this call id.
        self.call_id: str | None = None
        self.received = ReceiveStats()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.bridge: RemoteBridge | None = None
        self._callbacks: list[Callable[[MediaEvent], None]] = []
        self._stats: dict = {}
        self._playbacks: dict[int, RemotePlayback] = {}
        self._pids = itertools.count(1)

    def __repr__(self) -> str:
        return f"WorkerMediaSession({self.label!r}, worker={self.worker.index}, sid={self.sid})"

    # -- events --------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[MediaEvent], None]) -> None:
        self._callbacks.append(callback)

    def _emit(self, event: MediaEvent) -> None:
        if isinstance(event, MediaEnded) and not self.ended.done():
            self.ended.set_result(event.reason)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a subscriber never breaks the media
                log.exception("%s: media event handler failed", self.label)

    def _lost(self, reason: str) -> None:
        """The worker is gone: the media ended, everything pending finishes."""
        if self.ended.done():
            return
        self._emit(MediaEnded(reason))
        for playback in self._playbacks.values():
            playback._finish()
        if self.bridge is not None:
            self.bridge._closed(reason, "error")
            self.bridge._goodbye()

    # -- commands ------------------------------------------------------------------------

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self.worker.request(self.sid, method, args, kwargs)

    async def offer(self) -> str:
        return await self._call("offer")

    async def answer(self, offer: str) -> str:
        return await self._call("answer", offer)

    async def apply_answer(self, answer: str) -> None:
        await self._call("apply_answer", answer)

    async def wait_up(self, timeout: float | None = None) -> None:
        await self._call("wait_up", timeout)

    def play(self, source: Source) -> RemotePlayback:
        """Queue ``source`` (it is sent as what it was made from and closed here)."""
        playback = RemotePlayback(source)
        try:
            payload = pickle.dumps(source, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            source.close()
        pid = next(self._pids)
        self._playbacks[pid] = playback
        if not self._send(("play", self.sid, pid, payload)):
            playback._finish()
        return playback

    def record(self, spec: RecordSpec) -> dict[str, Path]:
        """Start the QA recording in the worker; returns its files by kind."""
        self._send(("record", self.sid, spec))
        return recording_paths(spec.directory, **RECORDING_FORMATS[spec.format])

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 80) -> None:
        await self._call("send_dtmf", digits, duration_ms, gap_ms)

    async def start_bridge(self, bridge, **kwargs: Any) -> RemoteBridge:
        """Start a voice-bot bridge (made by :func:`media.bridges.make_bridge`) in the
        worker; returns its handle."""
        self.bridge = RemoteBridge(self)
        await self._call("start_bridge", pickle.dumps(bridge, protocol=pickle.HIGHEST_PROTOCOL), **kwargs)
        return self.bridge

    async def open_rtp(self, **options: Any) -> RemoteRtpParty:
        """A plain-RTP party (a SIP leg's audio) in the worker, its port bound there."""
        self.bridge = party = RemoteRtpParty(self)
        await self._call("open_rtp", **options)
        return party

    def stats(self) -> dict:
        """The last statistics read (:meth:`get_stats`)."""
        return dict(self._stats)

    async def get_stats(self) -> dict:
        if not self.closed:
            self._stats = await self._call("get_stats")
        return dict(self._stats)

    async def reset_pacing(self) -> None:
        await self._call("reset_pacing")

    async def close(self, *, recording_meta: dict | None = None, media_stats: dict | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._call("close", recording_meta=recording_meta, media_stats=media_stats)
        except MediaError:
            pass  # (the worker is gone: so is the media)
        finally:
            self.worker.sessions.pop(self.sid, None)
            if not self.ended.done():
                self.ended.set_result("closed")
            for playback in self._playbacks.values():
                playback._finish()
            self._playbacks = {}
            self._callbacks = []

    def _send(self, message: tuple) -> bool:
        try:
            self.worker.send(message)
            return True
        except MediaError as exc:
            log.warning("%s: %s", self.label, exc)
            return False

    # -- from the worker -----------------------------------------------------------------

    def _played(self, pid: int, frames: int, packets: int) -> None:
        playback = self._playbacks.pop(pid, None)
        if playback is not None:
            playback._finish(frames, packets)

    def _bridge_news(self, what: str, *rest: Any) -> None:
        bridge = self.bridge
        if bridge is None:
            return
        if what == "closed":
            bridge._closed(*rest)
        elif what == "goodbye":
            bridge._goodbye()


class MediaWorker:
    """One worker process and its end of the pipe."""

    def __init__(self, index: int, pool: WorkerPool) -> None:
        self.index = index
        self.pool = pool
        self.process: asyncio.subprocess.Process | None = None
        self.sessions: dict[int, WorkerMediaSession] = {}
        self.alive = False
        self.started_at = 0.0
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._requests = itertools.count(1)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = str(Path(__file__).resolve().parent.parent)
        # (INFO and up at least: this process's loggers decide what is written)
        level = min(logging.INFO, logging.getLogger().getEffectiveLevel())
        env = dict(os.environ, WACALL_WORKER_LOG_LEVEL=str(level),
                   PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "media.worker", str(theirs.fileno()), pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=mine)
        self.alive = True
        self.started_at = time.monotonic()
        self._reader = asyncio.ensure_future(self._read(reader))
        log.info("media worker %d started (pid %d)", self.index, self.process.pid)

    def send(self, message: tuple) -> None:
        if not self.alive or self._writer is None:
            raise WorkerLost(f"media worker {self.index} is not running")
        self._writer.write(frame(message))

    async def request(self, sid: int, method: str, args: tuple, kwargs: dict) -> Any:
        req = next(self._requests)
        future = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        try:
            self.send(("call", req, sid, method, args, kwargs))
            return await future
        finally:
            self._pending.pop(req, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await read_message(reader)) is not None:
                try:
                    self._handle(message)
                except Exception:  # noqa: BLE001 - one bad message is not the worker's end
                    log.exception("media worker %d: message not understood", self.index)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            log.error("media worker %d: pipe broken: %s", self.index, exc)
        finally:
            await self._ended()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "reply":
            _, req, ok, value = message
            future = self._pending.get(req)
            if future is not None and not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            return
        if kind == "received":
            for sid, frames in message[1].items():
                session = self.sessions.get(sid)
                if session is not None:
                    session.received.frames = frames
            return
        if kind == "log":
            self._log(message[1])
            return
        session = self.sessions.get(message[1])
        if session is None:
            return
        if kind == "event":
            session._emit(message[2])
        elif kind == "played":
            session._played(*message[2:])
        elif kind == "bridge":
            session._bridge_news(*message[2:])

    def _log(self, fields: dict) -> None:
        session = self.sessions.get(fields.pop("media_session", None) or -1)
        record = logging.makeLogRecord(fields)
        record.worker = self.index
        if session is not None and session.call_id:
            record.call_id = session.call_id
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)

    async def _ended(self) -> None:
        """The pipe closed: the process exited (or is about to)."""
        self.alive = False
        if self._writer is not None:
            self._writer.close()
        code = None
        if self.process is not None:
            try:
                code = await asyncio.wait_for(self.process.wait(), 5.0)
            except asyncio.TimeoutError:
                self.process.kill()
                code = await self.process.wait()
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        reason = f"media worker lost: {how}"
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerLost(reason))
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            session._lost(reason)
        self.pool._worker_ended(self, reason, len(sessions))

    async def stop(self, timeout: float = 10.0) -> None:
        """Orderly: the worker closes its sessions and exits; killed after ``timeout``."""
        if self.alive:
            try:
                self.send(("stop",))
            except MediaError:
                pass
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)
            except asyncio.TimeoutError:
                if self.process is not None and self.process.returncode is None:
                    self.process.kill()
                await self._reader


class WorkerPool:
    """N media worker processes (see the module); ``size`` ≥ 1.

    ``on_lost(index, reason, sessions)`` is called when a worker dies (metrics)."""

    def __init__(self, size: int, *, on_lost: Callable[[int, str, int], None] | None = None) -> None:
        if size < 1:
            raise ValueError("a worker pool has at least one worker")
        self.size = size
        self.on_lost = on_lost
        self.workers: list[MediaWorker] = []
        self.restarts = 0
        self.closing = False
        self._sids = itertools.count(1)
        self._restarting: set[asyncio.Task] = set()
        self._pause: dict[int, float] = {}

    async def start(self) -> WorkerPool:
        self.workers = [MediaWorker(i, self) for i in range(self.size)]
        await asyncio.gather(*(w.start() for w in self.workers))
        return self

    async def __aenter__(self) -> WorkerPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def load(self) -> list[int]:
        """Sessions per worker (``-1``: not running)."""
        return [len(w.sessions) if w.alive else -1 for w in self.workers]

    @property
    def alive(self) -> int:
        return sum(w.alive for w in self.workers)

    def session(self, config: PeerConfig, *, label: str = "call", sinks: Iterable[Sink] = (),
                speech: bool = False) -> WorkerMediaSession:
        """A new media session on the least loaded worker.

        Raises:
            WorkerLost: no worker is running (all are being restarted).
        """
        running = [w for w in self.workers if w.alive]
        if not running:
            raise WorkerLost("no media worker is running")
        worker = min(running, key=lambda w: len(w.sessions))
        sid = next(self._sids)
        sinks = tuple(sinks)
        try:
            payload = pickle.dumps(sinks, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            for sink in sinks:  # (made again in the worker)
                close = getattr(sink, "close", None)
                if close is not None:
                    close()
        session = WorkerMediaSession(worker, sid, label)
        worker.send(("open", sid, config, label, payload, speech))
        worker.sessions[sid] = session
        return session

    def _worker_ended(self, worker: MediaWorker, reason: str, sessions: int) -> None:
        if self.closing:
            return
        log.error("media worker %d (pid %s) %s; %d call(s) on it end", worker.index, worker.pid,
                  reason.removeprefix("media worker lost: "), sessions)
        if self.on_lost is not None:
            try:
                self.on_lost(worker.index, reason, sessions)
            except Exception:  # noqa: BLE001
                log.exception("on_lost failed")
        young = time.monotonic() - worker.started_at < YOUNG_S
        pause = min(MAX_PAUSE_S, self._pause.get(worker.index, 0.25) * 2) if young else 0.0
        self._pause[worker.index] = pause or 0.25
        task = asyncio.ensure_future(self._restart(worker.index, pause))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _restart(self, index: int, pause: float) -> None:
        if pause:
            await asyncio.sleep(pause)
        if self.closing:
            return
        worker = MediaWorker(index, self)
        try:
            await worker.start()
        except OSError as exc:
            log.error("media worker %d could not be restarted: %s", index, exc)
            self._worker_ended(worker, f"media worker lost: {exc}", 0)
            return
        self.workers[index] = worker
        self.restarts += 1

    async def close(self, timeout: float = 10.0) -> None:
        """Stop every worker (each closes its sessions first)."""
        self.closing = True
        for task in list(self._restarting):
            task.cancel()
        await asyncio.gather(*self._restarting, return_exceptions=True)
        await asyncio.gather(*(w.stop(timeout) for w in self.workers))
