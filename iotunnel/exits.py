"""The exit codes of iotunnel's commands; the agent's restart policy reads the proxy's."""

from __future__ import annotations

import enum

__all__ = ["ExitCode"]


class ExitCode(enum.IntEnum):
    """Process exit codes of ``iotunnel-proxy`` (and, where they apply, the agent and service)."""

    CLOSED = 0  #: the service closed the tunnel (CloseTunnel, expiry); a clean stop
    INTERNAL = 1  #: an unexpected internal error (or an address the service cannot bind)
    CONFIG = 2  #: a usage or configuration error, including a mapping the tunnel cannot use
    REFUSED = 3  #: the service refused the handshake (4xx: bad, used or expired token)
    NETWORK = 4  #: gave up reaching the service
    INTERRUPTED = 130  #: SIGINT (128 + 2)
    TERMINATED = 143  #: SIGTERM (128 + 15)
