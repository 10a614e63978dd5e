"""The asyncio shell around :class:`~proxy.protocol.session.TunnelSession`.

One :class:`Tunnel` owns the WebSocket to the service (reconnecting with backoff), the local
connections, and in source mode the listeners. It follows the sans-IO adapter order: feed the
session, queue what it wants sent, then carry out its actions without awaiting in between.

Data path: what a local read returns is queued raw in the connection's FIFO of the
:class:`~proxy.io.scheduler.FairScheduler`, which cuts it into DATA frames (at most 63 KiB, at
the link's pace) only when it sends them; one received DATA frame becomes one write to the local
transport. Backpressure: a connection's reading pauses while its FIFO is full; reading from the
WebSocket pauses while a local peer has too much unread.

Which local endpoint or listener each service ID gets is decided by the pure rules of
:mod:`proxy.mapping`; this module carries the plan out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from iotunnel.errors import ConfigError
from iotunnel.exits import ExitCode
from iotunnel.mode import Mode
from iotunnel.status import Closed, Connected, Opened, Reconnecting, Services, StatusWriter
from proxy.config import Endpoint, ProxySettings
from proxy.errors import TransportError
from proxy.io.link import Link, LinkOptions, close_cause, open_link, prepare
from proxy.io.local import LocalConnection, connect_local
from proxy.io.scheduler import FairScheduler
from proxy.logs import TRACE
from proxy.mapping import (
    MAX_SERVICES,
    Binding,
    Plan,
    destination_endpoint,
    names,
    plan_destination,
    plan_source,
)
from proxy.protocol.actions import (
    CloseLocal,
    ConnectionRef,
    OpenLocal,
    ServiceIdsReceived,
    WriteLocal,
)
from proxy.protocol.session import TunnelSession
from proxy.retry import backoff, is_retryable

log = logging.getLogger("proxy")

#: Seconds of sending (idle time left out) over which the writer measures the link's rate.
_RATE_WINDOW = 0.1
#: A read of at most this many bytes, while nothing else waits to be sent, goes out at once
#: (see :meth:`Tunnel.local_data`).
_DIRECT_MAX = 4096


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _reason(exc: OSError) -> str:
    """The OS's reason alone (asyncio's bind errors repeat the address in their text)."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)


class _Listener:
    """A source's listening socket and the service its connections go to (None: none yet)."""

    def __init__(self, server: asyncio.Server, where: str) -> None:
        self.server = server
        self.where = where
        self.service_id: str | None = None


