"""The ``/tunnel`` WebSocket endpoint: a thin websockets layer over the pure rules.

:mod:`service.handshake` decides who may connect, :mod:`service.pairing` what is relayed; this
module moves bytes. Each connection runs one handler task that reads a WebSocket message,
decodes its tunnel frames, and awaits the send to the other peer before it reads the next one:
a slow receiver slows its sender down, and no queue grows without bound (websockets buffers at
most ``MAX_QUEUE`` incoming messages per connection, then stops reading the socket).

With a bandwidth cap (:class:`Bandwidth`), each tunnel has a token bucket per direction: a
handler charges each message it reads to its direction's bucket and, when the bucket is in
debt, holds the message (and so stops reading from its sender) for exactly as long as the debt
takes to pay back. One sleep per message at most; no per-byte work. Bytes queued in front of
the bucket wait in arrival order whatever their stream, so that queue is kept short (one
WebSocket message, a small kernel receive buffer): the backlog stays in the sending proxy.

The registry's connection states (``sourceConnectionState``/``destinationConnectionState`` of
DescribeTunnel) follow the peers: set when the first peer of a mode attaches, cleared when the
last one leaves.

Failed handshakes (401, 403, 404) are throttled per source address (:mod:`service.throttle`):
an address out of failures gets 429 with ``Retry-After`` until it has earned one back.

Close codes sent by the service: 1000 when the tunnel is closed or expires, when the peer's
access token is rotated, or when the peer is replaced by a new connection of the same mode;
1001 when the service shuts down, 1002 for an undecodable tunnel frame, 1003 for a text
message, 1009 for a message over the size limit (131076 bytes unless configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from iotunnel.mode import Mode
from proxy.io.memory import HeapTrimmer
from proxy.io.sockets import RECEIVE_BUFFER, tune_listener, tune_transport
from proxy.protocol.errors import RemoteProtocolError
from proxy.protocol.framing import MAX_WS_MESSAGE, Decoder
from proxy.protocol.messages import MAX_MESSAGE, Message
from service.bandwidth import TokenBucket
from service.handshake import Admission, Candidate, HandshakeRequest, Refusal, check, claim
from service.pairing import Pairing, describe, pack
from service.registry import TunnelRegistry
from service.throttle import COUNTED, DEFAULT_THROTTLE, HandshakeThrottle, ThrottleSettings

log = logging.getLogger(__name__)

#: Seconds between the service's keepalive pings.
PING_INTERVAL = 20.0
#: Seconds to wait for a pong before dropping a peer: generous, since a pong can queue behind
#: a large upload on a slow link, and an idle peer is not a dead one.
PING_TIMEOUT = 60.0
#: Incoming WebSocket messages websockets buffers per connection before it stops reading.
MAX_QUEUE = 4
#: websockets' write buffer high-water mark per connection (small: see _handle).
WRITE_LIMIT = 16 * 1024
#: Seconds allowed for the opening and the closing handshakes.
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0

_SENSITIVE_HEADERS = frozenset({"access-token", "client-token", "cookie"})
_DATA_OPCODES = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})


class _RedactFilter(logging.Filter):
    """Keep tokens and payloads out of websockets' debug log.

    websockets logs every request header (``< access-token: ...``) and a preview of every
    frame's payload at DEBUG: show ``[secure]`` for token-bearing headers and only the size
    of data frames.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or not args:
            return True
        first = args[0]
        if isinstance(first, str) and len(args) == 2 and first.lower() in _SENSITIVE_HEADERS:
            record.args = (first, "[secure]")
        elif isinstance(first, Frame) and first.opcode in _DATA_OPCODES:
            record.args = (f"{first.opcode.name} [{len(first.data)} bytes]", *args[1:])
        return True


