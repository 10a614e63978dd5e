"""iotunnel.status: the status channel's schema, its non-blocking writer, and what a real
:class:`~proxy.io.tunnel.Tunnel` reports on it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotunnel.status import (
    ENV_STATUS_FD,
    MAX_LINE,
    Closed,
    Connected,
    Event,
    Exited,
    LineSplitter,
    Opened,
    Reconnecting,
    Services,
    StatusError,
    StatusWriter,
    decode,
    encode,
)
from proxy.config import ProxySettings, load
from proxy.io.local import format_address
from proxy.io.tunnel import Tunnel
from proxy.protocol.messages import MessageType
from testbed.fake_service import FakeService

EVENTS: list[Event] = [
    Connected(3, "channel-1"),
    Connected(1),
    Services(("HTTP1", "SSH1")),
    Services(()),
    Opened("SSH1", "SSH1/2/1"),
    Closed("SSH1", "SSH1/2/1", 1200, 5300, 4.25, "local"),
    Closed("SSH1", "SSH1/2/2", 1, 2, 0.5, "peer", "[::1]:22"),
    Reconnecting("lost the connection after 3.0 s (1006)", 1.5),
    Exited(0, "the tunnel service closed the tunnel"),
]


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe whose ends the test closes if it hands them to something (else: closed here)."""
    read_end, write_end = os.pipe()
    inode = os.fstat(read_end).st_ino
    yield read_end, write_end
    for fd in (read_end, write_end):
        # Only if still open as this pipe: a closed number may be reused by now.
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == inode:
                os.close(fd)


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_survives_encode_and_decode(event: Event) -> None:
    line = encode(event)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode(line) == (event, 0)


def test_the_wire_form_is_the_documented_one() -> None:
    line = encode(Closed("SSH1", "SSH1/2/1", 1, 2, 0.5, "peer", "127.0.0.1:22"), dropped=3)
    assert json.loads(line) == {
        "event": "closed",
        "service_id": "SSH1",
        "connection": "SSH1/2/1",
        "bytes_in": 1,
        "bytes_out": 2,
        "duration": 0.5,
        "how": "peer",
        "local": "127.0.0.1:22",
        "dropped": 3,
    }
    assert decode(line)[1] == 3


def test_unknown_events_and_fields_are_ignored() -> None:
    assert decode(b'{"event": "paused", "why": "newer proxy"}') == (None, 0)
    assert decode(b'{"event": "exit", "code": 2, "reason": "x", "extra": [1]}') == (
        Exited(2, "x"),
        0,
    )


@pytest.mark.parametrize(
    "line",
    [
        b"2025-01-01 10:00:00,000 INFO proxy: connected",
        b"",
        b"[1, 2]",
        b'{"no": "event"}',
        b'{"event": "opened", "service_id": "SSH1"}',
        b'{"event": "closed", "service_id": "S", "connection": "c", "bytes_in": true, '
        b'"bytes_out": 1, "duration": 1, "how": "local"}',
        b'{"event": "reconnecting", "reason": "x", "delay": NaN}',
        b'{"event": "services", "service_ids": [1]}',
        b'{"event": "connected", "protocol": 3, "channel_id": [[[["SECRETISH"]]]]}',
        b"\xff\xfe",
        b'{"event": "exit", "code": 1, "reason": "' + b"x" * MAX_LINE + b'"}',
    ],
)
def test_garbage_is_a_status_error_that_quotes_nothing(line: bytes) -> None:
    with pytest.raises(StatusError) as caught:
        decode(line)
    assert "SECRETISH" not in str(caught.value)
    assert "proxy" not in str(caught.value)


def test_long_texts_are_cut_so_that_a_line_fits_in_pipe_buf() -> None:
    assert MAX_LINE <= select.PIPE_BUF
    event = Services(tuple("S" * 1000 for _ in range(100)))
    line = encode(event)
    assert len(line) <= MAX_LINE
    decoded, _ = decode(line)
    assert isinstance(decoded, Services)
    assert len(decoded.service_ids) < 100
    assert decoded.service_ids[0].endswith("...")
    reason = encode(Exited(1, "\u00e9" * 5000))  # escaped: 6 bytes a character
    assert len(reason) <= MAX_LINE


def test_the_line_splitter_bounds_lines_and_memory() -> None:
    lines = LineSplitter(limit=16)
    assert lines.feed(b"one\ntw") == [b"one"]
    assert lines.feed(b"o\n") == [b"two"]
    # A line over the limit is skipped whole, however it arrives, and stands as None.
    assert lines.feed(b"x" * 40) == [None]
    assert lines.feed(b"x" * 40) == []
    assert len(lines._buffer) < 16
    assert lines.feed(b"xx\nthree\n") == [b"three"]
    assert lines.feed(b"y" * 16 + b"\nfour\n") == [None, b"four"]
    assert lines.oversized == 2


# --------------------------------------------------------------------------- the writer


def read_events(fd: int) -> list[Event | None]:
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    return [decode(line)[0] for line in data.splitlines()]


