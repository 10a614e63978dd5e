"""The tunnel session: the protocol state machine of one proxy, in either role.

The session never performs I/O. Its inputs are the bytes the service sent (``receive_data``)
and what happened locally (``open_connection``, ``encode_data``, ``connection_closed``,
``reset``). Its outputs are frames to send (``data_to_send``), actions for the local side
(``actions``) and the protocol errors the peer made (``errors``). Peer input never raises.

Rules (proxy/protocol/PROTOCOL.md, section 'Rules'; the reference's V1/V2/V3 protocol guides):

* each service has at most one active stream; the source opens it with STREAM_START and, on V3,
  adds connections with CONNECTION_START; a new STREAM_START for a service replaces its stream;
* messages naming a stream that is not the service's active one are stale and ignored, as are
  resets and data for connections the session no longer knows;
* a destination detects the peer's version from each STREAM_START: neither a service id nor
  a connection id is V1, no connection id is V2, a connection id is V3 (with or without a
  service id); it answers in kind (STREAM_RESET for V1/V2, CONNECTION_RESET for V3 when a local
  connection ends), with the connection ids of a V3 stream;
* a source speaks the version it was built with (``-y V1|V2``, default V3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iotunnel.mode import Mode
from iotunnel.rules import SERVICE_ID_RE
from proxy.protocol.actions import (
    Action,
    CloseLocal,
    ConnectionRef,
    OpenLocal,
    ServiceIdsReceived,
    WriteLocal,
)
from proxy.protocol.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocol.framing import Decoder, encode, frame_parts
from proxy.protocol.messages import Message, MessageType, payload_wire, to_wire

_MAX_STREAM_ID = 2**31 - 1
_MAX_CONNECTION_ID = 2**32 - 1


@dataclass(slots=True)
class _Stream:
    stream_id: int
    version: int
    connections: set[int] = field(default_factory=set)
    next_connection_id: int = 2


_T = MessageType


@dataclass(frozen=True, slots=True)
class DataFramer:
    """Frames payloads as DATA messages of one connection (see :meth:`TunnelSession.framer`).

    The connection's fields are serialised once; each frame adds only its payload
    (:func:`~proxy.protocol.messages.payload_wire`).
    """

    stream_id: int
    service_id: str
    connection_id: int
    _head: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        head = to_wire(
            Message(
                _T.DATA,
                stream_id=self.stream_id,
                service_id=self.service_id,
                connection_id=self.connection_id,
            )
        )
        object.__setattr__(self, "_head", head)

    def __call__(self, data: bytes) -> bytes:
        return b"".join(self.pieces(data))

    def pieces(self, data: bytes) -> tuple[bytes, bytes, bytes]:
        """The frame for ``data`` as pieces to join (see :func:`~.framing.frame_parts`)."""
        return frame_parts(self._head, payload_wire(data))


class TunnelSession:
    """Protocol state of one proxy's tunnel.

    Args:
        role: source or destination.
        version: the protocol version a source speaks (1, 2 or 3). A destination speaks whatever
            each stream's STREAM_START showed; the argument is ignored there.
    """

    def __init__(self, role: Mode, *, version: int = 3) -> None:
        if version not in (1, 2, 3):
            raise LocalProtocolError(f"unknown protocol version {version}")
        self.role = role
        self.version = version
        #: The service IDs the service announced on this connection, or None before SERVICE_IDS.
        self.service_ids: tuple[str, ...] | None = None
        #: True once the byte stream lost its framing: drop the WebSocket and call reset().
        self.broken = False
        self._decoder = Decoder()
        self._streams: dict[str, _Stream] = {}
        self._next_stream_id = 1
        self._actions: list[Action] = []
        self._out: list[bytes] = []
        self._errors: list[RemoteProtocolError] = []

    # ------------------------------------------------------------------ outputs

    def actions(self) -> list[Action]:
        """Take the actions produced since the last call, in order."""
        actions, self._actions = self._actions, []
        return actions

    def data_to_send(self) -> list[bytes]:
        """Take the control frames produced since the last call, in order."""
        out, self._out = self._out, []
        return out

    def errors(self) -> list[RemoteProtocolError]:
        """Take the protocol errors the peer made since the last call."""
        errors, self._errors = self._errors, []
        return errors

    # ------------------------------------------------------------------ queries

    def is_open(self, conn: ConnectionRef) -> bool:
        """Whether ``conn`` is still carried by the tunnel."""
        return self._live(conn) is not None

    @property
    def connection_count(self) -> int:
        """Local connections the tunnel carries now."""
        return sum(len(s.connections) for s in self._streams.values())

    def open_connections(self) -> list[ConnectionRef]:
        """Every connection the tunnel carries now."""
        return [
            ConnectionRef(service_id, stream.stream_id, cid)
            for service_id, stream in self._streams.items()
            for cid in sorted(stream.connections)
        ]

    # ------------------------------------------------------------------ peer input

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the service (the payload of a binary WebSocket message)."""
        if self.broken:
            return
        try:
            messages = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            self._errors.append(exc)
            self.broken = True
            self._close_all()
            return
        for message in messages:
            self._handle(message)

    def _handle(self, m: Message) -> None:
        t = m.type
        if t == _T.DATA:
            self._on_data(m)
        elif t == _T.STREAM_START:
            self._on_stream_start(m)
        elif t == _T.CONNECTION_START:
            self._on_connection_start(m)
        elif t == _T.STREAM_RESET:
            self._on_stream_reset(m)
        elif t == _T.CONNECTION_RESET:
            self._on_connection_reset(m)
        elif t == _T.SESSION_RESET:
            self._close_all()
        elif t == _T.SERVICE_IDS:
            self._on_service_ids(m)
        elif not m.ignorable:
            self._error(f"unknown message type {t} (not ignorable) dropped")

    def _on_data(self, m: Message) -> None:
        stream = self._active(m)
        if stream is None:
            return
        cid = m.connection_id or 1
        if cid in stream.connections and m.payload:
            self._actions.append(
                WriteLocal(ConnectionRef(m.service_id, m.stream_id, cid), m.payload)
            )

    def _on_stream_start(self, m: Message) -> None:
        if self.role is Mode.SOURCE:
            self._error("STREAM_START received by a source dropped")
            return
        if m.stream_id <= 0:
            self._error(f"STREAM_START with invalid stream id {m.stream_id} dropped")
            return
        service_id = m.service_id
        # No connection id: V2, or V1 without a service id either. A connection id without a
        # service id is the reference's "V1 format" of an unnamed mapping on a tunnel without
        # services: it numbers its connections and drops DATA that does not name them.
        version = 3 if m.connection_id else 2 if service_id else 1
        cid = m.connection_id or 1
        if self.service_ids is not None and service_id and service_id not in self.service_ids:
            self._error(f"STREAM_START for unannounced service {service_id!r} refused")
            self._send_reset(service_id, m.stream_id, cid, version)
            return
        old = self._streams.pop(service_id, None)
        if old is not None:
            self._close_stream(service_id, old, reset=True)
        self._streams[service_id] = _Stream(m.stream_id, version, {cid})
        self._actions.append(OpenLocal(ConnectionRef(service_id, m.stream_id, cid)))

    def _on_connection_start(self, m: Message) -> None:
        if self.role is Mode.SOURCE:
            self._error("CONNECTION_START received by a source dropped")
            return
        stream = self._active(m)
        if stream is None:
            return
        cid = m.connection_id
        if cid == 0 or stream.version != 3:
            self._error(f"CONNECTION_START without a V3 connection id on stream {m.stream_id}")
            return
        if cid in stream.connections:
            self._error(f"CONNECTION_START for open connection {cid} ignored")
            return
        stream.connections.add(cid)
        self._actions.append(OpenLocal(ConnectionRef(m.service_id, m.stream_id, cid)))

    def _on_stream_reset(self, m: Message) -> None:
        stream = self._active(m)
        if stream is not None:
            del self._streams[m.service_id]
            self._close_stream(m.service_id, stream)

    def _on_connection_reset(self, m: Message) -> None:
        stream = self._active(m)
        if stream is None:
            return
        cid = m.connection_id or 1
        if cid in stream.connections:
            stream.connections.discard(cid)
            self._actions.append(CloseLocal(ConnectionRef(m.service_id, m.stream_id, cid)))

    def _on_service_ids(self, m: Message) -> None:
        bad = [s for s in m.available_service_ids if not SERVICE_ID_RE.fullmatch(s)]
        if bad:
            self._error(f"SERVICE_IDS with invalid service ids {bad!r} ignored")
            return
        self.service_ids = m.available_service_ids
        self._actions.append(ServiceIdsReceived(m.available_service_ids))

    def _active(self, m: Message) -> _Stream | None:
        """The stream ``m`` names if it is its service's active stream; None if stale."""
        if m.stream_id <= 0:
            self._error(f"{MessageType(m.type).name} with invalid stream id {m.stream_id} dropped")
            return None
        stream = self._streams.get(m.service_id)
        if stream is None or stream.stream_id != m.stream_id:
            return None
        return stream

    # ------------------------------------------------------------------ local input

    def open_connection(self, service_id: str) -> ConnectionRef:
        """Source: a local client connected to ``service_id``'s listener.

        Returns the new connection; the STREAM_START or CONNECTION_START for it is in
        :meth:`data_to_send`. On V1/V2 a service carries one connection: an older one is closed.
        The unnamed service ``""`` (a tunnel announcing no service) is a V1 stream whatever the
        version: a destination reads a STREAM_START without a service ID as V1.
        """
        if self.role is not Mode.SOURCE:
            raise LocalProtocolError("only a source opens connections")
        if self.version == 1:
            service_id = ""
        version = self.version if service_id else 1
        stream = self._streams.get(service_id)
        if stream is not None and version == 3 and stream.next_connection_id <= _MAX_CONNECTION_ID:
            cid = stream.next_connection_id
            stream.next_connection_id += 1
            stream.connections.add(cid)
            self._send(_T.CONNECTION_START, service_id, stream.stream_id, cid)
            return ConnectionRef(service_id, stream.stream_id, cid)
        if stream is not None:
            del self._streams[service_id]
            self._close_stream(service_id, stream, reset=True)
        stream_id = self._next_stream_id
        self._next_stream_id = stream_id + 1 if stream_id < _MAX_STREAM_ID else 1
        self._streams[service_id] = _Stream(stream_id, version, {1})
        self._send(_T.STREAM_START, service_id, stream_id, 1 if version == 3 else 0)
        return ConnectionRef(service_id, stream_id, 1)

    def encode_data(self, conn: ConnectionRef, data: bytes) -> bytes | None:
        """The DATA frame carrying ``data`` for ``conn``, or None if the tunnel dropped ``conn``.

        The frame is returned rather than queued so that the I/O shell can schedule data of
        different connections fairly; control frames go through :meth:`data_to_send`.
        """
        framer = self.framer(conn)
        return None if framer is None else framer(data)

    def framer(self, conn: ConnectionRef) -> DataFramer | None:
        """A function framing DATA for ``conn`` as it is on the wire now, or None if dropped.

        For an I/O shell that frames data when it sends it rather than when it reads it: data
        read before the local side closed must still go out (before the reset), although by
        then the session has forgotten the connection. Data queued for a connection the peer
        reset, or from before a :meth:`reset`, is stale: the shell drops it.
        """
        stream = self._live(conn)
        if stream is None:
            return None
        return DataFramer(
            conn.stream_id, conn.service_id, conn.connection_id if stream.version == 3 else 0
        )

    def connection_closed(self, conn: ConnectionRef) -> None:
        """The local connection ended (EOF, error, or a failed connect): tell the peer."""
        stream = self._live(conn)
        if stream is None:
            return
        stream.connections.discard(conn.connection_id)
        if stream.version != 3:
            del self._streams[conn.service_id]
        self._send_reset(conn.service_id, conn.stream_id, conn.connection_id, stream.version)

    def reset(self) -> None:
        """The WebSocket is gone: every stream is invalid. Closes all local connections."""
        self._close_all()
        self._out.clear()  # frames for the old WebSocket would name dead streams on the new one
        self._decoder = Decoder()
        self.service_ids = None
        self.broken = False

    # ------------------------------------------------------------------ helpers

    def _live(self, conn: ConnectionRef) -> _Stream | None:
        stream = self._streams.get(conn.service_id)
        if (
            stream is None
            or stream.stream_id != conn.stream_id
            or conn.connection_id not in stream.connections
        ):
            return None
        return stream

    def _close_stream(self, service_id: str, stream: _Stream, *, reset: bool = False) -> None:
        for cid in sorted(stream.connections):
            ref = ConnectionRef(service_id, stream.stream_id, cid)
            self._actions.append(CloseLocal(ref, reset=reset))

    def _close_all(self) -> None:
        streams, self._streams = self._streams, {}
        for service_id, stream in streams.items():
            self._close_stream(service_id, stream, reset=True)

    def _send_reset(self, service_id: str, stream_id: int, cid: int, version: int) -> None:
        if version == 3:
            self._send(_T.CONNECTION_RESET, service_id, stream_id, cid)
        else:
            self._send(_T.STREAM_RESET, service_id, stream_id, 0)

    def _send(self, type_: MessageType, service_id: str, stream_id: int, cid: int) -> None:
        self._out.append(
            encode(Message(type_, stream_id=stream_id, service_id=service_id, connection_id=cid))
        )

    def _error(self, text: str) -> None:
        self._errors.append(RemoteProtocolError(text))
