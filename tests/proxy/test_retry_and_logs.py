"""Reconnect policy and log redaction."""

from __future__ import annotations

import io
import itertools
import logging

import pytest

from proxy.errors import ConnectFailed, HandshakeRefused
from proxy.logs import RedactingFilter, configure, register_secrets
from proxy.retry import backoff, is_retryable


def test_backoff_is_exponential_equal_jitter_with_a_cap() -> None:
    bounds: list[tuple[float, float]] = []

    def rand(low: float, high: float) -> float:
        bounds.append((low, high))
        return high

    delays = list(itertools.islice(backoff(0.5, 8.0, rand=rand), 7))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(low == high / 2 for low, high in bounds)


def test_backoff_never_draws_near_zero_delays() -> None:
    """Full jitter could draw several ~0 s delays in a row: a reconnect storm (issue 11)."""
    delays = list(itertools.islice(backoff(1.0, 60.0), 200))
    assert all(d >= 0.5 for d in delays)
    assert sum(delays[:4]) >= 7.5  # at most 5 connects in the first 7.5 s


def test_only_refusals_are_final() -> None:
    assert not is_retryable(HandshakeRefused(403, "Forbidden"))
    assert is_retryable(ConnectFailed("reset"))
    assert is_retryable(TimeoutError())
    assert is_retryable(OSError("unreachable"))
    assert not is_retryable(ValueError("bug"))


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    saved = set(RedactingFilter.secrets)
    configure(5, stream=stream, fmt="%(levelname)s %(message)s")
    yield stream
    RedactingFilter.secrets.clear()
    RedactingFilter.secrets.update(saved)
    configure(4)


def test_registered_secrets_never_reach_the_log(captured: io.StringIO) -> None:
    register_secrets(["tok3n-value-123", ""])
    log = logging.getLogger("proxy.test")
    log.info("header access-token: %s", "tok3n-value-123")
    log.debug("in text tok3n-value-123 too")
    try:
        raise RuntimeError("failed with tok3n-value-123")
    except RuntimeError:
        log.exception("boom")
    text = captured.getvalue()
    assert "tok3n-value-123" not in text
    assert text.count("[secure]") == 4
    assert "RuntimeError" in text


def test_websockets_debug_logging_stays_off(captured: io.StringIO) -> None:
    configure(6, stream=captured)
    assert not logging.getLogger("websockets").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("proxy").isEnabledFor(5)
