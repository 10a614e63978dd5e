"""What the session asks its I/O shell to do, and how it names a local connection."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConnectionRef:
    """One local TCP connection carried by the tunnel.

    ``service_id`` is ``""`` for a V1 (unnamed) stream; ``connection_id`` is 1 for V1 and V2
    streams, which carry a single connection each.
    """

    service_id: str
    stream_id: int
    connection_id: int

    def __str__(self) -> str:
        return f"{self.service_id or '-'}/{self.stream_id}/{self.connection_id}"


@dataclass(frozen=True, slots=True)
class ServiceIdsReceived:
    """The service announced the tunnel's service IDs (after every (re)connect)."""

    service_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OpenLocal:
    """Destination: connect to the endpoint mapped to ``conn.service_id``.

    Report failure with :meth:`TunnelSession.connection_closed`; success needs no report.
    DATA for the connection may arrive (as :class:`WriteLocal`) before the connect completes.
    """

    conn: ConnectionRef


@dataclass(frozen=True, slots=True)
class WriteLocal:
    """Write ``data`` to the local connection."""

    conn: ConnectionRef
    data: bytes

    def __repr__(self) -> str:
        return f"WriteLocal({self.conn}, {len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class CloseLocal:
    """Close the local connection. The session forgot it.

    ``reset`` is False when the peer ended the connection (CONNECTION_RESET, STREAM_RESET): its
    far end most likely closed normally, so close after writing what is queued (FIN). It is
    True when the connection was cut: the whole session ended (SESSION_RESET, a broken frame
    stream, :meth:`TunnelSession.reset` after losing the WebSocket) or a new stream replaced its
    stream (a STREAM_START for the same service; on V1/V2 a source's next connection). Data in
    flight is lost, so reset the local connection (RST) for its client to see an error rather
    than a clean end it could take for the end of a complete transfer.
    """

    conn: ConnectionRef
    reset: bool = False


Action = ServiceIdsReceived | OpenLocal | WriteLocal | CloseLocal
