"""The asyncio shell around :class:`~proxy.protocol.session.TunnelSession`.

One :class:`Tunnel` owns the WebSocket to the service (reconnecting with backoff), the local
connections, and in source mode the listeners. It follows the sans-IO adapter order: feed the
session, queue what it wants sent, then carry out its actions without awaiting in between.

Data path: one local read becomes one DATA frame (at most 63 KiB) queued in the connection's
FIFO of the :class:`~proxy.io.scheduler.FairScheduler`; one received DATA frame becomes one
write to the local transport. Backpressure: a connection's reading pauses while its FIFO is
full; reading from the WebSocket pauses while a local peer has too much unread.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from proxy.config import Endpoint, Mode, ProxySettings
from proxy.errors import ConfigError, TransportError
from proxy.io.link import LinkOptions, close_cause, open_link, prepare
from proxy.io.local import LocalConnection, connect_local
from proxy.io.scheduler import FairScheduler
from proxy.logs import TRACE
from proxy.protocol.actions import (
    CloseLocal,
    ConnectionRef,
    OpenLocal,
    ServiceIdsReceived,
    WriteLocal,
)
from proxy.protocol.session import Role, TunnelSession
from proxy.retry import backoff, is_retryable

log = logging.getLogger("proxy")

EXIT_CLOSED = 0  #: the service closed the tunnel (CloseTunnel, expiry)
EXIT_CONFIG = 2  #: a usage or configuration error, including a mapping the tunnel cannot use
EXIT_REFUSED = 3  #: the service refused the handshake (4xx: bad, used or expired token)
EXIT_NETWORK = 4  #: gave up reaching the service

#: Seconds of sending (idle time left out) over which the writer measures the link's rate.
_RATE_WINDOW = 0.1


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Tunnel:
    """A running proxy: one tunnel, either role."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.tuning = settings.tuning
        role = Role.SOURCE if settings.mode is Mode.SOURCE else Role.DESTINATION
        self.session = TunnelSession(role, version=settings.peer_version)
        self.scheduler = FairScheduler(self._encode, max_quantum=self.tuning.read_chunk)
        self.conns: dict[ConnectionRef, LocalConnection] = {}
        self.listeners: dict[str, asyncio.Server] = {}
        self.ws: ClientConnection | None = None
        self._congested: list[LocalConnection] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._announced: tuple[str, ...] | None = None
        self._listeners_wanted = False
        # Without a client token an access token is single-use and a reconnect is refused; a
        # token made up here keeps reconnects working for this process's lifetime.
        client_token = settings.client_token.reveal() if settings.client_token else None
        self.link = LinkOptions(
            url=settings.url,
            access_token=settings.access_token.reveal(),
            client_token=client_token or uuid.uuid4().hex,
            ca_path=settings.ca_path,
            verify_host=settings.verify_host,
            open_timeout=self.tuning.connect_timeout,
            ping_interval=self.tuning.ping_interval,
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Run until the tunnel is closed or cannot go on; returns the exit code."""
        try:
            return await self._run()
        except _Exit as exc:
            return exc.code
        except ConfigError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        finally:
            await self._shutdown()

    async def _run(self) -> int:
        """Connect, serve, and reconnect after a delay from one backoff for every failure.

        A failed handshake and a connection the service drops alike wait the next delay of the
        backoff, which starts over only once a connection stayed up ``reconnect_reset_after``
        seconds: a service that accepts and drops every connection at once sees a few
        reconnects, not a storm. Such a short-lived connection counts as a failed attempt.
        """
        t = self.tuning
        self.link = prepare(self.link)  # the TLS context, once; a ConfigError ends the run
        clock = asyncio.get_running_loop().time
        secrets = (self.link.access_token, self.link.client_token or "")
        delays = backoff(t.reconnect_base, t.reconnect_max)
        failures = 0
        while True:
            try:
                ws, version = await open_link(self.link)
            except TransportError as exc:
                if not is_retryable(exc):
                    log.error("%s; not retrying", exc)
                    return EXIT_REFUSED
                failures += 1
                if 0 <= t.reconnect_attempts < failures:
                    log.error("%s; giving up after %d attempts", exc, failures)
                    return EXIT_NETWORK
                delay = next(delays)
                log.warning("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            connected = clock()
            try:
                closed = await self._serve(ws, version)
            finally:
                self.ws = None
                self._drop_session()
            if closed:
                return EXIT_CLOSED
            lasted = clock() - connected
            if lasted >= t.reconnect_reset_after:
                failures = 0
                delays = backoff(t.reconnect_base, t.reconnect_max)
            else:
                failures += 1
                if 0 <= t.reconnect_attempts < failures:
                    log.error(
                        "the tunnel service dropped the connection %.1f s after accepting it%s; "
                        "giving up after %d attempts",
                        lasted,
                        close_cause(ws, secrets),
                        failures,
                    )
                    return EXIT_NETWORK
            delay = next(delays)
            log.warning(
                "lost the connection to the tunnel service after %.1f s%s; reconnecting in %.1f s",
                lasted,
                close_cause(ws, secrets),
                delay,
            )
            await asyncio.sleep(delay)

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for server in self.listeners.values():
            server.close()
        for conn in list(self.conns.values()):
            conn.abort()
        self.conns.clear()
        if self.ws is not None:
            await self.ws.close()
        for server in self.listeners.values():
            await server.wait_closed()
        self.listeners.clear()

    def _drop_session(self) -> None:
        """The WebSocket is gone: every stream is invalid, queued frames are stale."""
        self.session.reset()
        self._carry_out()
        self.scheduler.clear()
        for conn in list(self.conns.values()):
            conn.abort()
        self.conns.clear()
        self._congested.clear()

    # ------------------------------------------------------------------ one WebSocket

    async def _serve(self, ws: ClientConnection, version: int) -> bool:
        """Relay until the WebSocket ends; True when the service closed the tunnel."""
        self.ws = ws
        if self.session.role is Role.SOURCE:
            self.session.version = min(self.settings.peer_version, version)
        if version == 1:
            # A 1.0 service announces no service IDs: use the configured mapping as is.
            self._on_services(None)
            await self._ensure_listeners()
        writer = asyncio.create_task(self._writer(ws), name="proxy.ws_writer")
        try:
            return await self._reader(ws)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _writer(self, ws: ClientConnection) -> None:
        """Send what the scheduler picks; measure how fast the link drains while busy.

        Only the time spent sending counts (waits for the link to drain included, waits for
        something to send excluded): a bulk transfer whose reads come in bursts leaves the
        writer idle between them, and is still measured at the link's pace.
        """
        clock = asyncio.get_running_loop().time
        busy, sent, mark = 0.0, 0, clock()
        try:
            while True:
                message = self.scheduler.pop()
                if message is None:  # idle: the busy period ends here
                    busy += clock() - mark
                    message = await self.scheduler.get()
                    mark = clock()
                await ws.send(message)
                sent += len(message)
                now = clock()
                elapsed = busy + (now - mark)
                if elapsed >= _RATE_WINDOW:
                    self.scheduler.observe_rate(sent / elapsed)
                    busy, sent, mark = 0.0, 0, now
        except ConnectionClosed:
            return

    @staticmethod
    def _encode(flow: object, data: bytes) -> tuple[bytes, ...] | None:
        assert isinstance(flow, LocalConnection)
        return None if flow.framer is None else flow.framer.pieces(data)

    async def _reader(self, ws: ClientConnection) -> bool:
        trace = log.isEnabledFor(TRACE)
        try:
            while True:
                message = await ws.recv()
                if isinstance(message, str):
                    log.error("the tunnel service sent a text message; reconnecting")
                    await ws.close(1003, "binary messages only")
                    return False
                if trace:
                    log.log(TRACE, "received %d bytes from the service", len(message))
                self.session.receive_data(message)
                self._carry_out()
                if self.session.broken:
                    await ws.close(1002, "invalid tunnel frame")
                    return False
                if self._listeners_wanted:
                    await self._ensure_listeners()
                while self._congested:
                    await self._congested.pop().wait_writable()
        except ConnectionClosed as exc:
            received = exc.rcvd
            if received is not None and received.code == 1000:
                log.info("the tunnel service closed the tunnel: %s", received.reason or "closed")
                return True
            return False

    def _carry_out(self) -> None:
        """Queue the session's control frames and carry out its actions; never awaits."""
        for frame in self.session.data_to_send():
            self.scheduler.push_control(frame)
        for action in self.session.actions():
            match action:
                case WriteLocal(conn=ref, data=data):
                    conn = self.conns.get(ref)
                    if conn is not None:
                        conn.write(data)
                        if not conn.writable:
                            self._congested.append(conn)
                case CloseLocal(conn=ref):
                    conn = self.conns.pop(ref, None)
                    if conn is not None:
                        log.debug("connection %s closed by the peer", ref)
                        self.scheduler.discard(conn)
                        conn.close()
                case OpenLocal(conn=ref):
                    self._open_local(ref)
                case ServiceIdsReceived(service_ids=ids):
                    self._on_services(ids)
                case _:  # pragma: no cover - the session produces nothing else
                    raise AssertionError(f"unexpected action {action!r}")
        for error in self.session.errors():
            log.warning("protocol error from the tunnel peer: %s", error)

    # ------------------------------------------------------------------ services

    def _on_services(self, ids: tuple[str, ...] | None) -> None:
        if ids is not None:
            log.info("the tunnel carries services: %s", ", ".join(ids) or "(none)")
        self._announced = ids
        if self.session.role is Role.DESTINATION:
            self._check_destination_mappings(ids)
        else:
            self._listeners_wanted = True

    def _named(self) -> dict[str, Endpoint]:
        return {m.service_id: m.endpoint for m in self.settings.mappings}

    def _check_destination_mappings(self, ids: tuple[str, ...] | None) -> None:
        mapped = self._named()
        if ids is None:
            return
        if "" in mapped:
            if len(ids) > 1:
                self._fail_config(
                    f"-d: an unnamed mapping needs a tunnel with one service; this one has "
                    f"{', '.join(ids)}: name them, e.g. -d {ids[0]}=PORT"
                )
            return
        missing = [s for s in ids if s not in mapped]
        if missing:
            self._fail_config(
                f"no destination mapping for service {', '.join(missing)} announced by the "
                f"tunnel: add -d {missing[0]}=PORT or a line '{missing[0]} = PORT' to the "
                f"config directory"
            )
        for extra in sorted(set(mapped) - set(ids)):
            log.warning("mapping for %s is not used: the tunnel has no such service", extra)

    def _endpoint_for(self, service_id: str) -> Endpoint | None:
        mapped = self._named()
        if service_id in mapped:
            return mapped[service_id]
        if len(mapped) == 1 and ("" in mapped or not service_id):
            return next(iter(mapped.values()))
        return None

    def _fail_config(self, text: str) -> None:
        log.error("%s", text)
        raise _Exit(EXIT_CONFIG)

    async def _ensure_listeners(self) -> None:
        """Source: listen for every service of the tunnel (free ports where none is mapped)."""
        self._listeners_wanted = False
        ids = self._announced
        mapped = self._named()
        if ids is None:
            wanted = {("" if self.session.version == 1 else sid): ep for sid, ep in mapped.items()}
        elif "" in mapped:
            if len(ids) != 1:
                self._fail_config(
                    f"-s: an unnamed mapping needs a tunnel with one service; this one has "
                    f"{', '.join(ids)}: name them, e.g. -s {ids[0]}=PORT"
                )
            wanted = {ids[0]: mapped[""]}
        else:
            wanted = {sid: mapped.get(sid, Endpoint(host=None, port=0)) for sid in ids}
        for service_id, endpoint in wanted.items():
            if service_id not in self.listeners:
                self.listeners[service_id] = await self._listen(service_id, endpoint)

    async def _listen(self, service_id: str, endpoint: Endpoint) -> asyncio.Server:
        loop = asyncio.get_running_loop()

        def factory() -> LocalConnection:
            return LocalConnection(
                self, service_id, None, high_water=self.tuning.local_write_buffer
            )

        try:
            if endpoint.path is not None:
                server = await loop.create_unix_server(factory, endpoint.path)
                where = endpoint.path
            else:
                host = endpoint.host or self.settings.bind_address or "127.0.0.1"
                server = await loop.create_server(factory, host, endpoint.port or 0, backlog=1024)
                port = server.sockets[0].getsockname()[1]
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except OSError as exc:
            raise ConfigError(f"cannot listen for {service_id or 'the tunnel'}: {exc}") from None
        log.info("service %s: listening on %s", service_id or "(unnamed)", where)
        return server

    # ------------------------------------------------------------------ local connections

    def local_connected(self, conn: LocalConnection) -> None:
        if conn.ref is not None:  # a destination connect completed
            log.debug("connection %s: connected to the local service", conn.ref)
            return
        if self.ws is None or len(self.conns) >= self.tuning.max_connections:
            log.warning(
                "refusing a connection for %s: %s",
                conn.service_id or "the tunnel",
                "not connected to the tunnel service" if self.ws is None else "too many",
            )
            conn.abort()
            return
        ref = self.session.open_connection(conn.service_id)
        conn.ref = ref
        conn.framer = self.session.framer(ref)
        self.conns[ref] = conn
        for frame in self.session.data_to_send():
            self.scheduler.push_frame(conn, frame)
        self._carry_out()
        log.debug("connection %s opened", ref)

    def local_data(self, conn: LocalConnection, data: bytes) -> None:
        # Framed when sent, at the size the link allows then (scheduler.py).
        if conn.ref is not None:
            self.scheduler.push_data(conn, data)

    def local_closed(self, conn: LocalConnection) -> None:
        ref = conn.ref
        if ref is None:
            return
        self.conns.pop(ref, None)
        if self.session.is_open(ref):
            log.debug("connection %s closed locally", ref)
            self.session.connection_closed(ref)
            for frame in self.session.data_to_send():
                self.scheduler.push_frame(conn, frame)

    def _open_local(self, ref: ConnectionRef) -> None:
        endpoint = self._endpoint_for(ref.service_id)
        if endpoint is None or len(self.conns) >= self.tuning.max_connections:
            log.warning(
                "connection %s refused: %s",
                ref,
                "no mapping for its service" if endpoint is None else "too many connections",
            )
            self.session.connection_closed(ref)
            self._carry_out()
            return
        conn = LocalConnection(self, ref.service_id, ref, high_water=self.tuning.local_write_buffer)
        conn.framer = self.session.framer(ref)
        self.conns[ref] = conn
        task = asyncio.create_task(self._connect(conn, endpoint), name=f"proxy.connect[{ref}]")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: LocalConnection, endpoint: Endpoint) -> None:
        t = self.tuning
        try:
            async with asyncio.timeout(t.connect_timeout):
                await connect_local(
                    lambda: conn, endpoint, happy_eyeballs_delay=t.happy_eyeballs_delay
                )
        except (OSError, TimeoutError) as exc:
            ref = conn.ref
            assert ref is not None
            log.warning(
                "connection %s: cannot connect to %s: %s", ref, endpoint, str(exc) or "timed out"
            )
            conn.abort()
            if self.conns.get(ref) is conn:
                del self.conns[ref]
                self.session.connection_closed(ref)
                self._carry_out()
