"""The iotunnel exception tree.

::

    IotunnelError                        (iotunnel.errors)
     +-- ConfigError                     bad flag, file line, variable or setting  -> exit 2
     +-- TunnelError                     (proxy.protocol.errors)
          +-- ProtocolError
          |    +-- LocalProtocolError
          |    +-- RemoteProtocolError
          +-- TransportError                  the network failed us
               +-- HandshakeRefused      the service answered the upgrade with 4xx or a redirect
               |                         -> do not retry (exit 3)
               +-- ConnectFailed         TCP/TLS/proxy connect failed              -> retry

Third-party exceptions (OSError, ssl, websockets) are mapped onto this tree only in
``proxy/io``. Messages never contain tokens or keys.
"""

from __future__ import annotations

from proxy.protocol.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TunnelError,
)

__all__ = [
    "ConnectFailed",
    "HandshakeRefused",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "TransportError",
    "TunnelError",
]


class TransportError(TunnelError):
    """The connection to the tunnel service failed."""


class HandshakeRefused(TransportError):
    """The service refused the WebSocket upgrade (4xx) or redirected it: retrying cannot help.

    ``message`` is one line: what the service answered, and what to do about it.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConnectFailed(TransportError):
    """Could not reach the tunnel service (DNS, TCP, TLS, proxy, 5xx, timeout)."""
