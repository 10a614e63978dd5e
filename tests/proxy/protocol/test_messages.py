"""Messages: hand-checked wire bytes, limits, unknown values, repr."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.protocol.actions import CloseLocal, ConnectionRef, WriteLocal
from proxy.protocol.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TunnelError,
)
from proxy.protocol.messages import (
    MAX_MESSAGE,
    MAX_PAYLOAD,
    Message,
    MessageType,
    from_wire,
    to_wire,
)

from .vectors import VECTORS, Vector

T = MessageType


# ---------------------------------------------------------------------- vectors


@pytest.mark.parametrize("vector", VECTORS, ids=repr)
def test_vector_decodes(vector: Vector) -> None:
    body = vector.frame[2:]
    assert from_wire(body) == vector.message
    assert from_wire(memoryview(body)) == vector.message


@pytest.mark.parametrize("vector", [v for v in VECTORS if v.canonical], ids=repr)
def test_vector_encodes(vector: Vector) -> None:
    assert to_wire(vector.message) == vector.frame[2:]


def test_empty_message_is_unknown_type() -> None:
    """Proto3 omits defaults: zero bytes are a valid message, of type UNKNOWN."""
    assert from_wire(b"") == Message(T.UNKNOWN)
    assert to_wire(Message(T.UNKNOWN)) == b""


def test_explicit_defaults_decode_like_absent_fields() -> None:
    # 08 01 DATA | 10 00 streamId=0 | 18 00 ignorable=false | 22 00 payload=b"" | 2a 00 serviceId=""
    # | 38 00 connectionId=0
    assert from_wire(bytes.fromhex("0801 1000 1800 2200 2a00 3800")) == Message(T.DATA)


def test_last_scalar_wins_and_repeated_fields_accumulate() -> None:
    # 08 01 | 08 02: type twice (the last wins); 32 01 41 | 32 01 42: two availableServiceIds
    message = from_wire(bytes.fromhex("0801 0802 320141 320142"))
    assert message == Message(T.STREAM_START, available_service_ids=("A", "B"))


# ---------------------------------------------------------------------- unknown enum values


def test_unknown_type_survives_as_int() -> None:
    message = from_wire(bytes.fromhex("0863 1801"))  # type=99 ignorable=true
    assert message.type == 99
    assert type(message.type) is int
    assert message.ignorable
    assert to_wire(message) == bytes.fromhex("0863 1801")
    assert repr(message) == "Message(type=99, ignorable)"


def test_known_types_compare_equal_to_their_enum() -> None:
    message = from_wire(bytes.fromhex("0805"))
    assert message.type == T.SERVICE_IDS
    assert message == Message(T.SERVICE_IDS)


def test_negative_type_round_trips() -> None:
    # type=-1: an int32 enum, sign-extended to a 10-byte varint
    wire = bytes.fromhex("08 ffffffffffffffffff01")
    assert from_wire(wire).type == -1
    assert to_wire(Message(-1)) == wire


# ---------------------------------------------------------------------- limits

# DATA stream=1 with a payload of n bytes, written out by hand:
# 08 01 (type) 10 01 (streamId) 22 <varint n> (payload): 64512 = 0b11_1111000_0000000 -> 80 f8 03
MAX_PAYLOAD_HEADER = bytes.fromhex("0801 1001 22 80f803")
# 64513 = 64512 + 1 -> 81 f8 03
OVER_PAYLOAD_HEADER = bytes.fromhex("0801 1001 22 81f803")


def test_max_payload_round_trips() -> None:
    payload = b"\x5a" * MAX_PAYLOAD
    message = Message(T.DATA, stream_id=1, payload=payload)
    assert to_wire(message) == MAX_PAYLOAD_HEADER + payload
    assert from_wire(MAX_PAYLOAD_HEADER + payload) == message


def test_payload_over_the_limit_refused_on_encode() -> None:
    with pytest.raises(LocalProtocolError, match=f"payload of {MAX_PAYLOAD + 1} bytes exceeds"):
        to_wire(Message(T.DATA, stream_id=1, payload=b"\x5a" * (MAX_PAYLOAD + 1)))


def test_payload_over_the_limit_refused_on_decode() -> None:
    wire = OVER_PAYLOAD_HEADER + b"\x5a" * (MAX_PAYLOAD + 1)
    assert len(wire) <= MAX_MESSAGE  # so only the payload limit can refuse it
    with pytest.raises(RemoteProtocolError, match="exceeds") as info:
        from_wire(wire)
    assert info.value.fatal


def test_message_over_the_prefix_limit_refused_on_encode() -> None:
    """A legal payload plus enough other fields cannot be framed: 2 bytes say at most 65535."""
    # Each 128-character service id costs 131 bytes: tag 32, length 80 01, then the id.
    services = tuple(f"{i:0128d}" for i in range(8))
    fits = Message(
        T.DATA, stream_id=1, payload=b"x" * MAX_PAYLOAD, available_service_ids=services[:7]
    )
    assert len(to_wire(fits)) == len(MAX_PAYLOAD_HEADER) + MAX_PAYLOAD + 7 * 131 == 65437
    too_big = dataclasses.replace(fits, available_service_ids=services)  # 65568 bytes
    with pytest.raises(LocalProtocolError, match=f"message of 65568 bytes exceeds {MAX_MESSAGE}"):
        to_wire(too_big)


@pytest.mark.parametrize(
    "message",
    [
        Message(T.DATA, stream_id=2**31),  # int32
        Message(T.DATA, stream_id=-(2**31) - 1),
        Message(T.DATA, connection_id=-1),  # uint32
        Message(T.DATA, connection_id=2**32),
        Message(2**31),  # enum is int32
        Message(T.DATA, service_id="\udc80"),  # a lone surrogate is not UTF-8
        Message(T.DATA, payload="text"),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_unencodable_fields_refused_as_local_errors(message: Message) -> None:
    with pytest.raises(LocalProtocolError, match="unencodable message"):
        to_wire(message)


def test_extreme_ids_round_trip() -> None:
    for message in [
        Message(T.DATA, stream_id=2**31 - 1, connection_id=2**32 - 1),
        Message(T.DATA, stream_id=-(2**31)),
    ]:
        assert from_wire(to_wire(message)) == message


# ---------------------------------------------------------------------- undecodable bytes


@pytest.mark.parametrize(
    "wire",
    [
        "08",  # a tag and no value
        "08ff",  # a varint cut short
        "2205 6869",  # payload announces 5 bytes, 2 follow
        "2a02 fffe",  # serviceId that is not UTF-8
        "3202 c328",  # availableServiceIds entry that is not UTF-8
        "0f",  # wire type 7 does not exist
        "00",  # field number 0 is invalid
        "0c",  # end-group with no start-group
        "08ffffffffffffffffffff01",  # an 11-byte varint
    ],
)
def test_undecodable_bytes_are_fatal_remote_errors(wire: str) -> None:
    with pytest.raises(RemoteProtocolError, match="undecodable") as info:
        from_wire(bytes.fromhex(wire))
    assert info.value.fatal


# ---------------------------------------------------------------------- repr and value semantics


def test_repr_truncates_payloads() -> None:
    long = Message(T.DATA, stream_id=3, service_id="SSH1", connection_id=2, payload=b"A" * 10_000)
    text = repr(long)
    assert text == (
        "Message(DATA, stream=3, service='SSH1', conn=2, payload[10000]=b'" + "A" * 24 + "'...)"
    )
    assert len(text) < 100


def test_repr_of_short_payload_is_complete() -> None:
    assert repr(Message(T.DATA, stream_id=1, payload=b"hi")) == (
        "Message(DATA, stream=1, payload[2]=b'hi')"
    )
    exactly = Message(T.DATA, payload=b"B" * 24)
    assert repr(exactly) == f"Message(DATA, payload[24]=b'{'B' * 24}')"


def test_repr_shows_only_present_fields() -> None:
    assert repr(Message(T.SESSION_RESET)) == "Message(SESSION_RESET)"
    assert repr(Message(T.SERVICE_IDS, available_service_ids=("SSH1", "HTTP1"))) == (
        "Message(SERVICE_IDS, services=['SSH1', 'HTTP1'])"
    )


def test_messages_are_frozen_values() -> None:
    a = Message(T.DATA, stream_id=1, payload=b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.stream_id = 2  # type: ignore[misc]
    assert a == Message(T.DATA, stream_id=1, payload=b"x")
    assert len({a, Message(T.DATA, stream_id=1, payload=b"x")}) == 1


def test_action_reprs_do_not_dump_payloads() -> None:
    conn = ConnectionRef("SSH1", 1, 2)
    assert str(conn) == "SSH1/1/2"
    assert str(ConnectionRef("", 4, 1)) == "-/4/1"
    assert repr(WriteLocal(conn, b"secret" * 1000)) == "WriteLocal(SSH1/1/2, 6000 bytes)"
    assert "ConnectionRef" in repr(CloseLocal(conn))


def test_error_tree() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(ProtocolError, TunnelError)
    assert not RemoteProtocolError("one message").fatal
    assert RemoteProtocolError("stream", fatal=True).fatal
    assert str(RemoteProtocolError("text", fatal=True)) == "text"
