"""A WebSocket server playing the tunnel service for one proxy, for tests that script it.

Built on ``websockets`` and the project's own frame encoder and decoder (proxy/protocol): it
answers the handshake with the V3 subprotocol, sends what a test tells it (SERVICE_IDS,
STREAM_START, DATA, resets, or a storm of IDs a real service would never send) and collects the
messages the proxy sends. Plain ``ws://`` on loopback: TLS is the real service's business.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from proxy.protocol.framing import Decoder, encode
from proxy.protocol.messages import Message, MessageType

SUBPROTOCOL = Subprotocol("aws.iot.securetunneling-3.0")


class FakeService:
    """One WebSocket at a time; ``connections`` counts the handshakes it accepted."""

    def __init__(
        self, service_ids: Sequence[str] | None = (), *, subprotocol: str = SUBPROTOCOL
    ) -> None:
        #: Sent right after each handshake; None sends no SERVICE_IDS.
        self.service_ids = None if service_ids is None else tuple(service_ids)
        self.received: asyncio.Queue[Message] = asyncio.Queue()
        self.connections = 0
        self.ws: ServerConnection | None = None
        self.connected = asyncio.Event()
        self._server: Server | None = None
        self._subprotocol = Subprotocol(subprotocol)
        self.port = 0

    async def __aenter__(self) -> FakeService:
        self._server = await serve(
            self._handler, "127.0.0.1", 0, subprotocols=[self._subprotocol], compression=None
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        self.ws = ws
        if self.service_ids is not None:
            await ws.send(
                encode(Message(MessageType.SERVICE_IDS, available_service_ids=self.service_ids))
            )
        self.connected.set()
        decoder = Decoder()
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                assert isinstance(message, bytes)
                for decoded in decoder.feed(message):
                    self.received.put_nowait(decoded)

    async def send(self, type_: MessageType, stream_id: int = 1, **fields: object) -> None:
        assert self.ws is not None
        await self.ws.send(encode(Message(type_, stream_id=stream_id, **fields)))  # type: ignore[arg-type]

    async def next(self) -> Message:
        async with asyncio.timeout(20):
            return await self.received.get()

    def drop(self) -> None:
        """Lose the WebSocket abruptly (no close handshake), as when the service dies."""
        assert self.ws is not None
        self.connected.clear()
        self.ws.transport.abort()
