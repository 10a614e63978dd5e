"""Property tests of the protocol core (hypothesis, after mitmproxy's ``test_http_fuzz.py``).

The invariants (after h11's ``fuzz/afl-server.py``): bytes from the peer either
decode or raise :class:`RemoteProtocolError`, never anything else; a session records peer errors
and never raises; how the bytes are cut into WebSocket messages never matters; and two sessions
driven through any interleaving of valid operations agree on which connections are open.

The settings are fixed here, not in a conftest: derandomized and without an example database, so
every run (and CI) explores the same cases, with budgets that keep this file to a few seconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from iotunnel.mode import Mode
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
from proxy.protocol.messages import MAX_PAYLOAD, Message, MessageType
from proxy.protocol.session import DataFramer, TunnelSession

from .playbook import SESSION_RESET, Link, decode_frame, service_ids
from .vectors import VECTORS

settings.register_profile(
    "iotunnel-protocol",
    derandomize=True,
    database=None,
    deadline=None,  # no timing assertions
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("iotunnel-protocol")
STATEFUL = settings(FUZZ, max_examples=150, stateful_step_count=50)

T = MessageType
SERVICES = ("SSH1", "HTTP1")
RESETS = {T.STREAM_RESET, T.CONNECTION_RESET}

# ---------------------------------------------------------------------- strategies

utf8_text = st.text(st.characters(codec="utf-8"), max_size=40)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    """Any encodable Message: known and unknown types, extreme ids, up to a maximal payload."""
    message = Message(
        type=draw(st.one_of(st.sampled_from(MessageType), int32)),
        stream_id=draw(st.one_of(st.integers(-1, 4), int32)),
        service_id=draw(st.one_of(st.sampled_from(["", *SERVICES]), utf8_text)),
        connection_id=draw(st.one_of(st.integers(0, 3), uint32)),
        payload=draw(
            st.one_of(
                st.binary(max_size=64),
                st.integers(0, MAX_PAYLOAD).map(lambda n: b"\xa5" * n),
            )
        ),
        ignorable=draw(st.booleans()),
        available_service_ids=tuple(draw(st.lists(utf8_text, max_size=3))),
    )
    assume(message != Message(T.UNKNOWN))  # serialises to nothing: cannot be framed
    return message


@st.composite
def protocol_messages(draw: st.DrawFn) -> Message:
    """Messages a real peer might send: small ids, the tunnel's services, V1/V2/V3 shapes."""
    type_ = draw(st.one_of(st.sampled_from(MessageType), st.integers(8, 10)))
    if type_ == T.SERVICE_IDS:
        ids = draw(st.lists(st.sampled_from([*SERVICES, "VNC1", "bad id"]), max_size=3))
        return service_ids(*ids)
    message = Message(
        type=type_,
        # Few ids, so that messages often name the same stream and connection.
        stream_id=draw(st.integers(0, 2)),
        service_id=draw(st.sampled_from(["SSH1", "SSH1", "HTTP1", "", "VNC1"])),
        connection_id=draw(st.integers(0, 2)),
        payload=draw(st.binary(max_size=8)),
        ignorable=draw(st.booleans()),
    )
    assume(message != Message(T.UNKNOWN))
    return message


@st.composite
def chunks(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def split_frames(
    draw: st.DrawFn, message_strategy: st.SearchStrategy[Message]
) -> tuple[list[Message], list[bytes]]:
    """Random messages, encoded into one byte stream and cut at random points."""
    msgs = draw(st.lists(message_strategy, max_size=10))
    return msgs, draw(chunks(b"".join(encode(m) for m in msgs)))


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    """A valid frame stream, then damaged: bytes flipped, cut out, or random bytes spliced in."""
    data = bytearray(b"".join(encode(m) for m in draw(st.lists(protocol_messages(), max_size=6))))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["flip", "cut", "splice"])):
            case "flip" if pos < len(data):
                data[pos] ^= draw(st.integers(1, 255))
            case "cut":
                del data[pos : pos + draw(st.integers(1, 8))]
            case _:
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


