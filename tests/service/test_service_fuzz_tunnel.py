"""Property tests of the ``/tunnel`` endpoint (hypothesis): hostile handshakes and hostile
frames after a successful one, while another tunnel carries traffic through the same service.

Invariants: every handshake gets an HTTP answer below 500 (or, for bytes that are no HTTP
request, a closed connection); a connection that sends junk is closed with one of the
documented codes (1002 undecodable frame, 1003 text, 1009 too large) or goes on; nothing in the
service's log is an error or a traceback; and the healthy tunnel relays both ways after every
single example, its peers never disconnected.

The service runs on an event loop in a thread (:class:`api_harness.ThreadedApi`); each example
runs its client coroutines on that loop. Derandomized, no example database, modest budgets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from api_harness import ThreadedApi
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from service_harness import V1, V2, V3, Harness, Peer
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from iotunnel.mode import Mode
from proxy.protocol.errors import RemoteProtocolError
from proxy.protocol.framing import MAX_WS_MESSAGE, Decoder, encode
from proxy.protocol.messages import MAX_PAYLOAD, Message
from proxy.protocol.messages import MessageType as T
from testbed.pki import PKI

settings.register_profile(
    "iotunnel-service-tunnel",
    derandomize=True,
    database=None,
    deadline=None,  # no timing assertions
    max_examples=80,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("iotunnel-service-tunnel")

SERVICES = ("SSH1", "HTTP1")
HEALTHY = "healthy"
FUZZED = "fuzzed"
TOKENS = {
    (HEALTHY, Mode.SOURCE): "healthy-source-AQGAAXiVzSmRL1VaJ22G7eRb",
    (HEALTHY, Mode.DESTINATION): "healthy-destination-AQGAAXiVzSmRL1VaJ22G7eRb",
    (FUZZED, Mode.SOURCE): "fuzzed-source-AQGAAXiVzSmRL1VaJ22G7eRb",
    (FUZZED, Mode.DESTINATION): "fuzzed-destination-AQGAAXiVzSmRL1VaJ22G7eRb",
}
CLIENT_TOKENS = {mode: f"{mode.value}-client-token-0123456789abcdef" for mode in Mode}


class LogWatch(logging.Handler):
    """Records (of any logger) that are errors, or warnings with a traceback
    (websockets logs rejected requests with a traceback at DEBUG: not a fault)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or (
            record.exc_info is not None and record.levelno >= logging.WARNING
        ):
            self.bad.append(f"{record.name}: {record.levelname}: {record.getMessage()}")


@dataclass
class Bench:
    """The service, the healthy tunnel's two peers, and the fuzzed tunnel's destination."""

    api: ThreadedApi
    harness: Harness
    log: LogWatch
    source: Peer
    destination: Peer
    drain: asyncio.Task[None]
    fuzzed_destination: ClientConnection
    ms: float
    #: marker stream id -> resolved when the fuzzed destination receives its STREAM_START
    markers: dict[int, asyncio.Future[None]]
    rounds: int = 0

    def run(self, coroutine: Any) -> Any:
        return self.api.call(coroutine, timeout=60)

    async def round_trip(self) -> None:
        """One DATA message each way on the healthy tunnel."""
        self.rounds += 1
        payload = f"round {self.rounds}".encode()
        async with asyncio.timeout(10_000 * self.ms):
            await self.source.send(
                Message(T.DATA, stream_id=1, service_id="SSH1", connection_id=1, payload=payload)
            )
            assert await _next_data(self.destination) == payload
            await self.destination.send(
                Message(
                    T.DATA, stream_id=1, service_id="SSH1", connection_id=1, payload=payload[::-1]
                )
            )
            assert await _next_data(self.source) == payload[::-1]

    def healthy(self, *, fuzzed_destination: bool = True) -> None:
        """The invariants after each example (and whether the fuzzed tunnel's destination must
        still be connected: junk from its source must not cost it its connection)."""
        self.run(self.round_trip())
        assert self.log.bad == []
        if fuzzed_destination:
            assert not self.drain.done(), "the fuzzed tunnel's destination was disconnected"


async def _next_data(peer: Peer) -> bytes:
    while True:
        message = await peer.next()
        if message.type == T.DATA:
            return message.payload


