"""A media worker process: calls' media on a core of its own.

``wacall serve --workers N`` keeps HTTP, webhooks and every call's state machine in the
main process and runs each call's :class:`~media.session.MediaSession` here, in one of N
worker processes, each with its own event loop (see :mod:`media.pool` for the main
process's side). The worker holds the real thing — a
:class:`~media.session.LocalMediaSession` per call: peer, jitter buffer, recorder, bot
bridge — and the main process drives it with the same commands over a socket pair.

The wire: a 4-byte big-endian length, then a pickle. Both ends are this package in
processes of one service (the main process starts the worker and hands it one end of a
``socketpair``), so pickle is the simplest faithful encoding of the commands' data
(SDP, :class:`~media.peer.PeerConfig`, sources and sinks as what they were made from,
events, exceptions). Messages:

main → worker
    ``("open", sid, config, label, sinks, speech)`` a new session (``sinks`` pickled
    on their own, so a sink that cannot be made fails that session only);
    ``("call", req, sid, method, args, kwargs)`` a command with a reply;
    ``("play", sid, pid, source)``, ``("record", sid, spec)`` fire-and-forget;
    ``("stop",)`` close every session and exit.
worker → main
    ``("reply", req, ok, value)``; ``("event", sid, event)`` (the session's
    :data:`~media.session.MediaEvent`); ``("played", sid, pid, frames, packets)``;
    ``("bridge", sid, "closed", reason, ended_by)`` and ``("bridge", sid, "goodbye")``;
    ``("received", {sid: frames})`` twice a second (what the gateway's RTP watchdog
    reads); ``("log", record)`` (log lines go out through the main process's logging, so
    they are formatted, redacted and de-duplicated in one place).

The worker ends when the main process closes its end (an orderly stop, or the main
process died: the socket reads EOF either way); it closes every session first, so
recordings are finished. It ignores SIGINT and SIGTERM (Ctrl-C in a terminal, or a
service manager stopping the whole group, reach it too): the main process decides how
calls end, hangs them up, then stops its workers; only SIGKILL ends a worker at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import traceback
from typing import Any

__all__ = ["RemoteError", "frame", "portable", "read_message"]

log = logging.getLogger(__name__)

HEADER = struct.Struct("!I")
#: No message is this large (an SDP is a few kB; a PCM prompt sent whole, a few MB).
MAX_MESSAGE = 256 * 1024 * 1024
#: How often the frames received per session are reported.
REPORT_S = 0.5


class RemoteError(RuntimeError):
    """An exception raised in a media worker that could not cross as itself."""


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message, or ``None`` at the end of the stream."""
    try:
        header = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(header)
        if size > MAX_MESSAGE:
            raise ValueError(f"a {size}-byte message is too large")
        return pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling as itself, else a :class:`RemoteError` saying what it was."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:  # noqa: BLE001 - anything that does not pickle
        pass
    return RemoteError(f"{type(exc).__name__}: {exc}")


_session: contextvars.ContextVar[int | None] = contextvars.ContextVar("wacall_media_session", default=None)


