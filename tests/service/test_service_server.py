"""The service over real sockets: TLS on loopback, websockets clients, hand-built frames."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from service_harness import (
    CLIENT_LOGGER,
    CLIENT_TOKEN,
    SERVICES,
    TOKENS,
    TUNNEL,
    V1,
    V2,
    V3,
    Harness,
)

from iotunnel.mode import Mode
from proxy.io.memory import HeapTrimmer
from proxy.protocol.framing import MAX_WS_MESSAGE, encode
from proxy.protocol.messages import MAX_PAYLOAD, Message
from proxy.protocol.messages import MessageType as T
from service.server import MAX_QUEUE

SRC, DST = Mode.SOURCE, Mode.DESTINATION
SERVICE_IDS = Message(T.SERVICE_IDS, available_service_ids=SERVICES)


def start(stream: int, service: str = "SSH1") -> Message:
    return Message(T.STREAM_START, stream_id=stream, service_id=service, connection_id=1)


def reset(stream: int, service: str = "SSH1") -> Message:
    return Message(T.STREAM_RESET, stream_id=stream, service_id=service)


def data(stream: int, payload: bytes, service: str = "SSH1") -> Message:
    return Message(T.DATA, stream_id=stream, service_id=service, payload=payload)


async def close_code(ws: Any) -> int | None:
    """The close code of ``ws``, once the service has closed it."""
    await ws.wait_closed()
    code: int | None = ws.close_code
    return code


# Handshake


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"path": "/"}, 404),
        ({"path": "/other?local-proxy-mode=source"}, 404),
        ({"path": "/tunnel"}, 400),
        ({"path": "/tunnel?local-proxy-mode=sauce"}, 400),
        ({"headers": [("access-token", TOKENS[SRC])]}, 400),
        ({"headers": [("Cookie", f"awsiot-tunnel-token={TOKENS[SRC]}")]}, 400),
        ({"token": "unknown-token-AQGAAXiVzSmRL1VaJ22G"}, 403),
        ({"token": TOKENS[DST]}, 400),
        ({"headers": [("x-padding", "p" * 4096)]}, 431),
        ({"subprotocols": None}, 400),
        ({"subprotocols": ["aws.iot.securetunneling-9.0"]}, 400),
        ({"client_token": "too-short"}, 400),
        ({"client_token": CLIENT_TOKEN, "headers": [("client-token", CLIENT_TOKEN)]}, 400),
    ],
)
def test_handshake_refused(harness: Harness, kwargs: dict[str, Any], status: int) -> None:
    async def scenario() -> None:
        async with harness.service() as service:
            code, body = await harness.refusal(service, SRC, **kwargs)
            assert code == status
            assert body.endswith("\n")
            assert TOKENS[SRC] not in body
            assert not service.peer_connected(TUNNEL, SRC)
            # a refusal does not spend the token
            async with harness.peer(service, SRC):
                pass

    harness.run(scenario())


def test_missing_token_is_401(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service:
            assert (await harness.refusal(service, SRC, no_token=True))[0] == 401
            assert (await harness.refusal(service, SRC, token="", no_token=True))[0] == 401

    harness.run(scenario())


def test_token_in_cookie(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service:
            cookie = ("Cookie", f"lang=en; awsiot-tunnel-token={TOKENS[DST]}")
            async with harness.connect(service, DST, no_token=True, headers=[cookie]) as ws:
                assert ws.subprotocol == V3

    harness.run(scenario())


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [([V1, V2, V3], V3), ([V3, V1], V3), ([V1, V2], V2), ([V1], V1), (["chat", V2], V2)],
)
def test_subprotocol_prefers_the_highest(harness: Harness, offered: list[str], chosen: str) -> None:
    async def scenario() -> None:
        async with (
            harness.service() as service,
            harness.connect(service, subprotocols=offered) as ws,
        ):
            assert ws.subprotocol == chosen

    harness.run(scenario())


def test_channel_id_is_fresh_per_connection(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service:
            ids = []
            for _ in range(2):
                async with harness.connect(service, SRC, client_token=CLIENT_TOKEN) as ws:
                    ids.append(ws.response.headers["channel-id"])
            assert len(set(ids)) == 2
            assert all(len(channel_id) >= 32 for channel_id in ids)

    harness.run(scenario())


def test_plain_http_request_does_not_spend_the_token(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", service.port, ssl=harness.pki.client_context()
            )
            writer.write(
                b"GET /tunnel?local-proxy-mode=source HTTP/1.1\r\nHost: localhost\r\n"
                b"Sec-WebSocket-Protocol: " + V3.encode() + b"\r\n"
                b"access-token: " + TOKENS[SRC].encode() + b"\r\n\r\n"
            )
            status_line = await reader.readline()
            await reader.read()
            writer.close()
            await writer.wait_closed()
            assert status_line.startswith(b"HTTP/1.1 426 ")
            async with harness.peer(service, SRC):
                pass

    harness.run(scenario())


# Tokens


def test_access_token_without_client_token_is_single_use(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service:
            async with harness.peer(service, SRC):
                assert (await harness.refusal(service, SRC))[0] == 403
            await service.wait_for_peer(TUNNEL, SRC, connected=False)
            assert (await harness.refusal(service, SRC))[0] == 403
            assert (await harness.refusal(service, SRC, client_token=CLIENT_TOKEN))[0] == 403

    harness.run(scenario())


def test_client_token_allows_reconnects(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service:
            for _ in range(3):
                async with harness.peer(service, SRC, client_token=CLIENT_TOKEN):
                    pass
                await service.wait_for_peer(TUNNEL, SRC, connected=False)
            other = "f" * 40
            assert (await harness.refusal(service, SRC, client_token=other))[0] == 403
            assert (await harness.refusal(service, SRC))[0] == 403

    harness.run(scenario())


# Relay


def test_service_ids_sent_to_v2_and_v3_peers(harness: Harness) -> None:
    async def scenario() -> None:
        async with (
            harness.service() as service,
            harness.peer(service, DST, subprotocols=[V2]) as destination,
            harness.peer(service, SRC, subprotocols=[V3]) as source,
        ):
            assert await destination.next() == SERVICE_IDS
            assert await source.next() == SERVICE_IDS

    harness.run(scenario())


def test_no_service_ids_for_v1_peers(harness: Harness) -> None:
    async def scenario() -> None:
        async with (
            harness.service() as service,
            harness.peer(service, DST, subprotocols=[V1]) as destination,
            harness.peer(service, SRC, subprotocols=[V1]) as source,
        ):
            await source.send(start(1, ""), data(1, b"v1", ""))
            assert await destination.take(2) == [start(1, ""), data(1, b"v1", "")]
            await destination.send(data(1, b"back", ""))
            assert await source.next() == data(1, b"back", "")

    harness.run(scenario())


def test_relay_packed_and_split_frames(harness: Harness) -> None:
    async def scenario() -> None:
        async with (
            harness.service() as service,
            harness.peer(service, DST) as destination,
            harness.peer(service, SRC) as source,
        ):
            assert await destination.next() == SERVICE_IDS
            assert await source.next() == SERVICE_IDS
            # several frames in one WebSocket message
            await source.send(start(1), data(1, b"hello"), start(1, "HTTP1"))
            assert await destination.take(3) == [start(1), data(1, b"hello"), start(1, "HTTP1")]
            # one frame split across three WebSocket messages, the next frame's start
            # riding on the last one
            first = encode(data(1, b"x" * 1000, "HTTP1"))
            wire = first + encode(data(1, b"tail"))
            cut = len(first) + 3
            for piece in (wire[:1], wire[1:500], wire[500:cut]):
                await source.ws.send(piece)
            assert await destination.next() == data(1, b"x" * 1000, "HTTP1")
            await source.ws.send(wire[cut:])
            assert await destination.next() == data(1, b"tail")
            # and back
            await destination.send(data(1, b"response"), data(1, b"page", "HTTP1"))
            assert await source.take(2) == [data(1, b"response"), data(1, b"page", "HTTP1")]

    harness.run(scenario())


def test_bulk_transfer_in_order_within_the_size_limit(harness: Harness) -> None:
    async def scenario() -> None:
        async with (
            harness.service() as service,
            harness.peer(service, DST) as destination,
            harness.peer(service, SRC) as source,
        ):
            await destination.next()
            await source.next()
            chunks = [bytes([i % 251]) * MAX_PAYLOAD for i in range(40)]
            await source.send(start(9))

            async def send_all() -> None:
                for first, second in zip(chunks[::2], chunks[1::2], strict=True):
                    await source.send(data(9, first), data(9, second))

            sender = asyncio.create_task(send_all())
            assert await destination.next() == start(9)
            received = [(await destination.next()).payload for _ in chunks]
            await sender
            assert received == chunks
            assert max(destination.message_sizes) <= MAX_WS_MESSAGE

    harness.run(scenario())


def test_disallowed_messages_are_dropped_and_the_tunnel_goes_on(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with (
            harness.service() as service,
            harness.peer(service, DST) as destination,
            harness.peer(service, SRC) as source,
        ):
            await destination.next()
            await source.next()
            await destination.send(start(5), Message(T.SESSION_RESET), data(0, b"zero"))
            await source.send(
                SERVICE_IDS,
                start(5, "NOPE"),
                Message(T.UNKNOWN, stream_id=5),
                Message(99, stream_id=5, ignorable=True),
                start(5),
            )
            assert await destination.next() == start(5)
            await destination.send(data(5, b"ok"))
            assert await source.next() == data(5, b"ok")

    with caplog.at_level(logging.WARNING, logger="service"):
        harness.run(scenario())
    assert any("dropped STREAM_START" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", [SRC, DST])
def test_stream_start_without_peer_is_reset(harness: Harness, mode: Mode) -> None:
    async def scenario() -> None:
        async with harness.service() as service, harness.peer(service, SRC) as source:
            await source.next()
            await source.send(start(4), data(4, b"lost"), start(2, "HTTP1"))
            assert await source.take(2) == [reset(4), reset(2, "HTTP1")]
            # the connection stays up and the tunnel works once the destination arrives
            async with harness.peer(service, DST) as destination:
                await destination.next()
                await source.send(start(6))
                assert await destination.next() == start(6)

    harness.run(scenario())


def test_disconnect_resets_active_streams(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service, harness.peer(service, SRC) as source:
            await source.next()
            async with harness.peer(service, DST, client_token=CLIENT_TOKEN) as destination:
                await destination.next()
                await source.send(start(7), start(3, "HTTP1"), reset(3, "HTTP1"), start(8, "HTTP1"))
                assert len(await destination.take(4)) == 4
            assert await source.take(2) == [reset(7), reset(8, "HTTP1")]
            # the table was cleared: a second disconnect resets nothing
            async with harness.peer(service, DST, client_token=CLIENT_TOKEN) as destination:
                await destination.next()
            await service.wait_for_peer(TUNNEL, DST, connected=False)
            await source.send(start(11))
            assert await source.next() == reset(11)

    harness.run(scenario())


def test_replacement_closes_the_old_peer_and_resets_streams(harness: Harness) -> None:
    async def scenario() -> None:
        async with (
            harness.service() as service,
            harness.peer(service, DST) as destination,
            harness.peer(service, SRC, client_token=CLIENT_TOKEN) as old,
        ):
            await destination.next()
            await old.next()
            await old.send(start(7), start(3, "HTTP1"))
            assert await destination.take(2) == [start(7), start(3, "HTTP1")]
            async with harness.connect(service, SRC, client_token=CLIENT_TOKEN) as new_ws:
                assert await close_code(old.ws) == 1000
                assert old.ws.close_reason == "replaced by a new connection"
                assert await destination.take(2) == [reset(7), reset(3, "HTTP1")]
                new = type(old)(new_ws)
                assert await new.next() == SERVICE_IDS
                await new.send(start(8))
                assert await destination.next() == start(8)
                assert service.peer_connected(TUNNEL, SRC)

    harness.run(scenario())


# Closing


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("text", 1003),
        (b"\x00\x00", 1002),  # empty frame
        (b"\x00\x03\x0f\xff\xff", 1002),  # invalid protobuf wire type
        (b"\x00" * (MAX_WS_MESSAGE + 1), 1009),
    ],
    ids=["text", "empty-frame", "undecodable", "oversized"],
)
def test_bad_input_closes_the_sender(harness: Harness, payload: str | bytes, code: int) -> None:
    async def scenario() -> None:
        async with (
            harness.service() as service,
            harness.peer(service, DST) as destination,
            harness.peer(service, SRC) as source,
        ):
            await destination.next()
            await source.next()
            await source.send(start(1))
            assert await destination.next() == start(1)
            await source.ws.send(payload)
            assert await close_code(source.ws) == code
            assert await destination.next() == reset(1)
            assert service.peer_connected(TUNNEL, DST)

    harness.run(scenario())


def test_largest_websocket_message_is_accepted(harness: Harness) -> None:
    # two full DATA frames, and a third that fills the message to exactly 131076 bytes
    full = encode(data(1, b"a" * MAX_PAYLOAD))
    rest = MAX_WS_MESSAGE - 2 * len(full)
    last = next(
        message
        for size in range(rest, 0, -1)
        if len(encode(message := data(1, b"b" * size))) == rest
    )
    wire = full + full + encode(last)
    assert len(wire) == MAX_WS_MESSAGE

    async def scenario() -> None:
        async with (
            harness.service() as service,
            harness.peer(service, DST) as destination,
            harness.peer(service, SRC) as source,
        ):
            await destination.next()
            await source.next()
            await source.ws.send(wire)
            assert await destination.take(3) == [data(1, b"a" * MAX_PAYLOAD)] * 2 + [last]

    harness.run(scenario())


def test_close_tunnel_closes_both_peers(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service:
            async with (
                harness.peer(service, DST) as destination,
                harness.peer(service, SRC) as source,
            ):
                await service.close_tunnel(TUNNEL)
                for peer in (source, destination):
                    assert await close_code(peer.ws) == 1000
                    assert peer.ws.close_reason == "tunnel closed"
            assert not service.peer_connected(TUNNEL, SRC)
            assert not service.peer_connected(TUNNEL, DST)
            assert (await harness.refusal(service, SRC, client_token=CLIENT_TOKEN))[0] == 410
            await service.close_tunnel(TUNNEL)  # idempotent

    harness.run(scenario())


def test_heap_is_trimmed_once_after_peers_leave(harness: Harness) -> None:
    """What closed connections leave in the heap goes back to the kernel (proxy/io/memory.py):
    one trim after both peers of a closed tunnel have left."""

    async def scenario() -> None:
        trimmed = asyncio.Event()

        def trim() -> bool:
            trimmed.set()
            return True

        async with harness.service() as service:
            service.trimmer = HeapTrimmer(delay=0.0, trim=trim)
            async with (
                harness.peer(service, DST) as destination,
                harness.peer(service, SRC) as source,
            ):
                await service.close_tunnel(TUNNEL)
                for peer in (source, destination):
                    assert await close_code(peer.ws) == 1000
                async with asyncio.timeout(10_000 * harness.ms):
                    await trimmed.wait()
            assert service.trimmer.trims == 1  # both disconnections: one trim

    harness.run(scenario())


def test_service_close_sends_going_away(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service, harness.peer(service, SRC) as source:
            await service.close()
            assert await close_code(source.ws) == 1001
            await service.close()

    harness.run(scenario())


def test_pings_are_answered(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service() as service, harness.connect(service, SRC) as ws:
            latency = await (await ws.ping(b"hello"))
            assert latency >= 0

    harness.run(scenario())


def test_plain_websocket_without_tls(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service(tls=False) as service:
            assert service.url.startswith("ws://127.0.0.1:")
            async with harness.peer(service, SRC) as source:
                assert await source.next() == SERVICE_IDS

    harness.run(scenario())


# Logs


def test_tokens_never_logged(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    secrets = [
        *TOKENS.values(),
        CLIENT_TOKEN,
        "unknown-token-AQGAAXiVzSmRL1VaJ22G",
        "payload-secret",
    ]

    async def scenario() -> None:
        async with harness.service() as service:
            await harness.refusal(service, SRC, token=secrets[3])
            await harness.refusal(service, SRC, token=TOKENS[DST])
            cookie = [("Cookie", f"awsiot-tunnel-token={TOKENS[SRC]}")]
            await harness.refusal(service, SRC, headers=cookie)
            async with (
                harness.peer(service, DST) as destination,
                harness.peer(service, SRC, client_token=CLIENT_TOKEN) as source,
            ):
                await source.send(start(1), data(1, secrets[4].encode()))
                assert await destination.take(3) == [
                    SERVICE_IDS,
                    start(1),
                    data(1, b"payload-secret"),
                ]
            await harness.refusal(service, SRC)
            await service.close_tunnel(TUNNEL)

    with caplog.at_level(logging.DEBUG):
        harness.run(scenario())
    ours = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGER)]
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in ours)
    assert "peer connected" in text
    assert "access-token: [secure]" in text
    for secret in secrets:
        assert secret not in text


@pytest.mark.parametrize("bad", ["text", b"\x00\x00"], ids=["text", "empty-frame"])
def test_bad_input_then_more_messages_closes_cleanly(
    harness: Harness, caplog: pytest.LogCaptureFixture, bad: str | bytes
) -> None:
    """Found by test_service_fuzz_tunnel: junk followed by more messages than websockets queues
    (MAX_QUEUE) stopped the service reading that connection, so the peer's answer to its close
    frame was never read: the close handshake stalled until CLOSE_TIMEOUT (then, the peer's own
    timeout aborted it: close code 1006 in the log instead of the one the service sent)."""
    caplog.set_level(logging.INFO, logger="service.server")

    async def scenario() -> None:
        async with harness.service() as service:
            async with harness.peer(service, SRC) as source:
                await source.ws.send(bad)
                for _ in range(MAX_QUEUE + 4):
                    await source.ws.send(encode(start(1)))
                await source.ws.wait_closed()
            async with asyncio.timeout(10_000 * harness.ms):
                await service.wait_for_peer(TUNNEL, SRC, connected=False)

    harness.run(scenario())
    code = 1003 if isinstance(bad, str) else 1002
    lines = [r.getMessage() for r in caplog.records if "peer disconnected" in r.getMessage()]
    assert len(lines) == 1
    assert f"close code {code} " in lines[0]