async def _drain(ws: ClientConnection, markers: dict[int, asyncio.Future[None]]) -> None:
    """Read what the fuzzed tunnel's destination is sent, until it closes: STREAM_STARTs of the
    ``markers`` streams resolve their futures, the rest is dropped."""
    decoder = Decoder()
    with contextlib.suppress(ConnectionClosed):
        async for data in ws:
            assert isinstance(data, bytes)
            for message in decoder.feed(data):
                future = markers.pop(message.stream_id, None)
                if message.type == T.STREAM_START and future is not None:
                    future.set_result(None)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, ms: float) -> Iterator[Bench]:
    watch = LogWatch()
    logger = logging.getLogger("service")
    logging.getLogger().addHandler(watch)  # every logger's errors: asyncio's, websockets' too
    level = logger.level
    logger.setLevel(logging.INFO)
    # No throttling: the hostile handshakes are to reach the rules, not the 429 (which
    # test_service_throttle covers).
    api = ThreadedApi(PKI.create(tmp_path_factory.mktemp("fuzz-tunnel-pki")), throttle=None)
    harness = Harness(api.pki, ms)
    for tunnel in (HEALTHY, FUZZED):
        api.registry.open_tunnel(
            tunnel, SERVICES, TOKENS[tunnel, Mode.SOURCE], TOKENS[tunnel, Mode.DESTINATION]
        )

    async def connect(tunnel: str, mode: Mode) -> ClientConnection:
        ws: ClientConnection = await harness.connect(
            api.data, mode, token=TOKENS[tunnel, mode], client_token=CLIENT_TOKENS[mode]
        )
        async with asyncio.timeout(10_000 * ms):
            await api.data.wait_for_peer(tunnel, mode)
        return ws

    async def setup() -> Bench:
        destination = Peer(await connect(HEALTHY, Mode.DESTINATION))
        source = Peer(await connect(HEALTHY, Mode.SOURCE))
        await source.send(Message(T.STREAM_START, stream_id=1, service_id="SSH1", connection_id=1))
        fuzzed_destination = await connect(FUZZED, Mode.DESTINATION)
        markers: dict[int, asyncio.Future[None]] = {}
        drain = asyncio.get_running_loop().create_task(_drain(fuzzed_destination, markers))
        return Bench(
            api, harness, watch, source, destination, drain, fuzzed_destination, ms, markers
        )

    bench = api.call(setup())
    try:
        bench.run(bench.round_trip())
        yield bench
        bench.healthy(fuzzed_destination=False)  # the last tests replace it
    finally:

        async def teardown() -> None:
            for ws in (bench.source.ws, bench.destination.ws, bench.fuzzed_destination):
                await ws.close()
            await bench.drain

        api.call(teardown())
        api.close()
        logging.getLogger().removeHandler(watch)
        logger.setLevel(level)


# ---------------------------------------------------------------------------- handshakes

_printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
_any_text = st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))


def _header(draw: st.DrawFn, name: str, valid: st.SearchStrategy[str]) -> list[tuple[bytes, bytes]]:
    """The header ``name``: absent, valid, fuzzed, repeated, or huge."""
    match draw(st.sampled_from(["valid"] * 6 + ["absent", "fuzzed", "twice", "huge"])):
        case "absent":
            return []
        case "fuzzed":
            return [(name.encode(), draw(st.one_of(*[_printable.map(str.encode)] * 3, _any_text)))]
        case "twice":
            return [(name.encode(), draw(valid).encode()), (name.encode(), draw(valid).encode())]
        case "huge":
            return [(name.encode(), b"x" * draw(st.integers(3000, 10_000)))]
        case _:
            return [(name.encode(), draw(valid).encode())]


@st.composite
def handshakes(draw: st.DrawFn) -> bytes:
    """An HTTP upgrade request to /tunnel (valid but for the fuzzed parts), or garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200)) + b"\r\n\r\n"
    mode = draw(st.sampled_from(list(Mode)))
    method = draw(st.sampled_from([b"GET"] * 6 + [b"POST", b"HEAD"]) | _printable.map(str.encode))
    paths = st.sampled_from(
        [f"/tunnel?local-proxy-mode={mode.value}"] * 6
        + [
            f"/tunnel?local-proxy-mode={mode.value}&local-proxy-mode=source",
            "/tunnel",
            "/",
            "/tunnel?local-proxy-mode=both",
        ]
    ).map(str.encode)
    path = draw(st.one_of(paths, paths, paths, _printable.map(lambda text: ("/" + text).encode())))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2", b"XYZ"]))
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"localhost")]
    headers += _header(draw, "Upgrade", st.just("websocket"))
    headers += _header(draw, "Connection", st.just("Upgrade"))
    headers += _header(
        draw,
        "Sec-WebSocket-Key",
        st.binary(min_size=16, max_size=16).map(lambda key: base64.b64encode(key).decode()),
    )
    headers += _header(draw, "Sec-WebSocket-Version", st.just("13"))
    headers += _header(
        draw,
        "Sec-WebSocket-Protocol",
        st.lists(
            st.sampled_from([V1, V2, V3, "chat", "aws.iot.securetunneling-9.0"]), min_size=1
        ).map(", ".join),
    )
    # Only the fuzzed tunnel's source token (valid in source mode only), never the healthy
    # tunnel's, nor the fuzzed destination's: an accepted one would replace their peers.
    token = draw(st.sampled_from([TOKENS[FUZZED, Mode.SOURCE]] * 3 + ["x" * 40]))
    match draw(st.sampled_from(["header"] * 4 + ["cookie", "both", "none", "fuzzed"])):
        case "header":
            headers.append((b"access-token", token.encode()))
        case "cookie":
            headers.append((b"Cookie", f"lang=en; awsiot-tunnel-token={token}".encode()))
        case "both":
            headers.append((b"access-token", token.encode()))
            headers.append((b"Cookie", f"awsiot-tunnel-token={token}".encode()))
        case "fuzzed":
            headers += _header(draw, "access-token", st.just(token))
            headers += _header(draw, "Cookie", st.just(f"awsiot-tunnel-token={token}"))
    headers += _header(
        draw, "client-token", st.sampled_from([CLIENT_TOKENS[mode], "short", "a" * 129])
    )
    names = st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True).map(str.encode)
    extra = draw(st.lists(st.tuples(names | _printable.map(str.encode), _any_text), max_size=3))
    headers += [(name or b"X", value) for name, value in extra]
    headers = draw(st.permutations(headers))
    lines = [method + b" " + path + b" " + version]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _exchange(bench: Bench, request: bytes) -> bytes:
    """Send ``request`` over a fresh TLS connection; the answer's head, or b"" if none."""
    context = bench.harness.pki.client_context()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", bench.api.ws_port, ssl=context, server_hostname="localhost"
    )
    try:
        writer.write(request)
        await writer.drain()
        head = b""
        async with asyncio.timeout(20_000 * bench.ms):
            while b"\r\n\r\n" not in head:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                head += chunk
        return head
    except (ConnectionError, ssl.SSLError):
        return b""  # reset after a refusal: as good as closed
    finally:
        writer.transport.abort()


def _request(mode: str, *headers: tuple[str, str], upgrade: bool = True) -> bytes:
    """A well-formed handshake request (or, without ``upgrade``, a plain GET)."""
    lines = [f"GET /tunnel?local-proxy-mode={mode} HTTP/1.1", "Host: localhost"]
    if upgrade:
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ]
    lines += [f"Sec-WebSocket-Protocol: {V3}", *(f"{name}: {value}" for name, value in headers)]
    return "\r\n".join([*lines, "", ""]).encode()


_SOURCE_TOKEN = ("access-token", TOKENS[FUZZED, Mode.SOURCE])
_SOURCE_CLIENT = ("client-token", CLIENT_TOKENS[Mode.SOURCE])


@settings(FUZZ, max_examples=150)
@given(request=handshakes())
@example(request=_request("source", _SOURCE_TOKEN, _SOURCE_CLIENT))  # 101
@example(request=_request("source", _SOURCE_CLIENT))  # 401
@example(request=_request("source", ("access-token", "x" * 40)))  # 403
@example(request=_request("destination", _SOURCE_TOKEN, _SOURCE_CLIENT))  # 400
@example(request=_request("source", _SOURCE_TOKEN, _SOURCE_CLIENT, upgrade=False))  # 426
def test_hostile_handshakes(bench: Bench, request: bytes) -> None:
    head = bench.run(_exchange(bench, request))
    event(f"HTTP {head[9:12].decode(errors='replace')}" if head else "closed without an answer")
    if head:
        assert head.startswith(b"HTTP/1.1 "), head[:80]
        status = int(head[9:12])
        assert 100 <= status < 500, head[:200]
        assert status in (101, 400, 401, 403, 404, 405, 410, 413, 426, 431), head[:200]
    bench.healthy()


