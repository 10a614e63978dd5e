"""Fixtures for end-to-end tests: real processes on loopback, cleaned up after each test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.harness import Source, Stack, Tunnel
from testbed.pki import PKI

_HERE = str(Path(__file__).resolve().parent)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(_HERE):
            item.add_marker(pytest.mark.e2e)


@dataclass
class TwoServices:
    """README.md's walk-through: one tunnel, HTTP1 -> an HTTP server, SSH1 -> an echo server."""

    tunnel: Tunnel
    service_port: int
    http_port: int
    echo_port: int
    destination: Any
    source: Source

    @property
    def http(self) -> int:
        return self.source.ports["HTTP1"]

    @property
    def ssh(self) -> int:
        return self.source.ports["SSH1"]


@pytest.fixture
def two_services(stack: Stack, pki: PKI, www: Path) -> TwoServices:
    tunnel = Tunnel("seed-tunnel", ("HTTP1", "SSH1"))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, http_port = stack.http_server(www)
    _, echo_port = stack.echo_server()
    destination = stack.destination(
        tunnel.destination_token, port, f"HTTP1={http_port},SSH1={echo_port}", ca=pki.ca.cert
    )
    source = stack.source(
        tunnel.source_token, port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=pki.ca.cert
    )
    return TwoServices(tunnel, port, http_port, echo_port, destination, source)


class ThreadedService:
    """The tunnel service run in this process (on its own event loop thread), for tests that
    need to call its Python API, such as closing a tunnel."""

    def __init__(self, pki: PKI, tunnels: list[Tunnel]) -> None:
        from service.registry import TunnelRegistry
        from service.server import TunnelService

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        registry = TunnelRegistry()
        for t in tunnels:
            registry.open_tunnel(t.tunnel_id, t.services, t.source_token, t.destination_token)

        async def make() -> TunnelService:
            return TunnelService(registry, ssl_context=pki.server_context())

        self.service = self.call(make())
        self.port: int = self.call(self.service.start("127.0.0.1", 0))

    def call(self, coroutine: Any, timeout: float = 20.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.call(self.service.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def threaded_service_factory(pki: PKI) -> Iterator[Any]:
    services: list[ThreadedService] = []

    def factory(tunnels: list[Tunnel]) -> ThreadedService:
        service = ThreadedService(pki, tunnels)
        services.append(service)
        return service

    yield factory
    for service in services:
        service.close()
