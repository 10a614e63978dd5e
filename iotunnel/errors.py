"""The root of the exceptions iotunnel raises on purpose, and the one :class:`ConfigError`.

::

    IotunnelError
     +-- ConfigError                     bad flag, file line, variable or setting  -> exit 2
     +-- TunnelError                     (proxy.protocol.errors, proxy.errors)
          +-- ProtocolError ...
          +-- TransportError ...

Messages are one line and never contain tokens or keys. Pure: no I/O.
"""

from __future__ import annotations

__all__ = ["ConfigError", "IotunnelError"]


class IotunnelError(Exception):
    """Base class of every error iotunnel raises on purpose."""


class ConfigError(IotunnelError):
    """A configuration problem; the one-line message names the flag, file:line, variable or key."""
