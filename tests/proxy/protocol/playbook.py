"""A tiny Playbook for :class:`TunnelSession`, after mitmproxy's ``test/mitmproxy/proxy/tutils.py``.

A conversation reads top to bottom: ``>>`` is something that happens to the session, ``<<`` is
what the session must produce in answer to the last ``>>``::

    assert (
        Playbook(TunnelSession(Mode.DESTINATION))
        >> stream_start(1)
        << OpenLocal(ref("SSH1", 1, 1))
        >> data(1, b"hi")
        << WriteLocal(ref("SSH1", 1, 1), b"hi")
    )

Inputs (``>>``): a :class:`Message` (encoded and fed to ``receive_data``), raw ``bytes`` (fed
as is), or a local event: :class:`Open`, :class:`Write`, :class:`Closed`, :class:`Reset`.

Expectations (``<<``): a :class:`Message` (a frame the session wants sent, from
``data_to_send`` or returned by ``encode_data``), an action (``OpenLocal``, ``WriteLocal``,
``CloseLocal``, ``ServiceIdsReceived``) or an :class:`Err`.

Each input's actions, frames and errors are compared exactly, in order, kind by kind: an input
with no ``<<`` after it must produce nothing at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.protocol.actions import (
    Action,
    CloseLocal,
    ConnectionRef,
    OpenLocal,
    ServiceIdsReceived,
    WriteLocal,
)
from proxy.protocol.errors import RemoteProtocolError
from proxy.protocol.framing import Decoder, encode
from proxy.protocol.messages import Message, MessageType
from proxy.protocol.session import TunnelSession

T = MessageType

# ---------------------------------------------------------------------- message builders
# V3 defaults (service "SSH1", connection 1); pass service="" / conn=0 for V1 / V2 peers.


def data(stream: int, payload: bytes, service: str = "SSH1", conn: int = 1) -> Message:
    return Message(
        T.DATA, stream_id=stream, service_id=service, connection_id=conn, payload=payload
    )


def stream_start(stream: int, service: str = "SSH1", conn: int = 1) -> Message:
    return Message(T.STREAM_START, stream_id=stream, service_id=service, connection_id=conn)


def connection_start(stream: int, conn: int, service: str = "SSH1") -> Message:
    return Message(T.CONNECTION_START, stream_id=stream, service_id=service, connection_id=conn)


def stream_reset(stream: int, service: str = "SSH1", conn: int = 0) -> Message:
    return Message(T.STREAM_RESET, stream_id=stream, service_id=service, connection_id=conn)


def connection_reset(stream: int, conn: int, service: str = "SSH1") -> Message:
    return Message(T.CONNECTION_RESET, stream_id=stream, service_id=service, connection_id=conn)


def service_ids(*ids: str) -> Message:
    return Message(T.SERVICE_IDS, available_service_ids=ids)


SESSION_RESET = Message(T.SESSION_RESET)


def ref(service: str, stream: int, conn: int) -> ConnectionRef:
    return ConnectionRef(service, stream, conn)


# ---------------------------------------------------------------------- local events


@dataclass(frozen=True)
class Open:
    """``session.open_connection(service)``, which must return ``expect``."""

    service: str
    expect: ConnectionRef


@dataclass(frozen=True)
class Write:
    """``session.encode_data(conn, data)``; the frame it returns (if any) is an output."""

    conn: ConnectionRef
    data: bytes


@dataclass(frozen=True)
class Closed:
    """``session.connection_closed(conn)``: the local connection ended."""

    conn: ConnectionRef


@dataclass(frozen=True)
class Reset:
    """``session.reset()``: the WebSocket is gone."""


@dataclass(frozen=True)
class Err:
    """A recorded :class:`RemoteProtocolError` whose text contains ``text``."""

    text: str
    fatal: bool = False

    def matches(self, error: RemoteProtocolError) -> bool:
        return self.text in str(error) and error.fatal == self.fatal


Input = Message | bytes | Open | Write | Closed | Reset
Expected = Message | Action | Err
_ACTIONS = (OpenLocal, WriteLocal, CloseLocal, ServiceIdsReceived)


def decode_frame(frame: bytes) -> Message:
    """The one message a single frame carries."""
    decoder = Decoder()
    (message,) = decoder.feed(frame)
    assert decoder.buffered == 0, f"trailing bytes after one frame: {frame.hex()}"
    return message


@dataclass
class _Outcome:
    actions: list[Action]
    frames: list[Message]
    errors: list[RemoteProtocolError]


class Playbook:
    """Record a conversation with ``>>`` / ``<<``; ``bool()`` plays it and asserts it."""

    def __init__(self, session: TunnelSession) -> None:
        self.session = session
        self._steps: list[tuple[Input, list[Expected]]] = []

    def __rshift__(self, event: Input) -> Playbook:
        self._steps.append((event, []))
        return self

    def __lshift__(self, expected: Expected) -> Playbook:
        assert self._steps, "a playbook starts with >>"
        self._steps[-1][1].append(expected)
        return self

    def __bool__(self) -> bool:
        transcript: list[str] = []
        for event, expected in self._steps:
            transcript.append(f">> {event!r}")
            outcome = self._apply(event)
            want_actions = [e for e in expected if isinstance(e, _ACTIONS)]
            want_frames = [e for e in expected if isinstance(e, Message)]
            want_errors = [e for e in expected if isinstance(e, Err)]
            ok = (
                outcome.actions == want_actions
                and outcome.frames == want_frames
                and len(outcome.errors) == len(want_errors)
                and all(w.matches(g) for w, g in zip(want_errors, outcome.errors, strict=True))
            )
            transcript.extend(f"<< {e!r}" for e in expected)
            if not ok:
                got = [*outcome.actions, *outcome.frames, *outcome.errors]
                transcript.append("!! but the session produced:")
                transcript.extend(f"   {g!r}" for g in got)
                raise AssertionError("playbook failed:\n" + "\n".join(transcript))
        return True

    def _apply(self, event: Input) -> _Outcome:
        s = self.session
        returned: list[Message] = []
        match event:
            case Message():
                s.receive_data(encode(event))
            case bytes():
                s.receive_data(event)
            case Open(service, expect):
                got = s.open_connection(service)
                assert got == expect, f"open_connection({service!r}) returned {got}, not {expect}"
            case Write(conn, payload):
                frame = s.encode_data(conn, payload)
                if frame is not None:
                    returned.append(decode_frame(frame))
            case Closed(conn):
                s.connection_closed(conn)
            case Reset():
                s.reset()
            case _:  # a typo in a test
                raise AssertionError(f"not a playbook input: {event!r}")
        frames = [decode_frame(f) for f in s.data_to_send()] + returned
        return _Outcome(s.actions(), frames, s.errors())


# ---------------------------------------------------------------------- a source/destination pair


class Link:
    """A source and a destination session joined by a perfect service (in-order bytes each way).

    Models the I/O shells too: it tracks which local connections each side holds open (added by
    ``open_connection`` / ``OpenLocal``, removed by ``CloseLocal`` / ``connection_closed``) and
    what bytes each local connection received.
    """

    def __init__(self, source: TunnelSession, destination: TunnelSession) -> None:
        self.source = source
        self.destination = destination
        self.wire: dict[int, bytearray] = {id(source): bytearray(), id(destination): bytearray()}
        self.local: dict[int, set[ConnectionRef]] = {id(source): set(), id(destination): set()}
        self.received: dict[int, dict[ConnectionRef, bytearray]] = {
            id(source): {},
            id(destination): {},
        }
        self.errors: list[RemoteProtocolError] = []

    def peer(self, side: TunnelSession) -> TunnelSession:
        return self.destination if side is self.source else self.source

    def service_says(self, message: Message) -> None:
        """The service sends ``message`` to both sides (after what is already in flight)."""
        frame = encode(message)
        for side in (self.source, self.destination):
            self.wire[id(side)] += frame

    def settle(self, side: TunnelSession) -> None:
        """Run ``side``'s shell: queue its frames to the peer, carry out its actions."""
        self.wire[id(self.peer(side))] += b"".join(side.data_to_send())
        for action in side.actions():
            match action:
                case OpenLocal(conn):
                    assert conn not in self.local[id(side)]
                    self.local[id(side)].add(conn)
                case WriteLocal(conn, payload):
                    assert conn in self.local[id(side)]
                    self.received[id(side)].setdefault(conn, bytearray()).extend(payload)
                case CloseLocal(conn):
                    self.local[id(side)].remove(conn)
                case ServiceIdsReceived():
                    pass
                case _:  # an action type this helper does not know
                    raise AssertionError(action)
        self.errors += side.errors()

    def open(self, service: str) -> ConnectionRef:
        conn = self.source.open_connection(service)
        self.local[id(self.source)].add(conn)
        self.settle(self.source)
        return conn

    def close(self, side: TunnelSession, conn: ConnectionRef) -> None:
        self.local[id(side)].discard(conn)
        side.connection_closed(conn)
        self.settle(side)

    def send(self, side: TunnelSession, conn: ConnectionRef, payload: bytes) -> bool:
        frame = side.encode_data(conn, payload)
        if frame is None:
            return False
        self.wire[id(self.peer(side))] += frame
        return True

    def deliver(self, side: TunnelSession, n: int | None = None) -> None:
        """Feed ``side`` the first ``n`` bytes in flight to it (all if None)."""
        wire = self.wire[id(side)]
        n = len(wire) if n is None else n
        chunk = bytes(wire[:n])
        del wire[:n]
        side.receive_data(chunk)
        self.settle(side)

    def run(self) -> None:
        """Deliver everything in flight, both ways, until nothing moves."""
        while any(self.wire.values()):
            self.deliver(self.destination)
            self.deliver(self.source)

    def drop(self) -> None:
        """The WebSocket is gone: both sides reset, what was in flight is lost."""
        for wire in self.wire.values():
            wire.clear()
        for side in (self.source, self.destination):
            side.reset()
            self.settle(side)  # anything queued now goes out on the new WebSocket

    def got(self, side: TunnelSession, conn: ConnectionRef) -> bytes:
        return bytes(self.received[id(side)].get(conn, b""))
