"""The asyncio shell (proxy/io/tunnel.py, proxy/io/local.py) below the end-to-end level.

A :class:`Tunnel` runs in the test's event loop against a scripted WebSocket server
(tests/proxy/fake_service.py) and real loopback sockets; :class:`LocalConnection` runs over a
socketpair with a stub owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from iotunnel.exits import ExitCode
from proxy.config import ProxySettings, load
from proxy.io.local import LocalConnection
from proxy.io.tunnel import Tunnel
from proxy.protocol.framing import encode
from proxy.protocol.messages import Message, MessageType
from testbed.fake_service import FakeService
from testbed.harness import free_port

T = MessageType
TOKEN = "t" * 40


def settings(url: str, *args: str) -> ProxySettings:
    # cwd: a directory without ./config, the mapping directory a source reads by default
    loaded = load(["-e", url, *args], {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN}, Path(__file__).parent)
    assert isinstance(loaded, ProxySettings)
    return loaded


class LogWaiter(logging.Handler):
    """The proxy's log records, and a way to await one that matches."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._changed.set()

    async def wait_for(self, pattern: str) -> str:
        regex = re.compile(pattern)
        async with asyncio.timeout(20):
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                self._changed.clear()
                await self._changed.wait()

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))


@contextlib.asynccontextmanager
async def running(s: ProxySettings) -> AsyncIterator[tuple[Tunnel, asyncio.Task[int], LogWaiter]]:
    logger = logging.getLogger("proxy")
    waiter = LogWaiter()
    logger.addHandler(waiter)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    tunnel = Tunnel(s)
    task = asyncio.create_task(tunnel.run())
    try:
        yield tunnel, task, waiter
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        logger.removeHandler(waiter)
        logger.setLevel(old_level)


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await test()

    asyncio.run(bounded())


def listen_port(line: str) -> int:
    return int(line.rsplit(":", 1)[1])


async def expect(fake: FakeService, type_: MessageType, **fields: Any) -> Message:
    message = await fake.next()
    assert message.type == type_, message
    for name, value in fields.items():
        assert getattr(message, name) == value, message
    return message


