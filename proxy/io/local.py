"""Local connections: one asyncio Protocol per TCP or Unix-socket connection, no task each.

A :class:`LocalConnection` hands what it reads to its owner (the tunnel) synchronously and lets
the owner pause its reading (the fair scheduler's queue is full) and wait for its writing (the
local peer reads slowly). Writes that arrive before a destination connect completes are held,
and count against the same bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Protocol as TypingProtocol
from typing import cast

from proxy.config import Endpoint
from proxy.protocol.actions import ConnectionRef
from proxy.protocol.session import DataFramer

#: SO_LINGER on, 0 seconds: close() resets the connection.
_LINGER_RESET = struct.pack("ii", 1, 0)


def format_address(address: object) -> str | None:
    """A socket address as ``host:port``, ``[v6]:port`` or a path; ``None`` when unknown."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):  # an abstract Unix socket
        address = address.decode("utf-8", "replace").replace("\0", "@", 1)
    if isinstance(address, str) and address:
        return address
    return None


class Owner(TypingProtocol):
    """The tunnel, as its connections see it."""

    def local_connected(self, conn: LocalConnection) -> None: ...

    def local_data(self, conn: LocalConnection, data: bytes) -> None: ...

    def local_closed(self, conn: LocalConnection) -> None: ...


class LocalConnection(asyncio.Protocol):
    """One local connection carried by the tunnel."""

    def __init__(
        self, owner: Owner, service_id: str | None, ref: ConnectionRef | None, *, high_water: int
    ) -> None:
        self.owner = owner
        self.service_id = service_id
        self.ref = ref
        #: Frames this connection's data (set when the tunnel opens the connection).
        self.framer: DataFramer | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._high = high_water
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._read_paused = False
        self._close_when_connected = False
        #: Bytes read from the local peer and bytes queued for it (the status channel's counts).
        self.bytes_read = 0
        self.bytes_written = 0
        #: When the tunnel reported it open (loop time), or None: not reported, or reported closed.
        self.opened_at: float | None = None
        #: The local endpoint, for the status channel (set when reported open).
        self.endpoint: str | None = None

    def __repr__(self) -> str:
        return f"LocalConnection({self.ref})"

    def address(self, side: str) -> str | None:
        """This connection's ``"sockname"`` or ``"peername"`` as ``host:port``, ``[v6]:port`` or
        a Unix socket's path; ``None`` when unknown."""
        if self.transport is None:
            return None
        return format_address(self.transport.get_extra_info(side))

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=self._high)
        if self._read_paused:
            transport.pause_reading()
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            transport.writelines(pending)
        if transport.get_write_buffer_size() < self._high:
            self._writable.set()
        if self._close_when_connected:
            transport.close()
        else:
            self.owner.local_connected(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_read += len(data)
        if not self.closed:
            self.owner.local_data(self, data)

    def eof_received(self) -> bool:
        # The tunnel protocol has no half-close: the end of the local stream ends the connection.
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        self._finish()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ------------------------------------------------------------ used by the tunnel

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the local peer (held until connected on a destination)."""
        if self.closed and self.transport is None:
            return
        self.bytes_written += len(data)
        if self.transport is None:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size >= self._high:
                self._writable.clear()
        else:
            self.transport.write(data)

    @property
    def writable(self) -> bool:
        """False while the local peer has ``high_water`` bytes or more unread."""
        return self._writable.is_set() or self.closed

    async def wait_writable(self) -> None:
        """Wait until the local peer has read enough (or the connection is gone)."""
        while not self._writable.is_set() and not self.closed:
            await self._writable.wait()

    def pause_reading(self) -> None:
        self._read_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._read_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Close after what is queued for the local peer has been written."""
        self.closed = True
        self._writable.set()
        if self.transport is not None:
            self.transport.close()
        else:
            self._close_when_connected = True

    def abort(self) -> None:
        """Close now, dropping what is queued."""
        self.closed = True
        self._writable.set()
        self._pending.clear()
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Close now with a TCP reset (RST), dropping what is queued.

        For a connection cut short (the tunnel is lost): its client sees an error, not a clean
        end of stream it could take for the end of a complete transfer. A Unix socket has no
        reset: its peer sees the end of the stream.
        """
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.abort()

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            self._writable.set()
            self.owner.local_closed(self)


async def connect_local(
    factory: Callable[[], LocalConnection],
    endpoint: Endpoint,
    *,
    happy_eyeballs_delay: float,
    default_host: str | None = None,
) -> None:
    """Connect a destination endpoint (TCP with Happy Eyeballs, or a Unix socket).

    ``default_host`` is the host of an endpoint given as a port alone (``-b`` in destination
    mode, as the reference proxy uses it; ``localhost`` without it). Callers bound the time
    with ``asyncio.timeout``.

    Raises:
        OSError: the endpoint could not be reached.
    """
    loop = asyncio.get_running_loop()
    if endpoint.path is not None:
        await loop.create_unix_connection(factory, endpoint.path)
        return
    host, port = endpoint.host or default_host or "localhost", endpoint.port or 0
    if isinstance(loop, asyncio.BaseEventLoop):
        # asyncio's own loop races the addresses (Happy Eyeballs, RFC 8305).
        await loop.create_connection(factory, host, port, happy_eyeballs_delay=happy_eyeballs_delay)
    else:  # uvloop has no Happy Eyeballs: it tries the addresses in turn.
        await loop.create_connection(factory, host, port)
