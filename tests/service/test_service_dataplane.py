"""The data plane under the control plane: connection states, rotation, expiry and deletion
closing live WebSockets, the bandwidth cap, configurable size limits.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from service_harness import CLIENT_TOKEN, SERVICES, TOKENS, TUNNEL, Harness

from iotunnel.mode import Mode
from proxy.protocol.framing import encode
from proxy.protocol.messages import Message
from proxy.protocol.messages import MessageType as T
from service.clock import ManualClock
from service.control import ControlPlane
from service.handshake import Candidate, HandshakeRequest, check, claim
from service.handshake import Refusal as HandshakeRefusal
from service.registry import TunnelRegistry
from service.server import Bandwidth, TunnelService

SRC, DST = Mode.SOURCE, Mode.DESTINATION
SERVICE_IDS = Message(T.SERVICE_IDS, available_service_ids=SERVICES)


def start(stream: int, service: str = "SSH1") -> Message:
    return Message(T.STREAM_START, stream_id=stream, service_id=service, connection_id=1)


def data(stream: int, payload: bytes, service: str = "SSH1") -> Message:
    return Message(T.DATA, stream_id=stream, service_id=service, payload=payload)


async def closed(ws: Any) -> tuple[int | None, str | None]:
    await ws.wait_closed()
    return ws.close_code, ws.close_reason


def test_connection_states_follow_the_peers(harness: Harness) -> None:
    registry = harness.registry()
    tunnel = registry.get(TUNNEL)

    async def scenario() -> None:
        async with harness.service(registry) as service:
            assert not tunnel.source_state.connected
            async with harness.peer(service, SRC, client_token=CLIENT_TOKEN):
                assert tunnel.source_state.connected
                assert not tunnel.destination_state.connected
                first = tunnel.source_state.updated_at
                # a reconnect with the client token replaces the peer: still connected
                async with harness.peer(service, SRC, client_token=CLIENT_TOKEN):
                    assert tunnel.source_state.connected
                    assert tunnel.source_state.updated_at == first
            async with harness.connect(service, DST):
                await service.wait_for_peer(TUNNEL, DST)
                assert tunnel.destination_state.connected
            await service.wait_for_peer(TUNNEL, SRC, connected=False)
            await service.wait_for_peer(TUNNEL, DST, connected=False)
            assert not tunnel.source_state.connected
            assert not tunnel.destination_state.connected

    harness.run(scenario())


def test_rotation_disconnects_the_old_peer_and_only_the_new_token_works(
    harness: Harness,
) -> None:
    registry = harness.registry()
    control = ControlPlane(registry)

    async def scenario() -> None:
        async with harness.service(registry) as service:
            control.data_plane = service
            async with (
                harness.peer(service, DST) as destination,
                harness.peer(service, SRC, client_token=CLIENT_TOKEN) as source,
            ):
                assert await destination.next() == SERVICE_IDS
                assert await source.next() == SERVICE_IDS
                await source.send(start(1), data(1, b"hi"))
                assert await destination.take(2) == [start(1), data(1, b"hi")]
                tokens = await control.rotate(TUNNEL, [SRC])
                assert await closed(source.ws) == (1000, "access token rotated")
                # the destination stays, and learns that the stream is gone
                assert await destination.next() == Message(
                    T.STREAM_RESET, stream_id=1, service_id="SSH1"
                )
                assert service.peer_connected(TUNNEL, DST)
                # the old token is unknown now, even with its bound client token
                status, _ = await harness.refusal(service, SRC, client_token=CLIENT_TOKEN)
                assert status == 403
                async with harness.peer(service, SRC, token=tokens[SRC]) as new_source:
                    assert await new_source.next() == SERVICE_IDS

    harness.run(scenario())


def test_rotation_between_check_and_claim_refuses_the_old_token() -> None:
    registry = TunnelRegistry()
    registry.open_tunnel(TUNNEL, SERVICES, TOKENS[SRC], TOKENS[DST])
    request = HandshakeRequest(
        "/tunnel?local-proxy-mode=source",
        [("access-token", TOKENS[SRC]), ("sec-websocket-protocol", "aws.iot.securetunneling-3.0")],
    )
    candidate = check(request, registry)
    assert isinstance(candidate, Candidate)
    registry.rotate(TUNNEL, SRC, "a-brand-new-source-token-0123456789")
    outcome = claim(candidate, registry)
    assert isinstance(outcome, HandshakeRefusal)
    assert outcome.status == 403
    assert not registry.get(TUNNEL).source.used


def test_expiry_and_deletion_close_the_websockets(harness: Harness) -> None:
    clock = ManualClock()
    registry = TunnelRegistry(clock=clock)

    async def scenario() -> None:
        async with harness.service(registry) as service:
            control = ControlPlane(registry, data_plane=service)
            expiring = await control.open_tunnel(services=["SSH1"], lifetime_minutes=1)
            deleted = await control.open_tunnel(services=["SSH1"])
            ids = expiring.tunnel.tunnel_id, deleted.tunnel.tunnel_id
            async with (
                harness.peer(service, DST, tunnel=ids[0], token=expiring.destination_token) as a,
                harness.peer(service, SRC, tunnel=ids[0], token=expiring.source_token) as b,
                harness.peer(service, DST, tunnel=ids[1], token=deleted.destination_token) as c,
            ):
                clock.advance(60)
                assert await control.expire_due() == [ids[0]]
                assert await closed(a.ws) == (1000, "tunnel expired")
                assert await closed(b.ws) == (1000, "tunnel expired")
                await control.close_tunnel(ids[1], delete=True)
                assert await closed(c.ws) == (1000, "tunnel closed")
            assert (await harness.refusal(service, DST, token=expiring.destination_token))[0] == 410
            assert (await harness.refusal(service, SRC, token=deleted.source_token))[0] == 403
            assert not expiring.tunnel.destination_state.connected

    harness.run(scenario())


class PacedService(TunnelService):
    """A service whose bandwidth cap sees a frozen clock and records its waits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waits: list[float] = []

    def _pace_time(self) -> float:
        return 100.0

    async def _pace_sleep(self, delay: float) -> None:
        self.waits.append(delay)


