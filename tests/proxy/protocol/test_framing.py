"""Framing: the 2-byte length prefix and the incremental decoder."""

from __future__ import annotations

import re

import pytest

from proxy.protocol.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocol.framing import PREFIX, Decoder, encode, frame_parts
from proxy.protocol.messages import MAX_MESSAGE, MAX_PAYLOAD, Message, MessageType
from proxy.protocol.session import DataFramer

from .vectors import VECTORS, Vector, load_hex

T = MessageType

# A frame to follow each vector, so that "trailing partial data" is a real next frame.
TRAILER = load_hex("service_ids")
TRAILER_MESSAGE = Message(T.SERVICE_IDS, available_service_ids=("SSH1", "HTTP1"))


def tr(frame: bytes, expected: list[Message]) -> None:
    """Feed ``frame`` (h11's ``tr()``): whole, byte at a time, and followed by partial data."""
    # Whole.
    decoder = Decoder()
    assert decoder.feed(frame) == expected
    assert decoder.buffered == 0

    # Byte at a time: each message comes out with its last byte, not before.
    decoder = Decoder()
    got: list[Message] = []
    ends = _frame_ends(frame)
    for i in range(len(frame)):
        out = decoder.feed(frame[i : i + 1])
        assert len(out) == (1 if i + 1 in ends else 0)
        got += out
        assert decoder.buffered == i + 1 - max([0, *(e for e in ends if e <= i + 1)])
    assert got == expected

    # Followed by every strict prefix of another frame, which is kept for the next feed.
    for k in range(1, len(TRAILER)):
        decoder = Decoder()
        assert decoder.feed(frame + TRAILER[:k]) == expected
        assert decoder.buffered == k
        assert decoder.feed(TRAILER[k:]) == [TRAILER_MESSAGE]
        assert decoder.buffered == 0


def _frame_ends(stream: bytes) -> set[int]:
    """Offsets just past each frame of a well-formed ``stream``, read from the prefixes."""
    ends, pos = set(), 0
    while pos < len(stream):
        pos += 2 + int.from_bytes(stream[pos : pos + 2], "big")
        ends.add(pos)
    return ends


@pytest.mark.parametrize("vector", VECTORS, ids=repr)
def test_vector(vector: Vector) -> None:
    tr(vector.frame, [vector.message])
    if vector.canonical:
        assert encode(vector.message) == vector.frame


def test_several_frames_per_chunk_at_every_chunk_size() -> None:
    stream = b"".join(v.frame for v in VECTORS)
    expected = [v.message for v in VECTORS]
    tr(stream, expected)
    for size in range(1, 40):
        decoder = Decoder()
        got: list[Message] = []
        for pos in range(0, len(stream), size):
            got += decoder.feed(stream[pos : pos + size])
        assert got == expected, size
        assert decoder.buffered == 0


def test_empty_feeds_are_harmless() -> None:
    decoder = Decoder()
    frame = load_hex("data_v3")
    assert decoder.feed(b"") == []
    assert decoder.feed(frame[:1]) == []
    assert decoder.feed(b"") == []
    assert decoder.buffered == 1
    assert decoder.feed(frame[1:]) == [VECTORS[0].message]


def test_empty_message_frame() -> None:
    """A prefix of 1 with a body of ``08 00`` is UNKNOWN, explicitly: the smallest real frame."""
    tr(bytes.fromhex("0002 0800"), [Message(T.UNKNOWN)])


# ---------------------------------------------------------------------- limits

# DATA stream=1 payload=64512 bytes, by hand: prefix 64520 = fc08;
# 08 01 (type) | 10 01 (streamId) | 22 80f803 <payload>
MAX_FRAME_HEAD = bytes.fromhex("fc08 0801 1001 2280f803")
# payload of 64513: prefix 64521 = fc09; length varint 81f803
OVER_FRAME_HEAD = bytes.fromhex("fc09 0801 1001 2281f803")


def test_max_payload_frame() -> None:
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256)
    message = Message(T.DATA, stream_id=1, payload=payload)
    assert encode(message) == MAX_FRAME_HEAD + payload
    decoder = Decoder()
    frame = MAX_FRAME_HEAD + payload
    assert decoder.feed(frame[:30_000]) == []
    assert decoder.feed(frame[30_000:60_000]) == []
    assert decoder.feed(frame[60_000:]) == [message]


def test_empty_message_refused_on_encode() -> None:
    """Type UNKNOWN with every field default serialises to nothing, and length 0 is invalid.

    Regression: encode() used to produce the frame ``00 00``, which Decoder refuses as fatal.
    """
    with pytest.raises(LocalProtocolError, match="length 0"):
        encode(Message(T.UNKNOWN))
    assert encode(Message(T.UNKNOWN, ignorable=True)) == bytes.fromhex("0002 1801")


def test_payload_over_the_limit_refused_on_encode() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode(Message(T.DATA, stream_id=1, payload=b"x" * (MAX_PAYLOAD + 1)))


