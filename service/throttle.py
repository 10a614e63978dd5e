"""Throttling of failed ``/tunnel`` handshakes per source address, as AWS throttles them.

Each source address (an IPv4 address, or the /64 prefix of an IPv6 address, which one client
usually owns whole) has a token bucket of ``burst`` failures that refills at ``rate`` failures
per second. A handshake refused with 401, 403 or 404 (no, unknown or spent access token, client
token mismatch, wrong path) takes one token. While an address's bucket is empty, every
handshake from it is answered 429 with ``Retry-After`` (the seconds until the next token), before
any of the request is looked at: no token is hashed, no tunnel looked up.

"Every" includes a handshake with a valid token from that address: a valid token cannot be told
from a guess without checking it, and checking guesses is what the throttle stops (AWS, too,
throttles the address). So a valid peer that shares its address with a failing client waits at
most ``Retry-After`` (``1 / rate`` seconds) per attempt, and a valid peer on any other address
is not affected at all. Successful handshakes take no token.

The table of addresses is bounded: at most ``max_addresses`` entries, the least recently seen
dropped first (a dropped address starts again with a full bucket). Pure: the caller passes the
time (any monotonic clock).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus

#: Handshake refusals that take a token: the ones a token guesser or a scanner gets.
COUNTED = frozenset({HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN, HTTPStatus.NOT_FOUND})


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    """Failed handshakes allowed per address: bursts of ``burst``, then ``rate`` per second."""

    #: failures per second an address earns back; 0 turns throttling off
    rate: float = 1.0
    #: failures an address may have in a row before it is throttled
    burst: int = 20
    #: addresses remembered at most (least recently seen forgotten first)
    max_addresses: int = 10_000

    @property
    def enabled(self) -> bool:
        return self.rate > 0


#: The service's default: bursts of 20 failures per address, then one a second.
DEFAULT_THROTTLE = ThrottleSettings()


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    #: 429s answered since the bucket last ran dry (the first one is logged)
    refused: int = 0


class HandshakeThrottle:
    """The per-address buckets of failed handshakes."""

    def __init__(self, settings: ThrottleSettings) -> None:
        if settings.rate <= 0 or settings.burst < 1 or settings.max_addresses < 1:
            raise ValueError("rate must be positive, burst and max_addresses at least 1")
        self.settings = settings
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    @staticmethod
    def key(host: str) -> str:
        """The address a bucket belongs to: ``host`` itself, or its /64 for IPv6."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)

    def _refill(self, key: str, now: float) -> _Bucket | None:
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        elapsed = max(0.0, now - bucket.stamp)
        bucket.stamp = max(bucket.stamp, now)
        refilled = bucket.tokens + elapsed * self.settings.rate
        bucket.tokens = min(float(self.settings.burst), refilled)
        self._buckets.move_to_end(key)
        return bucket

    def retry_after(self, key: str, now: float) -> int:
        """0 if a handshake from ``key`` may be checked now; otherwise the whole seconds until
        it may (for ``Retry-After``), the 429 counted."""
        bucket = self._refill(key, now)
        if bucket is None:
            return 0
        if bucket.tokens >= 1.0:
            bucket.refused = 0
            return 0
        bucket.refused += 1
        return max(1, math.ceil((1.0 - bucket.tokens) / self.settings.rate))

    def first_refusal(self, key: str) -> bool:
        """Whether the last :meth:`retry_after` of ``key`` was its first 429 since its bucket
        ran dry (log that one; the rest are counted)."""
        bucket = self._buckets.get(key)
        return bucket is not None and bucket.refused == 1

    def failed(self, key: str, now: float) -> None:
        """Charge one failed handshake to ``key``."""
        bucket = self._refill(key, now)
        if bucket is None:
            bucket = _Bucket(float(self.settings.burst), now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.settings.max_addresses:
                self._buckets.popitem(last=False)
        bucket.tokens -= 1.0
