"""OPTIONS keepalive to a peer (a PBX or trunk): the peer is up while it answers."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any

from gateway.redact import mask_text

#: The :class:`gateway.sip.ua.UserAgent` this works for (not imported: it imports us).
UserAgent = Any

log = logging.getLogger(__name__)


class PeerState(enum.Enum):
    """What the keepalive knows of its peer."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Keepalive:
    """Sends OPTIONS to ``uri`` every ``interval`` seconds. Any response from the peer
    (even 4xx: it is alive) means UP; a timeout (408) or transport error (503) generated
    here means DOWN. ``on_change`` is called with each new state; ``changed`` is set on
    each change (clear it to wait for the next)."""

    def __init__(self, ua: UserAgent, uri: str, *, interval: float = 30.0) -> None:
        self.ua = ua
        self.uri = uri
        self.interval = interval
        self.state = PeerState.UNKNOWN
        self.on_change: Callable[[PeerState], None] | None = None
        self.changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = self.ua._spawn(self._loop())

    async def ping(self) -> PeerState:
        """One OPTIONS now; the resulting state."""
        resp = await self.ua.options(self.uri)
        local = resp.headers.get("X-Wacall-Local") is not None
        self._set(PeerState.DOWN if local else PeerState.UP)
        return self.state

    def _set(self, state: PeerState) -> None:
        if state is not self.state:
            log.info("sip: peer %s is %s", mask_text(self.uri), state.value)
            self.state = state
            self.changed.set()
            if self.on_change is not None:
                self.on_change(state)

    async def _loop(self) -> None:
        while True:
            await self.ping()
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
