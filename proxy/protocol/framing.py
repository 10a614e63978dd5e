"""Tunnel frames: a 2-byte big-endian length, then one serialised :class:`Message`.

Tunnel frames are only loosely coupled to WebSocket messages: one WebSocket message may carry
several frames, or part of one. :class:`Decoder` buffers across WebSocket messages.
"""

from __future__ import annotations

from proxy.protocol.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocol.messages import MAX_MESSAGE, Message, from_wire, to_wire

PREFIX = 2
#: The largest WebSocket message either side of a tunnel accepts (two full frames fit).
MAX_WS_MESSAGE = 131076


def encode(message: Message) -> bytes:
    """One frame: length prefix + serialised message.

    Raises:
        LocalProtocolError: the message cannot be framed (see :func:`to_wire`), or it
            serialises to nothing (type UNKNOWN, every field default): a length of 0 is invalid.
    """
    wire = to_wire(message)
    if not wire:
        raise LocalProtocolError("an empty message cannot be framed: length 0 is invalid")
    return len(wire).to_bytes(PREFIX, "big") + wire


def frame_parts(head: bytes, body: bytes) -> tuple[bytes, bytes, bytes]:
    """One frame of a message serialised in two parts, as pieces to join: prefix, head, body.

    See :func:`~proxy.protocol.messages.payload_wire`. The pieces are left unjoined so that a
    sender joining several frames into one WebSocket message copies each payload once.

    Raises:
        LocalProtocolError: the message is over :data:`MAX_MESSAGE`, or empty.
    """
    size = len(head) + len(body)
    if not 0 < size <= MAX_MESSAGE:
        raise LocalProtocolError(f"message of {size} bytes cannot be framed (1..{MAX_MESSAGE})")
    return size.to_bytes(PREFIX, "big"), head, body


class Decoder:
    """Incremental frame decoder.

    ``max_message`` bounds what is buffered for one incomplete frame; a prefix announcing more
    is rejected before any of its body is buffered. After a :class:`RemoteProtocolError` the
    decoder is unusable (the byte stream has lost its framing).
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buffer = bytearray()
        self._max = max_message
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """Add bytes; return every message they complete, in order.

        Raises:
            RemoteProtocolError: a frame is oversized, empty or undecodable (always fatal).
        """
        if self._failed:
            raise RemoteProtocolError("decoder used after a framing error", fatal=True)
        if self._buffer:
            self._buffer += data
            buf: bytes | bytearray = self._buffer
        else:
            buf = data
        view = memoryview(buf)
        messages: list[Message] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= PREFIX:
                size = (buf[pos] << 8) | buf[pos + 1]
                if size == 0 or size > self._max:
                    self._failed = True
                    raise RemoteProtocolError(
                        f"tunnel frame length {size} outside 1..{self._max}", fatal=True
                    )
                if end - pos - PREFIX < size:
                    break
                start = pos + PREFIX
                pos = start + size
                try:
                    messages.append(from_wire(view[start:pos]))
                except RemoteProtocolError:
                    self._failed = True
                    raise
        finally:
            view.release()
        if buf is self._buffer:
            del self._buffer[:pos]
        elif pos < end:
            self._buffer += data[pos:]
        return messages
