"""Hand-written frame vectors (``tests/vectors/*.hex``) and the messages they decode to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.protocol.messages import Message, MessageType

VECTOR_DIR = Path(__file__).resolve().parents[2] / "vectors"

T = MessageType


def load_hex(name: str) -> bytes:
    """The bytes of ``tests/vectors/<name>.hex``: ``#`` comments and whitespace dropped."""
    text = (VECTOR_DIR / f"{name}.hex").read_text(encoding="ascii")
    digits = "".join(line.split("#", 1)[0] for line in text.splitlines())
    return bytes.fromhex(digits)


@dataclass(frozen=True)
class Vector:
    """One frame: its file, the message it carries, and whether our encoder must produce it."""

    name: str
    message: Message
    canonical: bool = True  #: ``encode(message)`` yields exactly these bytes

    @property
    def frame(self) -> bytes:
        return load_hex(self.name)

    def __repr__(self) -> str:  # pytest ids
        return self.name


VECTORS = [
    Vector(
        "data_v3",
        Message(T.DATA, stream_id=1, service_id="SSH1", connection_id=1, payload=b"hi"),
    ),
    Vector(
        "stream_start_v3", Message(T.STREAM_START, stream_id=1, service_id="SSH1", connection_id=1)
    ),
    Vector("stream_start_v2", Message(T.STREAM_START, stream_id=2, service_id="SSH1")),
    Vector("stream_start_v1", Message(T.STREAM_START, stream_id=1)),
    Vector(
        "connection_start",
        Message(T.CONNECTION_START, stream_id=1, service_id="SSH1", connection_id=2),
    ),
    Vector(
        "connection_reset",
        Message(T.CONNECTION_RESET, stream_id=1, service_id="SSH1", connection_id=2),
    ),
    Vector("stream_reset_v2", Message(T.STREAM_RESET, stream_id=2, service_id="SSH1")),
    Vector("session_reset", Message(T.SESSION_RESET)),
    Vector("service_ids", Message(T.SERVICE_IDS, available_service_ids=("SSH1", "HTTP1"))),
    Vector("unknown_type_ignorable", Message(9, ignorable=True)),
    Vector(
        "data_multibyte_varints",
        Message(T.DATA, stream_id=300, connection_id=2**32 - 1, payload=b"\x00"),
    ),
    Vector(
        "stream_start_negative_id",
        Message(T.STREAM_START, stream_id=-1, service_id="SSH1", connection_id=1),
    ),
    Vector(
        "data_v3_reordered",
        Message(T.DATA, stream_id=1, service_id="SSH1", connection_id=1, payload=b"hi"),
        canonical=False,
    ),
]