class _WireLogHandler(logging.Handler):
    """Sends log records to the main process (message formatted here, with the session)."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = None
            if record.exc_info:
                exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            self.worker.send(("log", {
                "name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                "msg": record.getMessage(), "created": record.created, "msecs": record.msecs,
                "exc_text": exc_text, "media_session": _session.get(), "worker_pid": os.getpid(),
            }))
        except Exception:  # noqa: BLE001 - a log line never breaks the media
            self.handleError(record)


class Worker:
    """The worker's side of the pipe: sessions by id, commands carried out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sessions: dict[int, Any] = {}  # sid -> LocalMediaSession
        self.bridges: dict[int, Any] = {}
        self._tasks: set[asyncio.Task] = set()
        self._reported: dict[int, int] = {}

    def send(self, message: Any) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame(message))

    async def run(self) -> None:
        reporter = asyncio.ensure_future(self._report())
        try:
            while (message := await read_message(self.reader)) is not None:
                if message[0] == "stop":
                    break
                self._dispatch(message)
        finally:
            reporter.cancel()
            await self._close_all()
            self.writer.close()

    def _spawn(self, sid: int, coro) -> None:
        context = contextvars.copy_context()
        context.run(_session.set, sid)  # (the session's tasks log with its id)
        task = asyncio.get_running_loop().create_task(coro, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "open":
            _, sid, config, label, sinks, speech = message
            self._open(sid, config, label, sinks, speech)
        elif kind == "call":
            _, req, sid, method, args, kwargs = message
            self._spawn(sid, self._serve(req, sid, method, args, kwargs))
        elif kind == "play":
            _, sid, pid, source = message
            self._play(sid, pid, source)
        elif kind == "record":
            _, sid, spec = message
            self._record(sid, spec)
        else:
            log.error("media worker: unknown message %r", kind)

    def _open(self, sid: int, config, label: str, sinks: bytes, speech: bool) -> None:
        from .session import LocalMediaSession, MediaEnded, RecordingFailed

        token = _session.set(sid)
        try:
            try:
                made = pickle.loads(sinks)
            except Exception as exc:  # noqa: BLE001 - a sink that cannot be made here
                log.warning("%s: a recording sink could not be opened: %s", label, exc)
                made = ()
                self.send(("event", sid, RecordingFailed("sink_error", f"cannot open a sink: {exc}")))
            session = LocalMediaSession(config, label=label, sinks=tuple(made), speech=speech)
        finally:
            _session.reset(token)

        def forward(event) -> None:
            if not isinstance(event, MediaEnded) or sid in self.sessions:
                self.send(("event", sid, event))

        session.subscribe(forward)
        self.sessions[sid] = session

    async def _serve(self, req: int, sid: int, method: str, args: tuple, kwargs: dict) -> None:
        from .rtp.party import COMMANDS as RTP_COMMANDS, RtpParty

        session = self.sessions.get(sid)
        try:
            if session is None:
                raise RuntimeError(f"media session {sid} is not open in this worker")
            if method == "start_bridge":
                bridge = pickle.loads(args[0])
                self.bridges[sid] = bridge
                await session.start_bridge(bridge, **kwargs)
                self._watch_bridge(sid, bridge)
                result = None
            elif method == "open_rtp":
                party = await RtpParty.open(session.peer, **kwargs)
                self.bridges[sid] = party
                self._watch_bridge(sid, party)
                result = None
            elif method == "rtp":
                party = self.bridges.get(sid)
                if not isinstance(party, RtpParty) or args[0] not in RTP_COMMANDS:
                    raise RuntimeError(f"no RTP party for {args[0]!r} in media session {sid}")
                result = await getattr(party, args[0])(*args[1:])
            elif method == "stop_bridge":
                bridge = self.bridges.get(sid)
                result = await bridge.stop(*args) if bridge is not None else None
            elif method == "close":
                result = await self._close(sid, **kwargs)
            elif method in ("offer", "answer", "apply_answer", "wait_up", "send_dtmf", "get_stats",
                            "reset_pacing"):
                result = await getattr(session, method)(*args, **kwargs)
            else:
                raise ValueError(f"unknown media command {method!r}")
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            self.send(("reply", req, False, portable(exc)))
        else:
            self.send(("reply", req, True, result))

    async def _close(self, sid: int, **kwargs: Any) -> None:
        session = self.sessions.pop(sid, None)
        self.bridges.pop(sid, None)
        self._reported.pop(sid, None)
        if session is not None:
            await session.close(**kwargs)

    def _play(self, sid: int, pid: int, source: bytes) -> None:
        session = self.sessions.get(sid)
        try:
            if session is None:
                raise RuntimeError(f"media session {sid} is not open in this worker")
            playback = session.play(pickle.loads(source))
        except Exception as exc:  # noqa: BLE001 - that playback fails, the call goes on
            log.warning("media session %s: cannot play: %s", sid, exc)
            self.send(("played", sid, pid, 0, 0))
            return
        playback.done.add_done_callback(
            lambda _: self.send(("played", sid, pid, playback.frames, playback.packets)))

    def _record(self, sid: int, spec) -> None:
        from .session import RecordingFailed

        session = self.sessions.get(sid)
        if session is None:
            return
        try:
            session.record(spec)
        except Exception as exc:  # noqa: BLE001 - no recording, the call goes on
            log.warning("media session %s: cannot record: %s", sid, exc)
            self.send(("event", sid, RecordingFailed("io_error", f"cannot start the recording: {exc}")))

    def _watch_bridge(self, sid: int, bridge) -> None:
        def closed(future: asyncio.Future) -> None:
            reason = None if future.cancelled() else future.result()
            self.send(("bridge", sid, "closed", reason, bridge.ended_by))
            playback = bridge.playback
            if playback is None or playback.done.done():
                self.send(("bridge", sid, "goodbye"))
            else:
                playback.done.add_done_callback(lambda _: self.send(("bridge", sid, "goodbye")))

        bridge.closed.add_done_callback(closed)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_S)
            changed = {}
            for sid, session in self.sessions.items():
                frames = session.received.frames
                if self._reported.get(sid) != frames:
                    changed[sid] = self._reported[sid] = frames
            if changed:
                self.send(("received", changed))

    async def _close_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        sessions = list(self.sessions)
        if sessions:
            log.warning("media worker stopping with %d session(s) open: closing them", len(sessions))
        for sid in sessions:
            try:
                await asyncio.wait_for(self._close(sid), 5.0)
            except Exception:  # noqa: BLE001 - close the others all the same
                log.exception("media session %s did not close cleanly", sid)


async def _main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    worker = Worker(reader, writer)
    root = logging.getLogger()
    root.handlers[:] = [_WireLogHandler(worker)]
    root.setLevel(int(os.environ.get("WACALL_WORKER_LOG_LEVEL", logging.INFO)))
    await worker.run()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        sys.exit("usage: python -m media.worker FD  (started by the gateway, not by hand)")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(_main(int(argv[0])))


if __name__ == "__main__":
    main()