peer_bytes = st.one_of(
    st.binary(max_size=200),
    mutated_stream(),
    st.lists(st.sampled_from([v.frame for v in VECTORS]), max_size=6).map(b"".join),
)


# ---------------------------------------------------------------------- (a) framing is split-proof


@FUZZ
@given(split_frames(messages()))
def test_any_split_of_valid_frames_decodes_the_same(
    case: tuple[list[Message], list[bytes]],
) -> None:
    msgs, pieces = case
    stream = b"".join(pieces)
    assert Decoder().feed(stream) == msgs
    decoder = Decoder()
    got: list[Message] = []
    for piece in pieces:
        got += decoder.feed(piece)
    assert got == msgs
    assert decoder.buffered == 0


@FUZZ
@given(st.lists(messages(), max_size=5), st.data())
def test_a_truncated_stream_yields_a_prefix_and_buffers_the_rest(
    msgs: list[Message], data: st.DataObject
) -> None:
    frames = [encode(m) for m in msgs]
    stream = b"".join(frames)
    cut = data.draw(st.integers(0, len(stream)))
    decoder = Decoder()
    got = decoder.feed(stream[:cut])
    assert got == msgs[: len(got)]
    assert decoder.buffered == cut - sum(len(f) for f in frames[: len(got)])
    assert got + decoder.feed(stream[cut:]) == msgs


@FUZZ
@given(messages())
def test_messages_round_trip(message: Message) -> None:
    assert decode_frame(encode(message)) == message


@FUZZ
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["", "SSH1", "HTTP1", "a:b_c-d"]),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=2048),
)
def test_data_frames_in_two_parts_decode_as_one_message(
    stream_id: int, service_id: str, connection_id: int, payload: bytes
) -> None:
    """The session's DATA frames (header once, payload appended) equal the plain encoding."""
    frame = DataFramer(stream_id, service_id, connection_id)(payload)
    expected = Message(MessageType.DATA, stream_id, service_id, connection_id, payload)
    assert decode_frame(frame) == expected
    assert len(frame) == len(encode(expected))


# ---------------------------------------------------------------------- (b) the decoder's contract


def _decode_all(pieces: list[bytes]) -> tuple[list[Message], bool]:
    """Messages returned before any error, and whether the decoder failed."""
    decoder = Decoder()
    got: list[Message] = []
    for piece in pieces:
        try:
            out = decoder.feed(piece)
        except RemoteProtocolError as exc:
            error = exc
            break
        assert all(isinstance(m, Message) for m in out)
        got += out
    else:
        return got, False
    assert error.fatal
    with pytest.raises(RemoteProtocolError, match="used after a framing error"):
        decoder.feed(b"")  # after a failure the decoder stays failed
    return got, True


@FUZZ
@given(peer_bytes.flatmap(lambda b: chunks(b)))
@example([b"\x00\x00"])
@example([b"\x00", b"\x01\xff"])
@example([b"\xff\xff" + b"\x00" * 10])
def test_arbitrary_bytes_decode_or_raise_remote_protocol_error(pieces: list[bytes]) -> None:
    """Anything else escaping ``feed`` (DecodeError, ValueError, IndexError...) fails here."""
    got, failed = _decode_all(pieces)
    # Cutting never changes the verdict; messages come out in the same order. (In the failing
    # piece, messages before the bad frame are lost with it, so compare prefixes.)
    one_by_one, failed_bytewise = _decode_all([bytes([b]) for b in b"".join(pieces)])
    assert failed == failed_bytewise
    assert got == one_by_one[: len(got)]
    if not failed:
        assert got == one_by_one


# ---------------------------------------------------------------------- (c) sessions never raise


