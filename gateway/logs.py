"""Structured, redacted logs for a wacall service.

:func:`configure` installs one handler on the root logger that writes either one JSON
object per line (:class:`JsonFormatter`) or a human-readable line
(:class:`HumanFormatter`). Both go through a :class:`RedactingFilter`, so a phone
number or a configured secret never reaches the output, even when a developer logs
one by mistake (``log.info("calling %s", to)``).

The call a log line belongs to comes from a context variable::

    with bind_call_id(call.id):
        log.info("ringing")          # -> {"msg": "ringing", "call_id": "call_1a2b3c", ...}

or, per line, from ``extra={"call_id": ...}`` (which wins over the context).
Because :mod:`asyncio` tasks copy the context when they are created, a task spawned
inside ``bind_call_id`` keeps logging with that call id.
"""

from __future__ import annotations

import contextlib
import contextvars
import json as _json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import IO, Any

from .redact import mask_phone, mask_secret, mask_text

__all__ = [
    "HumanFormatter",
    "JsonFormatter",
    "RedactingFilter",
    "RepeatFilter",
    "bind_call_id",
    "configure",
    "current_call_id",
    "redact_text",
]

_call_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("wacall_call_id", default=None)


def current_call_id() -> str | None:
    """The call id bound in the current context, or ``None``."""
    return _call_id.get()


@contextlib.contextmanager
def bind_call_id(call_id: str | None) -> Iterator[str | None]:
    """Log lines inside the block (and tasks created in it) carry ``call_id``."""
    token = _call_id.set(call_id)
    try:
        yield call_id
    finally:
        _call_id.reset(token)


# -- redaction ----------------------------------------------------------------------------

#: Ids that must survive redaction untouched: WhatsApp call/message ids (base64 after
#: the dot, may contain digit runs) and wacall's own ``call_<hex>`` ids.
_PROTECTED = re.compile(r"\b(?:wacid|wamid)\.[A-Za-z0-9+/=_-]+|\bcall_[0-9a-f]+\b")
#: A ``+``-prefixed number written with separators (``+49 151 1234 5678``,
#: ``+1 (555) 123-4567``), which :func:`mask_text` alone would leave readable.
_SPACED_PHONE = re.compile(r"\+\d[\d \t().-]*\d")
_MIN_PHONE_DIGITS = 7


def _mask_spaced(m: re.Match[str]) -> str:
    text = m.group(0)
    digits = sum(ch.isdigit() for ch in text)
    return mask_phone(text) if digits >= _MIN_PHONE_DIGITS else text


def _mask_phones(text: str) -> str:
    return mask_text(_SPACED_PHONE.sub(_mask_spaced, text))


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret replaced by :func:`mask_secret` and phone numbers masked.

    Phone numbers are digit runs of 7+ (optionally ``+``-prefixed, see
    :func:`~gateway.redact.mask_text`) and ``+``-prefixed numbers with separators.
    ``wacid.…``/``wamid.…`` tokens and ``call_<hex>`` ids are left as they are.
    """
    return _Redactor(secrets)(text)


class _Redactor:
    def __init__(self, secrets: Iterable[str | None] = ()):
        # Longest first, so a secret that contains another is replaced whole.
        unique = {s for s in secrets if s}
        self.secrets = sorted(unique, key=len, reverse=True)
        self._secret_re = (
            re.compile("|".join(re.escape(s) for s in self.secrets)) if self.secrets else None
        )

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._secret_re is not None:
            text = self._secret_re.sub(lambda m: mask_secret(m.group(0)), text)
        out: list[str] = []
        pos = 0
        for m in _PROTECTED.finditer(text):
            out.append(_mask_phones(text[pos:m.start()]))
            out.append(m.group(0))
            pos = m.end()
        out.append(_mask_phones(text[pos:]))
        return "".join(out)

    def deep(self, value: Any) -> Any:
        """Redact strings inside JSON-like values (dict values, list/tuple items)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.deep(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.deep(v) for v in value]
        return value


