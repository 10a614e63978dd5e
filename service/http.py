"""A small asyncio HTTP/1.1 server for the management API, on h11's parser.

h11 does the parsing and the framing (sans-IO, like the rest of the service); this module reads
and writes the bytes: one task per connection, keep-alive, bounded request size, timeouts, and
``Expect: 100-continue``. Each request is read whole (bodies are small: at most ``max_body``
bytes, a larger declared Content-Length is refused before any of it is read) and handed to the
application, a coroutine function :data:`Handler`. Requests the server refuses itself (413,
malformed HTTP) are logged in one line and answered by an :data:`ErrorHook` if given.

TLS, when given an :class:`ssl.SSLContext`, is asyncio's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

log = logging.getLogger(__name__)

#: Seconds a kept-alive connection may stay idle between requests.
IDLE_TIMEOUT = 60.0
#: Seconds allowed to receive one whole request once it has started.
REQUEST_TIMEOUT = 30.0
#: Seconds allowed for closing a connection (the TLS close_notify exchange).
CLOSE_TIMEOUT = 5.0
#: Largest request line plus headers.
MAX_HEAD = 16 * 1024
#: Largest request body.
MAX_BODY = 1024 * 1024
#: What is read and dropped, at most, after refusing a request, before closing (see _refuse).
LINGER_BYTES = 4 * 1024 * 1024
LINGER_TIMEOUT = 5.0
_READ_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One whole request."""

    method: str
    target: str
    headers: list[tuple[str, str]] = field(repr=False)
    body: bytes = field(repr=False)
    #: ``https`` or ``http``
    scheme: str = "https"
    #: ``host:port`` of the client, for logs
    peer: str = "-"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """One whole response (Content-Length is added)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = field(repr=False)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
#: Shapes the responses the server itself sends (malformed HTTP, a body over the limit):
#: ``(status, reason) -> response``. Without one they are plain text.
ErrorHook = Callable[[int, str], HttpResponse]


class _Closed(Exception):
    """The client went away, or the connection must end."""


class HttpServer:
    """Serves ``handler`` on a TCP (or TLS) listener::

    server = HttpServer(handler, ssl_context=context)
    port = await server.start("127.0.0.1", 0)
    ...
    await server.close()
    """

    def __init__(
        self,
        handler: Handler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_body: int = MAX_BODY,
        on_error: ErrorHook | None = None,
    ) -> None:
        self._handler = handler
        self._ssl = ssl_context
        self._max_body = max_body
        self._on_error = on_error
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._url: str | None = None

    @property
    def url(self) -> str:
        """``https://host:port`` (``http://`` without TLS), after :meth:`start`."""
        if self._url is None:
            raise RuntimeError("server not started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the bound port (the first one, if ``host`` resolves to several)."""
        self._server = await asyncio.start_server(
            self._connection, host, port, ssl=self._ssl, limit=_READ_SIZE
        )
        bound = int(self._server.sockets[0].getsockname()[1])
        scheme = "https" if self._ssl is not None else "http"
        shown = f"[{host}]" if ":" in host else host
        self._url = f"{scheme}://{shown}:{bound}"
        return bound

    async def close(self) -> None:
        """Stop listening and end every connection; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # no TLS close_notify dance with idle kept-alive clients
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        peer = _peer(writer)
        try:
            await self._serve(reader, writer, peer)
        except (_Closed, ConnectionError, TimeoutError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("http: connection from %s failed", peer)
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await writer.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        scheme = "https" if self._ssl is not None else "http"
        while True:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    event = await _next_event(conn, reader)
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request), event
                if _declared_length(event) > self._max_body:
                    raise _BodyTooLarge  # refused before a byte of it is read
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    body = await self._read_body(conn, reader, writer)
            except h11.RemoteProtocolError as exc:
                await self._refuse(conn, reader, writer, peer, exc.error_status_hint, str(exc))
                return
            except _BodyTooLarge:
                reason = f"request body over {self._max_body} bytes"
                await self._refuse(conn, reader, writer, peer, 413, reason)
                return
            request = HttpRequest(
                event.method.decode("ascii", "replace"),
                event.target.decode("ascii", "replace"),
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
                body,
                scheme,
                peer,
            )
            response = await self._handler(request)
            await _send(conn, writer, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _read_body(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await _next_event(conn, reader)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_body:
                    raise _BodyTooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise _Closed

    async def _refuse(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        status: int,
        reason: str,
    ) -> None:
        """Answer a request the server cannot hand to the application, log one line, close."""
        log.info("http: refused a request from %s: %d %s", peer, status, reason)
        response = None if self._on_error is None else self._on_error(status, reason)
        await _send_error(conn, writer, status, reason, response)
        # Read (and drop) what the client is still sending before closing: closing a socket
        # with unread data resets it, and the client, still writing its body, might never
        # read the answer. Bounded in bytes and time.
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                left = LINGER_BYTES
                while left > 0 and (data := await reader.read(min(left, _READ_SIZE))):
                    left -= len(data)


class _BodyTooLarge(Exception):
    pass


def _declared_length(request: h11.Request) -> int:
    """The request's Content-Length (h11 has checked it is one decimal number), or 0."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return 0


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(_READ_SIZE)
            conn.receive_data(data)
            continue
        if event is h11.PAUSED:  # pragma: no cover - we never pipeline past a response
            raise _Closed
        return event


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, response: HttpResponse) -> None:
    headers = [
        *((k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers),
        (b"content-length", str(len(response.body)).encode()),
        (b"server", b"iotunnel-service"),
    ]
    out = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
    out += conn.send(h11.Data(data=response.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    writer.write(out)
    await writer.drain()


async def _send_error(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    reason: str,
    response: HttpResponse | None = None,
) -> None:
    """An error response (plain text unless ``response`` is given) that closes the connection,
    if the connection is still in a state to send one."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    if response is None:
        body = (reason + "\n").encode()
        response = HttpResponse(status, [("content-type", "text/plain; charset=utf-8")], body)
    response = HttpResponse(status, [*response.headers, ("connection", "close")], response.body)
    with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
        await _send(conn, writer, response)


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
