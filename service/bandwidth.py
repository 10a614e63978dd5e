"""A token bucket: the per-tunnel, per-direction bandwidth cap of the relay.

AWS IoT Secure Tunneling caps each tunnel's bandwidth (proxy/protocol/PROTOCOL.md, section
'Limits'); the self-hosted service can emulate that, so that fairness between the streams of
one tunnel is measurable on loopback. Pure: the caller passes the time and sleeps for the delay
returned.

Each WebSocket message is charged whole when it arrives; the bucket may go into debt, and the
relay holds the message (and stops reading from its sender) until the debt is paid back. So a
message is never split, any message size works whatever the burst, and the long-run rate is
exactly ``rate`` bytes per second. The waits are computed, not polled: one sleep per message
that finds the bucket short, no per-byte work.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` bytes per second, bursts of up to ``burst`` bytes.

    Args:
        rate: bytes per second (> 0).
        burst: the bucket's capacity in bytes (> 0); it starts full.
        now: the current time, in seconds of any monotonic clock.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._stamp = now

    @property
    def tokens(self) -> float:
        """Bytes in the bucket at the last update (negative: debt)."""
        return self._tokens

    def take(self, amount: int, now: float) -> float:
        """Charge ``amount`` bytes at ``now``; return the seconds until the bucket is out of
        debt (0.0 if it is not in debt): how long to hold those bytes."""
        elapsed = max(0.0, now - self._stamp)
        self._stamp = max(self._stamp, now)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate) - amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
