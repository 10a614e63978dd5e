"""The relay rules of one tunnel, without sockets: peers are plain strings."""

from __future__ import annotations

import pytest

from iotunnel.mode import Mode
from proxy.protocol.framing import MAX_WS_MESSAGE, Decoder, encode
from proxy.protocol.messages import MAX_PAYLOAD, Message
from proxy.protocol.messages import MessageType as T
from service.pairing import Pairing, describe, pack

SRC, DST = Mode.SOURCE, Mode.DESTINATION


def paired() -> Pairing[str]:
    pairing: Pairing[str] = Pairing(["HTTP1", "SSH1"])
    assert pairing.attach(SRC, "s1") == []
    assert pairing.attach(DST, "d1") == []
    return pairing


def start(stream: int, service: str = "SSH1") -> Message:
    return Message(T.STREAM_START, stream_id=stream, service_id=service, connection_id=1)


def reset(stream: int, service: str = "SSH1") -> Message:
    return Message(T.STREAM_RESET, stream_id=stream, service_id=service)


def data(stream: int, payload: bytes = b"x", service: str = "SSH1") -> Message:
    return Message(T.DATA, stream_id=stream, service_id=service, payload=payload)


def test_service_ids() -> None:
    assert paired().service_ids() == Message(T.SERVICE_IDS, available_service_ids=("HTTP1", "SSH1"))


def test_forward_both_ways() -> None:
    pairing = paired()
    routing = pairing.receive(SRC, "s1", [start(1), data(1)])
    assert routing.forward == [start(1), data(1)]
    assert routing.reply == routing.dropped == []
    routing = pairing.receive(DST, "d1", [data(1, b"back")])
    assert routing.forward == [data(1, b"back")]


ALLOWED_FROM_SOURCE = [
    data(1),
    start(1),
    reset(1),
    Message(T.CONNECTION_START, stream_id=1, service_id="SSH1", connection_id=2),
    Message(T.CONNECTION_RESET, stream_id=1, service_id="SSH1", connection_id=2),
]


@pytest.mark.parametrize("message", ALLOWED_FROM_SOURCE, ids=describe)
def test_source_may_send(message: Message) -> None:
    assert paired().receive(SRC, "s1", [message]).forward == [message]


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (DST, start(1)),
        (DST, Message(T.CONNECTION_START, stream_id=1, service_id="SSH1", connection_id=2)),
        (SRC, Message(T.SERVICE_IDS, available_service_ids=("SSH1",))),
        (DST, Message(T.SERVICE_IDS, available_service_ids=("SSH1",))),
        (SRC, Message(T.SESSION_RESET)),
        (DST, Message(T.SESSION_RESET)),
        (SRC, Message(T.UNKNOWN, stream_id=1)),
        (SRC, Message(42, stream_id=1, ignorable=True)),
        (SRC, data(0)),
        (DST, reset(0)),
        (SRC, start(1, "FTP1")),
        (DST, data(1, service="ssh1")),
    ],
    ids=lambda value: describe(value) if isinstance(value, Message) else str(value),
)
def test_disallowed_messages_are_dropped(mode: Mode, message: Message) -> None:
    pairing = paired()
    peer = "s1" if mode is SRC else "d1"
    routing = pairing.receive(mode, peer, [message, data(1)])
    assert [drop.message for drop in routing.dropped] == [message]
    assert routing.forward == [data(1)]
    assert pairing.active_streams == {}


def test_v1_messages_without_service_id_pass() -> None:
    pairing = paired()
    routing = pairing.receive(SRC, "s1", [start(3, ""), data(3, service="")])
    assert routing.forward == [start(3, ""), data(3, service="")]
    assert pairing.active_streams == {"": 3}


def test_stream_table_follows_starts_and_resets() -> None:
    pairing = paired()
    pairing.receive(SRC, "s1", [start(1), start(1, "HTTP1"), start(2)])
    assert pairing.active_streams == {"HTTP1": 1, "SSH1": 2}
    pairing.receive(DST, "d1", [reset(1)])  # stale: stream 1 of SSH1 was replaced
    assert pairing.active_streams == {"HTTP1": 1, "SSH1": 2}
    pairing.receive(DST, "d1", [reset(1, "HTTP1")])
    assert pairing.active_streams == {"SSH1": 2}
    pairing.receive(SRC, "s1", [reset(2)])
    assert pairing.active_streams == {}


@pytest.mark.parametrize("leaving", [SRC, DST])
def test_detach_resets_active_streams_for_the_other_peer(leaving: Mode) -> None:
    pairing = paired()
    pairing.receive(SRC, "s1", [start(7), start(3, "HTTP1")])
    peer = "s1" if leaving is SRC else "d1"
    assert pairing.detach(leaving, peer) == [reset(7), reset(3, "HTTP1")]
    assert pairing.active_streams == {}
    assert pairing.peer(leaving) is None
    assert pairing.detach(leaving, peer) == []


def test_replacement_resets_streams_and_ignores_the_old_peer() -> None:
    pairing = paired()
    pairing.receive(SRC, "s1", [start(7)])
    assert pairing.attach(SRC, "s2") == [reset(7)]
    assert pairing.peer(SRC) == "s2"
    late = pairing.receive(SRC, "s1", [data(7)])
    assert late.forward == []
    assert [d.reason for d in late.dropped] == ["sender was replaced"]
    assert pairing.detach(SRC, "s1") == []
    assert pairing.peer(SRC) == "s2"


def test_stream_start_without_peer_is_reset_to_the_sender() -> None:
    pairing: Pairing[str] = Pairing(["SSH1"])
    pairing.attach(SRC, "s1")
    conn_start = Message(T.CONNECTION_START, stream_id=4, service_id="SSH1", connection_id=2)
    routing = pairing.receive(SRC, "s1", [start(4), conn_start, data(4)])
    assert routing.forward == []
    assert routing.reply == [
        reset(4),
        Message(T.CONNECTION_RESET, stream_id=4, service_id="SSH1", connection_id=2),
    ]
    assert [d.message for d in routing.dropped] == [data(4)]
    assert pairing.active_streams == {}


def test_empty() -> None:
    pairing: Pairing[str] = Pairing([])
    assert pairing.empty
    pairing.attach(DST, "d1")
    assert not pairing.empty
    pairing.detach(DST, "d1")
    assert pairing.empty


def test_pack_batches_up_to_the_websocket_limit() -> None:
    big = [data(1, bytes([i]) * MAX_PAYLOAD) for i in range(5)]
    chunks = pack([start(1), *big, reset(1)])
    assert all(len(chunk) <= MAX_WS_MESSAGE for chunk in chunks)
    assert len(chunks) == 3
    decoder = Decoder()
    assert [m for chunk in chunks for m in decoder.feed(chunk)] == [start(1), *big, reset(1)]
    assert pack([start(1), data(1)]) == [encode(start(1)) + encode(data(1))]
    assert pack([]) == []


def test_describe_never_shows_the_payload() -> None:
    text = describe(data(5, b"secret-bytes"))
    assert "secret" not in text
    assert text == "DATA(stream=5, service='SSH1', conn=0, payload=12B)"
    assert describe(Message(42)).startswith("type=42(")