def test_bandwidth_cap_charges_every_relayed_byte_per_direction(harness: Harness) -> None:
    rate, burst = 10_000.0, 5_000.0
    chunk = b"x" * 3000

    async def scenario() -> None:
        async with harness.service(cls=PacedService, bandwidth=Bandwidth(rate, burst)) as service:
            assert isinstance(service, PacedService)
            assert service._server is not None
            listener = service._server.sockets[0]
            # a short queue in front of the bucket (Linux doubles the value it is given)
            assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 4 * 16 * 1024
            async with (
                harness.peer(service, DST) as destination,
                harness.peer(service, SRC) as source,
            ):
                await destination.next()
                await source.next()
                await source.send(start(1))
                sizes = [len(encode(start(1)))]
                for _ in range(10):
                    await source.send(data(1, chunk))
                    sizes.append(len(encode(data(1, chunk))))
                for message in await destination.take(11):
                    assert message.type in (T.STREAM_START, T.DATA)
                # with time frozen, the bucket never refills: the last wait is the whole debt
                assert service.waits[-1] == pytest.approx((sum(sizes) - burst) / rate)
                waits_before = len(service.waits)
                # the other direction has its own, full bucket: one small message, no wait
                await destination.send(data(1, b"back"))
                assert await source.next() == data(1, b"back")
                assert len(service.waits) == waits_before
                assert service.paced_seconds == pytest.approx(sum(service.waits))

    harness.run(scenario())


def test_size_limits_are_configurable(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service(max_frame=1000, max_message=4000) as service:
            # a client token lets the same source token connect twice
            async with harness.peer(service, SRC, client_token=CLIENT_TOKEN) as source:
                await source.next()
                await source.send(data(1, b"y" * 1200))  # one frame over 1000 bytes
                assert (await closed(source.ws))[0] == 1002
            async with harness.connect(service, SRC, client_token=CLIENT_TOKEN) as ws:
                await ws.send(b"\x00" * 5000)  # one message over 4000 bytes
                assert (await closed(ws))[0] == 1009

    harness.run(scenario())
