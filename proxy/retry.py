"""Reconnect policy: pure functions, injectable and unit-tested."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from proxy.errors import ConnectFailed, HandshakeRefused, TransportError


def backoff(
    base: float = 1.0, cap: float = 60.0, *, rand: Callable[[float, float], float] = random.uniform
) -> Iterator[float]:
    """Delays for successive reconnect attempts: exponential with full jitter.

    The n-th delay is uniform in ``[0, min(cap, base * 2**n)]`` (the "full jitter" of the AWS
    architecture blog), so a fleet that lost the service at once does not come back at once.
    The reference proxy instead waits a fixed 2.5 s forever.
    """
    attempt = 0
    while True:
        yield rand(0.0, min(cap, base * 2.0**attempt))
        attempt = min(attempt + 1, 62)


def is_retryable(exc: BaseException) -> bool:
    """Whether a failure to reach the service may go away by itself.

    A 4xx refusal of the handshake (bad or used token, wrong mode or region) never does.
    """
    if isinstance(exc, HandshakeRefused):
        return False
    return isinstance(exc, ConnectFailed | TransportError | OSError | TimeoutError)
