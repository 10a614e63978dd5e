"""The relay rules of one tunnel: who is connected, which frames pass, which streams are open.

Pure: messages in, routing decisions out. The server owns the sockets; a :class:`Pairing` only
holds opaque peer handles (compared by identity) and the active stream of each service.

The rules (proxy/protocol/PROTOCOL.md, section 'What the service relays'; the reference's V2/V3
WebSocket protocol guides):

- a source may send DATA, STREAM_START, STREAM_RESET, CONNECTION_START and CONNECTION_RESET;
  a destination DATA, STREAM_RESET and CONNECTION_RESET; SERVICE_IDS and SESSION_RESET come
  only from the service. Anything else is dropped, and the tunnel goes on;
- stream id 0 is invalid, and the service id must be one of the tunnel's services or empty
  (a V1-format message, which V2/V3 proxies may also send);
- STREAM_START (source -> destination) makes its stream the active one of its service, and a
  STREAM_RESET of that stream, either way, ends it;
- when a peer leaves (disconnects, or is replaced by a new connection of the same mode), the
  other peer gets a STREAM_RESET for every active stream, and the table is cleared;
- a STREAM_START (or CONNECTION_START) while the other peer is not connected is answered with a
  STREAM_RESET (CONNECTION_RESET) to the sender, so that its local connection closes at once;
  the AWS documentation does not say what the AWS service does here. Other messages for an
  absent peer are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from iotunnel.mode import Mode
from proxy.protocol.framing import MAX_WS_MESSAGE, encode
from proxy.protocol.messages import Message, MessageType

#: The message types each end may send through the service.
ALLOWED: dict[Mode, frozenset[int]] = {
    Mode.SOURCE: frozenset(
        {
            MessageType.DATA,
            MessageType.STREAM_START,
            MessageType.STREAM_RESET,
            MessageType.CONNECTION_START,
            MessageType.CONNECTION_RESET,
        }
    ),
    Mode.DESTINATION: frozenset(
        {MessageType.DATA, MessageType.STREAM_RESET, MessageType.CONNECTION_RESET}
    ),
}

P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Drop:
    """A message the service refused to relay, and why."""

    message: Message
    reason: str


@dataclass(slots=True)
class Routing:
    """What to do with the messages of one incoming WebSocket message."""

    #: to the other peer, in order
    forward: list[Message] = field(default_factory=list)
    #: back to the sender, in order
    reply: list[Message] = field(default_factory=list)
    #: refused messages
    dropped: list[Drop] = field(default_factory=list)


def type_name(message_type: int) -> str:
    """The name of a message type, or ``type=N`` for one the schema does not know."""
    try:
        return MessageType(message_type).name
    except ValueError:
        return f"type={message_type}"


def describe(message: Message) -> str:
    """A log-safe summary of a message: its header fields and payload size, never the payload."""
    return (
        f"{type_name(message.type)}(stream={message.stream_id}, service={message.service_id!r}, "
        f"conn={message.connection_id}, payload={len(message.payload)}B)"
    )


def pack(messages: Iterable[Message], limit: int = MAX_WS_MESSAGE) -> list[bytes]:
    """Frame ``messages`` into as few WebSocket messages of at most ``limit`` bytes as possible."""
    chunks: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for message in messages:
        frame = encode(message)
        if batch and size + len(frame) > limit:
            chunks.append(b"".join(batch))
            batch, size = [], 0
        batch.append(frame)
        size += len(frame)
    if batch:
        chunks.append(b"".join(batch))
    return chunks


class Pairing(Generic[P]):
    """Relay state of one tunnel: the connected peer of each mode and the active streams."""

    def __init__(self, services: Iterable[str]) -> None:
        self.services = tuple(services)
        self._valid_service_ids = frozenset(self.services) | {""}
        self._peers: dict[Mode, P] = {}
        #: service id -> active stream id, in the order the streams started
        self._streams: dict[str, int] = {}

    def service_ids(self) -> Message:
        """The SERVICE_IDS message announcing this tunnel's services."""
        return Message(MessageType.SERVICE_IDS, available_service_ids=self.services)

    def peer(self, mode: Mode) -> P | None:
        """The connected peer of ``mode``, if any."""
        return self._peers.get(mode)

    @property
    def active_streams(self) -> dict[str, int]:
        """A copy of the table of active streams: service id -> stream id."""
        return dict(self._streams)

    @property
    def empty(self) -> bool:
        """Whether no peer is connected."""
        return not self._peers

    def attach(self, mode: Mode, peer: P) -> list[Message]:
        """Make ``peer`` the connected peer of ``mode``, replacing any previous one.

        Returns the messages for the other peer: STREAM_RESETs when a peer was replaced.
        """
        resets = self._reset_streams() if mode in self._peers else []
        self._peers[mode] = peer
        return resets

    def detach(self, mode: Mode, peer: P) -> list[Message]:
        """Forget ``peer`` if it is still the connected peer of ``mode``.

        Returns the messages for the other peer: STREAM_RESETs for the active streams.
        """
        if self._peers.get(mode) is not peer:
            return []
        del self._peers[mode]
        return self._reset_streams()

    def receive(self, mode: Mode, peer: P, messages: Iterable[Message]) -> Routing:
        """Route the messages ``peer`` (of ``mode``) sent in one WebSocket message."""
        routing = Routing()
        if self._peers.get(mode) is not peer:
            routing.dropped.extend(Drop(m, "sender was replaced") for m in messages)
            return routing
        other_connected = mode.other in self._peers
        for message in messages:
            reason = self._refuse(mode, message)
            if reason is not None:
                routing.dropped.append(Drop(message, reason))
            elif other_connected:
                self._track(message)
                routing.forward.append(message)
            elif message.type == MessageType.STREAM_START:
                routing.reply.append(
                    Message(
                        MessageType.STREAM_RESET,
                        stream_id=message.stream_id,
                        service_id=message.service_id,
                    )
                )
            elif message.type == MessageType.CONNECTION_START:
                routing.reply.append(
                    Message(
                        MessageType.CONNECTION_RESET,
                        stream_id=message.stream_id,
                        service_id=message.service_id,
                        connection_id=message.connection_id,
                    )
                )
            else:
                routing.dropped.append(Drop(message, f"no {mode.other} connected"))
        return routing

    def _refuse(self, mode: Mode, message: Message) -> str | None:
        """Why ``message`` from ``mode`` may not pass, or None."""
        if message.type not in ALLOWED[mode]:
            return f"{mode} may not send {type_name(message.type)}"
        if message.stream_id == 0:
            return "stream id 0"
        if message.service_id not in self._valid_service_ids:
            return f"unknown service id {message.service_id!r}"
        return None

    def _track(self, message: Message) -> None:
        """Update the stream table for a message being forwarded."""
        if message.type == MessageType.STREAM_START:
            self._streams.pop(message.service_id, None)
            self._streams[message.service_id] = message.stream_id
        elif (
            message.type == MessageType.STREAM_RESET
            and self._streams.get(message.service_id) == message.stream_id
        ):
            del self._streams[message.service_id]

    def _reset_streams(self) -> list[Message]:
        """STREAM_RESETs for every active stream; clears the table."""
        resets = [
            Message(MessageType.STREAM_RESET, stream_id=stream_id, service_id=service_id)
            for service_id, stream_id in self._streams.items()
        ]
        self._streams.clear()
        return resets
