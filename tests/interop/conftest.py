"""Fixtures for the interoperability tests: the reference C++ localproxy as a peer, a
byte-for-byte relay standing in for the tunnel service, and the backends behind a destination.

The reference binary is ``$LOCALPROXY`` or ``<checkout>/../shared/peers/localproxy/
localproxy-x86_64``; tests that need it are skipped, with the reason, when it is missing or
cannot run here. It takes its access token from ``AWSIOT_TUNNEL_ACCESS_TOKEN``, never argv, and
runs with its working directory in the test's temporary directory (it reads ``./config``).
It logs to stderr and mostly exits 0, so a failed test prints every process's log.

What the reference does that the tests work around (each seen with the reference at both
ends too), so that they test iotunnel and not the reference's limits:

- ``-c`` is an OpenSSL CA *directory* (hashed, as ``c_rehash`` makes it); a CA file trusts
  nothing. ``-k`` turns certificate verification off.
- As a source with ``-y V1``/``-y V2`` it closes its listener while it carries a connection and
  listens again after it (``Peers.relisten`` waits for that, without a probe connection); as a
  V2 source, a STREAM_RESET from the destination stops it reading its WebSocket until it accepts
  another TCP connection (so V2 HTTP clients close first: ``http_get_client_closes``).
- As a destination it takes a V1 source's STREAM_START (no service id) only with ``-y V1``.
- ``-b`` in destination mode is the host of port-only ``-d`` mappings; it does not bind the
  outgoing sockets.
- Its unpaced source buffers without bound: traffic through it is paced (one SSH chunk in
  flight) and small (64 KiB HTTP bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import re
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from proxy.protocol.framing import encode
from proxy.protocol.messages import Message, MessageType
from testbed.clients import echo_roundtrips, http_get, recv_exactly
from testbed.harness import HarnessError, Proc, Stack, free_port
from testbed.pki import PKI, CertPair, self_signed
from testbed.reference import find_localproxy
from testbed.sshd import SshSetup, ssh_command, sshd_binary

ROOT = Path(__file__).resolve().parent.parent.parent
#: The line the reference logs once its WebSocket is up.
REFERENCE_CONNECTED = "Successfully established websocket connection with proxy server"
V1_SUBPROTOCOL = "aws.iot.securetunneling-1.0"


# --------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class LocalProxy:
    """The reference C++ localproxy, started as a process of a :class:`Stack`."""

    binary: Path

    def start(
        self,
        stack: Stack,
        name: str,
        port: int,
        args: Sequence[str],
        *,
        token: str,
        ca_dir: Path | None = None,
        insecure: bool = False,
    ) -> Proc:
        """Run it against ``wss://127.0.0.1:port`` (the token in its environment only)."""
        argv = [str(self.binary), "-e", f"127.0.0.1:{port}", "-v", "5"]
        if ca_dir is not None:
            argv += ["-c", str(ca_dir)]
        if insecure:
            argv.append("-k")
        return stack.start(name, [*argv, *args], env={"AWSIOT_TUNNEL_ACCESS_TOKEN": token})

    def destination(
        self,
        stack: Stack,
        port: int,
        mapping: str,
        *,
        name: str = "ref-destination",
        args: Sequence[str] = (),
        **kw: Any,
    ) -> Proc:
        """A destination (``-d mapping``), once its WebSocket is up."""
        proc = self.start(stack, name, port, ["-d", mapping, *args], **kw)
        proc.wait_for(REFERENCE_CONNECTED, timeout=30)
        return proc

    def source(
        self,
        stack: Stack,
        port: int,
        mapping: str,
        listens: Sequence[int],
        *,
        name: str = "ref-source",
        host: str = "127.0.0.1",
        args: Sequence[str] = (),
        **kw: Any,
    ) -> Proc:
        """A source (``-s mapping``), once it listens on each of ``listens`` at ``host``."""
        proc = self.start(stack, name, port, ["-s", mapping, *args], **kw)
        proc.wait_for(REFERENCE_CONNECTED, timeout=30)
        for listen in listens:
            wait_listening(proc, host, listen)
        return proc