#: The logger handed to websockets, with tokens and payloads redacted.
ws_log = logging.getLogger("service.websockets")
ws_log.addFilter(_RedactFilter())


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """A per-tunnel, per-direction bandwidth cap: ``rate`` bytes/s, bursts of ``burst`` bytes.

    ``receive_buffer`` is the kernel receive buffer (SO_RCVBUF) of each connection while a cap
    is on: what may queue, unordered by stream, in front of the bucket. By default about 10 ms
    of the rate (at least 8 KiB): short enough that the backlog stays with the sender, whose
    scheduler keeps streams fair (bench scenario 4), and long enough not to limit the rate by
    the window on a real network.
    """

    rate: float
    burst: float
    receive_buffer: int = 0

    def __post_init__(self) -> None:
        if self.receive_buffer <= 0:
            object.__setattr__(self, "receive_buffer", max(8 * 1024, int(self.rate * 0.01)))


@dataclass(eq=False)
class _Peer:
    """One accepted connection, as the pairing sees it (compared by identity)."""

    ws: ServerConnection
    tunnel_id: str
    mode: Mode
    subprotocol: str
    version: int
    channel_id: str
    dropped: int = 0

    def __str__(self) -> str:
        return f"tunnel {self.tunnel_id} {self.mode} [channel-id {self.channel_id}]"


