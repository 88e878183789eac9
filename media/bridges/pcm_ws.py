"""Raw PCM over WebSocket: the simplest bot protocol wacall speaks.

wacall dials the bot's ``ws://``/``wss://`` URL. Audio is binary, control is JSON text:

→ bot   ``{"event": "start", "protocol": "wacall.pcm", "version": 1, "call_id": …,
        "stream_id": …, "format": {"encoding": "pcm_s16le", "sample_rate": 16000,
        "channels": 1, "frame_ms": 20}, "parameters": {…}}`` first; then one binary
        message per ``frame_ms`` of the caller's audio (signed 16-bit little-endian mono
        at the call's rate: per 20 ms 640 bytes at 16 kHz, 960 at 24 kHz, 1920 at 48 kHz;
        ``frame_ms`` 40, 60, 80 or 100 sends that much per message: fewer messages, as
        much more latency);
        ``{"event": "dtmf", "digit": "5", "duration_ms": 500}`` per key press;
        ``{"event": "mark", "name": …}`` echoes; ``{"event": "stop", "reason": …}`` when
        the caller hangs up (then the socket closes).
← bot   binary PCM in the same format, any length (queued and played in real time; an
        odd trailing byte waits for the next message); ``{"event": "clear"}`` drops
        queued audio and echoes pending marks; ``{"event": "mark", "name": …}`` is echoed
        once the audio before it has played; ``{"event": "stop"}`` (or
        ``{"event": "hangup"}``) or closing the socket hangs up. Unknown events and
        malformed JSON are ignored (``stats.ignored_messages``).
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import one_of
from .websocket import WebSocketBridge

if TYPE_CHECKING:  # pragma: no cover
    from ..dtmf import DtmfEvent

__all__ = ["PcmBridge", "PCM_RATES", "PCM_FRAME_MS"]

PCM_RATES = (8000, 16000, 24000, 48000)
PCM_FRAME_MS = (20, 40, 60, 80, 100)
_LITTLE = sys.byteorder == "little"


class PcmBridge(WebSocketBridge):
    """Raw L16 over WebSocket.

    Args:
        sample_rate: 16000 (default), 24000 or 48000 (8000 also accepted).
        frame_ms: the caller's audio per message: 20 (default), 40, 60, 80 or 100.
        **options: see :class:`~media.bridges.websocket.WebSocketBridge`.
    """

    protocol = "pcm"

    def __init__(self, url: str, *, sample_rate: int = 16000, frame_ms: int = 20, **options: Any) -> None:
        self.wire_rate = one_of("sample_rate", sample_rate, PCM_RATES)
        self.frames_per_message = one_of("frame_ms", frame_ms, PCM_FRAME_MS) // 20
        super().__init__(url, **options)
        self.stream_id = uuid.uuid4().hex
        self._odd = b""

    async def _open(self) -> None:
        await self._send_text(json.dumps({
            "event": "start",
            "protocol": "wacall.pcm",
            "version": 1,
            "call_id": self.call_id,
            "stream_id": self.stream_id,
            "format": {"encoding": "pcm_s16le", "sample_rate": self.wire_rate, "channels": 1,
                       "frame_ms": 20 * self.frames_per_message},
            "parameters": self.parameters,
        }))

    # -- to the bot ---------------------------------------------------------------------

    def _encode_audio(self, pcm: np.ndarray) -> bytes:
        return pcm.tobytes() if _LITTLE else pcm.astype("<i2").tobytes()

    async def _send_audio(self, payload: bytes, index: int) -> None:
        await self.ws.send_bytes(payload)

    async def _send_dtmf(self, event: DtmfEvent) -> None:
        await self._send_text(json.dumps({"event": "dtmf", "digit": event.digit, "duration_ms": event.duration_ms}))

    async def _send_mark(self, name: str) -> None:
        await self._send_text(json.dumps({"event": "mark", "name": name}))

    async def _send_stop(self, reason: str) -> None:
        await self._send_text(json.dumps({"event": "stop", "reason": reason}))

    # -- from the bot -------------------------------------------------------------------

    def _on_binary(self, data: bytes, received_at: float) -> str | None:
        if self._odd:
            data = self._odd + data
            self._odd = b""
        if len(data) & 1:
            self._odd = data[-1:]
            data = data[:-1]
        if data:
            pcm = np.frombuffer(data, dtype="<i2")
            self._bot_audio(pcm.astype(np.int16) if not _LITTLE else pcm, received_at)
        return None

    def _on_event(self, event: object, message: dict, received_at: float) -> str | None:
        if event == "clear":
            self._bot_clear()
        elif event == "mark":
            name = message.get("name")
            if isinstance(name, str):
                self._bot_mark(name)
            else:
                self.stats.ignored_messages += 1
        elif event in ("stop", "hangup"):
            reason = message.get("reason")
            return f"bot hung up ({reason})" if isinstance(reason, str) and reason else "bot hung up"
        else:
            self.stats.ignored_messages += 1
        return None
