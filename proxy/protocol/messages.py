"""Tunnel messages: the ``com.amazonaws.iot.securedtunneling.Message`` schema as frozen dataclasses.

This is the only module that imports the generated protobuf code. Everything above it speaks
:class:`Message`; everything below it is bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from proxy.protocol._pb import Message_pb2 as _pb
from proxy.protocol.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocol.limits import MAX_PAYLOAD as MAX_PAYLOAD

#: Largest serialised message: the 2-byte length prefix cannot say more.
MAX_MESSAGE = 0xFFFF

_PAYLOAD_REPR = 24


class MessageType(enum.IntEnum):
    """``Message.Type``; values the schema does not know stay plain ints on :class:`Message`."""

    UNKNOWN = 0  #: never valid; an empty message decodes to this
    DATA = 1  #: bytes for one connection
    STREAM_START = 2  #: source -> destination: open a stream (and its first connection)
    STREAM_RESET = 3  #: close a stream and every connection on it
    SESSION_RESET = 4  #: service -> peer: close everything
    SERVICE_IDS = 5  #: service -> peer: the services of this tunnel
    CONNECTION_START = 6  #: source -> destination: another connection on an open stream (V3)
    CONNECTION_RESET = 7  #: close one connection (V3)


@dataclass(frozen=True, slots=True)
class Message:
    """One tunnel message.

    ``type`` is a :class:`MessageType`, or the plain int of a type this schema does not know.
    ``connection_id == 0`` means the field was absent (a V1 or V2 peer); ``service_id == ""``
    means no service was named (a V1 peer).
    """

    type: int
    stream_id: int = 0
    service_id: str = ""
    connection_id: int = 0
    payload: bytes = b""
    ignorable: bool = False
    available_service_ids: tuple[str, ...] = ()

    def __repr__(self) -> str:
        try:
            name = MessageType(self.type).name
        except ValueError:
            name = f"type={self.type}"
        parts = [name]
        if self.stream_id:
            parts.append(f"stream={self.stream_id}")
        if self.service_id:
            parts.append(f"service={self.service_id!r}")
        if self.connection_id:
            parts.append(f"conn={self.connection_id}")
        if self.payload:
            head = self.payload[:_PAYLOAD_REPR]
            more = "..." if len(self.payload) > _PAYLOAD_REPR else ""
            parts.append(f"payload[{len(self.payload)}]={head!r}{more}")
        if self.ignorable:
            parts.append("ignorable")
        if self.available_service_ids:
            parts.append(f"services={list(self.available_service_ids)}")
        return f"Message({', '.join(parts)})"


def _check_payload(payload: bytes) -> None:
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")


def to_wire(message: Message) -> bytes:
    """Serialise ``message`` (without the length prefix).

    Raises:
        LocalProtocolError: the message could not be sent (too large, bad field).
    """
    _check_payload(message.payload)
    try:
        pb = _pb.Message(
            type=message.type,
            streamId=message.stream_id,
            ignorable=message.ignorable,
            payload=message.payload,
            serviceId=message.service_id,
            availableServiceIds=message.available_service_ids,
            connectionId=message.connection_id,
        )
    except (ValueError, TypeError) as exc:  # out-of-range id, unencodable string, wrong type
        raise LocalProtocolError(f"unencodable message: {exc}") from exc
    wire: bytes = pb.SerializeToString()
    if len(wire) > MAX_MESSAGE:
        raise LocalProtocolError(f"message of {len(wire)} bytes exceeds {MAX_MESSAGE}")
    return wire


def payload_wire(payload: bytes) -> bytes:
    """Serialise a message that holds only ``payload``, to follow a serialised header.

    Protobuf parses concatenated serialisations of a message as one message with the fields of
    both (fields may come in any order), so a DATA frame can be a header serialised once per
    connection followed by this: the fields that never change are not rebuilt for every frame.

    Raises:
        LocalProtocolError: ``payload`` is over :data:`MAX_PAYLOAD`.
    """
    _check_payload(payload)
    wire: bytes = _pb.Message(payload=payload).SerializeToString()
    return wire


def from_wire(data: bytes | memoryview) -> Message:
    """Parse one serialised message (without the length prefix).

    Raises:
        RemoteProtocolError: not a valid ``Message`` (fatal: the stream cannot be trusted).
    """
    pb = _pb.Message()
    try:
        pb.ParseFromString(data)
    except (DecodeError, ValueError, TypeError) as exc:
        raise RemoteProtocolError("undecodable tunnel message", fatal=True) from exc
    payload = pb.payload  # every read of a bytes field copies it
    if len(payload) > MAX_PAYLOAD:
        message = f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}"
        raise RemoteProtocolError(message, fatal=True)
    return Message(
        type=pb.type,
        stream_id=pb.streamId,
        service_id=pb.serviceId,
        connection_id=pb.connectionId,
        payload=payload,
        ignorable=pb.ignorable,
        available_service_ids=tuple(pb.availableServiceIds),
    )
