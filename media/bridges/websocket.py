"""The WebSocket client side shared by the Twilio and raw-PCM bridges (aiohttp)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import aiohttp

from .base import Bridge, BridgeUnavailable

__all__ = ["WebSocketBridge"]

log = logging.getLogger(__name__)

#: Largest message accepted from a bot (Twilio-style bots send whole utterances).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class WebSocketBridge(Bridge):
    """A bridge whose bot is a WebSocket server; wacall dials it as the client.

    Args:
        headers: extra HTTP headers for the upgrade request (e.g. an auth token).
        session: an ``aiohttp.ClientSession`` to share between calls; by default each
            bridge opens (and closes) its own.
        heartbeat_s: send WebSocket pings this often and treat a missing pong as a
            broken connection (``None``: no pings).
    """

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        heartbeat_s: float | None = None,
        **options: Any,
    ) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"a WebSocket bot URL starts with ws:// or wss://, got {url.split('?')[0]!r}")
        super().__init__(url, **options)
        self.headers = dict(headers or {})
        self._session = session
        self._own_session = session is None
        self._heartbeat_s = heartbeat_s
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def _connect(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            self.ws = await self._session.ws_connect(
                self.url,
                headers=self.headers,
                autoclose=True,
                autoping=True,
                heartbeat=self._heartbeat_s,
                max_msg_size=MAX_MESSAGE_BYTES,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.close_timeout_s),
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise BridgeUnavailable(self.target, f"WebSocket upgrade rejected (HTTP {exc.status} {exc.message})") from exc
        except aiohttp.ClientConnectorError as exc:
            raise BridgeUnavailable(self.target, _os_reason(exc.os_error)) from exc
        except aiohttp.InvalidURL as exc:
            raise BridgeUnavailable(self.target, f"invalid URL ({exc})") from exc
        except aiohttp.ClientError as exc:
            raise BridgeUnavailable(self.target, str(exc) or type(exc).__name__) from exc

    async def _send_text(self, text: str) -> None:
        await self.ws.send_str(text)

    async def _send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def _receive(self) -> str:
        ws = self.ws
        clock = time.perf_counter
        text = aiohttp.WSMsgType.TEXT
        binary = aiohttp.WSMsgType.BINARY
        while True:
            msg = await ws.receive()
            t = clock()
            kind = msg.type
            if kind is text:
                self._touch()
                reason = self._on_text(msg.data, t)
            elif kind is binary:
                self._touch()
                reason = self._on_binary(msg.data, t)
            elif kind is aiohttp.WSMsgType.ERROR:
                raise ConnectionError(f"WebSocket error: {ws.exception() or msg.data}")
            else:  # CLOSE / CLOSING / CLOSED
                code = ws.close_code
                return f"bot hung up (WebSocket closed, code {code})" if code is not None else "bot hung up (connection closed)"
            if reason is not None:
                return reason

    def _on_text(self, data: str, received_at: float) -> str | None:
        """Handle a text message: a JSON object with an ``"event"`` (what both JSON bot
        protocols send), handed to :meth:`_on_event`; anything else is ignored (counted).
        Returns a reason to end the bridge (bot hang-up)."""
        try:
            message = json.loads(data)
            event = message["event"]
        except (ValueError, TypeError, KeyError):
            self.stats.ignored_messages += 1
            return None
        return self._on_event(event, message, received_at)

    def _on_event(self, event: object, message: dict, received_at: float) -> str | None:
        """One ``{"event": ...}`` message from the bot; return a reason to end the bridge."""
        self.stats.ignored_messages += 1
        return None

    def _on_binary(self, data: bytes, received_at: float) -> str | None:
        self.stats.ignored_messages += 1
        return None

    async def _close_transport(self) -> None:
        try:
            if self.ws is not None and not self.ws.closed:
                await self.ws.close()
        finally:
            if self._own_session and self._session is not None:
                await self._session.close()


def _os_reason(exc: OSError | None) -> str:
    if exc is None:
        return "cannot connect"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or str(exc) or type(exc).__name__
