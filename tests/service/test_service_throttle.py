"""Throttling of failed /tunnel handshakes per source address (issue 11 #5)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from service_harness import TOKENS, Harness
from websockets.exceptions import InvalidStatus

from iotunnel.mode import Mode
from proxy.protocol.messages import Message
from proxy.protocol.messages import MessageType as T
from service.server import TunnelService
from service.throttle import HandshakeThrottle, ThrottleSettings

# ---------------------------------------------------------------------------- the buckets


def test_a_burst_of_failures_then_one_per_interval() -> None:
    throttle = HandshakeThrottle(ThrottleSettings(rate=0.5, burst=3))
    for _ in range(3):
        assert throttle.retry_after("a", 0.0) == 0
        throttle.failed("a", 0.0)
    assert throttle.retry_after("a", 0.0) == 2  # one failure earned back every 2 s
    assert throttle.first_refusal("a")
    assert throttle.retry_after("a", 1.0) == 1
    assert not throttle.first_refusal("a")
    assert throttle.retry_after("b", 1.0) == 0  # another address: unaffected
    assert throttle.retry_after("a", 2.0) == 0
    throttle.failed("a", 2.0)
    assert throttle.retry_after("a", 2.0) == 2
    assert throttle.first_refusal("a")  # a new episode
    assert throttle.retry_after("a", 100.0) == 0  # refilled, never above the burst
    for _ in range(3):
        throttle.failed("a", 100.0)
    assert throttle.retry_after("a", 100.0) > 0


def test_the_table_is_bounded_least_recently_seen_first() -> None:
    throttle = HandshakeThrottle(ThrottleSettings(rate=0.001, burst=1, max_addresses=3))
    for host in ("a", "b", "c"):
        throttle.failed(host, 0.0)
    assert throttle.retry_after("a", 0.0) > 0  # "a" is now the most recently seen
    throttle.failed("d", 0.0)  # over the cap: "b" goes
    assert len(throttle) == 3
    assert throttle.retry_after("b", 0.0) == 0
    assert throttle.retry_after("a", 0.0) > 0
    for index in range(1000):
        throttle.failed(f"10.0.{index // 256}.{index % 256}", 0.0)
    assert len(throttle) == 3


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("not an address", "not an address"),
    ],
)
def test_ipv6_addresses_are_throttled_by_64(host: str, key: str) -> None:
    assert HandshakeThrottle.key(host) == key


def test_settings_are_checked() -> None:
    assert not ThrottleSettings(rate=0).enabled
    with pytest.raises(ValueError, match="rate must be positive"):
        HandshakeThrottle(ThrottleSettings(rate=0))


# ---------------------------------------------------------------------------- the service


class ClockedService(TunnelService):
    """The service with the throttle's clock in the test's hands."""

    now = 1000.0

    def _throttle_time(self) -> float:
        return self.now


SLOW = ThrottleSettings(rate=0.1, burst=10)  # one failure earned back every 10 s
WRONG = "wrong-token-AQGAAXiVzSmRL1VaJ22G7eRb"


async def _status(harness: Harness, service: TunnelService, **kwargs: Any) -> tuple[int, Any]:
    with pytest.raises(InvalidStatus) as info:
        async with harness.connect(service, **kwargs):
            pass
    response = info.value.response
    return response.status_code, response


async def _relays(harness: Harness, service: TunnelService, **kwargs: Any) -> None:
    """A source and a destination connect (with ``kwargs``) and a message goes through."""
    async with (
        harness.peer(service, Mode.DESTINATION, client_token="d" * 32, **kwargs) as destination,
        harness.peer(service, Mode.SOURCE, client_token="s" * 32, **kwargs) as source,
    ):
        await source.send(Message(T.STREAM_START, stream_id=1, service_id="SSH1", connection_id=1))
        received = await destination.next()
        while received.type == T.SERVICE_IDS:
            received = await destination.next()
        assert (received.type, received.stream_id) == (T.STREAM_START, 1)


def test_wrong_tokens_are_throttled_valid_peers_are_not(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")

    async def scenario() -> None:
        async with harness.service(cls=ClockedService, throttle=SLOW) as service:
            assert isinstance(service, ClockedService)
            statuses = []
            for _ in range(50):
                status, response = await _status(harness, service, token=WRONG)
                statuses.append(status)
            assert statuses[:10] == [403] * 10
            assert statuses[10:] == [429] * 40
            assert response.headers["Retry-After"] == "10"
            assert b"too many failed handshakes" in response.body
            # No token was looked at for the 429s: not even a missing one is reported.
            status, response = await _status(harness, service, no_token=True)
            assert status == 429

            # A valid peer on another address is not slowed down at all.
            await _relays(harness, service, local_addr=("127.0.0.2", 0))

            # A valid token from the throttled address waits for Retry-After like any other
            # handshake from it (documented: a token is not even looked at while throttled)...
            status, response = await _status(harness, service)
            assert status == 429
            wait = int(response.headers["Retry-After"])
            assert wait <= 10
            # ... and, Retry-After later, gets through (and takes no token when it does).
            service.now += wait
            await _relays(harness, service)

    harness.run(scenario())
    # One line per episode (websockets' own per-response lines are off outside --verbose).
    throttled = [
        r
        for r in caplog.records
        if r.name == "service.server" and "429 too many failed handshakes" in r.getMessage()
    ]
    assert len(throttled) == 1, [r.getMessage() for r in throttled]
    assert WRONG not in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "counted"),
    [
        ({"token": WRONG}, True),  # 403
        ({"no_token": True}, True),  # 401
        ({"path": "/elsewhere"}, True),  # 404
        ({"subprotocols": None}, False),  # 400: not a token failure
        ({"mode": Mode.DESTINATION, "token": TOKENS[Mode.SOURCE]}, False),  # 400: other mode
    ],
)
def test_which_refusals_count(harness: Harness, kwargs: dict[str, Any], counted: bool) -> None:
    async def scenario() -> None:
        async with harness.service(throttle=ThrottleSettings(rate=0.01, burst=1)) as service:
            first, _ = await _status(harness, service, **kwargs)
            second, _ = await _status(harness, service, **kwargs)
            assert first != 429
            assert (second == 429) is counted

    harness.run(scenario())


def test_throttling_can_be_turned_off(harness: Harness) -> None:
    async def scenario() -> None:
        async with harness.service(throttle=ThrottleSettings(rate=0, burst=1)) as service:
            for _ in range(5):
                assert (await _status(harness, service, token=WRONG))[0] == 403
            await _relays(harness, service)

    harness.run(scenario())
