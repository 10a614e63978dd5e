"""Harness for the tunnel service tests: a TLS service on loopback and websockets clients.

Imported by the tests of this directory as ``service_harness`` (pytest puts the directory on
``sys.path``); ``conftest.py`` makes the :class:`Harness` a fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any, TypeVar

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from iotunnel.mode import Mode
from proxy.protocol.framing import Decoder, encode
from proxy.protocol.messages import Message
from service.registry import TunnelRegistry
from service.server import TunnelService
from testbed.pki import PKI

V1 = "aws.iot.securetunneling-1.0"
V2 = "aws.iot.securetunneling-2.0"
V3 = "aws.iot.securetunneling-3.0"
TUNNEL = "t1"
SERVICES = ("HTTP1", "SSH1")
TOKENS = {
    Mode.SOURCE: "source-token-AQGAAXiVzSmRL1VaJ22G7eRb",
    Mode.DESTINATION: "destination-token-AQGAAXiVzSmRL1VaJ22G7eRb",
}
CLIENT_TOKEN = "0b3c5a4e-1111-4222-8333-444455556666"
#: Logger of the test clients: their debug log shows the tokens they send.
CLIENT_LOGGER = "tests.client"

T = TypeVar("T")


def frames(*messages: Message) -> bytes:
    """Tunnel frames for ``messages``, back to back."""
    return b"".join(encode(m) for m in messages)


class Peer:
    """A client connection and the tunnel messages it has received."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._decoder = Decoder()
        self._pending: list[Message] = []
        #: sizes of the WebSocket messages received so far
        self.message_sizes: list[int] = []

    async def send(self, *messages: Message) -> None:
        """Send ``messages`` packed into one WebSocket message."""
        await self.ws.send(frames(*messages))

    async def next(self) -> Message:
        """The next tunnel message, across WebSocket message boundaries."""
        while not self._pending:
            data = await self.ws.recv()
            assert isinstance(data, bytes)
            self.message_sizes.append(len(data))
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    async def take(self, count: int) -> list[Message]:
        """The next ``count`` tunnel messages."""
        return [await self.next() for _ in range(count)]


class Harness:
    """Starts services and clients; every timeout derives from ``ms``."""

    def __init__(self, pki: PKI, ms: float) -> None:
        self.pki = pki
        self.ms = ms

    def run(self, coroutine: Awaitable[T]) -> T:
        """Run ``coroutine`` in a fresh event loop, with a 10 s (scaled) limit against hangs."""

        async def limited() -> T:
            async with asyncio.timeout(10_000 * self.ms):
                return await coroutine

        return asyncio.run(limited())

    @staticmethod
    def registry() -> TunnelRegistry:
        """A registry with tunnel ``t1`` (HTTP1, SSH1) and the :data:`TOKENS`."""
        registry = TunnelRegistry()
        registry.open_tunnel(TUNNEL, SERVICES, TOKENS[Mode.SOURCE], TOKENS[Mode.DESTINATION])
        return registry

    @contextlib.asynccontextmanager
    async def service(
        self,
        registry: TunnelRegistry | None = None,
        *,
        tls: bool = True,
        cls: type[TunnelService] = TunnelService,
        **options: Any,
    ) -> AsyncIterator[TunnelService]:
        """A started service on 127.0.0.1 (TLS with the test CA unless ``tls`` is false);
        ``options`` go to the :class:`TunnelService` (``cls``) constructor."""
        context = self.pki.server_context() if tls else None
        if registry is None:
            registry = self.registry()
        service = cls(registry, ssl_context=context, **options)
        async with service:
            await service.start()
            yield service

    def connect(
        self,
        service: TunnelService,
        mode: Mode | str = Mode.SOURCE,
        *,
        token: str | None = None,
        no_token: bool = False,
        subprotocols: Sequence[str] | None = (V3,),
        client_token: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        path: str | None = None,
        **options: Any,
    ) -> Any:
        """A websockets ``connect`` (use with ``async with``) to the service's /tunnel.

        It sends ``token`` (by default the mode's token) as ``access-token``, or no such header
        with ``no_token``. ``options`` go to ``connect`` (and on to the event loop's
        ``create_connection``: ``local_addr=("127.0.0.2", 0)`` picks the source address).
        """
        all_headers = [] if no_token else [("access-token", token or TOKENS[Mode(mode)])]
        if client_token is not None:
            all_headers.append(("client-token", client_token))
        all_headers.extend(headers)
        return connect(
            service.url + (path or f"/tunnel?local-proxy-mode={mode}"),
            ssl=self.pki.client_context() if service.url.startswith("wss:") else None,
            subprotocols=list(subprotocols) if subprotocols is not None else None,
            additional_headers=all_headers,
            compression=None,
            ping_interval=None,
            open_timeout=5000 * self.ms,
            close_timeout=5000 * self.ms,
            logger=logging.getLogger(CLIENT_LOGGER),
            **options,
        )

    @contextlib.asynccontextmanager
    async def peer(
        self, service: TunnelService, mode: Mode | str, *, tunnel: str = TUNNEL, **kwargs: Any
    ) -> AsyncIterator[Peer]:
        """A connected :class:`Peer` of ``tunnel``; waits until the service has attached it."""
        async with self.connect(service, mode, **kwargs) as ws:
            async with asyncio.timeout(5000 * self.ms):
                await service.wait_for_peer(tunnel, mode)
            yield Peer(ws)

    async def refusal(
        self, service: TunnelService, mode: Mode | str = Mode.SOURCE, **kwargs: Any
    ) -> tuple[int, str]:
        """Status code and body of a handshake the service must refuse."""
        with pytest.raises(InvalidStatus) as info:
            async with self.connect(service, mode, **kwargs):
                pass
        response = info.value.response
        return response.status_code, response.body.decode()
