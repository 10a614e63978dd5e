"""End to end: the proxy's local side (listeners, mappings, resets) as real processes.

The project's service over TLS (or, for announcements no real service makes, a scripted
WebSocket server built on the project's own frame encoder), real proxies, HTTP and echo servers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from testbed.clients import echo_roundtrips
from testbed.fake_service import FakeService
from testbed.harness import ROOT, Stack, Tunnel, free_port

MiB = 1 << 20


class ThreadedFake:
    """A :class:`FakeService` on an event loop thread of its own."""

    def __init__(self, service_ids: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = FakeService(service_ids)
        self.call(self.fake.__aenter__())

    def call(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(30)

    def close(self) -> None:
        self.call(self.fake.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def storm() -> Iterator[ThreadedFake]:
    fake = ThreadedFake([f"svc{i}" for i in range(5000)])
    yield fake
    fake.close()


def test_a_storm_of_service_ids_opens_at_most_three_listeners(
    stack: Stack, storm: ThreadedFake
) -> None:
    argv = [sys.executable, "-m", "proxy", "-m", "src", "-e", storm.fake.url, "-v", "5"]
    proc = stack.start("source", argv, env={"AWSIOT_TUNNEL_ACCESS_TOKEN": "t" * 40})
    proc.wait_for("4997 of them ignored", 60)
    proc.wait_for("service svc2: listening on", 60)
    # The proxy lives and stays small: three listeners, a handful of descriptors.
    echo = [int(p.rsplit(":", 1)[1]) for p in _listening(proc.output())]
    assert len(echo) == 3
    assert proc.popen.poll() is None
    fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
    assert fds < 64, fds
    assert proc.output().count("ignored") == 1
    # The listeners work: a connection becomes a stream on the (scripted) tunnel.
    with socket.create_connection(("127.0.0.1", echo[0]), timeout=20) as sock:
        sock.sendall(b"hi")
        message = storm.call(storm.fake.next())
        assert message.service_id == "svc0"
    assert "Traceback" not in proc.output()


def _listening(output: str) -> list[str]:
    return [
        line.split("listening on ")[1] for line in output.splitlines() if "listening on" in line
    ]


def test_unnamed_mappings_on_a_tunnel_without_services(stack: Stack, pki) -> None:
    """``-s PORT`` / ``-d PORT`` (the V1 style) on a tunnel whose service list is empty."""
    tunnel = Tunnel("no-services", ())
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    stack.destination(tunnel.destination_token, port, str(echo_port), ca=pki.ca.cert)
    listen = free_port()
    src = stack.source(tunnel.source_token, port, str(listen), ["(unnamed)"], ca=pki.ca.cert)
    assert src.ports["(unnamed)"] == listen
    assert echo_roundtrips(listen, 10) == 10
    assert echo_roundtrips(listen, 5) == 5  # V1: one connection at a time, a new one replaces
    assert "Traceback" not in src.proc.output()


@pytest.fixture(scope="module")
def reference() -> str:
    """The reference C++ localproxy, as a peer (``$LOCALPROXY`` or the shared checkout)."""
    path = os.environ.get("LOCALPROXY") or str(
        ROOT.parent / "shared" / "peers" / "localproxy" / "localproxy-x86_64"
    )
    if shutil.which(path) is None:
        pytest.skip(f"the reference localproxy is not available at {path}")
    try:
        subprocess.run([path, "--help"], capture_output=True, timeout=30, check=False)
    except OSError as exc:
        pytest.skip(f"the reference localproxy does not run here: {exc}")
    return path


@pytest.mark.parametrize("ours", ["source", "destination"])
def test_unnamed_mappings_on_a_tunnel_without_services_with_the_reference(
    stack: Stack, pki, reference: str, ours: str
) -> None:
    """Regression (ours = destination): the reference numbers the connections of an unnamed
    stream and dropped our replies, which carried none."""
    tunnel = Tunnel(f"no-services-{ours}", ())
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    listen = free_port()
    # -k: the reference wants a hashed CA directory for -c; the link is on loopback.
    ref_argv = [reference, "-e", f"127.0.0.1:{port}", "-k", "-v", "4"]
    if ours == "source":
        ref = stack.start(
            "reference-destination",
            [*ref_argv, "-d", str(echo_port)],
            env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.destination_token},
        )
        ref.wait_for("Successfully established websocket connection", 30)
        stack.source(tunnel.source_token, port, str(listen), ["(unnamed)"], ca=pki.ca.cert)
    else:
        stack.destination(tunnel.destination_token, port, str(echo_port), ca=pki.ca.cert)
        ref = stack.start(
            "reference-source",
            [*ref_argv, "-s", str(listen)],
            env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token},
        )
        ref.wait_for(f"Listening for new connection on port {listen}", 30)
    assert echo_roundtrips(listen, 10) == 10


def test_busy_port_fails_before_the_token_is_spent(stack: Stack, pki) -> None:
    """The source's access token is single-use (no client token given): a local mistake must
    make the proxy stop before the handshake, so that the corrected rerun can still use it."""
    tunnel = Tunnel("busy-port", ("SSH1",))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    stack.destination(tunnel.destination_token, port, f"SSH1={echo_port}", ca=pki.ca.cert)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        argv = stack.proxy_argv(
            "src", port, ca=pki.ca.cert, verbosity=4, args=["-s", f"SSH1={taken}"]
        )
        proc = stack.start(
            "source-busy", argv, env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token}
        )
        assert proc.wait(30) == 2
    errors = [line for line in proc.output().splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert f"-s SSH1={taken}: cannot listen on 127.0.0.1:{taken}: " in errors[0]
    assert "connected to the tunnel service" not in proc.output()
    assert "Traceback" not in proc.output()

    src = stack.source(tunnel.source_token, port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
    assert echo_roundtrips(src.ports["SSH1"], 3) == 3


def test_download_cut_by_the_loss_of_the_tunnel_is_reset(stack: Stack, pki, tmp_path: Path) -> None:
    """Regression: the client of a download cut off by the loss of the tunnel saw a clean end
    of stream, as if the (short) file were complete."""
    www = tmp_path / "www"
    www.mkdir()
    size = 64 * MiB
    (www / "big.bin").write_bytes(os.urandom(MiB) * (size // MiB))
    tunnel = Tunnel("cut", ("HTTP1",))
    service, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, http_port = stack.http_server(www)
    stack.destination(tunnel.destination_token, port, f"HTTP1={http_port}", ca=pki.ca.cert)
    src = stack.source(tunnel.source_token, port, "HTTP1=0", ["HTTP1"], ca=pki.ca.cert)
    with socket.create_connection(("127.0.0.1", src.ports["HTTP1"]), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = 0
        while received < MiB:
            chunk = sock.recv(65536)
            assert chunk, "the download ended early"
            received += len(chunk)
        service.stop(signal.SIGKILL)
        src.proc.wait_for("lost the connection to the tunnel service", 30)
        with pytest.raises(ConnectionResetError):
            received += _read_to_the_end(sock)
        assert received < size


def _read_to_the_end(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(1 << 20):
        total += len(chunk)
    return total
