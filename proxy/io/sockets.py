"""Socket and transport settings that keep the queues below a fair scheduler small.

Shared by the proxy's WebSocket link and the tunnel service. A keystroke waits behind every
byte queued in a FIFO below the scheduler: kernel send and receive buffers (autotuned to
megabytes on a fast link), asyncio's TLS read-ahead (256 KiB by default) and the transports'
write buffers. These settings bound each of them; bench scenario 4 measures the effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

#: Unsent bytes the kernel may hold before a send blocks (TCP_NOTSENT_LOWAT).
NOTSENT_LOWAT = 8 * 1024
#: The kernel's receive buffer (SO_RCVBUF; the kernel doubles it for bookkeeping).
RECEIVE_BUFFER = 128 * 1024
#: Encrypted bytes asyncio's TLS layer may read ahead of the application.
TLS_READ_AHEAD = 32 * 1024
#: Encrypted bytes the TCP transport under asyncio's TLS layer may hold (default 64 KiB).
TLS_WRITE_BEHIND = 8 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def _is_tcp(sock: socket.socket | None) -> bool:
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)


def tune_tcp(sock: socket.socket | None, *, receive_buffer: int = RECEIVE_BUFFER) -> None:
    """TCP_NODELAY (no Nagle stall on small messages), keepalive and small kernel queues."""
    if sock is None or not _is_tcp(sock):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    with contextlib.suppress(OSError):  # Linux >= 3.12
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)


def tune_listener(sock: socket.socket, *, receive_buffer: int = RECEIVE_BUFFER) -> None:
    """Give accepted connections a small receive window from their first segment on.

    A receive buffer made smaller after the handshake does not shrink a window already
    advertised; one set on the listening socket is inherited before it is.
    """
    if _is_tcp(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)


def tune_transport(
    transport: asyncio.BaseTransport, *, receive_buffer: int = RECEIVE_BUFFER
) -> None:
    """:func:`tune_tcp` on the transport's socket, and small TLS buffers when it has TLS."""
    tune_tcp(transport.get_extra_info("socket"), receive_buffer=receive_buffer)
    set_read_limits = getattr(transport, "set_read_buffer_limits", None)  # asyncio's TLS
    if set_read_limits is not None:
        set_read_limits(high=min(TLS_READ_AHEAD, receive_buffer))
    # The TCP transport under asyncio's TLS layer is not public; when it is there (CPython
    # 3.11+), bound what it holds too. uvloop's TLS has no such buffer to bound.
    below = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    if isinstance(below, asyncio.WriteTransport):
        below.set_write_buffer_limits(high=TLS_WRITE_BEHIND)
