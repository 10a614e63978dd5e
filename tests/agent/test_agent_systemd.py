"""agent.systemd against a real AF_UNIX datagram socket standing in for NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.systemd import Notifier, watchdog_pings


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting now, without waiting for more."""
    got = []
    while True:
        try:
            got.append(sock.recv(4096, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return got


def test_messages(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier(path)
    assert notifier.enabled
    assert notifier.ready("MQTT connected; 0 tunnels, 0 streams")
    assert sock.recv(4096) == b"READY=1\nSTATUS=MQTT connected; 0 tunnels, 0 streams"
    assert notifier.status("two\nlines")
    assert sock.recv(4096) == b"STATUS=two lines"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    notifier.close()
    assert not notifier.watchdog()


def test_abstract_namespace_socket() -> None:
    name = f"iotunnel-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        notifier = Notifier("@" + name)
        assert notifier.ready("up")
        assert sock.recv(4096).startswith(b"READY=1\n")
        notifier.close()


def test_without_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    asyncio.run(watchdog_pings(notifier))  # returns at once


def test_a_vanished_socket_is_not_an_error(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert not notifier.status("x")
    notifier.close()


def test_from_environ_takes_the_variables_away(notify_socket: tuple[socket.socket, str]) -> None:
    _, path = notify_socket
    environ = {
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "3000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    notifier = Notifier.from_environ(environ)
    assert environ == {"PATH": "/usr/bin"}
    assert notifier.enabled
    assert notifier.watchdog_interval == 1.5
    notifier.close()


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [("3000000", "1", None), ("0", None, None), ("soon", None, None), ("2000000", None, 1.0)],
)
def test_watchdog_only_for_this_process(
    notify_socket: tuple[socket.socket, str], usec: str, pid: str | None, interval: float | None
) -> None:
    environ = {"NOTIFY_SOCKET": notify_socket[1], "WATCHDOG_USEC": usec}
    if pid is not None:
        environ["WATCHDOG_PID"] = pid
    notifier = Notifier.from_environ(environ, pid=4242)
    assert notifier.watchdog_interval == interval
    notifier.close()


def test_a_blocked_event_loop_stops_the_watchdog_pings(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    sock.setblocking(False)
    notifier = Notifier(path, watchdog_usec=40_000)  # a ping every 20 ms

    async def scenario() -> tuple[list[bytes], list[bytes], bytes]:
        loop = asyncio.get_running_loop()
        pinger = asyncio.create_task(watchdog_pings(notifier))
        try:
            first = [await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)]
            first.append(await asyncio.wait_for(loop.sock_recv(sock, 4096), 10))
            # Block the loop itself, as a stuck callback would, for 25 ping periods.
            drain(sock)
            time.sleep(0.5)  # noqa: ASYNC251 - the point: a blocked loop
            during = drain(sock)
            # Once the loop runs again, so do the pings.
            resumed = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
            return first, during, resumed
        finally:
            pinger.cancel()

    first, during, resumed = asyncio.run(scenario())
    assert first == [b"WATCHDOG=1", b"WATCHDOG=1"]
    assert during == []
    assert resumed == b"WATCHDOG=1"
    notifier.close()