def test_plain_text_on_the_tls_port(bench: Bench) -> None:
    async def scenario() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", bench.api.ws_port)
        writer.write(b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(20_000 * bench.ms):
                await reader.read()
        writer.transport.abort()

    bench.run(scenario())
    bench.healthy()


# ---------------------------------------------------------------------------- frames

_int32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    """Tunnel messages of any type (unknown ones too), ids and sizes."""
    message = Message(
        type=draw(st.sampled_from(list(T)) | st.integers(8, 1000)),
        stream_id=draw(st.integers(0, 3) | _int32),
        service_id=draw(st.sampled_from(["", *SERVICES, "VNC1"]) | st.text(max_size=20)),
        connection_id=draw(st.integers(0, 3)),
        payload=draw(st.binary(max_size=64) | st.just(b"\xa5" * MAX_PAYLOAD)),
        ignorable=draw(st.booleans()),
    )
    return message if message != Message(T.UNKNOWN) else Message(T.DATA, stream_id=1)


@st.composite
def sends(draw: st.DrawFn) -> list[bytes | str]:
    """What the fuzzed source sends, message by message."""
    actions: list[bytes | str] = []
    for _ in range(draw(st.integers(1, 5))):
        match draw(st.sampled_from(["frames", "bytes", "mutated", "partial", "text", "huge"])):
            case "frames":
                actions.append(b"".join(encode(m) for m in draw(st.lists(messages(), max_size=4))))
            case "bytes":
                actions.append(draw(st.binary(max_size=300)))
            case "mutated":
                frame = bytearray(encode(draw(messages())))
                for _ in range(draw(st.integers(1, 3))):
                    frame[draw(st.integers(0, len(frame) - 1))] ^= draw(st.integers(1, 255))
                actions.append(bytes(frame))
            case "partial":
                frame = encode(draw(messages()))
                actions.append(frame[: draw(st.integers(1, len(frame) - 1))])
            case "text":
                actions.append(draw(st.text(max_size=50)))
            case _:
                actions.append(b"\x00" * draw(st.integers(131_077, 200_000)))
    return actions


def expected_close(actions: list[bytes | str]) -> tuple[set[int], bool]:
    """The close codes the service may answer ``actions`` with (empty: it must stay open), and
    whether its frame decoder then holds no partial frame. The service decodes with the same
    Decoder, so this is computed here the same way."""
    decoder = Decoder()
    codes: set[int] = set()
    for action in actions:
        if isinstance(action, bytes) and len(action) > MAX_WS_MESSAGE:
            # websockets refuses it as it reads the frame, maybe before the relay has handled
            # the messages queued in front of it
            return codes | {1009}, True
        if codes:
            continue  # the relay closes at the first fault; only 1009 may overtake it
        if isinstance(action, str):
            codes = {1003}
            continue
        try:
            decoder.feed(action)
        except RemoteProtocolError:
            codes = {1002}
    return codes, decoder.buffered == 0


async def _fuzz_frames(bench: Bench, actions: list[bytes | str], mode: Mode) -> None:
    """Connect to the fuzzed tunnel as ``mode`` and send ``actions``; then wait until the
    service has handled all of them and check how the connection ended."""
    codes, aligned = expected_close(actions)
    ws: ClientConnection = await bench.harness.connect(
        bench.api.data, mode, token=TOKENS[FUZZED, mode], client_token=CLIENT_TOKENS[mode]
    )
    service = bench.api.data
    async with asyncio.timeout(20_000 * bench.ms):
        try:
            for action in actions:
                await ws.send(action)
            if not codes and aligned and mode is Mode.SOURCE:
                # A STREAM_START after the junk reaches the fuzzed destination once the relay
                # has handled everything before it.
                bench.rounds += 1
                marker = 1_000_000 + bench.rounds
                arrived = bench.markers[marker] = asyncio.get_running_loop().create_future()
                await ws.send(
                    encode(
                        Message(
                            T.STREAM_START, stream_id=marker, service_id="SSH1", connection_id=1
                        )
                    )
                )
                await arrived
        except ConnectionClosed:
            pass
        if codes:
            await ws.wait_closed()
            assert ws.close_code in codes, (ws.close_code, codes)
        else:
            assert ws.close_code is None, ws.close_code  # still open
            await ws.close()
        # The relay of this connection has ended: whatever it was sent has been handled.
        await service.wait_for_peer(FUZZED, mode, connected=False)


@FUZZ
@given(actions=sends())
def test_hostile_frames_from_a_source(bench: Bench, actions: list[bytes | str]) -> None:
    codes, aligned = expected_close(actions)
    event(
        f"closed with {sorted(codes)}" if codes else f"open, {'aligned' if aligned else 'partial'}"
    )
    bench.run(_fuzz_frames(bench, actions, Mode.SOURCE))
    bench.healthy()


@settings(FUZZ, max_examples=30)
@given(actions=sends())
def test_hostile_frames_from_a_destination(bench: Bench, actions: list[bytes | str]) -> None:
    """The fuzzed tunnel's own destination is replaced (and so closed) by these; it comes back
    for the next tests."""
    bench.run(_fuzz_frames(bench, actions, Mode.DESTINATION))
    bench.healthy(fuzzed_destination=False)