def test_a_full_pipe_drops_events_never_blocks_and_counts(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer = StatusWriter(write_end)
    assert not os.get_blocking(write_end)
    event = Opened("SSH1", "SSH1/1/1")
    written = 0
    while writer.emit(event):  # returns (never blocks) once the pipe is full
        written += 1
    assert writer.dropped == 1
    assert not writer.emit(event)
    assert writer.dropped == 2
    events = read_events(read_end)
    assert len(events) == written
    assert set(events) == {event}
    # Room again: the next line goes out whole and carries the count.
    assert writer.emit(Exited(0, "done"))
    os.set_blocking(read_end, True)
    assert decode(os.read(read_end, MAX_LINE)) == (Exited(0, "done"), 2)


def test_a_reader_that_went_away_ends_the_reports(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    writer = StatusWriter(write_end)
    os.close(read_end)
    assert not writer.emit(Connected(3))  # EPIPE, not an exception nor SIGPIPE
    assert not writer.enabled
    assert not writer.emit(Connected(3))


def test_from_environ(pipe: tuple[int, int], tmp_path: Path) -> None:
    _, write_end = pipe
    assert StatusWriter.from_environ({})[0].enabled is False
    assert StatusWriter.from_environ({})[1] is None
    writer, problem = StatusWriter.from_environ({ENV_STATUS_FD: str(write_end)})
    assert writer.enabled
    assert problem is None
    with (tmp_path / "file").open("w") as file:
        for value in ["x", "-1", "1", "999999", str(file.fileno())]:
            writer, problem = StatusWriter.from_environ({ENV_STATUS_FD: value})
            assert not writer.enabled
            assert problem is not None
            assert problem.startswith(f"{ENV_STATUS_FD}=")


# --------------------------------------------------------------------------- a real tunnel


def test_a_destination_tunnel_reports_what_happens() -> None:
    """connected, services, opened, closed with its bytes, reconnecting: from the tunnel's
    own code paths, whatever its log level."""
    read_end, write_end = os.pipe()

    async def test() -> list[Event | None]:
        received: asyncio.Queue[Event | None] = asyncio.Queue()
        lines = LineSplitter()

        class Reader(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                for line in lines.feed(data):
                    assert line is not None
                    received.put_nowait(decode(line)[0])

        async def until(kind: type) -> list[Event | None]:
            got = []
            async with asyncio.timeout(20):
                while not got or not isinstance(got[-1], kind):
                    got.append(await received.get())
            return got

        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(Reader, os.fdopen(read_end, "rb", 0))

        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.readexactly(5) + b"!")
            await w.drain()
            w.close()

        local = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = local.sockets[0].getsockname()[1]
        ports.append(port)
        seen: list[Event | None] = []
        try:
            async with FakeService(("SSH1",)) as fake:
                tunnel = Tunnel(settings(fake.url, "-d", f"SSH1={port}"), StatusWriter(write_end))
                task = asyncio.create_task(tunnel.run())
                seen += await until(Services)
                await fake.send(MessageType.STREAM_START, 1, service_id="SSH1", connection_id=1)
                await fake.send(
                    MessageType.DATA, 1, service_id="SSH1", connection_id=1, payload=b"hello"
                )
                seen += await until(Closed)  # the local server answers and closes
                fake.drop()
                seen += await until(Reconnecting)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            transport.close()  # and read_end with it
            os.close(write_end)
            local.close()
        return seen

    ports: list[int] = []
    events = asyncio.run(test())
    [port] = ports
    assert events[:3] == [Connected(3, None), Services(("SSH1",)), Opened("SSH1", "SSH1/1/1")]
    closed = events[3]
    assert isinstance(closed, Closed)
    assert (closed.connection, closed.bytes_in, closed.bytes_out, closed.how) == (
        "SSH1/1/1",
        5,
        6,
        "local",
    )
    assert closed.local == f"127.0.0.1:{port}"  # the endpoint the destination connected to
    assert closed.duration >= 0
    reconnecting = events[4]
    assert isinstance(reconnecting, Reconnecting)
    assert reconnecting.reason.startswith("lost the connection after")
    assert reconnecting.delay > 0


def settings(url: str, *args: str) -> ProxySettings:
    # cwd: a directory without ./config (the mapping directory read by default)
    env = {"AWSIOT_TUNNEL_ACCESS_TOKEN": "t" * 40}
    loaded = load(["-e", url, "-v", "2", *args], env, Path(__file__).parent)
    assert isinstance(loaded, ProxySettings)
    return loaded


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (("127.0.0.1", 22), "127.0.0.1:22"),
        (("::1", 22, 0, 0), "[::1]:22"),
        ("/run/app.sock", "/run/app.sock"),
        (b"\0abstract", "@abstract"),
        ("", None),
        (None, None),
    ],
)
def test_the_local_endpoint_of_a_closed_event(address: object, text: str | None) -> None:
    assert format_address(address) == text