@pytest.fixture(scope="session")
def localproxy() -> LocalProxy:
    """The reference binary; skips the test where it cannot run."""
    path, reason = find_localproxy()
    if path is None:
        pytest.skip(reason)
    return LocalProxy(path)


def listening(host: str, port: int) -> bool:
    """Whether a TCP socket listens on ``host:port`` (IPv4), read from /proc: no probe
    connection (a V1 or V2 reference source takes a probe for its one connection)."""
    wanted = {_hex_address(host, port), _hex_address("0.0.0.0", port)}
    return any(f[1] in wanted and f[3] == "0A" for f in _tcp_table())  # TCP_LISTEN


def _tcp_table() -> list[list[str]]:
    """The rows of /proc/net/tcp (IPv4 sockets), split into fields."""
    return [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]


def _hex_address(host: str, port: int) -> str:
    """``host:port`` as /proc/net/tcp writes it."""
    return f"{int.from_bytes(socket.inet_aton(host), sys.byteorder):08X}:{port:04X}"


def wait_listening(proc: Proc, host: str, port: int, timeout: float = 30.0) -> None:
    """Wait until ``proc`` listens on ``host:port``; raise with its output if it does not."""
    deadline = time.monotonic() + timeout
    while not listening(host, port):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            state = "exited" if proc.popen.poll() is not None else "still running"
            raise HarnessError(
                f"{proc.name} does not listen on {host}:{port} ({state}):\n{proc.output()[-4000:]}"
            )
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, stack: Stack) -> Iterator[None]:
    """Print every process's output when the test failed (the reference mostly exits 0 and
    says why only in its log)."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for proc in stack.procs:
            print(f"---------------- {proc.name} (pid {proc.pid}) ----------------")
            print(proc.output()[-6000:])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.e2e)


# --------------------------------------------------------------------------- the relay


@dataclass
class Relay:
    """A stand-in for the tunnel service that checks nothing: it pairs one source and one
    destination connection (by ``local-proxy-mode``) and forwards every WebSocket message
    untouched, both ways. Like the service it echoes a subprotocol (the first one offered) and
    sends SERVICE_IDS at connect (unless that is the V1 one). Runs on its own thread.

    ``contexts`` names its TLS listeners (say, one with a certificate of the test CA and one
    self-signed); all of them reach the same pair.
    """

    services: tuple[str, ...]
    contexts: Mapping[str, ssl.SSLContext]
    #: port of each listener, by name
    ports: dict[str, int] = field(default_factory=dict)
    #: subprotocols each connection offered, by mode, in order
    offered: dict[str, list[list[str]]] = field(default_factory=dict)
    #: WebSocket messages and bytes forwarded from each mode
    messages: dict[str, int] = field(default_factory=dict)
    forwarded: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._thread.start()
        self._servers: list[Server] = []
        self._peers: dict[str, ServerConnection] = {}
        self._changed: asyncio.Condition | None = None
        self._closing = False
        self._lock = threading.Condition()
        for mode in ("source", "destination"):
            self.offered[mode] = []
            self.messages[mode] = self.forwarded[mode] = 0
        for name, context in self.contexts.items():
            self.ports[name] = self._call(self._listen(context))

    def _call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _listen(self, context: ssl.SSLContext) -> int:
        if self._changed is None:
            self._changed = asyncio.Condition()
        server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            ssl=context,
            process_request=self._process_request,
            select_subprotocol=lambda _, offered: offered[0] if offered else None,
            compression=None,
            max_size=None,
        )
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    @staticmethod
    def _mode(connection: ServerConnection | Request) -> str:
        request = connection if isinstance(connection, Request) else connection.request
        assert request is not None
        return parse_qs(urlsplit(request.path).query).get("local-proxy-mode", [""])[0]

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self._mode(request) not in ("source", "destination"):
            return connection.respond(400, "local-proxy-mode must be source or destination\n")
        offered = [
            name.strip()
            for value in request.headers.get_all("Sec-WebSocket-Protocol")
            for name in value.split(",")
        ]
        with self._lock:
            self.offered[self._mode(request)].append(offered)
            self._lock.notify_all()
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert self._changed is not None
        mode = self._mode(ws)
        other = "destination" if mode == "source" else "source"
        if ws.subprotocol not in (None, V1_SUBPROTOCOL):
            services = Message(MessageType.SERVICE_IDS, available_service_ids=self.services)
            await ws.send(encode(services))
        replaced = self._peers.get(mode)
        async with self._changed:
            self._peers[mode] = ws
            self._changed.notify_all()
        if replaced is not None:
            await replaced.close(1000, "replaced by a new connection")
        try:
            async for data in ws:
                async with self._changed:
                    await self._changed.wait_for(lambda: other in self._peers or self._closing)
                    if self._closing:
                        return
                    partner = self._peers[other]
                with self._lock:
                    self.messages[mode] += 1
                    self.forwarded[mode] += len(data)
                with contextlib.suppress(ConnectionClosed):
                    await partner.send(data)
        except ConnectionClosed:
            pass
        finally:
            async with self._changed:
                if self._peers.get(mode) is ws:
                    del self._peers[mode]
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Wait until ``predicate()`` holds (evaluated under the relay's lock)."""
        with self._lock:
            if not self._lock.wait_for(predicate, timeout):
                raise HarnessError(f"relay: no {what} within {timeout} s")

    def close(self) -> None:
        async def stop() -> None:
            if self._changed is not None:
                async with self._changed:
                    self._closing = True  # no more waiting for a partner
                    self._changed.notify_all()
            for server in self._servers:
                server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    for server in self._servers:
                        await server.wait_closed()
            # What remains: connections still in their opening handshake (a proxy reconnecting).
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self._call(stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


@pytest.fixture(scope="session")
def untrusted(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    """A self-signed certificate for loopback: right names, no trusted issuer."""
    return self_signed(tmp_path_factory.mktemp("self-signed"))


@pytest.fixture
def relay_factory(pki: PKI, untrusted: CertPair) -> Iterator[Callable[..., Relay]]:
    """``relay_factory(services)``: a :class:`Relay` with listeners ``"ca"`` (a certificate of
    the test CA) and ``"self-signed"``; closed after the test."""
    relays: list[Relay] = []

    def factory(services: Sequence[str]) -> Relay:
        insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        insecure.load_cert_chain(untrusted.cert, untrusted.key)
        relay = Relay(tuple(services), {"ca": pki.server_context(), "self-signed": insecure})
        relays.append(relay)
        return relay

    yield factory
    for relay in relays:
        relay.close()


@pytest.fixture(scope="session")
def ca_dir(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test CA in a hashed CA directory (what the reference's ``-c`` takes)."""
    return pki.hashed_ca_directory(tmp_path_factory.mktemp("ca-dir"))


def token() -> str:
    """A random access token (the relay checks none)."""
    return secrets.token_urlsafe(32)


# --------------------------------------------------------------------------- backends, traffic


@dataclass
class Backends:
    """What a destination reaches: an HTTP server, and sshd (or an echo server without it)."""

    http: int
    ssh: int
    ssh_setup: SshSetup | None
    www: Path

    def mapping(self, host: str = "") -> str:
        """``-d`` for HTTP1 and SSH1, with ``host:`` before each port if given."""
        prefix = f"{host}:" if host else ""
        return f"HTTP1={prefix}{self.http},SSH1={prefix}{self.ssh}"


@pytest.fixture
def backends(stack: Stack, www: Path) -> Backends:
    _, http = stack.http_server(www)
    if sshd_binary() is not None:
        _, ssh, setup = stack.sshd()
        return Backends(http, ssh, setup, www)
    _, echo = stack.echo_server()
    return Backends(http, echo, None, www)


class Session:
    """One interactive byte stream through the tunnel: ``ssh host cat`` with the real client
    when sshd runs behind the destination, else a plain connection to the echo server.
    Every chunk sent comes back; both directions are hashed."""

    CHUNK = 16 * 1024

    def __init__(self, backends: Backends, port: int, host: str = "127.0.0.1") -> None:
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.count = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        if backends.ssh_setup is not None:
            argv = ssh_command(backends.ssh_setup, port, "cat")
            if host != "127.0.0.1":
                argv[argv.index(f"{backends.ssh_setup.user}@127.0.0.1")] = (
                    f"{backends.ssh_setup.user}@{host}"
                )
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        else:
            self._sock = socket.create_connection((host, port), timeout=30)

    def exchange(self) -> None:
        """Send one chunk and read it back."""
        data = hashlib.sha256(self.count.to_bytes(8, "big")).digest() * (self.CHUNK // 32)
        self.count += 1
        self.sent.update(data)
        if self._proc is not None:
            assert self._proc.stdin is not None
            assert self._proc.stdout is not None
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
            back = _read_exactly(self._proc.stdout, len(data))
        else:
            assert self._sock is not None
            self._sock.sendall(data)
            back = recv_exactly(self._sock, len(data))
        self.received.update(back)

    def close(self) -> None:
        """End the session; raise if it failed or the bytes differ."""
        if self._proc is not None:
            try:  # closes ssh's stdin: the remote cat ends
                _, err = self._proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                _, err = self._proc.communicate()
            assert self._proc.returncode == 0, f"ssh failed: {err.decode(errors='replace')}"
        elif self._sock is not None:
            self._sock.close()
        assert self.count
        assert self.received.hexdigest() == self.sent.hexdigest()

    def abort(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.communicate()  # and close its pipes
        if self._sock is not None:
            self._sock.close()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)  # a buffered pipe reads until size or EOF
    if len(data) != size:
        raise ConnectionError(f"the session ended with {size - len(data)} of {size} bytes missing")
    return data


def session(backends: Backends, port: int, *, chunks: int = 8, host: str = "127.0.0.1") -> None:
    """A whole :class:`Session` of ``chunks`` exchanges."""
    s = Session(backends, port, host)
    try:
        for _ in range(chunks):
            s.exchange()
    except BaseException:
        s.abort()
        raise
    s.close()


def http_and_ssh_at_once(
    backends: Backends,
    http: int,
    ssh: int,
    *,
    parallel: int = 6,
    requests: int = 12,
    after_request: Callable[[int], None] | None = None,
    get: Callable[[int, str], tuple[int, bytes]] = http_get,
) -> None:
    """HTTP GETs (``parallel`` at a time) while one SSH session stays open and carries bytes
    both ways; every body and the session's bytes must arrive intact.

    The session exchanges a chunk before the first request and after the last, and keeps
    exchanging while requests are in flight (one chunk in flight at a time: a paced load).
    ``after_request(n)``, if given, runs after the n-th request (then one at a time).
    """
    blob = (backends.www / "blob.bin").read_bytes()

    def browse(count: int) -> list[tuple[int, bytes]]:
        results = []
        for number in range(1, count + 1):
            results.append(get(http, "/blob.bin"))
            if after_request is not None:
                after_request(number)
        return results

    if after_request is not None:
        parallel = 1
    s = Session(backends, ssh)
    try:
        s.exchange()
        with ThreadPoolExecutor(parallel) as pool:
            if parallel == 1:
                futures = [pool.submit(browse, requests)]
            else:
                futures = [pool.submit(browse, 1) for _ in range(requests)]
            while not all(f.done() for f in futures) and s.count < 200:
                s.exchange()
            results = [result for f in futures for result in f.result(120)]
        s.exchange()
    except BaseException:
        s.abort()
        raise
    s.close()
    digests = {(status, hashlib.sha256(body).hexdigest()) for status, body in results}
    assert digests == {(200, hashlib.sha256(blob).hexdigest())}
    assert len(results) == requests


# --------------------------------------------------------------------------- one tunnel


@dataclass(frozen=True)
class Endpoint:
    """Where both proxies connect (the service or a relay) and their access tokens."""

    port: int
    source_token: str
    destination_token: str


@dataclass
class Peers:
    """A destination and a source proxy on one tunnel, and where the source listens."""

    source: Proc
    destination: Proc
    ports: dict[str, int]
    #: which role the reference plays
    reference: str
    version: int

    def relisten(self, service: str, connections: int) -> None:
        """After ``connections`` connections to ``service`` have closed, wait until the source
        listens again: a V1 or V2 reference source closes its listener while it carries a
        connection (and says so in its log before it listens again). Nothing to wait for
        with iotunnel or V3."""
        if self.reference != "source" or self.version == 3:
            return
        port = self.ports[service]
        line = re.compile(rf"Listening for new connection on port {port}$", re.MULTILINE)
        deadline = time.monotonic() + 30
        while len(line.findall(self.source.output())) < connections + 1:
            if self.source.popen.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.source.name} did not listen again on {port} after {connections} "
                    f"connection(s):\n{self.source.output()[-4000:]}"
                )
            time.sleep(0.02)
        wait_listening(self.source, "127.0.0.1", port)


def start_peers(
    stack: Stack,
    localproxy: LocalProxy,
    pki: PKI,
    ca_dir: Path,
    endpoint: Endpoint,
    backends: Backends,
    *,
    reference: str,
    version: int = 3,
) -> Peers:
    """The reference as ``reference`` ("source" or "destination") and iotunnel as the other
    role, destination first. Versions 3 and 2 carry HTTP1 and SSH1; version 1 one unnamed
    service (``-d PORT``/``-s PORT``) to an echo server: with sshd, the server may close first,
    and a V1 or V2 reference destination that sends the STREAM_RESET then stops reading its
    WebSocket for good (its next connection would hang).

    ``-y V1|V2`` goes to the source; a V1 reference destination needs ``-y V1`` too (it takes
    a STREAM_START without a service id for one only then).
    """
    compat = [] if version == 3 else ["-y", f"V{version}"]
    dst_mapping = str(stack.echo_server()[1]) if version == 1 else backends.mapping()
    services = ["SSH1"] if version == 1 else ["HTTP1", "SSH1"]
    if reference == "source":
        destination = stack.destination(
            endpoint.destination_token, endpoint.port, dst_mapping, ca=pki.ca.cert
        )
        ports = {sid: free_port() for sid in services}
        if version == 1:
            src_mapping = str(ports["SSH1"])
        else:
            src_mapping = ",".join(f"{sid}={port}" for sid, port in ports.items())
        source = localproxy.source(
            stack,
            endpoint.port,
            src_mapping,
            list(ports.values()),
            args=compat,
            token=endpoint.source_token,
            ca_dir=ca_dir,
        )
        return Peers(source, destination, ports, reference, version)
    destination = localproxy.destination(
        stack,
        endpoint.port,
        dst_mapping,
        args=compat if version == 1 else [],
        token=endpoint.destination_token,
        ca_dir=ca_dir,
    )
    src_mapping = "0" if version == 1 else "HTTP1=0,SSH1=0"
    ours = stack.source(
        endpoint.source_token, endpoint.port, src_mapping, services, ca=pki.ca.cert, extra=compat
    )
    return Peers(ours.proc, destination, ours.ports, reference, version)


def http_get_client_closes(port: int, path: str) -> tuple[int, bytes]:
    """A GET on a keep-alive connection that the client closes once it has the response.

    For a V2 reference source: a STREAM_RESET from the destination (the server closed first)
    makes it stop reading its WebSocket until it accepts another TCP connection, which stalls
    its other services (reproduced with the reference at both ends).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def carry_traffic(peers: Peers, backends: Backends) -> None:
    """What each protocol version can carry, end to end and checked byte for byte.

    V3: parallel HTTP requests while an SSH session runs. V2 (one connection per service at
    a time): HTTP requests one after another while an SSH session runs. V1 (one service, one
    connection): two echo sessions one after the other, each closed by the client.
    """
    if peers.version == 3:
        http_and_ssh_at_once(backends, peers.ports["HTTP1"], peers.ports["SSH1"])
    elif peers.version == 2:
        http_and_ssh_at_once(
            backends,
            peers.ports["HTTP1"],
            peers.ports["SSH1"],
            requests=4,
            after_request=lambda n: peers.relisten("HTTP1", n),
            get=http_get_client_closes,
        )
    else:
        assert echo_roundtrips(peers.ports["SSH1"], 20, size=4096) == 20
        peers.relisten("SSH1", 1)
        assert echo_roundtrips(peers.ports["SSH1"], 20, size=4096) == 20
