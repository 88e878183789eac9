"""The sinks of one media path, kept away from that path's error handling.

Sinks (recorders, taps, meters, bridges, a caller's own) run on the event loop inside the
send and receive paths. A sink that raises — a full disk under a recorder, a bug in a
tap — must not stop the audio: aiortc's sender ends its send loop on any exception
from the track, and a receive tick that raises skips every later sink. A
:class:`SinkSet` calls each sink on its own; one that raises is *detached* (never called
again), closed or failed (``sink.fail(exc)`` when it has one, else ``sink.close()``),
logged once, and reported to ``on_fault`` as a :class:`SinkFault`. The others go on, and
so does the audio.

Adding and removing swap an immutable tuple, so a sink may remove itself (or another)
from inside ``write`` without disturbing the frame being delivered.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .frames import Sink

__all__ = ["SinkFault", "SinkSet", "fault_code", "describe_sink"]

log = logging.getLogger(__name__)

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def fault_code(exc: BaseException) -> str:
    """A stable code for what went wrong: ``disk_full``, ``io_error`` or ``sink_error``."""
    if isinstance(exc, OSError):
        return "disk_full" if exc.errno in _DISK_FULL else "io_error"
    return "sink_error"


def describe_sink(sink: object) -> str:
    """A short name for logs: the class, and the file when the sink writes one."""
    path = getattr(sink, "path", None)
    name = type(sink).__name__
    return f"{name}({getattr(path, 'name', path)})" if path is not None else name


@dataclass(frozen=True, slots=True)
class SinkFault:
    """A sink raised and was detached."""

    sink: object
    error: BaseException
    #: Which path it was on: ``"receive"`` (the far side's audio), ``"send"`` (ours)
    #: or ``"rtp"`` (received packets, before decoding).
    path: str

    @property
    def code(self) -> str:
        return fault_code(self.error)

    @property
    def reason(self) -> str:
        return f"{describe_sink(self.sink)}: {self.error}"


FaultHandler = Callable[[SinkFault], None]


class SinkSet:
    """An ordered set of :class:`~media.frames.Sink` objects fed one frame at a time.

    Args:
        path: ``"receive"`` or ``"send"``, for faults and logs.
        label: the peer's label, for logs.
        on_fault: called once per detached sink (after it was detached and closed).
    """

    __slots__ = ("path", "label", "on_fault", "_sinks", "faults")

    def __init__(self, path: str, *, label: str = "peer", on_fault: FaultHandler | None = None) -> None:
        self.path = path
        self.label = label
        self.on_fault = on_fault
        self._sinks: tuple[Sink, ...] = ()
        #: Sinks detached so far.
        self.faults = 0

    def add(self, sink: Sink) -> None:
        self._sinks = self._sinks + (sink,)

    def remove(self, sink: Sink) -> None:
        if sink in self._sinks:
            self._sinks = tuple(s for s in self._sinks if s is not sink)

    def clear(self) -> tuple[Sink, ...]:
        """Forget every sink; returns them (to close)."""
        sinks, self._sinks = self._sinks, ()
        return sinks

    def __iter__(self) -> Iterator[Sink]:
        return iter(self._sinks)

    def __len__(self) -> int:
        return len(self._sinks)

    def __bool__(self) -> bool:
        return bool(self._sinks)

    def __contains__(self, sink: object) -> bool:
        return sink in self._sinks

    def write(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        """Hand one frame to every sink; a sink that raises is detached."""
        for sink in self._sinks:
            try:
                sink.write(pcm, sample_rate, channels)
            except Exception as exc:  # noqa: BLE001 - any sink fault is isolated here
                self.detach(sink, exc)

    def detach(self, sink: object, exc: BaseException) -> None:
        """Take ``sink`` out after it raised ``exc``: fail or close it, log once, report."""
        self.remove(sink)
        self.faults += 1
        report(SinkFault(sink, exc, self.path), self.label, self.on_fault)


def report(fault: SinkFault, label: str, on_fault: FaultHandler | None) -> None:
    """Fail (or close) the faulty sink, log the fault once, hand it to ``on_fault``."""
    sink, exc = fault.sink, fault.error
    if isinstance(exc, OSError):  # an environment fault: the message says it all
        log.warning("%s: %s sink detached after an error: %s", label, fault.path, fault.reason)
    else:  # a bug: keep the traceback, once
        log.error("%s: %s sink detached after an error: %s", label, fault.path, fault.reason,
                  exc_info=(type(exc), exc, exc.__traceback__))
    try:
        fail = getattr(sink, "fail", None)
        if fail is not None:
            fail(exc)
        else:
            close = getattr(sink, "close", None)
            if close is not None:
                close()
    except Exception as again:  # noqa: BLE001 - a broken sink may break again on close
        log.warning("%s: closing the detached %s failed too: %s", label, describe_sink(sink), again)
    if on_fault is not None:
        try:
            on_fault(fault)
        except Exception:  # noqa: BLE001
            log.exception("%s: sink fault handler failed", label)
