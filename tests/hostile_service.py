"""A tunnel service that misbehaves on purpose, for tests of the proxy's link.

:class:`HostileService` runs a real WebSocket server (websockets, plain or over TLS) on its own
event-loop thread, so that proxies started as processes can connect to it, and answers every
connection as its :class:`Behaviour` says. It records each upgrade request it got (path and
headers) and counts accepted connections; :class:`Listener` is a bare TCP listener that only
records whether anyone connected to it (the target of a redirect).

Usage::

    with HostileService(Behaviour.CLOSE_1011) as hostile:
        ... start a proxy with -e hostile.url ...
        hostile.wait_for_connections(2)
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Self

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from proxy.protocol.framing import MAX_WS_MESSAGE, encode
from proxy.protocol.messages import Message

__all__ = ["Behaviour", "HostileService", "Listener", "Seen"]

_SUBPROTOCOL = "aws.iot.securetunneling-3.0"


class Behaviour(enum.Enum):
    """What the hostile service does with each connection."""

    #: accept the WebSocket, then close it at once with 1011 (internal error)
    CLOSE_1011 = "close-1011"
    #: accept the WebSocket, then drop the TCP connection without a close frame
    DROP = "drop"
    #: accept, then send a binary message that is no tunnel frame
    GARBAGE = "garbage"
    #: accept, then send one binary message larger than the proxy accepts
    OVERSIZED = "oversized"
    #: accept, then send a text message
    TEXT = "text"
    #: accept, then send a well-formed frame of an unknown, not ignorable message type
    UNKNOWN_TYPE = "unknown-type"
    #: answer the upgrade with ``redirect_status`` and ``Location: redirect_to``
    REDIRECT = "redirect"
    #: answer the upgrade with ``status`` and ``body``
    REFUSE = "refuse"
    #: answer the upgrade request with bytes that are not HTTP
    NOT_HTTP = "not-http"


@dataclass(frozen=True)
class Seen:
    """One upgrade request the hostile service received."""

    path: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class _LoopThread:
    """An event loop on a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        self.call(self._cancel_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @staticmethod
    async def _cancel_tasks() -> None:
        """End the handlers still running, so that none is destroyed pending."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Counter:
    """A count that other threads can wait on."""

    def __init__(self) -> None:
        self._value = 0
        self._changed = threading.Condition()

    @property
    def value(self) -> int:
        with self._changed:
            return self._value

    def add(self) -> None:
        with self._changed:
            self._value += 1
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._value >= count, timeout):
                raise AssertionError(f"{what}: {self._value} after {timeout} s, wanted {count}")


class HostileService:
    """A WebSocket server on 127.0.0.1 that answers every connection with ``behaviour``."""

    def __init__(
        self,
        behaviour: Behaviour,
        *,
        ssl_context: ssl.SSLContext | None = None,
        status: int = 403,
        body: bytes = b"",
        redirect_to: str = "",
        redirect_status: int = 302,
    ) -> None:
        self.behaviour = behaviour
        self.ssl_context = ssl_context
        self.status = status
        self.body = body
        self.redirect_to = redirect_to
        self.redirect_status = redirect_status
        self.requests: list[Seen] = []
        self._accepted = _Counter()
        self._thread: _LoopThread | None = None
        self._server: Server | asyncio.Server | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        self._thread = _LoopThread()
        self.port = self._thread.call(self._start())
        return self

    def close(self) -> None:
        if self._thread is None:
            return
        self._thread.call(self._close())
        self._thread.stop()
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The endpoint to give the proxy with ``-e``."""
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Connections accepted so far (upgrade requests, for REDIRECT, REFUSE and NOT_HTTP)."""
        return self._accepted.value

    def wait_for_connections(self, count: int, timeout: float = 30.0) -> None:
        """Block until ``count`` connections were accepted; AssertionError after ``timeout``."""
        self._accepted.wait_for(
            count, timeout, f"connections to the {self.behaviour.value} service"
        )

    async def _start(self) -> int:
        server: Server | asyncio.Server
        if self.behaviour is Behaviour.NOT_HTTP:
            server = await asyncio.start_server(
                self._not_http, "127.0.0.1", 0, ssl=self.ssl_context
            )
        else:
            server = await serve(
                self._handle,
                "127.0.0.1",
                0,
                ssl=self.ssl_context,
                process_request=self._process_request,
                subprotocols=[_SUBPROTOCOL],  # type: ignore[list-item]
                max_size=None,
                ping_interval=None,
                compression=None,
            )
        self._server = server
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def _close(self) -> None:
        server = self._server
        if server is None:
            return
        server.close()
        await server.wait_closed()

    # ------------------------------------------------------------------ behaviours

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append(Seen(request.path, tuple(request.headers.raw_items())))
        if self.behaviour is Behaviour.REDIRECT:
            self._accepted.add()
            headers = Headers([("Location", self.redirect_to), ("Content-Length", "0")])
            return Response(self.redirect_status, "Found", headers, b"")
        if self.behaviour is Behaviour.REFUSE:
            self._accepted.add()
            headers = Headers(
                [("Content-Type", "text/plain"), ("Content-Length", str(len(self.body)))]
            )
            return Response(self.status, HTTPStatus(self.status).phrase, headers, self.body)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self._accepted.add()
        match self.behaviour:
            case Behaviour.CLOSE_1011:
                await ws.close(1011, "internal error")
            case Behaviour.DROP:
                ws.transport.abort()
            case Behaviour.GARBAGE:
                await ws.send(b"\x00\x06\xff\xff\xff\xff\xff\xff")  # a frame of no protobuf
                await ws.wait_closed()
            case Behaviour.OVERSIZED:
                await ws.send(b"\x00" * (MAX_WS_MESSAGE + 1))
                await ws.wait_closed()
            case Behaviour.TEXT:
                await ws.send("not a tunnel frame")
                await ws.wait_closed()
            case Behaviour.UNKNOWN_TYPE:
                await ws.send(encode(Message(type=99, stream_id=1)))
                await ws.wait_closed()
            case _:  # pragma: no cover - handled before the upgrade
                raise AssertionError(self.behaviour)

    async def _not_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted.add()
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"\x16\x03\x01\xff garbage \x00\xfe\r\n\r\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


class Listener:
    """A bare TCP listener on 127.0.0.1 that records every byte anyone sends it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._connections = _Counter()
        self._thread: _LoopThread | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def connections(self) -> int:
        return self._connections.value

    def __enter__(self) -> Self:
        self._thread = _LoopThread()
        self.port = self._thread.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._thread is not None
        self._thread.call(self._close())
        self._thread.stop()

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add()
        try:
            async with asyncio.timeout(5):
                while data := await reader.read(4096):
                    self.received += data
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
