"""Asterisk AudioSocket, Asterisk's side: a bot written for AudioSocket answers a call.

wacall connects to the bot's TCP address (as Asterisk's ``AudioSocket()`` application or
``Dial(AudioSocket/host:port/uuid)`` does, with ``TCP_NODELAY``) and exchanges frames of
``kind: u8 | length: u16 big-endian | payload``:

→ bot   ``0x01`` UUID (16 raw bytes) first; then ``0x10`` audio every 20 ms: signed
        16-bit little-endian mono PCM at 8 kHz (320 bytes), or at 16/24/48 kHz as
        ``0x12``/``0x13``/``0x16`` (``0x11`` 12 kHz) when the call asks for that rate, as
        Asterisk ≥ 20.17/21.12/22.7 does for a slin16… channel; ``0x03`` DTMF (one ASCII
        digit); ``0x00`` hang-up when the caller hangs up, then the socket closes.
← bot   audio of the call's kind (any length; queued and played in real time),
        ``0x00`` hang-up or EOF (the bot hangs up). As Asterisk does, anything else ends
        the session: another audio kind, an empty audio frame, ``0x01``/``0x03``, or
        ``0xFF`` error (its optional payload is the bot's error code, e.g. ``0x01``
        calling-party hang-up, ``0x02`` frame forwarding, ``0x04`` memory).

AudioSocket has no marks, no clear and no parameters; the session is keyed by the UUID
only (``session_uuid``: given, the call id when it is a UUID, else a UUID derived from
the call id).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from .base import Bridge, BotProtocolError, BridgeUnavailable, one_of

if TYPE_CHECKING:  # pragma: no cover
    from ..dtmf import DtmfEvent

__all__ = [
    "AUDIO_KINDS",
    "AudioSocketBridge",
    "KIND_AUDIO",
    "KIND_DTMF",
    "KIND_ERROR",
    "KIND_HANGUP",
    "KIND_UUID",
    "pack_frame",
    "session_uuid_for",
]

KIND_HANGUP = 0x00
KIND_UUID = 0x01
KIND_DTMF = 0x03
KIND_AUDIO = 0x10
KIND_ERROR = 0xFF
#: Audio kind per sample rate (released Asterisk table: 0x11 is slin12, 0x12 slin16).
AUDIO_KINDS = {8000: 0x10, 12000: 0x11, 16000: 0x12, 24000: 0x13, 48000: 0x16}
_ALL_AUDIO_KINDS = range(0x10, 0x19)
_HEADER = struct.Struct("!BH")
_LITTLE = sys.byteorder == "little"
#: Namespace for UUIDs derived from call ids that are not UUIDs themselves.
CALL_NAMESPACE = uuid.UUID("6f1c3a52-8d0e-4c4b-9a59-2b7f0c1d5e11")


def pack_frame(kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def session_uuid_for(call_id: str) -> uuid.UUID:
    """The UUID a call's AudioSocket session uses by default: the call id itself when it
    is a UUID, else a name-based UUID (v5) of it, stable across runs."""
    try:
        return uuid.UUID(str(call_id))
    except ValueError:
        return uuid.uuid5(CALL_NAMESPACE, str(call_id))


def _parse_address(url: str) -> tuple[str, int]:
    target = url if "://" in url else "tcp://" + url
    parts = urlsplit(target)
    if parts.scheme not in ("tcp", "audiosocket"):
        raise ValueError(f"an AudioSocket address is tcp://host:port or host:port, got {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}") from exc
    if not parts.hostname or port is None:
        raise ValueError(f"an AudioSocket address needs a host and a port, got {url!r}")
    return parts.hostname, port


class AudioSocketBridge(Bridge):
    """AudioSocket over TCP towards a bot listening at ``tcp://host:port``.

    Args:
        sample_rate: 8000 (default, kind 0x10, what the dialplan app uses), 12000,
            16000, 24000 or 48000.
        session_uuid: the UUID sent first (see the module notes for the default).
        send_hangup: send ``00 00 00`` before closing when the caller hangs up (the
            protocol's terminate message; Asterisk itself just closes, which bots treat
            the same way).
    """

    protocol = "audiosocket"

    def __init__(
        self,
        url: str,
        *,
        sample_rate: int = 8000,
        session_uuid: str | uuid.UUID | None = None,
        send_hangup: bool = True,
        **options: Any,
    ) -> None:
        one_of("sample_rate", sample_rate, AUDIO_KINDS)
        self.host, self.port = _parse_address(url)
        super().__init__(url, **options)
        self.wire_rate = sample_rate
        self.kind = AUDIO_KINDS[sample_rate]
        self._given_uuid = uuid.UUID(str(session_uuid)) if session_uuid is not None else None
        self.session_uuid: uuid.UUID | None = self._given_uuid
        self.send_hangup = send_hangup
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._audio_header = _HEADER.pack(self.kind, sample_rate // 50 * 2)

    @property
    def target(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def _connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        except ConnectionRefusedError as exc:
            raise BridgeUnavailable(self.target, "connection refused") from exc
        except socket.gaierror as exc:
            raise BridgeUnavailable(self.target, f"cannot resolve {self.host} ({exc.strerror})") from exc
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def _open(self) -> None:
        if self.session_uuid is None:
            self.session_uuid = session_uuid_for(self.call_id)
        self._writer.write(pack_frame(KIND_UUID, self.session_uuid.bytes))
        await self._writer.drain()

    # -- to the bot ---------------------------------------------------------------------

    def _encode_audio(self, pcm: np.ndarray) -> bytes:
        return self._audio_header + (pcm.tobytes() if _LITTLE else pcm.astype("<i2").tobytes())

    async def _send_audio(self, payload: bytes, index: int) -> None:
        writer = self._writer
        writer.write(payload)
        await writer.drain()

    async def _send_dtmf(self, event: DtmfEvent) -> None:
        self._writer.write(pack_frame(KIND_DTMF, event.digit.encode("ascii")))
        await self._writer.drain()

    async def _send_stop(self, reason: str) -> None:
        if self.send_hangup:
            self._writer.write(pack_frame(KIND_HANGUP))
            await self._writer.drain()

    # -- from the bot -------------------------------------------------------------------

    async def _receive(self) -> str:
        reader = self._reader
        clock = time.perf_counter
        kind_audio = self.kind
        while True:
            try:
                header = await reader.readexactly(3)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise ConnectionError("connection closed inside a frame header") from exc
                return "bot hung up (connection closed)"
            kind, length = _HEADER.unpack(header)
            try:
                payload = await reader.readexactly(length) if length else b""
            except asyncio.IncompleteReadError as exc:
                raise ConnectionError(f"connection closed inside a frame (kind 0x{kind:02x}, {length} bytes)") from exc
            t = clock()
            self._touch()
            if kind == kind_audio and length:
                if length & 1:
                    raise BotProtocolError(f"odd audio frame length {length}")
                pcm = np.frombuffer(payload, dtype="<i2")
                self._bot_audio(pcm if _LITTLE else pcm.astype(np.int16), t)
            elif kind == KIND_HANGUP:
                return "bot hung up (hangup frame)"
            elif kind == KIND_ERROR:
                code = f" (code 0x{payload.hex()})" if payload else ""
                raise BotProtocolError(f"bot sent an error frame{code}")
            elif kind in _ALL_AUDIO_KINDS and length:
                raise BotProtocolError(f"audio of kind 0x{kind:02x}, expected 0x{kind_audio:02x} ({self.wire_rate} Hz)")
            else:
                raise BotProtocolError(f"unexpected frame kind 0x{kind:02x} ({length} bytes)")

    async def _close_transport(self) -> None:
        writer = self._writer
        if writer is None:
            return
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
