"""SIP transports on asyncio: one UDP socket, or one TCP (or TLS) listener with its
connections, per transport (RFC 3261 §18).

A transport delivers each received message as raw bytes with the :class:`Peer` it came
from, and sends bytes to a peer without blocking: a stream transport reuses the connection
the peer already has with us (so responses go back where the request came from, §18.2.2)
or opens one, queueing what is sent meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from gateway.sip.message import StreamFramer

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Peer:
    """A remote transport address: ``transport`` is ``"UDP"``, ``"TCP"`` or ``"TLS"``."""

    transport: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.transport.lower()}:{self.host}:{self.port}"


Receiver = Callable[[bytes, Peer], None]
ErrorHandler = Callable[[Peer, Exception], None]


class Transport:
    """The interface of a transport. ``drop`` is a fault-injection hook for tests: when it
    returns true for ``(data, peer)`` the bytes are not sent."""

    name: str = ""
    reliable: bool = False

    def __init__(self, host: str, port: int, on_message: Receiver, on_error: ErrorHandler) -> None:
        self.host = host
        self.port = port
        self._on_message = on_message
        self._on_error = on_error
        self.drop: Callable[[bytes, Peer], bool] | None = None

    async def start(self) -> None:
        """Bind; ``port`` is then the bound port (useful when asked for port 0)."""
        raise NotImplementedError

    def send(self, data: bytes, peer: Peer) -> None:
        """Send ``data`` to ``peer``; failures are reported to ``on_error``."""
        if self.drop is not None and self.drop(data, peer):
            log.debug("sip %s: dropped %d bytes to %s (fault injection)", self.name, len(data), peer)
            return
        self._send(data, peer)

    def _send(self, data: bytes, peer: Peer) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Close the socket(s) and stop every task of this transport."""
        raise NotImplementedError


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if data.strip():
            self.owner._on_message(data, Peer("UDP", addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("sip udp: %s", exc)


class UdpTransport(Transport):
    """SIP over UDP: one socket, sending and receiving."""

    name = "UDP"
    reliable = False

    #: How long a host name's address is reused.
    DNS_TTL_S = 60.0

    def __init__(self, host: str, port: int, on_message: Receiver, on_error: ErrorHandler) -> None:
        super().__init__(host, port, on_message, on_error)
        self._transport: asyncio.DatagramTransport | None = None
        #: host name -> (address, expires): a name is resolved off the loop (``sendto``
        #: with a name would block the event loop on DNS), then reused for a while.
        self._names: dict[str, tuple[str, float]] = {}
        self._resolving: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagram(self), local_addr=(self.host, self.port))
        self.port = self._transport.get_extra_info("sockname")[1]

    def _send(self, data: bytes, peer: Peer) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        host = peer.host
        if not _is_address(host):
            loop = asyncio.get_running_loop()
            known = self._names.get(host)
            if known is None or known[1] < loop.time():
                task = loop.create_task(self._resolve_and_send(data, peer))
                self._resolving.add(task)
                task.add_done_callback(self._resolving.discard)
                return
            host = known[0]
        try:
            self._transport.sendto(data, (host, peer.port))
        except OSError as exc:
            self._on_error(peer, exc)

    async def _resolve_and_send(self, data: bytes, peer: Peer) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(peer.host, peer.port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            self._on_error(peer, exc if isinstance(exc, OSError) else OSError(str(exc)))
            return
        if not infos:
            self._on_error(peer, OSError(f"{peer.host}: no address"))
            return
        self._names[peer.host] = (infos[0][4][0], loop.time() + self.DNS_TTL_S)
        self._send(data, peer)

    async def close(self) -> None:
        for task in list(self._resolving):
            task.cancel()
        await asyncio.gather(*self._resolving, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _Connection:
    """One stream connection: its writer once connected, and what waits to be written."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.pending: list[bytes] = []
        self.task: asyncio.Task | None = None


class TcpTransport(Transport):
    """SIP over TCP; with ``ssl_server``/``ssl_client`` contexts, SIP over TLS (same code)."""

    name = "TCP"
    reliable = True

    def __init__(self, host: str, port: int, on_message: Receiver, on_error: ErrorHandler, *,
                 ssl_server: ssl.SSLContext | None = None, ssl_client: ssl.SSLContext | None = None) -> None:
        super().__init__(host, port, on_message, on_error)
        if ssl_server is not None or ssl_client is not None:
            self.name = "TLS"
        self._ssl_server = ssl_server
        self._ssl_client = ssl_client
        self._server: asyncio.Server | None = None
        self._conns: dict[tuple[str, int], _Connection] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, self.host, self.port, ssl=self._ssl_server)
        self.port = self._server.sockets[0].getsockname()[1]

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        key = (addr[0], addr[1])
        conn = _Connection()
        conn.writer = writer
        self._conns[key] = conn
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self._read(reader, writer, key)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    key: tuple[str, int]) -> None:
        framer = StreamFramer()
        peer = Peer(self.name, key[0], key[1])
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for message in framer.feed(data):
                    self._on_message(message, peer)
        except (ConnectionError, ValueError, ssl.SSLError) as exc:
            log.debug("sip %s: connection %s closed: %s", self.name, peer, exc)
        finally:
            if self._conns.get(key) is not None and self._conns[key].writer is writer:
                del self._conns[key]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _send(self, data: bytes, peer: Peer) -> None:
        if self._closing:
            return
        key = (peer.host, peer.port)
        conn = self._conns.get(key)
        if conn is None:
            conn = _Connection()
            self._conns[key] = conn
            conn.pending.append(data)
            conn.task = self._spawn(self._connect(key, conn, peer))
            return
        if conn.writer is None:
            conn.pending.append(data)
            return
        try:
            conn.writer.write(data)
        except (ConnectionError, RuntimeError) as exc:
            self._conns.pop(key, None)
            self._on_error(peer, exc)

    async def _connect(self, key: tuple[str, int], conn: _Connection, peer: Peer) -> None:
        try:
            ctx = self._ssl_client
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(peer.host, peer.port, ssl=ctx,
                                        server_hostname=peer.host if ctx is not None else None),
                CONNECT_TIMEOUT)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            if self._conns.get(key) is conn:
                del self._conns[key]
            log.info("sip %s: cannot connect to %s: %s", self.name, peer, exc)
            self._on_error(peer, exc if isinstance(exc, Exception) else OSError(str(exc)))
            return
        conn.writer = writer
        for data in conn.pending:
            writer.write(data)
        conn.pending.clear()
        await self._read(reader, writer, key)

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            if conn.writer is not None:
                conn.writer.close()
        self._conns.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
