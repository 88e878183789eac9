"""Live call progress for a person at a terminal: one line per timeline entry."""

from __future__ import annotations

import sys
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

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

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