class Tunnel:
    """A running proxy: one tunnel, either role."""

    def __init__(self, settings: ProxySettings, status: StatusWriter | None = None) -> None:
        self.settings = settings
        #: Where the tunnel reports its state to a supervisor (iotunnel/status.py).
        self.status = status or StatusWriter(None)
        #: Why the run ended, for the status channel's exit event.
        self.exit_reason = ""
        self.tuning = settings.tuning
        role = settings.mode
        self.session = TunnelSession(role, version=settings.peer_version)
        self.scheduler = FairScheduler(self._encode, max_quantum=self.tuning.read_chunk)
        self.conns: dict[ConnectionRef, LocalConnection] = {}
        #: Source: the listeners of the configured mappings (by mapping ID, bound before the
        #: first connect) and those on free ports for unmapped services (by service ID).
        self.mapped_listeners: dict[str, _Listener] = {}
        self.free_listeners: dict[str, _Listener] = {}
        self.ws: Link | None = None
        self._congested: list[LocalConnection] = []
        #: What handling a received message raised, for the reader task to raise.
        self._failure: Exception | None = None
        self._trace = False
        #: True while the WebSocket writer waits for something to send.
        self._writer_idle = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: What to serve on this WebSocket (None until the tunnel announced its services).
        self._plan: Plan | None = None
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
            if self.session.role is Mode.SOURCE:
                # A local mistake must not spend the (maybe single-use) access token.
                await self._bind_mapped()
            return await self._run()
        except _Exit as exc:
            return exc.code
        except ConfigError as exc:
            log.error("%s", exc)
            self.exit_reason = str(exc)
            return ExitCode.CONFIG
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
                    self.exit_reason = str(exc)
                    return ExitCode.REFUSED
                failures += 1
                if 0 <= t.reconnect_attempts < failures:
                    log.error("%s; giving up after %d attempts", exc, failures)
                    self.exit_reason = f"{exc}; gave up after {failures} attempts"
                    return ExitCode.NETWORK
                delay = next(delays)
                log.warning("%s; retrying in %.1f s", exc, delay)
                self.status.emit(Reconnecting(str(exc), delay))
                await asyncio.sleep(delay)
                continue
            connected = clock()
            channel = ws.response.headers.get("channel-id") if ws.response else None
            self.status.emit(Connected(version, channel))
            try:
                closed = await self._serve(ws, version)
            finally:
                self.ws = None
                self._drop_session()
            if closed:
                self.exit_reason = "the tunnel service closed the tunnel"
                return ExitCode.CLOSED
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
                    self.exit_reason = f"the tunnel service dropped {failures} connections"
                    return ExitCode.NETWORK
            delay = next(delays)
            log.warning(
                "lost the connection to the tunnel service after %.1f s%s; reconnecting in %.1f s",
                lasted,
                close_cause(ws, secrets),
                delay,
            )
            lost = f"lost the connection after {lasted:.1f} s{close_cause(ws, secrets)}"
            self.status.emit(Reconnecting(lost, delay))
            await asyncio.sleep(delay)

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        listeners = [*self.mapped_listeners.values(), *self.free_listeners.values()]
        for listener in listeners:
            listener.server.close()
        for conn in list(self.conns.values()):
            self._report_closed(conn, "reset")
            conn.reset()
        self.conns.clear()
        if self.ws is not None:
            await self.ws.close()
        for listener in listeners:
            await listener.server.wait_closed()
        self.mapped_listeners.clear()
        self.free_listeners.clear()

    def _drop_session(self) -> None:
        """The WebSocket is gone: every stream is invalid, queued frames are stale.

        The local connections are reset (RST), not closed: what was in flight is lost, and a
        client must not take the cut for the clean end of a complete transfer.
        """
        self.session.reset()
        self._carry_out()
        self.scheduler.clear()
        for conn in list(self.conns.values()):
            self._report_closed(conn, "reset")
            conn.reset()
        self.conns.clear()
        self._congested.clear()
        self._plan = None

    # ------------------------------------------------------------------ one WebSocket

    async def _serve(self, ws: Link, version: int) -> bool:
        """Relay until the WebSocket ends; True when the service closed the tunnel."""
        self.ws = ws
        if self.session.role is Mode.SOURCE:
            self.session.version = min(self.settings.peer_version, version)
        if version == 1:
            # A 1.0 service announces no service IDs: use the configured mapping as is.
            self._on_services(None)
            if self._listeners_wanted:  # a source; a destination has nothing to listen on
                await self._ensure_listeners()
        writer = asyncio.create_task(self._writer(ws), name="proxy.ws_writer")
        try:
            return await self._reader(ws)
        finally:
            ws.release()  # what arrives from now on is for no session
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _writer(self, ws: Link) -> None:
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
                    self._writer_idle = True
                    try:
                        message = await self.scheduler.get()
                    finally:
                        self._writer_idle = False
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

    async def _reader(self, ws: Link) -> bool:
        """Do what received messages need and :meth:`_on_message` cannot do without awaiting.

        Messages are handled as they are received (in the WebSocket's ``data_received``); this
        task waits for the link's ``attention``: a local peer with too much unread (the link
        holds further messages until it has read enough), listeners to open, a broken session,
        a text message, or the end of the connection.
        """
        self._trace = log.isEnabledFor(TRACE)
        self._failure = None
        ws.take(self._on_message)
        while True:
            await ws.attention.wait()
            ws.attention.clear()
            if self._failure is not None:
                raise self._failure
            if ws.text_received:
                log.error("the tunnel service sent a text message; reconnecting")
                await ws.close(1003, "binary messages only")
                return False
            if self.session.broken:
                await ws.close(1002, "invalid tunnel frame")
                return False
            if self._listeners_wanted:
                await self._ensure_listeners()
            while self._congested:
                await self._congested.pop().wait_writable()
            ws.resume()
            if ws.state is State.CLOSED and not ws.held:
                received = ws.protocol.close_rcvd
                if received is not None and received.code == 1000:
                    log.info(
                        "the tunnel service closed the tunnel: %s", received.reason or "closed"
                    )
                    return True
                return False

    def _on_message(self, data: bytes) -> bool:
        """Handle a binary message (or part of one) from the service, as it is received.

        Returns False when the reader task has something to do first (see :meth:`_reader`).
        """
        if self._trace:
            log.log(TRACE, "received %d bytes from the service", len(data))
        try:
            self.session.receive_data(data)
            self._carry_out()
        except Exception as exc:  # a configuration error (_Exit): the reader task raises it
            self._failure = exc
            return False
        return not (self._congested or self._listeners_wanted or self.session.broken)

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
                case CloseLocal(conn=ref, reset=reset):
                    conn = self.conns.pop(ref, None)
                    if conn is not None:
                        self.scheduler.discard(conn)
                        if reset:  # the session ended: data in flight is lost
                            log.debug("connection %s reset: the tunnel session ended", ref)
                            self._report_closed(conn, "reset")
                            conn.reset()
                        else:  # the peer's end closed (we cannot tell a clean close apart)
                            log.debug("connection %s closed by the peer", ref)
                            self._report_closed(conn, "peer")
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
            log.info("the tunnel carries services: %s", names(ids) or "(none)")
            self.status.emit(Services(ids))
        mappings = self.settings.mappings
        if self.session.role is Mode.SOURCE:
            plan = plan_source(mappings, ids)
        else:
            plan = plan_destination(mappings, ids)
        if plan.error is not None:
            self._fail_config(plan.error)
        for unused in plan.unused:
            log.warning("mapping for %s is not used: the tunnel has no such service", unused)
        if plan.ignored:
            log.warning(
                "the tunnel announced more services than the %d a tunnel can have: "
                "%d of them ignored",
                MAX_SERVICES,
                plan.ignored,
            )
        self._plan = plan
        if self.session.role is Mode.SOURCE:
            self._listeners_wanted = True

    def _fail_config(self, text: str) -> None:
        log.error("%s", text)
        self.exit_reason = text
        raise _Exit(ExitCode.CONFIG)

    async def _bind_mapped(self) -> None:
        """Source: listen on every configured endpoint, before connecting to the service."""
        for mapping in self.settings.mappings:
            listener = await self._listen(
                mapping.endpoint,
                f"-s {mapping.service_id + '=' if mapping.service_id else ''}{mapping.endpoint}",
            )
            self.mapped_listeners[mapping.service_id] = listener

    async def _ensure_listeners(self) -> None:
        """Source: serve the planned services (listening on free ports where none is mapped)."""
        self._listeners_wanted = False
        plan = self._plan
        if plan is None:  # the WebSocket was lost meanwhile
            return
        serving: set[int] = set()
        for binding in plan.bindings:
            listener = await self._listener_for(binding)
            serving.add(id(listener))
            if listener.service_id != binding.service_id:
                listener.service_id = binding.service_id
                log.info(
                    "service %s: listening on %s", binding.service_id or "(unnamed)", listener.where
                )
        for listener in [*self.mapped_listeners.values(), *self.free_listeners.values()]:
            if id(listener) not in serving:
                listener.service_id = None

    async def _listener_for(self, binding: Binding) -> _Listener:
        if binding.mapping_id is not None:
            return self.mapped_listeners[binding.mapping_id]
        listener = self.free_listeners.get(binding.service_id)
        if listener is None:
            listener = await self._listen(
                binding.endpoint, f"service {binding.service_id or '(unnamed)'}"
            )
            self.free_listeners[binding.service_id] = listener
        return listener

    async def _listen(self, endpoint: Endpoint, what: str) -> _Listener:
        loop = asyncio.get_running_loop()
        holder: list[_Listener] = []

        def factory() -> LocalConnection:
            service_id = holder[0].service_id if holder else None
            return LocalConnection(
                self, service_id, None, high_water=self.tuning.local_write_buffer
            )

        host = endpoint.host or self.settings.bind_address or "127.0.0.1"
        wanted = endpoint.path or (f"[{host}]" if ":" in host else host) + f":{endpoint.port}"
        try:
            if endpoint.path is not None:
                server = await loop.create_unix_server(factory, endpoint.path)
                where = endpoint.path
            else:
                server = await loop.create_server(factory, host, endpoint.port or 0, backlog=1024)
                port = server.sockets[0].getsockname()[1]
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except OSError as exc:
            raise ConfigError(f"{what}: cannot listen on {wanted}: {_reason(exc)}") from None
        listener = _Listener(server, where)
        holder.append(listener)
        return listener

    # ------------------------------------------------------------------ local connections

    def local_connected(self, conn: LocalConnection) -> None:
        if conn.ref is not None:  # a destination connect completed
            log.debug("connection %s: connected to the local service", conn.ref)
            self._report_opened(conn)
            return
        service_id = conn.service_id
        if self.ws is None:
            refused = "not connected to the tunnel service"
        elif service_id is None:
            refused = "the tunnel has not announced a service for this listener"
        elif len(self.conns) >= self.tuning.max_connections:
            refused = "too many"
        else:
            refused = None
        if refused is not None or service_id is None:
            log.warning("refusing a connection for %s: %s", service_id or "the tunnel", refused)
            conn.abort()
            return
        ref = self.session.open_connection(service_id)
        conn.ref = ref
        conn.framer = self.session.framer(ref)
        self.conns[ref] = conn
        for frame in self.session.data_to_send():
            self.scheduler.push_frame(conn, frame)
        self._carry_out()
        log.debug("connection %s opened", ref)
        self._report_opened(conn)

    def local_data(self, conn: LocalConnection, data: bytes) -> None:
        # Framed when sent, at the size the link allows then (scheduler.py).
        if conn.ref is not None and not (
            len(data) <= _DIRECT_MAX and self._send_direct(conn, data)
        ):
            self.scheduler.push_data(conn, data)

    def _send_direct(self, conn: LocalConnection, data: bytes) -> bool:
        """Send a small read now, as the writer would, if nothing else waits to be sent.

        An idle tunnel's keystroke then leaves in the same event-loop turn as it was read,
        without waking the writer task (a turn and a task switch per message, at each proxy).
        Only when the writer is idle, the scheduler empty and the TLS transport's buffer empty:
        the order of frames and the fairness under load are the scheduler's, unchanged. The
        frame goes through websockets' Sans-I/O protocol, as ``send`` does it.
        """
        ws, framer = self.ws, conn.framer
        if not self._writer_idle or framer is None or ws is None or not self.scheduler.empty:
            return False
        transport = ws.transport
        if ws.protocol.state is not State.OPEN or transport.get_write_buffer_size():
            return False
        ws.protocol.send_binary(b"".join(framer.pieces(data)))
        for chunk in ws.protocol.data_to_send():
            transport.write(chunk)
        return True

    def local_closed(self, conn: LocalConnection) -> None:
        ref = conn.ref
        if ref is None:
            return
        self.conns.pop(ref, None)
        self._report_closed(conn, "local")
        if self.session.is_open(ref):
            log.debug("connection %s closed locally", ref)
            self.session.connection_closed(ref)
            for frame in self.session.data_to_send():
                self.scheduler.push_frame(conn, frame)

    def _report_opened(self, conn: LocalConnection) -> None:
        if conn.ref is not None and conn.opened_at is None:
            conn.opened_at = asyncio.get_running_loop().time()
            # The local end: what a destination connected to, what a source listened on.
            side = "peername" if self.session.role is Mode.DESTINATION else "sockname"
            conn.endpoint = conn.address(side)
            self.status.emit(Opened(conn.ref.service_id, str(conn.ref)))

    def _report_closed(self, conn: LocalConnection, how: str) -> None:
        """Report the end of a connection reported open, once."""
        if conn.ref is None or conn.opened_at is None:
            return
        duration = asyncio.get_running_loop().time() - conn.opened_at
        conn.opened_at = None
        ref = conn.ref
        self.status.emit(
            Closed(
                ref.service_id,
                str(ref),
                conn.bytes_written,
                conn.bytes_read,
                duration,
                how,
                conn.endpoint,
            )
        )

    def _open_local(self, ref: ConnectionRef) -> None:
        endpoint = destination_endpoint(self.settings.mappings, self._plan, ref.service_id)
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
                    lambda: conn,
                    endpoint,
                    happy_eyeballs_delay=t.happy_eyeballs_delay,
                    default_host=self.settings.bind_address,
                )
        except (OSError, TimeoutError) as exc:
            ref = conn.ref
            assert ref is not None
            if endpoint.host is None and endpoint.path is None and self.settings.bind_address:
                endpoint = Endpoint(self.settings.bind_address, endpoint.port)
            log.warning(
                "connection %s: cannot connect to %s: %s", ref, endpoint, str(exc) or "timed out"
            )
            conn.abort()
            if self.conns.get(ref) is conn:
                del self.conns[ref]
                self.session.connection_closed(ref)
                self._carry_out()