class ShellModel:
    """What a correct I/O shell would hold: the local connections, checked against each action."""

    def __init__(self, session: TunnelSession) -> None:
        self.session = session
        self.local: set[ConnectionRef] = set()

    def take(self) -> tuple[list[Action], list[Message], list[str]]:
        """Take the session's outputs, check them, and return them (errors as text)."""
        actions = self.session.actions()
        announced = self.session.service_ids
        for action in actions:
            match action:
                case OpenLocal(conn):
                    assert self.session.role is Mode.DESTINATION
                    assert conn not in self.local
                    self.local.add(conn)
                case WriteLocal(conn, payload):
                    assert conn in self.local
                    assert payload
                case CloseLocal(conn):
                    self.local.remove(conn)
                case ServiceIdsReceived(ids):
                    announced = ids
                case _:
                    raise AssertionError(action)
        frames = [decode_frame(f) for f in self.session.data_to_send()]
        for sent in frames:  # control frames only, and well-formed
            assert sent.stream_id > 0
            if self.session.role is Mode.SOURCE:
                assert sent.type in {T.STREAM_START, T.CONNECTION_START, *RESETS}
            else:  # the destination never starts anything
                assert sent.type in RESETS
        assert self.session.service_ids == announced  # the last announcement is the one kept
        errors = self.session.errors()
        assert all(type(e) is RemoteProtocolError for e in errors)
        if self.session.broken:
            assert self.local == set()
        assert self.local == set(self.session.open_connections())
        return actions, frames, [str(e) for e in errors]


def _fresh(role: Mode, version: int, announce: bool) -> ShellModel:
    shell = ShellModel(TunnelSession(role, version=version))
    if announce:
        shell.session.receive_data(encode(service_ids(*SERVICES)))
    if role is Mode.SOURCE:
        for service in (*SERVICES, SERVICES[0]):
            shell.local.add(shell.session.open_connection(service))
    shell.take()
    return shell


@FUZZ
@given(
    st.sampled_from(Mode),
    st.sampled_from([1, 2, 3]),
    st.booleans(),
    st.lists(peer_bytes.flatmap(lambda b: chunks(b)), max_size=3),
)
@example(Mode.DESTINATION, 3, True, [[b"\x00\x04\x08\x02\x10\x01", b"\x00\x00"]])
def test_receive_data_never_raises(
    role: Mode, version: int, announce: bool, feeds: list[list[bytes]]
) -> None:
    shell = _fresh(role, version, announce)
    for pieces in feeds:
        for piece in pieces:
            shell.session.receive_data(piece)  # nothing may escape
            shell.take()
        if shell.session.broken:
            shell.session.reset()
            shell.take()
            assert not shell.session.broken


@FUZZ
@given(
    st.sampled_from(Mode),
    st.booleans(),
    split_frames(protocol_messages()),
)
def test_session_does_not_care_how_valid_bytes_are_cut(
    role: Mode, announce: bool, case: tuple[list[Message], list[bytes]]
) -> None:
    _, pieces = case

    def run(feed: Callable[[TunnelSession], None]) -> tuple[list[Action], list[Message], list[str]]:
        shell = _fresh(role, 3, announce)
        feed(shell.session)
        return shell.take()

    def whole(session: TunnelSession) -> None:
        session.receive_data(b"".join(pieces))

    def cut(session: TunnelSession) -> None:
        for piece in pieces:
            session.receive_data(piece)

    assert run(whole) == run(cut)


# ---------------------------------------------------------------------- (d) a pair stays consistent


