"""Errors raised or recorded by the sans-IO protocol core.

The tree (its root is :mod:`iotunnel.errors`, the rest lives in :mod:`proxy.errors`)::

    IotunnelError
     +-- TunnelError
          +-- ProtocolError                 the tunnel protocol was broken
               +-- LocalProtocolError       ... by us (a bug or misuse of the core)
               +-- RemoteProtocolError      ... by the peer or the service (bad bytes, bad message)

Peer input never raises out of :class:`proxy.protocol.session.TunnelSession`: a
:class:`RemoteProtocolError` is recorded on the session instead.
"""

from __future__ import annotations

from iotunnel.errors import IotunnelError


class TunnelError(IotunnelError):
    """Base class of the errors of a tunnel: the protocol's, and (in :mod:`proxy.errors`) the
    network's."""


class ProtocolError(TunnelError):
    """The tunnel protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer (or the service) sent something the protocol does not allow.

    ``fatal`` is true when the byte stream itself is damaged (a bad length prefix or an
    undecodable message): the session cannot resynchronise and the WebSocket must be closed.
    A non-fatal error concerns one message, which was dropped.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal
