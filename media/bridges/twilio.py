"""Twilio Media Streams, platform side: a bot written for Twilio answers a WhatsApp call.

wacall dials the bot's WebSocket (as Twilio does for ``<Connect><Stream url=…>``) and
speaks bidirectional Media Streams:

→ bot   ``connected``, ``start`` (streamSid ``MZ…``, accountSid ``AC…``, callSid = the
        call id, ``tracks: ["inbound"]``, μ-law 8 kHz mono, ``customParameters``), then a
        ``media`` message every 20 ms (160 bytes of μ-law, base64; track ``inbound``;
        ``chunk`` and ``timestamp`` (ms) counting frames since start), ``dtmf``
        (``track: "inbound_track"``), ``mark`` echoes, and ``stop`` when the caller hangs
        up. ``sequenceNumber``, ``chunk`` and ``timestamp`` are strings, as Twilio sends
        them; ``sequenceNumber`` counts every message after ``connected`` from ``"1"``.
← bot   ``media`` (μ-law 8 kHz of any length, queued and played in real time), ``mark``
        (echoed once the audio before it has played), ``clear`` (drop queued audio, echo
        pending marks). Closing the socket hangs up. Anything else is ignored, as are
        ``streamSid`` values, binary frames and malformed JSON (counted in
        ``stats.ignored_messages``).

Pipecat's ``TwilioFrameSerializer`` works unchanged; construct it with
``params=TwilioFrameSerializer.InputParams(auto_hang_up=False)`` (or give it a
``base_url`` that answers the REST hang-up), else at the end of the pipeline it first
tries to hang up through Twilio's REST API.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from ..g711 import ULAW_DECODE, ULAW_ENCODE
from .websocket import WebSocketBridge

if TYPE_CHECKING:  # pragma: no cover
    from ..dtmf import DtmfEvent

__all__ = ["TwilioBridge", "new_sid"]


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two letters + 32 hex digits (``MZ…``, ``AC…``, ``CA…``)."""
    return prefix + uuid.uuid4().hex


class TwilioBridge(WebSocketBridge):
    """Twilio Media Streams (bidirectional) towards a bot's ``ws://``/``wss://`` URL.

    Args:
        account_sid: ``start.accountSid`` (default: a random ``AC…``).
        stream_sid: ``streamSid`` (default: a random ``MZ…``).
        **options: see :class:`~media.bridges.websocket.WebSocketBridge` and
            :class:`~media.bridges.base.Bridge`.
    """

    protocol = "twilio"
    wire_rate = 8000

    def __init__(self, url: str, *, account_sid: str | None = None, stream_sid: str | None = None, **options: Any) -> None:
        super().__init__(url, **options)
        self.account_sid = account_sid or new_sid("AC")
        self.stream_sid = stream_sid or new_sid("MZ")
        self._seq = 0
        # Media messages are formatted by hand (hot path); the SID is [A-Za-z0-9].
        if not self.stream_sid.isalnum():
            raise ValueError("stream_sid must be alphanumeric")
        self._media_head = '{"event":"media","sequenceNumber":"%d","streamSid":"' + self.stream_sid + '",'
        self._media_tail = '"media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def _open(self) -> None:
        await self._send_text(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start = {
            "event": "start",
            "sequenceNumber": self._next_seq(),
            "streamSid": self.stream_sid,
            "start": {
                "streamSid": self.stream_sid,
                "accountSid": self.account_sid,
                "callSid": self.call_id,
                "tracks": ["inbound"],
                # Twilio's <Parameter> values are strings.
                "customParameters": {str(k): str(v) for k, v in self.parameters.items() if v is not None},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
        await self._send_text(json.dumps(start))

    # -- to the bot ---------------------------------------------------------------------

    def _encode_audio(self, pcm: np.ndarray) -> str:
        return base64.b64encode(ULAW_ENCODE[pcm.view(np.uint16)].tobytes()).decode("ascii")

    async def _send_audio(self, payload: str, index: int) -> None:
        self._seq += 1
        await self.ws.send_str(
            self._media_head % self._seq + self._media_tail % (index + 1, index * 20, payload)
        )

    async def _send_dtmf(self, event: DtmfEvent) -> None:
        await self._send_text(json.dumps({
            "event": "dtmf",
            "sequenceNumber": self._next_seq(),
            "streamSid": self.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": event.digit},
        }))

    async def _send_mark(self, name: str) -> None:
        await self._send_text(json.dumps({
            "event": "mark",
            "sequenceNumber": self._next_seq(),
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        }))

    async def _send_stop(self, reason: str) -> None:
        await self._send_text(json.dumps({
            "event": "stop",
            "sequenceNumber": self._next_seq(),
            "streamSid": self.stream_sid,
            "stop": {"accountSid": self.account_sid, "callSid": self.call_id},
        }))

    # -- from the bot -------------------------------------------------------------------

    def _on_event(self, event: object, message: dict, received_at: float) -> str | None:
        if event == "media":
            try:
                ulaw = base64.b64decode(message["media"]["payload"])
            except (KeyError, TypeError, binascii.Error, ValueError):
                self.stats.ignored_messages += 1
                return None
            if ulaw:
                self._bot_audio(ULAW_DECODE[np.frombuffer(ulaw, dtype=np.uint8)], received_at)
            else:
                self.stats.ignored_messages += 1
        elif event == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if isinstance(name, str):
                self._bot_mark(name)
            else:
                self.stats.ignored_messages += 1
        elif event == "clear":
            self._bot_clear()
        else:
            self.stats.ignored_messages += 1
        return None
