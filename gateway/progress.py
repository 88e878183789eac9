"""Live call progress for a person at a terminal: one line per timeline entry, and on a
terminal a status line kept up to date in place (state, time connected, both sides'
levels) that log lines and timeline lines never break into."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

from .calls import LiveCall as Call, TimelineEntry

_LABELS = {
    "created": "call created",
    "permission_requested": "no call permission yet: permission request sent",
    "permission_granted": "permission granted by the user",
    "offer_created": "offer ready (ICE gathered)",
    "offer_sent": "offer accepted by the provider",
    "answer_received": "SDP answer received",
    "ringing": "ringing",
    "media_up": "media up (ICE + DTLS)",
    "accepted": "user picked up",
    "media_connected": "connected: audio flowing both ways",
    "ended": "ended",
}


class ProgressPrinter:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        #: The status line being shown (redrawn after anything else is printed).
        self._status = ""

    @property
    def tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, text: str) -> None:
        self.clear_status()
        print(text, file=self.stream, flush=True)
        self._redraw()

    # -- the status line (terminals only) ---------------------------------------------------

    def status(self, text: str) -> None:
        """Show ``text`` as the status line, in place of the previous one."""
        self._status = text
        self._redraw()

    def clear_status(self) -> None:
        if self._status and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _redraw(self) -> None:
        if self._status and self.tty:
            self.stream.write("\r\033[K" + self._status)
            self.stream.flush()

    def end_status(self) -> None:
        """Leave the status line for good (the terminal's next output starts clean)."""
        self.clear_status()
        self._status = ""

    async def follow(self, call: Call, user_meter, business_meter, every_s: float = 0.25) -> None:
        """Keep the status line up to date until the call ends (cancel to stop)."""
        started = time.monotonic()
        try:
            while not call.ended:
                connected = call.connected_at
                clock = time.monotonic() - (connected if connected is not None else started)
                self.status(f"  {call.state.value:<16} {int(clock) // 60:02d}:{int(clock) % 60:02d}  "
                            f"user {_meter(user_meter)}  business {_meter(business_meter)}")
                await asyncio.sleep(every_s)
        finally:
            self.end_status()

    def guard_logs(self) -> logging.Filter:
        """A filter for log handlers writing to the same terminal: the status line is
        cleared before a log line and drawn again after it."""
        printer = self

        class _Guard(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                printer.clear_status()
                return True

        return _Guard()

    def __call__(self, call: Call, entry: TimelineEntry) -> None:
        label = _LABELS.get(entry.name, entry.name)
        extra = ""
        if entry.name == "offer_sent":
            extra = f"  {call.wacid}"
        elif entry.name == "ended":
            extra = f": {entry.detail.get('reason')}"
            error = entry.detail.get("error")
            if error:
                extra += f" [{error.get('code')}] {error.get('message')}"
                if error.get("resolution"):
                    extra += f" - {error['resolution']}"
            elif entry.detail.get("detail"):
                extra += f" ({entry.detail['detail']})"
        self.line(f"  +{entry.elapsed_s:7.3f}s  {label}{extra}")


def _meter(meter) -> str:
    """``-23 dBFS ▮▮▮▮▯▯▯▯`` (8 steps of 6 dB from -48 dBFS), or silence."""
    level = meter.level_dbfs if meter.frames else -120.0
    if level <= -90:
        return f"{'silent':<18}"
    bars = max(0, min(8, int((level + 48) // 6)))
    return f"{level:4.0f} dBFS {'▮' * bars}{'▯' * (8 - bars)}"