async def open_source_stream(
    fake: FakeService, port: int, service_id: str, connection_id: int = 1
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await expect(fake, T.STREAM_START, service_id=service_id, connection_id=connection_id)
    return reader, writer


class LocalServer:
    """A TCP server in the test's loop that records the peer address of each connection."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        self.accepted = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1") -> int:
        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.accepted.put_nowait((r, w))

        self.server = await asyncio.start_server(on_connect, host, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def next(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(20):
            return await self.accepted.get()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        while not self.accepted.empty():
            self.accepted.get_nowait()[1].close()


# ---------------------------------------------------------------------- the unnamed mapping


def test_source_unnamed_mapping_on_a_tunnel_without_services() -> None:
    """Regression: ``-s PORT`` on a tunnel announcing an empty list crashed with IndexError."""

    async def test() -> None:
        async with FakeService(()) as fake:
            port = _free_port()
            async with running(settings(fake.url, "-s", str(port))) as (_, task, log):
                line = await log.wait_for(r"service \(unnamed\): listening on")
                assert listen_port(line) == port
                reader, writer = await open_source_stream(fake, port, "", 0)  # a V1 stream
                writer.write(b"hello")
                await expect(fake, T.DATA, service_id="", connection_id=0, payload=b"hello")
                await fake.send(T.DATA, 1, payload=b"world")
                assert await reader.readexactly(5) == b"world"
                writer.close()
                await expect(fake, T.STREAM_RESET, service_id="")
                assert not task.done()

    run(test)


def test_destination_unnamed_mapping_on_a_tunnel_without_services() -> None:
    async def test() -> None:
        local = LocalServer()
        port = await local.start()
        async with (
            FakeService(()) as fake,
            running(settings(fake.url, "-d", str(port))) as (_, task, _log),
        ):
            await fake.connected.wait()
            await fake.send(T.STREAM_START, 1)  # V1: no service, no connection id
            await fake.send(T.DATA, 1, payload=b"ping")
            reader, writer = await local.next()
            assert await reader.readexactly(4) == b"ping"
            writer.write(b"pong")
            await expect(fake, T.DATA, service_id="", payload=b"pong")
            assert not task.done()
        await local.close()

    run(test)


V1 = "aws.iot.securetunneling-1.0"


def test_source_on_a_v1_tunnel_serves_its_one_mapping_unnamed() -> None:
    async def test() -> None:
        async with (
            FakeService(None, subprotocol=V1) as fake,
            running(settings(fake.url, "-s", "SSH1=0")) as (_, task, log),
        ):
            line = await log.wait_for(r"service \(unnamed\): listening on")
            reader, writer = await open_source_stream(fake, listen_port(line), "", 0)
            await fake.send(T.DATA, 1, payload=b"v1")
            assert await reader.readexactly(2) == b"v1"
            writer.close()
            assert not task.done()

    run(test)


def test_destination_on_a_v1_tunnel_listens_on_nothing() -> None:
    """Regression: a destination on a V1 tunnel tried to listen on its own mappings."""

    async def test() -> None:
        local = LocalServer()
        port = await local.start()
        async with (
            FakeService(None, subprotocol=V1) as fake,
            running(settings(fake.url, "-d", f"SSH1={port}")) as (tunnel, task, _),
        ):
            await fake.connected.wait()
            await fake.send(T.STREAM_START, 1)
            await fake.send(T.DATA, 1, payload=b"v1")
            reader, writer = await local.next()
            assert await reader.readexactly(2) == b"v1"
            assert tunnel.mapped_listeners == {}
            assert tunnel.free_listeners == {}
            writer.close()
            assert not task.done()
        await local.close()

    run(test)


# ---------------------------------------------------------------------- listeners


def test_source_caps_a_storm_of_service_ids() -> None:
    async def test() -> None:
        ids = [f"S{i}" for i in range(5000)]
        async with (
            FakeService(ids) as fake,
            running(settings(fake.url, "-m", "src")) as (tunnel, task, log),
        ):
            await log.wait_for(r"4997 of them ignored")
            await log.wait_for(r"service S2: listening on")
            assert log.count("listening on") == 3
            assert sorted(tunnel.free_listeners) == ["S0", "S1", "S2"]
            assert log.count("ignored") == 1
            assert not task.done()

    run(test)


def test_destination_storm_of_service_ids_fails_with_one_short_line() -> None:
    async def test() -> None:
        ids = ["SSH1", *(f"X{i}" for i in range(5000))]
        async with (
            FakeService(ids) as fake,
            running(settings(fake.url, "-d", "SSH1=22")) as (_, task, log),
        ):
            assert await task == ExitCode.CONFIG
            line = await log.wait_for("no destination mapping")
            assert "service X0, X1 announced" in line
            assert len(line) < 200
            assert len(log.lines) < 10  # a few lines, not one per announced ID
            assert log.count("X4999") == 0

    run(test)


def test_source_busy_port_fails_before_connecting() -> None:
    """A local mistake must not spend a single-use token: no handshake at all."""

    async def test() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            async with (
                FakeService(("SSH1",)) as fake,
                running(settings(fake.url, "-s", f"SSH1={port}")) as (_, task, log),
            ):
                assert await task == ExitCode.CONFIG
                line = await log.wait_for("cannot listen")
                assert (
                    line
                    == f"-s SSH1={port}: cannot listen on 127.0.0.1:{port}: Address already in use"
                )
                assert fake.connections == 0

    run(test)


def test_source_bind_address_not_on_this_machine_fails_before_connecting() -> None:
    async def test() -> None:
        async with (
            FakeService(("SSH1",)) as fake,
            running(settings(fake.url, "-s", "SSH1=0", "-b", "192.0.2.1")) as (_, task, log),
        ):
            assert await task == ExitCode.CONFIG
            line = await log.wait_for("cannot listen")
            assert (
                line == "-s SSH1=0: cannot listen on 192.0.2.1:0: Cannot assign requested address"
            )
            assert fake.connections == 0

    run(test)


def test_source_listener_of_an_unannounced_mapping_refuses_connections() -> None:
    async def test() -> None:
        async with FakeService(("HTTP1",)) as fake:
            s = settings(fake.url, "-s", "SSH1=0")
            async with running(s) as (tunnel, task, log):
                await log.wait_for("service HTTP1: listening on")
                await log.wait_for("mapping for SSH1 is not used")
                ssh_port = tunnel.mapped_listeners["SSH1"].server.sockets[0].getsockname()[1]
                reader, writer = await asyncio.open_connection("127.0.0.1", ssh_port)
                assert await reader.read() == b""
                writer.close()
                await log.wait_for("refusing a connection for the tunnel: the tunnel has not")
                assert fake.received.empty()
                assert not task.done()

    run(test)


# ---------------------------------------------------------------------- closing and resetting


async def _source_with_one_connection(
    fake: FakeService, log: LogWaiter
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    line = await log.wait_for("service SSH1: listening on")
    reader, writer = await open_source_stream(fake, listen_port(line), "SSH1")
    await fake.send(T.DATA, 1, service_id="SSH1", connection_id=1, payload=b"part")
    assert await reader.readexactly(4) == b"part"
    return reader, writer


@pytest.mark.parametrize("how", ["tunnel lost", "SESSION_RESET"])
def test_source_connection_is_reset_when_the_session_ends(how: str) -> None:
    """Regression: a download cut off by the loss of the tunnel ended in a clean EOF."""

    async def test() -> None:
        async with (
            FakeService(("SSH1",)) as fake,
            running(settings(fake.url, "-s", "SSH1=0")) as (_, _task, log),
        ):
            reader, writer = await _source_with_one_connection(fake, log)
            if how == "tunnel lost":
                fake.drop()
            else:
                await fake.send(T.SESSION_RESET, 0)
            with pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()

    run(test)


@pytest.mark.parametrize("reset", [T.CONNECTION_RESET, T.STREAM_RESET])
def test_source_peer_reset_closes_cleanly_after_queued_data(reset: MessageType) -> None:
    async def test() -> None:
        async with (
            FakeService(("SSH1",)) as fake,
            running(settings(fake.url, "-s", "SSH1=0")) as (_, _task, log),
        ):
            reader, writer = await _source_with_one_connection(fake, log)
            await fake.send(T.DATA, 1, service_id="SSH1", connection_id=1, payload=b"end")
            await fake.send(reset, 1, service_id="SSH1", connection_id=1)
            assert await reader.read() == b"end"  # then a clean end of stream
            writer.close()

    run(test)


def test_destination_connection_is_reset_when_the_tunnel_is_lost() -> None:
    async def test() -> None:
        local = LocalServer()
        port = await local.start()
        async with (
            FakeService(("SSH1",)) as fake,
            running(settings(fake.url, "-d", f"SSH1={port}")) as (_, _task, _),
        ):
            await fake.connected.wait()
            await fake.send(T.STREAM_START, 1, service_id="SSH1", connection_id=1)
            await fake.send(T.DATA, 1, service_id="SSH1", connection_id=1, payload=b"up")
            reader, writer = await local.next()
            assert await reader.readexactly(2) == b"up"
            fake.drop()
            with pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()
        await local.close()

    run(test)


# ---------------------------------------------------------------------- -b in destination mode


def test_destination_connects_port_only_mappings_to_the_bind_address() -> None:
    """``-b`` in destination mode is the host of a port-only mapping, as the reference's."""

    async def test() -> None:
        local = LocalServer()
        port = await local.start("127.0.0.2")
        async with FakeService(("SSH1",)) as fake:
            s = settings(fake.url, "-d", f"SSH1={port}", "-b", "127.0.0.2")
            async with running(s) as (_, _task, _):
                await fake.connected.wait()
                await fake.send(T.STREAM_START, 1, service_id="SSH1", connection_id=1)
                _, writer = await local.next()
                assert writer.get_extra_info("sockname")[0] == "127.0.0.2"
                writer.close()
        await local.close()

    run(test)


def test_destination_bind_address_leaves_host_mappings_alone() -> None:
    async def test() -> None:
        local = LocalServer()
        port = await local.start()
        async with FakeService(("SSH1",)) as fake:
            s = settings(fake.url, "-d", f"SSH1=127.0.0.1:{port}", "-b", "127.0.0.2")
            async with running(s) as (_, task, _):
                await fake.connected.wait()
                await fake.send(T.STREAM_START, 1, service_id="SSH1", connection_id=1)
                _, writer = await local.next()
                assert writer.get_extra_info("sockname")[0] == "127.0.0.1"
                writer.close()
                assert not task.done()
        await local.close()

    run(test)


def test_destination_unreachable_bind_host_fails_that_connection_only() -> None:
    async def test() -> None:
        async with FakeService(("SSH1",)) as fake:
            s = settings(fake.url, "-d", f"SSH1={free_port()}", "-b", "127.0.0.3")
            async with running(s) as (_, task, log):
                await fake.connected.wait()
                await fake.send(T.STREAM_START, 1, service_id="SSH1", connection_id=1)
                await expect(fake, T.CONNECTION_RESET, service_id="SSH1", connection_id=1)
                line = await log.wait_for("cannot connect to")
                assert "127.0.0.3:" in line
                assert not task.done()

    run(test)


# ---------------------------------------------------------------------- LocalConnection


class StubOwner:
    def __init__(self) -> None:
        self.connected: list[LocalConnection] = []
        self.data: list[bytes] = []
        self.closed: list[LocalConnection] = []
        self.got_data = asyncio.Event()
        self.got_close = asyncio.Event()

    def local_connected(self, conn: LocalConnection) -> None:
        self.connected.append(conn)

    def local_data(self, conn: LocalConnection, data: bytes) -> None:
        self.data.append(data)
        self.got_data.set()

    def local_closed(self, conn: LocalConnection) -> None:
        self.closed.append(conn)
        self.got_close.set()


async def _pair(
    conn: LocalConnection, family: int = socket.AF_UNIX
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect ``conn`` to one end of a socket pair; returns streams on the other end."""
    if family == socket.AF_UNIX:
        ours, theirs = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as server:
            theirs = socket.create_connection(server.getsockname())
            ours, _ = server.accept()
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: conn, ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    return reader, writer


def test_local_connection_backpressure_both_ways() -> None:
    async def test() -> None:
        owner = StubOwner()
        conn = LocalConnection(owner, "SSH1", None, high_water=4096)
        reader, writer = await _pair(conn)
        assert owner.connected == [conn]
        block = b"x" * 65536
        while conn.writable:  # the peer reads nothing: the write buffer fills
            conn.write(block)
        waiting = asyncio.create_task(conn.wait_writable())
        await asyncio.sleep(0)
        assert not waiting.done()
        total = 0
        while not waiting.done():
            total += len(await reader.read(1 << 20))
        await waiting
        assert total > 0

        conn.pause_reading()
        writer.write(b"held")
        await writer.drain()
        conn.resume_reading()
        await owner.got_data.wait()
        assert b"".join(owner.data) == b"held"

        writer.close()
        await owner.got_close.wait()
        assert owner.closed == [conn]
        assert conn.writable  # a closed connection never blocks the tunnel

    run(test)


def test_local_connection_writes_before_connect_are_held_then_closed() -> None:
    """A destination's DATA may arrive before its connect completes; so may the reset."""

    async def test() -> None:
        owner = StubOwner()
        conn = LocalConnection(owner, "SSH1", None, high_water=8)
        conn.write(b"early ")
        conn.write(b"bytes")
        assert not conn.writable  # held bytes count against the bound
        conn.pause_reading()
        conn.close()
        reader, writer = await _pair(conn)
        assert await reader.read() == b"early bytes"
        assert owner.connected == []  # closed before it connected: never reported
        writer.close()

    run(test)


@pytest.mark.parametrize(
    ("family", "expected"), [(socket.AF_INET, ConnectionResetError), (socket.AF_UNIX, None)]
)
def test_local_connection_reset(family: int, expected: type[Exception] | None) -> None:
    async def test() -> None:
        owner = StubOwner()
        conn = LocalConnection(owner, "SSH1", None, high_water=4096)
        reader, writer = await _pair(conn, family)
        conn.write(b"lost")
        conn.reset()
        if expected is None:  # a Unix socket has no reset: a plain end of stream
            assert await reader.read() in (b"", b"lost")
        else:
            with pytest.raises(expected):
                await reader.read()
        writer.close()
        conn.reset()  # idempotent

    run(test)


def test_local_connection_reset_before_connect_drops_held_bytes() -> None:
    owner = StubOwner()
    conn = LocalConnection(owner, "SSH1", None, high_water=8)
    conn.write(b"dropped")
    conn.reset()
    assert conn.closed
    assert conn.writable
    conn.write(b"ignored once closed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------- receiving (link.py)


def test_a_slow_local_reader_stops_the_websocket_and_loses_nothing() -> None:
    """Messages are handled as they are received; a local peer that reads nothing stops the
    reading of the WebSocket (the service's sends block), and what the link held meanwhile
    reaches the peer in order."""

    async def test() -> None:
        local = LocalServer()
        port = await local.start()
        # 24 MB (more than the loopback socket buffers and the proxy's write buffer hold) in
        # small messages: a socket read brings several, and the link holds some of them
        chunks = [bytes([i % 251]) * 3000 for i in range(8000)]
        async with (
            FakeService(("SSH1",)) as fake,
            running(settings(fake.url, "-d", f"SSH1={port}")) as (tunnel, task, _),
        ):
            await fake.connected.wait()
            await fake.send(T.STREAM_START, 1, service_id="SSH1", connection_id=1)

            async def send_all() -> None:
                for chunk in chunks:
                    await fake.send(T.DATA, 1, service_id="SSH1", connection_id=1, payload=chunk)

            sending = asyncio.create_task(send_all())
            reader, writer = await local.next()
            async with asyncio.timeout(30):
                # nothing signals the pause of a transport's reading: poll for it
                while tunnel.ws is None or tunnel.ws.transport.is_reading():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert not sending.done()
            assert tunnel.ws.held <= 256 * 1024 // 3000  # at most one socket read's worth
            received = await reader.readexactly(sum(map(len, chunks)))
            assert received == b"".join(chunks)
            await sending
            assert tunnel.ws.transport.is_reading()
            assert not task.done()
            writer.close()
        await local.close()

    run(test)


def test_a_fragmented_message_from_the_service_is_delivered() -> None:
    """A binary message in fragments (a frame's length prefix cut in two among them) reaches
    the local peer as one payload, in order with the messages around it."""

    async def test() -> None:
        local = LocalServer()
        port = await local.start()
        async with (
            FakeService(("SSH1",)) as fake,
            running(settings(fake.url, "-d", f"SSH1={port}")) as (_, task, _log),
        ):
            await fake.connected.wait()
            await fake.send(T.STREAM_START, 1, service_id="SSH1", connection_id=1)
            await fake.send(T.DATA, 1, service_id="SSH1", connection_id=1, payload=b"one ")
            frames = [
                encode(Message(T.DATA, 1, "SSH1", 1, payload=b"two, in fragments "))
                for _ in range(2)
            ]
            whole = b"".join(frames)
            assert fake.ws is not None
            await fake.ws.send([whole[:1], whole[1:7], whole[7:30], whole[30:]])
            await fake.send(T.DATA, 1, service_id="SSH1", connection_id=1, payload=b"three")
            reader, writer = await local.next()
            expected = b"one " + b"two, in fragments " * 2 + b"three"
            assert await reader.readexactly(len(expected)) == expected
            assert not task.done()
            writer.close()
        await local.close()

    run(test)