class PairMachine(RuleBasedStateMachine):
    """A source and a destination behind a perfect service, driven by valid operations only.

    Both shells (see :class:`~.playbook.Link`) must always agree with their sessions; when
    nothing is in flight, both sides carry the same connections and every byte sent on a
    connection still open at both ends has arrived. No valid conversation records an error.
    """

    def __init__(self) -> None:
        super().__init__()
        self.link: Link
        self.announce = True
        # bytes each side's local connection handed to the tunnel, by connection
        self.sent: dict[int, dict[ConnectionRef, bytearray]] = {}

    @initialize(version=st.sampled_from([1, 2, 3]), announce=st.booleans())
    def start(self, version: int, announce: bool) -> None:
        source = TunnelSession(Mode.SOURCE, version=version)
        self.link = Link(source, TunnelSession(Mode.DESTINATION))
        self.sent = {id(self.link.source): {}, id(self.link.destination): {}}
        self.announce = announce
        self._announce()

    def _announce(self) -> None:
        if self.announce:
            self.link.service_says(service_ids(*SERVICES))
            self.link.run()

    def _side(self, destination: bool) -> TunnelSession:
        return self.link.destination if destination else self.link.source

    # -- local events

    @rule(service=st.sampled_from(SERVICES))
    def open(self, service: str) -> None:
        self.link.open(service)

    @precondition(lambda self: any(self.link.local.values()))
    @rule(data=st.data(), destination=st.booleans())
    def close(self, data: st.DataObject, destination: bool) -> None:
        """A local connection ends (or, at the destination, its connect failed)."""
        side = self._side(destination)
        if not self.link.local[id(side)]:
            side = self.link.peer(side)
        conn = data.draw(st.sampled_from(sorted(self.link.local[id(side)], key=str)))
        self.link.close(side, conn)

    @precondition(lambda self: any(self.link.local.values()))
    @rule(data=st.data(), destination=st.booleans(), payload=st.binary(min_size=1, max_size=16))
    def send(self, data: st.DataObject, destination: bool, payload: bytes) -> None:
        side = self._side(destination)
        if not self.link.local[id(side)]:
            side = self.link.peer(side)
        conn = data.draw(st.sampled_from(sorted(self.link.local[id(side)], key=str)))
        assert self.link.send(side, conn, payload)  # the shell's connection is the session's
        self.sent[id(side)].setdefault(conn, bytearray()).extend(payload)

    # -- the network

    @rule(data=st.data(), destination=st.booleans())
    def deliver_some(self, data: st.DataObject, destination: bool) -> None:
        side = self._side(destination)
        self.link.deliver(side, data.draw(st.integers(0, len(self.link.wire[id(side)]))))

    @rule()
    def deliver_all(self) -> None:
        self.link.run()

    @rule()
    def session_reset(self) -> None:
        """The service resets the session (at a quiet moment: it is not a race we can win)."""
        self.link.run()
        self.link.service_says(SESSION_RESET)
        self.link.run()
        assert self.link.local == {id(self.link.source): set(), id(self.link.destination): set()}

    @rule()
    def reconnect(self) -> None:
        """The WebSocket drops: what was in flight is lost and both sides start over."""
        self.link.drop()
        assert self.link.source.connection_count == self.link.destination.connection_count == 0
        self._announce()

    @rule(service=st.sampled_from(SERVICES))
    def open_during_outage(self, service: str) -> None:
        """A client connects while the WebSocket is down; the reconnect resets the session.

        The STREAM_START queued for the dead WebSocket must not reach the new one.
        """
        self.link.local[id(self.link.source)].add(self.link.source.open_connection(service))
        self.reconnect()

    # -- invariants

    @invariant()
    def shells_agree_with_sessions(self) -> None:
        for side in (self.link.source, self.link.destination):
            assert self.link.local[id(side)] == set(side.open_connections())
            assert not side.broken
        assert self.link.errors == []

    @invariant()
    def bytes_arrive_in_order(self) -> None:
        for side in (self.link.source, self.link.destination):
            peer = self.link.peer(side)
            for conn, sent in self.sent[id(side)].items():
                assert bytes(sent).startswith(self.link.got(peer, conn))

    @invariant()
    def quiet_sides_agree(self) -> None:
        if any(self.link.wire.values()):
            return
        source, destination = self.link.source, self.link.destination
        assert set(source.open_connections()) == set(destination.open_connections())
        for side in (source, destination):
            peer = self.link.peer(side)
            for conn in side.open_connections():
                assert self.link.got(peer, conn) == bytes(self.sent[id(side)].get(conn, b""))


PairMachine.TestCase.settings = STATEFUL
TestPair = PairMachine.TestCase