class TunnelService:
    """The data plane of the self-hosted tunnel service.

    Usage::

        async with TunnelService(registry, ssl_context=context) as service:
            port = await service.start("127.0.0.1", 0)
            ...
            await service.close_tunnel("tunnel-1")

    Tunnels live in ``registry``; tunnels opened there while the service runs are served at
    once. Close a tunnel through :meth:`close_tunnel` (not the registry), so that its
    connections are closed too.
    """

    def __init__(
        self,
        registry: TunnelRegistry,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ping_interval: float | None = PING_INTERVAL,
        ping_timeout: float | None = PING_TIMEOUT,
        max_message: int = MAX_WS_MESSAGE,
        max_frame: int = MAX_MESSAGE,
        bandwidth: Bandwidth | None = None,
        throttle: ThrottleSettings | None = DEFAULT_THROTTLE,
    ) -> None:
        self._registry = registry
        self._throttle = (
            HandshakeThrottle(throttle) if throttle is not None and throttle.enabled else None
        )
        self._max_message = max_message
        self._max_frame = max_frame
        self._bandwidth = bandwidth
        self._receive_buffer = RECEIVE_BUFFER if bandwidth is None else bandwidth.receive_buffer
        self._buckets: dict[tuple[str, Mode], TokenBucket] = {}
        #: seconds the bandwidth cap has held messages back, in total (a statistic)
        self.paced_seconds = 0.0
        self._ssl = ssl_context
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._server: Server | None = None
        self._url: str | None = None
        self._port: int | None = None
        self._pairings: dict[str, Pairing[_Peer]] = {}
        self._candidates: weakref.WeakKeyDictionary[ServerConnection, Candidate] = (
            weakref.WeakKeyDictionary()
        )
        self._admissions: weakref.WeakKeyDictionary[ServerConnection, Admission] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: set[asyncio.Task[None]] = set()
        #: set (and replaced) whenever a peer attaches or detaches
        self._peers_changed = asyncio.Event()
        #: returns what connections leave as holes in the heap (see proxy/io/memory.py)
        self.trimmer = HeapTrimmer()

    @property
    def registry(self) -> TunnelRegistry:
        """The tunnels this service serves."""
        return self._registry

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("service not started")
        return self._port

    @property
    def url(self) -> str:
        """``wss://host:port`` (``ws://`` without TLS), after :meth:`start`."""
        if self._url is None:
            raise RuntimeError("service not started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port) and return the bound port.

        A host name that resolves to several addresses binds each of them; with port 0 they
        may get different ports, and the first one is returned. Give an address to avoid that.
        """
        if self._server is not None:
            raise RuntimeError("service already started")
        self._server = await serve(
            self._handle,
            host,
            port,
            ssl=self._ssl,
            process_request=self._process_request,
            process_response=self._process_response,
            select_subprotocol=self._select_subprotocol,
            compression=None,
            max_size=self._max_message,
            # With a cap, queue as little as possible in front of the bucket (see start()).
            max_queue=MAX_QUEUE if self._bandwidth is None else 1,
            write_limit=WRITE_LIMIT,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            open_timeout=OPEN_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            server_header="iotunnel-service",
            logger=ws_log,
        )
        for sock in self._server.sockets:
            tune_listener(sock, receive_buffer=self._receive_buffer)
        self._port = self._server.sockets[0].getsockname()[1]
        scheme = "ws" if self._ssl is None else "wss"
        shown = f"[{host}]" if ":" in host else host
        self._url = f"{scheme}://{shown}:{self._port}"
        log.info("listening on %s", self._url)
        if self._bandwidth is not None:
            log.info(
                "bandwidth cap: %.0f bytes/s per tunnel and direction, bursts of %.0f bytes",
                self._bandwidth.rate,
                self._bandwidth.burst,
            )
        return self._port

    async def close(self) -> None:
        """Stop listening and close every connection (code 1001); idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        while self._tasks:
            await asyncio.gather(*self._tasks)
        self.trimmer.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def peer_connected(self, tunnel_id: str, mode: Mode | str) -> bool:
        """Whether a ``mode`` peer is connected to tunnel ``tunnel_id``."""
        pairing = self._pairings.get(tunnel_id)
        return pairing is not None and pairing.peer(Mode(mode)) is not None

    async def wait_for_peer(
        self, tunnel_id: str, mode: Mode | str, *, connected: bool = True
    ) -> None:
        """Return once a ``mode`` peer is connected to ``tunnel_id`` (or, not ``connected``, not).

        Wrap it in :func:`asyncio.timeout`: it waits for as long as it takes.
        """
        while self.peer_connected(tunnel_id, mode) is not connected:
            await self._peers_changed.wait()

    def _notify_peers_changed(self) -> None:
        self._peers_changed.set()
        self._peers_changed = asyncio.Event()

    async def close_tunnel(self, tunnel_id: str) -> None:
        """Mark the tunnel closed and close both its connections with code 1000.

        Connections with its tokens are refused from now on (410).

        Raises:
            service.registry.UnknownTunnel: no such tunnel.
        """
        self._registry.close_tunnel(tunnel_id)
        log.info("tunnel %s closed", tunnel_id)
        await self.end_tunnel(tunnel_id, "tunnel closed")

    async def end_tunnel(self, tunnel_id: str, reason: str) -> None:
        """Close both connections of a tunnel with code 1000 and ``reason``, without STREAM_RESETs.

        The caller has closed (or deleted) the tunnel in the registry first, so that no new
        connection is admitted.
        """
        self._drop_buckets(tunnel_id)
        pairing = self._pairings.pop(tunnel_id, None)
        if pairing is None:
            return
        peers = [peer for mode in Mode if (peer := pairing.peer(mode)) is not None]
        for peer in peers:
            pairing.detach(peer.mode, peer)  # no STREAM_RESETs: both ends are closing
        for mode in Mode:
            self._sync_state(tunnel_id, mode)
        self._notify_peers_changed()
        await asyncio.gather(*(p.ws.close(CloseCode.NORMAL_CLOSURE, reason) for p in peers))

    async def disconnect(self, tunnel_id: str, modes: Iterable[Mode], reason: str) -> None:
        """Close the connections of ``modes`` of a tunnel with code 1000 and ``reason``.

        The other end stays connected and gets STREAM_RESETs for the active streams (used when
        the access tokens of ``modes`` are rotated).
        """
        pairing = self._pairings.get(tunnel_id)
        if pairing is None:
            return
        peers = [peer for mode in modes if (peer := pairing.peer(mode)) is not None]
        for peer in peers:
            log.info("%s: closing: %s", peer, reason)
        await asyncio.gather(*(p.ws.close(CloseCode.NORMAL_CLOSURE, reason) for p in peers))

    def _sync_state(self, tunnel_id: str, mode: Mode) -> None:
        """Record in the registry whether a ``mode`` peer of the tunnel is connected."""
        self._registry.set_connected(tunnel_id, mode, self.peer_connected(tunnel_id, mode))

    def _drop_buckets(self, tunnel_id: str) -> None:
        for mode in Mode:
            self._buckets.pop((tunnel_id, mode), None)

    async def _pace(self, peer: _Peer, size: int) -> None:
        """Charge ``size`` bytes to the sender's bucket; hold them while it is in debt."""
        if self._bandwidth is None:
            return
        key = (peer.tunnel_id, peer.mode)
        now = self._pace_time()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self._bandwidth.rate, self._bandwidth.burst, now)
            self._buckets[key] = bucket
        delay = bucket.take(size, now)
        if delay > 0:
            self.paced_seconds += delay
            await self._pace_sleep(delay)

    def _pace_time(self) -> float:
        """The monotonic time of the bandwidth cap (a seam for tests)."""
        return asyncio.get_running_loop().time()

    async def _pace_sleep(self, delay: float) -> None:
        """Hold a sender back for ``delay`` seconds (a seam for tests)."""
        await asyncio.sleep(delay)

    # Handshake hooks (websockets calls them in this order, without awaiting in between).

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self._throttle is not None:
            key = self._throttle.key(_host(connection))
            wait = self._throttle.retry_after(key, self._throttle_time())
            if wait:  # before anything of the request is looked at
                return self._throttled(connection, key, wait)
        outcome = check(
            HandshakeRequest(request.path, list(request.headers.raw_items())), self._registry
        )
        if isinstance(outcome, Refusal):
            return self._refuse(connection, outcome)
        self._candidates[connection] = outcome
        return None

    def _select_subprotocol(
        self, connection: ServerConnection, offered: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        candidate = self._candidates.get(connection)
        return None if candidate is None else Subprotocol(candidate.subprotocol)

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        candidate = self._candidates.pop(connection, None)
        if candidate is None or response.status_code != 101:
            return None
        outcome = claim(candidate, self._registry)
        if isinstance(outcome, Refusal):
            return self._refuse(connection, outcome)
        self._admissions[connection] = outcome
        response.headers["channel-id"] = str(connection.id)
        return None

    def _throttle_time(self) -> float:
        """The monotonic time of the handshake throttle (a seam for tests)."""
        return asyncio.get_running_loop().time()

    def _throttled(self, connection: ServerConnection, key: str, wait: int) -> Response:
        """429 for an address out of failed handshakes: logged once per episode, no more."""
        assert self._throttle is not None
        level = logging.INFO if self._throttle.first_refusal(key) else logging.DEBUG
        log.log(
            level,
            "refused %s: 429 too many failed handshakes from %s; throttled for %d s",
            _address(connection),
            key,
            wait,
        )
        reason = f"too many failed handshakes from this address; retry after {wait} s"
        response = connection.respond(HTTPStatus.TOO_MANY_REQUESTS, reason + "\n")
        response.headers["Retry-After"] = str(wait)
        return response

    def _refuse(self, connection: ServerConnection, refusal: Refusal) -> Response:
        if self._throttle is not None and refusal.status in COUNTED:
            key = self._throttle.key(_host(connection))
            self._throttle.failed(key, self._throttle_time())
        tunnel = f" (tunnel {refusal.tunnel_id})" if refusal.tunnel_id else ""
        log.info(
            "refused %s: %d %s%s",
            _address(connection),
            refusal.status,
            refusal.reason,
            tunnel,
        )
        return connection.respond(refusal.status, refusal.reason + "\n")

    # Connection handling.

    async def _handle(self, ws: ServerConnection) -> None:
        # Bytes queued below the relay wait in arrival order, whatever stream they belong to:
        # keep those queues short (kernel buffers, TLS read-ahead), so that the backlog stays
        # with the sending proxy, whose scheduler interleaves streams fairly. With a cap, the
        # receive buffer is smaller still: it is what waits in front of the bucket.
        tune_transport(ws.transport, receive_buffer=self._receive_buffer)
        admission = self._admissions.pop(ws)
        tunnel_id, mode = admission.tunnel_id, admission.mode
        tunnel = self._registry.find(tunnel_id)
        if tunnel is None or not tunnel.is_open:  # closed or deleted since the handshake
            await ws.close(CloseCode.NORMAL_CLOSURE, "tunnel closed")
            return
        peer = _Peer(
            ws,
            tunnel_id,
            mode,
            admission.subprotocol,
            admission.version,
            str(ws.id),
        )
        pairing = self._pairings.setdefault(tunnel_id, Pairing(tunnel.services))
        replaced = pairing.peer(mode)
        resets = pairing.attach(mode, peer)
        self._sync_state(tunnel_id, mode)
        self._notify_peers_changed()
        log.info(
            "peer connected: %s from %s, %s, client token %s",
            peer,
            _address(ws),
            peer.subprotocol,
            "yes" if admission.client_token else "no",
        )
        try:
            if peer.version >= 2:
                # The first write on this connection: anything another handler forwards to
                # it can only be written after this (websockets writes before it awaits).
                await self._send(peer, [pairing.service_ids()])
            if replaced is not None:
                log.info("%s replaced by channel-id %s", replaced, peer.channel_id)
                self._spawn(
                    replaced.ws.close(CloseCode.NORMAL_CLOSURE, "replaced by a new connection"),
                    f"close {replaced}",
                )
            await self._send(pairing.peer(mode.other), resets)
            await self._relay(pairing, peer)
        finally:
            resets = pairing.detach(mode, peer)
            if pairing.empty and self._pairings.get(tunnel_id) is pairing:
                del self._pairings[tunnel_id]
                self._drop_buckets(tunnel_id)
            self._sync_state(tunnel_id, mode)
            self._notify_peers_changed()
            log.info(
                "peer disconnected: %s, close code %s %r, %d message(s) dropped",
                peer,
                ws.close_code,
                ws.close_reason,
                peer.dropped,
            )
            await self._send(pairing.peer(mode.other), resets)
            self.trimmer.request()

    async def _relay(self, pairing: Pairing[_Peer], peer: _Peer) -> None:
        """Forward what ``peer`` sends until its connection closes."""
        decoder = Decoder(self._max_frame)
        ws = peer.ws
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            async for data in ws:
                if isinstance(data, str):
                    log.warning("%s sent a text message; closing", peer)
                    await _close_discarding(ws, CloseCode.UNSUPPORTED_DATA, "binary messages only")
                    return
                try:
                    messages = decoder.feed(data)
                except RemoteProtocolError as exc:
                    log.warning("%s: %s; closing", peer, exc)
                    await _close_discarding(
                        ws, CloseCode.PROTOCOL_ERROR, "undecodable tunnel frame"
                    )
                    return
                routing = pairing.receive(peer.mode, peer, messages)
                for drop in routing.dropped:
                    peer.dropped += 1
                    level = logging.WARNING if peer.dropped == 1 else logging.DEBUG
                    log.log(level, "%s: dropped %s: %s", peer, describe(drop.message), drop.reason)
                if debug:
                    for message in routing.forward:
                        log.debug("%s: relayed %s", peer, describe(message))
                    for message in routing.reply:
                        log.debug("%s: answered with %s", peer, describe(message))
                await self._send(peer, routing.reply)
                if routing.forward:
                    await self._pace(peer, len(data))
                await self._send(pairing.peer(peer.mode.other), routing.forward)
        except ConnectionClosed:
            pass  # reported by the caller

    async def _send(self, peer: _Peer | None, messages: list[Message]) -> None:
        """Send ``messages`` to ``peer``, batched; nothing if it is gone or going."""
        if not messages or peer is None or peer.ws.state is not State.OPEN:
            return
        try:
            for chunk in pack(messages, self._max_message):
                await peer.ws.send(chunk)
        except ConnectionClosed:
            pass  # its own handler reports the disconnection

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coroutine`` in a task that :meth:`close` waits for."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _close_discarding(ws: ServerConnection, code: CloseCode, reason: str) -> None:
    """Close ``ws`` while reading (and dropping) what it still sends.

    websockets stops reading a connection while ``MAX_QUEUE`` messages wait for the handler:
    a handler that closes instead of reading on would never see the peer's answer to its close
    frame, and the close would stall for ``CLOSE_TIMEOUT``.
    """

    async def discard() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    reader = asyncio.get_running_loop().create_task(discard(), name="discard")
    try:
        await ws.close(code, reason)
    finally:
        reader.cancel()
        await asyncio.wait([reader])  # without swallowing a cancellation of our own


def _host(connection: ServerConnection) -> str:
    """The remote host (address) of a connection, for the handshake throttle."""
    address = connection.remote_address
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


def _address(connection: ServerConnection) -> str:
    """``host:port`` of the remote end, for logs."""
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
