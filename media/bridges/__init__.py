"""Bot bridges: let an existing voice bot answer a WhatsApp call unchanged.

::

    from media.bridges import make_bridge, BridgeUnavailable

    bridge = make_bridge("twilio", "wss://bot.example.com/ws", idle_timeout_s=60)
    try:
        await bridge.start(peer, call_id=call.id, parameters={"from_number": "+49…"})
    except BridgeUnavailable as exc:
        ...                                   # str(exc) says which bot and why
    reason = await bridge.closed              # bot hung up / "bot idle" / link lost
    await bridge.stop("user hung up")         # caller hung up: stop message, close

Protocols: ``"twilio"`` (Twilio Media Streams, :mod:`.twilio`), ``"pcm"`` (raw L16 over
WebSocket, :mod:`.pcm_ws`), ``"audiosocket"`` (Asterisk AudioSocket over TCP,
:mod:`.audiosocket`). Semantics shared by all: :mod:`.base`.
"""

from __future__ import annotations

from typing import Any

from .audiosocket import AudioSocketBridge
from .base import BotAudio, BotProtocolError, Bridge, BridgeError, BridgeStats, BridgeUnavailable
from .pcm_ws import PcmBridge
from .twilio import TwilioBridge

__all__ = [
    "AudioSocketBridge",
    "BotAudio",
    "BotProtocolError",
    "Bridge",
    "BridgeError",
    "BridgeStats",
    "BridgeUnavailable",
    "PROTOCOLS",
    "PcmBridge",
    "TwilioBridge",
    "make_bridge",
]

PROTOCOLS: dict[str, type[Bridge]] = {
    "twilio": TwilioBridge,
    "pcm": PcmBridge,
    "audiosocket": AudioSocketBridge,
}


def make_bridge(protocol: str, url: str, **options: Any) -> Bridge:
    """A new, unstarted bridge for one call.

    Args:
        protocol: ``"twilio"``, ``"pcm"`` or ``"audiosocket"``.
        url: the bot's ``ws://``/``wss://`` URL (twilio, pcm) or ``tcp://host:port``
            (audiosocket).
        **options: common ones — ``connect_timeout_s`` (5), ``idle_timeout_s`` (60,
            ``None`` = off), ``close_timeout_s`` (2), ``outbox_frames`` (50),
            ``max_buffer_s`` (600); WebSocket ones — ``headers``, ``session``,
            ``heartbeat_s``; per protocol — twilio: ``account_sid``, ``stream_sid``;
            pcm: ``sample_rate`` (16000/24000/48000), ``frame_ms`` (20…100);
            audiosocket: ``sample_rate``
            (8000…), ``session_uuid``, ``send_hangup``.

    Raises:
        ValueError: unknown protocol, a URL of the wrong kind, or a bad option value.
        TypeError: an option the protocol does not take.
    """
    try:
        cls = PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(f"unknown bridge protocol {protocol!r} (use one of {', '.join(PROTOCOLS)})") from None
    bridge = cls(url, **options)
    bridge.options = dict(options)  # (what it is made from again in a media worker process)
    return bridge