def test_payload_over_the_limit_refused_on_decode() -> None:
    frame = OVER_FRAME_HEAD + b"x" * (MAX_PAYLOAD + 1)
    with pytest.raises(RemoteProtocolError, match=f"exceeds {MAX_PAYLOAD}") as info:
        Decoder().feed(frame)
    assert info.value.fatal


def test_largest_prefix_is_accepted_by_default() -> None:
    """65535 fits the prefix; the default bound is the prefix itself."""
    decoder = Decoder()
    assert decoder.feed(b"\xff\xff" + b"\x00" * 100) == []
    assert decoder.buffered == 102
    assert MAX_MESSAGE == 0xFFFF


def test_length_prefix_0_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match=re.escape("length 0 outside 1..65535")) as info:
        Decoder().feed(b"\x00\x00")
    assert info.value.fatal


def test_length_prefix_0_after_a_partial_buffer_rejected() -> None:
    decoder = Decoder()
    assert decoder.feed(b"\x00") == []
    with pytest.raises(RemoteProtocolError, match="length 0"):
        decoder.feed(b"\x00")


def test_prefix_over_custom_max_rejected_before_the_body() -> None:
    decoder = Decoder(max_message=100)
    assert decoder.feed(b"\x00") == []  # one byte of prefix says nothing yet
    with pytest.raises(RemoteProtocolError, match=re.escape("length 101 outside 1..100")) as info:
        decoder.feed(b"\x65")  # 101: refused with no body byte received
    assert info.value.fatal
    assert decoder.buffered == 2  # nothing beyond the prefix was ever buffered


def test_prefix_at_custom_max_accepted() -> None:
    body = bytes.fromhex("0801 2260") + b"p" * 96  # DATA, payload of 96 = 0x60 bytes: 100 bytes
    frame = b"\x00\x64" + body
    assert Decoder(max_message=100).feed(frame) == [Message(T.DATA, payload=b"p" * 96)]


def test_prefix_over_max_after_a_complete_frame_in_the_same_chunk() -> None:
    decoder = Decoder(max_message=100)
    with pytest.raises(RemoteProtocolError, match="length 65535"):
        decoder.feed(load_hex("session_reset") + b"\xff\xff")


@pytest.mark.parametrize(
    "frame",
    [
        "0001 ff",  # a lone 0xff: a varint tag that never ends
        "0002 2a05",  # serviceId announces 5 bytes, the message ends
        "0004 2a02 fffe",  # serviceId that is not UTF-8
        "0001 0f",  # wire type 7
    ],
)
def test_undecodable_frame_is_fatal(frame: str) -> None:
    with pytest.raises(RemoteProtocolError, match="undecodable") as info:
        Decoder().feed(bytes.fromhex(frame))
    assert info.value.fatal


def test_undecodable_frame_fed_in_pieces() -> None:
    decoder = Decoder()
    assert decoder.feed(bytes.fromhex("0004 2a")) == []
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        decoder.feed(bytes.fromhex("02 fffe"))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (b"\x00\x00", load_hex("data_v3")),  # failed on the prefix
        (bytes.fromhex("0001 ff"), load_hex("data_v3")),  # failed on the body
        (bytes.fromhex("0001 ff"), b""),
    ],
)
def test_decoder_unusable_after_failure(first: bytes, second: bytes) -> None:
    decoder = Decoder()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(first)
    with pytest.raises(RemoteProtocolError, match="used after a framing error") as info:
        decoder.feed(second)
    assert info.value.fatal


def test_data_frame_in_two_parts_vector() -> None:
    """A DATA frame as the session builds it: the connection's fields once, then the payload.

    Hand-derived: 08 01 (type DATA) 10 05 (streamId 5) 2a 04 "SSH1" (serviceId)
    38 03 (connectionId 3), then 22 02 "hi" (payload); 16 bytes, prefix 00 10.
    """
    frame = DataFramer(5, "SSH1", 3)(b"hi")
    assert frame == bytes.fromhex("0010 0801 1005 2a04 53534831 3803 2202 6869")
    assert Decoder().feed(frame) == [
        Message(T.DATA, stream_id=5, service_id="SSH1", connection_id=3, payload=b"hi")
    ]


def test_data_frame_of_an_empty_payload_is_the_header_alone() -> None:
    assert DataFramer(1, "", 0)(b"") == bytes.fromhex("0004 0801 1001")


def test_data_frame_limits() -> None:
    framer = DataFramer(1, "SSH1", 1)
    assert len(framer(b"x" * MAX_PAYLOAD)) == PREFIX + 6 + 6 + 4 + MAX_PAYLOAD
    with pytest.raises(LocalProtocolError, match="exceeds"):
        framer(b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(LocalProtocolError, match="cannot be framed"):
        frame_parts(b"", b"")
    with pytest.raises(LocalProtocolError, match="cannot be framed"):
        frame_parts(b"\x08\x01", b"x" * MAX_MESSAGE)