_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Attributes added to ``record`` through ``extra=`` (``call_id`` excluded)."""
    return {
        k: v
        for k, v in record.__dict__.items()
        if k not in _STANDARD_ATTRS and k != "call_id" and not k.startswith("_")
    }


class RedactingFilter(logging.Filter):
    """Masks phone numbers and the given secrets in a record before it is formatted.

    The final message (``msg % args``) is computed, redacted and stored back in
    ``record.msg`` with ``record.args`` cleared, so the arguments cannot leak either.
    The traceback (``exc_text``), ``stack_info`` and string values passed through
    ``extra=`` are redacted too. Never drops a record.
    """

    def __init__(self, secrets: Iterable[str | None] = (), name: str = ""):
        super().__init__(name)
        self._redact = _Redactor(secrets)

    def redact(self, text: str) -> str:
        return self._redact(text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception as exc:  # bad format/args: keep the line, redacted, not a logging error
            message = f"{record.msg} [log format error: {type(exc).__name__}; args={record.args!r}]"
        record.msg = self._redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        for key, value in _extra_fields(record).items():
            setattr(record, key, self._redact.deep(value))
        call_id = getattr(record, "call_id", None)
        if call_id is None:
            call_id = current_call_id()
        if call_id is not None:
            # Stamped now (not at format time) so a queueing handler keeps it.
            record.call_id = self._redact(str(call_id))
        return True


# -- formatters ---------------------------------------------------------------------------


def _iso_ms(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _record_call_id(record: logging.LogRecord) -> str | None:
    call_id = getattr(record, "call_id", None)
    if call_id is None:
        call_id = current_call_id()
    return None if call_id is None else str(call_id)


def _json_ok(value: Any) -> bool:
    try:
        _json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record.

    Keys: ``ts`` (ISO 8601 UTC, milliseconds, ``Z``), ``level``, ``logger``, ``msg``,
    ``call_id`` (when known), ``exc`` (traceback, when there is one), ``stack`` (with
    ``stack_info=True``), then every JSON-serialisable ``extra=`` field. An extra whose
    name clashes with one of these keys is written as ``extra_<name>``.
    """

    _CORE = ("ts", "level", "logger", "msg", "call_id", "exc", "stack")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso_ms(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        call_id = _record_call_id(record)
        if call_id is not None:
            out["call_id"] = call_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for key, value in _extra_fields(record).items():
            if not _json_ok(value):
                continue
            out[f"extra_{key}" if key in self._CORE else key] = value
        return _json.dumps(out, ensure_ascii=False, separators=(",", ":"))


class HumanFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123Z INFO gateway.calls [call_1a2b3c] message`` (+ traceback)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(call_tag)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso_ms(record.created)

    def format(self, record: logging.LogRecord) -> str:
        call_id = _record_call_id(record)
        record.call_tag = f" [{call_id}]" if call_id else ""
        try:
            return super().format(record)
        finally:
            del record.call_tag


# -- setup --------------------------------------------------------------------------------

_HANDLER_MARK = "_wacall_handler"


class Outage:
    """One log line per outage, not one per failure: :meth:`first` is true for the first
    failure and then at most once per ``interval_s`` (a full disk fails every write; its
    log says so once a minute). Shared by everything that writes to the same place."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._at = -1e18

    def first(self) -> bool:
        import time

        now = time.monotonic()
        if now - self._at < self.interval_s:
            return False
        self._at = now
        return True


#: Failures to write to the store (``wacall.sqlite3``): calls, events, webhook ids.
STORE_OUTAGE = Outage()


class RepeatFilter(logging.Filter):
    """Folds a flood of one log line into that line plus a count.

    Lines are "the same" when logger, level, message template (before ``%`` args) and
    call id agree. The first passes; repeats within ``window_s`` are dropped and
    counted; the count is written as one line (``… repeated N times in the last 60 s``)
    when the window ends, on the next record this filter sees, or at :meth:`flush`.
    At most ``max_keys`` distinct lines are tracked (the oldest are summarised and
    forgotten first)."""

    def __init__(self, handler: logging.Handler | None = None, *, window_s: float = 60.0,
                 max_keys: int = 1024, clock=None) -> None:
        super().__init__()
        import time

        self.handler = handler
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock or time.monotonic
        #: key -> [window start, repeats dropped, last dropped record]
        self._seen: dict[tuple, list] = {}
        self._next_sweep = 0.0
        #: Lines dropped since start.
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_wacall_repeat_summary", False):
            return True
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        key = (record.name, record.levelno, str(record.msg), _record_call_id(record))
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self.window_s:
            if seen is not None:
                self._summarise(key, seen)
            self._seen[key] = [now, 0, None]
            if len(self._seen) > self.max_keys:
                oldest = next(iter(self._seen))
                self._summarise(oldest, self._seen.pop(oldest))
            return True
        seen[1] += 1
        seen[2] = record
        self.suppressed += 1
        return False

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + min(1.0, self.window_s)
        for key in [k for k, v in self._seen.items() if now - v[0] >= self.window_s]:
            self._summarise(key, self._seen.pop(key))

    def _summarise(self, key: tuple, seen: list) -> None:
        count, last = seen[1], seen[2]
        if not count or last is None or self.handler is None:
            return
        summary = logging.makeLogRecord(last.__dict__)
        summary.msg = "%s (repeated %d times in the last %d s)"
        summary.args = (last.getMessage(), count, round(self.window_s))
        summary.exc_info = summary.exc_text = summary.stack_info = None
        summary._wacall_repeat_summary = True
        self.handler.handle(summary)
        seen[1], seen[2] = 0, None

    def flush(self) -> None:
        """Write the counts of every open window now (e.g. at shutdown)."""
        for key, seen in list(self._seen.items()):
            self._summarise(key, seen)


def configure(
    json: bool = True,
    level: int | str = logging.INFO,
    stream: IO[str] | None = None,
    *,
    secrets: Iterable[str | None] = (),
) -> logging.Handler:
    """Log to ``stream`` (default ``sys.stderr``) as JSON lines or human-readable text.

    Installs one handler on the root logger, with a :class:`RedactingFilter` for
    ``secrets`` (``None``/empty entries are ignored) and sets the root level. Calling it
    again replaces the handler installed by a previous call (no duplicate lines);
    handlers installed by others (``basicConfig``, pytest's caplog) are left alone.
    Returns the new handler.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            for f in old.filters:
                if isinstance(f, RepeatFilter):
                    f.flush()
            old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(RepeatFilter(handler))  # before redaction: the template is the key
    handler.addFilter(RedactingFilter(secrets))
    handler.setFormatter(JsonFormatter() if json else HumanFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler
