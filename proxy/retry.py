"""Reconnect policy: pure functions, injectable and unit-tested."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from proxy.errors import ConnectFailed, HandshakeRefused, TransportError


def backoff(
    base: float = 1.0, cap: float = 60.0, *, rand: Callable[[float, float], float] = random.uniform
) -> Iterator[float]:
    """Delays for successive reconnect attempts: exponential with "equal jitter".

    The n-th delay is uniform in ``[c/2, c]`` with ``c = min(cap, base * 2**n)`` (the "equal
    jitter" of the AWS architecture blog): random, so a fleet that lost the service at once
    does not come back at once, and never near zero, so a service that drops every connection
    at once sees a few reconnects, not a storm (full jitter may draw several near-zero delays
    in a row). The reference proxy instead waits a fixed 2.5 s forever.
    """
    attempt = 0
    while True:
        ceiling = min(cap, base * 2.0**attempt)
        yield rand(ceiling / 2, ceiling)
        attempt = min(attempt + 1, 62)


def is_retryable(exc: BaseException) -> bool:
    """Whether a failure to reach the service may go away by itself.

    A refusal of the handshake (4xx: bad or used token, wrong mode or region; or a redirect)
    never does.
    """
    if isinstance(exc, HandshakeRefused):
        return False
    return isinstance(exc, ConnectFailed | TransportError | OSError | TimeoutError)
