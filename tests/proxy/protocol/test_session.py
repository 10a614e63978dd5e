"""TunnelSession playbooks: one test (or class) per rule.

The rules are those of proxy/protocol/PROTOCOL.md, section 'Rules'.
"""

from __future__ import annotations

import pytest

from iotunnel.mode import Mode
from proxy.protocol.actions import CloseLocal, OpenLocal, ServiceIdsReceived, WriteLocal
from proxy.protocol.errors import LocalProtocolError
from proxy.protocol.framing import encode
from proxy.protocol.messages import MAX_PAYLOAD, Message
from proxy.protocol.session import TunnelSession

from .playbook import (
    SESSION_RESET,
    Closed,
    Err,
    Link,
    Open,
    Playbook,
    Reset,
    T,
    Write,
    connection_reset,
    connection_start,
    data,
    decode_frame,
    ref,
    service_ids,
    stream_reset,
    stream_start,
)
from .vectors import load_hex


@pytest.fixture
def dst() -> TunnelSession:
    return TunnelSession(Mode.DESTINATION)


@pytest.fixture
def src() -> TunnelSession:
    return TunnelSession(Mode.SOURCE)


def test_constructor_rejects_unknown_versions() -> None:
    for version in (0, 4):
        with pytest.raises(LocalProtocolError, match="version"):
            TunnelSession(Mode.SOURCE, version=version)
    assert TunnelSession(Mode.DESTINATION, version=1).version == 1


# ---------------------------------------------------------------------- SERVICE_IDS


class TestServiceIds:
    """After the handshake the service sends SERVICE_IDS; IDs match a pattern.

    proxy/protocol/PROTOCOL.md, section 'Service IDs'.
    """

    @pytest.mark.parametrize("role", list(Mode))
    def test_recorded_and_reported(self, role: Mode) -> None:
        session = TunnelSession(role)
        assert session.service_ids is None
        assert (
            Playbook(session)
            >> service_ids("SSH1", "HTTP1")
            << ServiceIdsReceived(("SSH1", "HTTP1"))
        )
        assert session.service_ids == ("SSH1", "HTTP1")

    def test_later_announcement_replaces_earlier(self, dst: TunnelSession) -> None:
        assert (
            Playbook(dst)
            >> service_ids("SSH1")
            << ServiceIdsReceived(("SSH1",))
            >> service_ids()
            << ServiceIdsReceived(())
        )
        assert dst.service_ids == ()

    def test_edges_of_the_service_id_pattern_accepted(self, dst: TunnelSession) -> None:
        longest = "a" * 128
        assert (
            Playbook(dst)
            >> service_ids("a:Z_0-9", longest)
            << ServiceIdsReceived(("a:Z_0-9", longest))
        )

    @pytest.mark.parametrize("bad", ["", "has space", "a" * 129, "caf\u00e9", "a/b", "ssh\n"])
    def test_invalid_ids_refused(self, dst: TunnelSession, bad: str) -> None:
        assert (
            Playbook(dst)
            >> service_ids("SSH1")
            << ServiceIdsReceived(("SSH1",))
            >> service_ids("HTTP1", bad)
            << Err("SERVICE_IDS with invalid service ids")
        )
        assert dst.service_ids == ("SSH1",)


# ---------------------------------------------------------------------- the source side


class TestSourceV3:
    """Source: STREAM_START (connectionId=1) for a service's first connection, then
    CONNECTION_START for the next ones."""

    def test_stream_start_then_connection_start(self, src: TunnelSession) -> None:
        assert (
            Playbook(src)
            >> Open("SSH1", ref("SSH1", 1, 1))
            << stream_start(1, "SSH1", conn=1)
            >> Open("SSH1", ref("SSH1", 1, 2))
            << connection_start(1, 2)
            >> Open("HTTP1", ref("HTTP1", 2, 1))
            << stream_start(2, "HTTP1", conn=1)
            >> Open("SSH1", ref("SSH1", 1, 3))
            << connection_start(1, 3)
        )
        assert src.connection_count == 4

    def test_data_right_after_stream_start(self, src: TunnelSession) -> None:
        """No reply from the destination is awaited before sending data."""
        conn = ref("SSH1", 1, 1)
        assert (
            Playbook(src)
            >> Open("SSH1", conn)
            << stream_start(1)
            >> Write(conn, b"SSH-2.0-client\r\n")
            << data(1, b"SSH-2.0-client\r\n")
        )

    def test_receives_data_and_resets(self, src: TunnelSession) -> None:
        c1, c2 = ref("SSH1", 1, 1), ref("SSH1", 1, 2)
        assert (
            Playbook(src)
            >> Open("SSH1", c1)
            << stream_start(1)
            >> Open("SSH1", c2)
            << connection_start(1, 2)
            >> data(1, b"banner", conn=2)
            << WriteLocal(c2, b"banner")
            >> connection_reset(1, 2)
            << CloseLocal(c2)
            >> stream_reset(1)
            << CloseLocal(c1)
        )
        assert src.connection_count == 0

    def test_local_close_sends_connection_reset_and_keeps_the_stream(
        self, src: TunnelSession
    ) -> None:
        c1 = ref("SSH1", 1, 1)
        assert (
            Playbook(src)
            >> Open("SSH1", c1)
            << stream_start(1)
            >> Closed(c1)
            << connection_reset(1, 1)
            >> Closed(c1)  # a second report of the same close is harmless
            >> Open("SSH1", ref("SSH1", 1, 2))
            << connection_start(1, 2)
        )

    def test_stream_ids_wrap_to_1_and_never_use_0(self, src: TunnelSession) -> None:
        src._next_stream_id = 2**31 - 1  # white box: 2**31 streams are too many to open
        assert (
            Playbook(src)
            >> Open("SSH1", ref("SSH1", 2**31 - 1, 1))
            << stream_start(2**31 - 1)
            >> Open("HTTP1", ref("HTTP1", 1, 1))
            << stream_start(1, "HTTP1")
        )

    def test_exhausted_connection_ids_start_a_new_stream(self, src: TunnelSession) -> None:
        last = 2**32 - 1
        assert Playbook(src) >> Open("SSH1", ref("SSH1", 1, 1)) << stream_start(1)
        src._streams["SSH1"].next_connection_id = last  # white box, as above
        assert (
            Playbook(src)
            >> Open("SSH1", ref("SSH1", 1, last))
            << connection_start(1, last)
            >> Open("SSH1", ref("SSH1", 2, 1))
            << CloseLocal(ref("SSH1", 1, 1), reset=True)
            << CloseLocal(ref("SSH1", 1, last), reset=True)
            << stream_start(2)
        )


class TestSourceOldVersions:
    """``-y V1|V2``: a source speaking to an old destination."""

    def test_v1_no_service_id_on_the_wire_and_one_stream(self) -> None:
        src = TunnelSession(Mode.SOURCE, version=1)
        first, second = ref("", 1, 1), ref("", 2, 1)
        assert (
            Playbook(src)
            >> Open("SSH1", first)
            << stream_start(1, service="", conn=0)
            >> Write(first, b"a")
            << data(1, b"a", service="", conn=0)
            >> data(1, b"b", service="", conn=0)
            << WriteLocal(first, b"b")
            # Whatever the service, V1 has one stream: a new connection replaces it.
            >> Open("HTTP1", second)
            << CloseLocal(first, reset=True)
            << stream_start(2, service="", conn=0)
            >> Write(first, b"late")
            >> Closed(second)
            << stream_reset(2, service="")
        )
        assert src.connection_count == 0

    def test_unnamed_service_on_v3_is_a_v1_stream(self, src: TunnelSession) -> None:
        """A tunnel announcing no service is served by ``-s PORT`` as the unnamed V1 stream:
        a STREAM_START without service or connection id, one connection at a time (a
        destination reads such a STREAM_START as V1 and refuses CONNECTION_START on it)."""
        first, second = ref("", 1, 1), ref("", 2, 1)
        assert (
            Playbook(src)
            >> Open("", first)
            << stream_start(1, service="", conn=0)
            >> Write(first, b"a")
            << data(1, b"a", service="", conn=0)
            >> Open("", second)
            << CloseLocal(first, reset=True)
            << stream_start(2, service="", conn=0)
            >> Closed(second)
            << stream_reset(2, service="")
        )

    def test_v2_no_connection_id_and_a_second_connection_replaces_the_first(self) -> None:
        src = TunnelSession(Mode.SOURCE, version=2)
        first, second, http = ref("SSH1", 1, 1), ref("SSH1", 2, 1), ref("HTTP1", 3, 1)
        assert (
            Playbook(src)
            >> Open("SSH1", first)
            << stream_start(1, conn=0)
            >> Write(first, b"a")
            << data(1, b"a", conn=0)
            >> data(1, b"b", conn=0)
            << WriteLocal(first, b"b")
            >> Open("SSH1", second)
            << CloseLocal(first, reset=True)
            << stream_start(2, conn=0)
            >> Open("HTTP1", http)
            << stream_start(3, "HTTP1", conn=0)
            >> Closed(second)
            << stream_reset(2)
            >> stream_reset(3, "HTTP1")  # the destination could not connect
            << CloseLocal(http)
        )
        assert src.connection_count == 0


class TestSourceRefusesDestinationMessages:
    """Destination never sends STREAM_START (or CONNECTION_START)."""

    def test_destination_cannot_open_connections(self, dst: TunnelSession) -> None:
        with pytest.raises(LocalProtocolError, match="only a source"):
            dst.open_connection("SSH1")

    def test_source_receiving_starts_records_errors(self, src: TunnelSession) -> None:
        assert (
            Playbook(src)
            >> stream_start(1)
            << Err("STREAM_START received by a source")
            >> connection_start(1, 2)
            << Err("CONNECTION_START received by a source")
        )
        assert src.connection_count == 0


# ---------------------------------------------------------------------- the destination side


class TestDestinationV3:
    """Destination: connect on STREAM_START / CONNECTION_START; no reply on success."""

    def test_open_local_on_stream_start_and_connection_start(self, dst: TunnelSession) -> None:
        c1, c2 = ref("SSH1", 1, 1), ref("SSH1", 1, 2)
        assert (
            Playbook(dst)
            >> service_ids("SSH1")
            << ServiceIdsReceived(("SSH1",))
            >> stream_start(1)
            << OpenLocal(c1)
            >> data(1, b"early")  # data may come before the connect completes
            << WriteLocal(c1, b"early")
            >> connection_start(1, 2)
            << OpenLocal(c2)
            >> data(1, b"two", conn=2)
            << WriteLocal(c2, b"two")
            >> Write(c2, b"reply")
            << data(1, b"reply", conn=2)
        )
        assert dst.open_connections() == [c1, c2]

    def test_failed_connect_or_local_close_answers_connection_reset(
        self, dst: TunnelSession
    ) -> None:
        c1, c2 = ref("SSH1", 1, 1), ref("SSH1", 1, 2)
        assert (
            Playbook(dst)
            >> stream_start(1)
            << OpenLocal(c1)
            >> connection_start(1, 2)
            << OpenLocal(c2)
            >> Closed(c1)
            << connection_reset(1, 1)
            >> Write(c1, b"x")  # encode_data: None for a dead connection
            >> data(1, b"stale", conn=1)
        )
        # The stream survives: only that connection was reset.
        assert dst.open_connections() == [c2]
        assert Playbook(dst) >> connection_start(1, 3) << OpenLocal(ref("SSH1", 1, 3))

    def test_connection_start_needs_a_v3_stream_and_a_new_id(self, dst: TunnelSession) -> None:
        assert (
            Playbook(dst)
            >> stream_start(1)
            << OpenLocal(ref("SSH1", 1, 1))
            >> connection_start(1, 0)
            << Err("without a V3 connection id")
            >> connection_start(1, 1)
            << Err("for open connection 1")
            >> connection_start(7, 2)  # not the active stream: stale, ignored
            >> connection_start(1, 2, service="HTTP1")  # no stream for that service
            >> stream_start(2, "HTTP1", conn=0)  # a V2 stream ...
            << OpenLocal(ref("HTTP1", 2, 1))
            >> connection_start(2, 2, service="HTTP1")  # ... carries one connection
            << Err("without a V3 connection id")
        )
        assert dst.connection_count == 2


class TestVersionDetection:
    """The destination detects each peer's version from its STREAM_START and answers in kind."""

    def test_v1_peer_no_service_id(self, dst: TunnelSession) -> None:
        conn = ref("", 1, 1)
        assert (
            Playbook(dst)
            >> load_hex("stream_start_v1")
            << OpenLocal(conn)
            >> data(1, b"in", service="", conn=0)
            << WriteLocal(conn, b"in")
            >> Write(conn, b"out")
            << data(1, b"out", service="", conn=0)
            >> Closed(conn)
            << stream_reset(1, service="")
        )
        assert dst.connection_count == 0

    def test_unnamed_peer_with_connection_ids(self, dst: TunnelSession) -> None:
        """The reference's unnamed mapping on a tunnel without services: no service id, but
        connection ids, which it expects back (it drops DATA with connection id 0)."""
        conn = ref("", 1, 1)
        assert (
            Playbook(dst)
            >> stream_start(1, service="", conn=1)
            << OpenLocal(conn)
            >> data(1, b"in", service="", conn=1)
            << WriteLocal(conn, b"in")
            >> Write(conn, b"out")
            << data(1, b"out", service="", conn=1)
            >> Closed(conn)
            << connection_reset(1, service="", conn=1)
        )
        assert dst.connection_count == 0

    def test_v2_peer_no_connection_id(self, dst: TunnelSession) -> None:
        conn = ref("SSH1", 2, 1)
        assert (
            Playbook(dst)
            >> load_hex("stream_start_v2")
            << OpenLocal(conn)
            >> data(2, b"in", conn=0)
            << WriteLocal(conn, b"in")
            >> Write(conn, b"out")
            << data(2, b"out", conn=0)
            >> Closed(conn)
            << Message(T.STREAM_RESET, stream_id=2, service_id="SSH1")
        )
        assert dst.connection_count == 0

    def test_v3_peer(self, dst: TunnelSession) -> None:
        conn = ref("SSH1", 1, 1)
        assert (
            Playbook(dst)
            >> load_hex("stream_start_v3")
            << OpenLocal(conn)
            >> Write(conn, b"out")
            << data(1, b"out")
            >> Closed(conn)
            << connection_reset(1, 1)
        )

    def test_versions_are_per_stream(self, dst: TunnelSession) -> None:
        v1, v2, v3 = ref("", 1, 1), ref("HTTP1", 2, 1), ref("SSH1", 3, 1)
        assert (
            Playbook(dst)
            >> stream_start(1, service="", conn=0)
            << OpenLocal(v1)
            >> stream_start(2, "HTTP1", conn=0)
            << OpenLocal(v2)
            >> stream_start(3, "SSH1", conn=1)
            << OpenLocal(v3)
            >> Closed(v3)
            << connection_reset(3, 1)
            >> Closed(v2)
            << stream_reset(2, "HTTP1")
            >> Closed(v1)
            << stream_reset(1, "")
        )


class TestUnannouncedServices:
    def test_stream_start_for_unannounced_service_refused_with_reset(
        self, dst: TunnelSession
    ) -> None:
        assert (
            Playbook(dst)
            >> service_ids("SSH1")
            << ServiceIdsReceived(("SSH1",))
            >> stream_start(1, "VNC1", conn=1)
            << Err("unannounced service 'VNC1'")
            << connection_reset(1, 1, service="VNC1")
            >> stream_start(2, "VNC1", conn=0)
            << Err("unannounced service 'VNC1'")
            << stream_reset(2, "VNC1")
            >> data(1, b"x", service="VNC1")
        )
        assert dst.connection_count == 0

    def test_unnamed_v1_stream_binds_to_the_announced_service(self, dst: TunnelSession) -> None:
        assert (
            Playbook(dst)
            >> service_ids("SSH1")
            << ServiceIdsReceived(("SSH1",))
            >> stream_start(1, service="", conn=0)
            << OpenLocal(ref("", 1, 1))
        )

    def test_before_service_ids_any_service_is_accepted(self, dst: TunnelSession) -> None:
        assert Playbook(dst) >> stream_start(1, "VNC1") << OpenLocal(ref("VNC1", 1, 1))


# ---------------------------------------------------------------------- stale and unknown ids


class TestStale:
    """DATA / STREAM_RESET for a stream that is not the active one, CONNECTION_RESET for an unknown
    connection, and anything for an unknown connection: ignored silently."""

    def test_stale_and_unknown_ignored(self, dst: TunnelSession) -> None:
        c1 = ref("SSH1", 5, 1)
        assert (
            Playbook(dst)
            >> stream_start(5)
            << OpenLocal(c1)
            >> data(4, b"old stream")
            >> data(6, b"future stream")
            >> data(5, b"other service", service="HTTP1")
            >> data(5, b"unknown connection", conn=9)
            >> data(5, b"", conn=1)  # empty DATA: nothing to write
            >> stream_reset(4)
            >> stream_reset(5, "HTTP1")
            >> connection_reset(4, 1)
            >> connection_reset(5, 9)
            >> connection_reset(5, 1, service="HTTP1")
            >> data(5, b"still open")
            << WriteLocal(c1, b"still open")
        )
        assert dst.open_connections() == [c1]

    def test_source_ignores_stale_messages_too(self, src: TunnelSession) -> None:
        c = ref("SSH1", 1, 1)
        assert (
            Playbook(src)
            >> Open("SSH1", c)
            << stream_start(1)
            >> data(2, b"x")
            >> stream_reset(2)
            >> connection_reset(1, 3)
            >> data(1, b"y")
            << WriteLocal(c, b"y")
        )

    def test_connection_id_0_means_1(self, dst: TunnelSession) -> None:
        """connectionId 0 (absent) names connection 1 on DATA and CONNECTION_RESET."""
        conn = ref("SSH1", 1, 1)
        assert (
            Playbook(dst)
            >> stream_start(1, conn=1)
            << OpenLocal(conn)
            >> data(1, b"x", conn=0)
            << WriteLocal(conn, b"x")
            >> connection_reset(1, 0)
            << CloseLocal(conn)
        )

    def test_stream_start_without_connection_id_opens_connection_1(
        self, dst: TunnelSession
    ) -> None:
        assert Playbook(dst) >> stream_start(1, conn=0) << OpenLocal(ref("SSH1", 1, 1))


class TestInvalidStreamIds:
    """Stream id 0 (and, being int32, negative ids) is invalid on every stream message."""

    @pytest.mark.parametrize(
        ("message", "text"),
        [
            (stream_start(0), "STREAM_START with invalid stream id 0"),
            (data(0, b"x"), "DATA with invalid stream id 0"),
            (stream_reset(0), "STREAM_RESET with invalid stream id 0"),
            (connection_start(0, 2), "CONNECTION_START with invalid stream id 0"),
            (connection_reset(0, 1), "CONNECTION_RESET with invalid stream id 0"),
            (data(-5, b"x"), "DATA with invalid stream id -5"),
        ],
        ids=repr,
    )
    def test_refused(self, dst: TunnelSession, message: Message, text: str) -> None:
        assert (
            Playbook(dst) >> stream_start(1) << OpenLocal(ref("SSH1", 1, 1)) >> message << Err(text)
        )
        assert dst.open_connections() == [ref("SSH1", 1, 1)]

    def test_negative_stream_start_vector(self, dst: TunnelSession) -> None:
        assert (
            Playbook(dst)
            >> load_hex("stream_start_negative_id")
            << Err("STREAM_START with invalid stream id -1")
        )


# ---------------------------------------------------------------------- resets


class TestResets:
    def test_stream_reset_closes_every_connection_of_that_service(self, dst: TunnelSession) -> None:
        ssh1, ssh2, http = ref("SSH1", 1, 1), ref("SSH1", 1, 2), ref("HTTP1", 2, 1)
        assert (
            Playbook(dst)
            >> stream_start(1)
            << OpenLocal(ssh1)
            >> connection_start(1, 2)
            << OpenLocal(ssh2)
            >> stream_start(2, "HTTP1")
            << OpenLocal(http)
            >> stream_reset(1)
            << CloseLocal(ssh1)
            << CloseLocal(ssh2)
            >> data(1, b"stale now")
            >> connection_start(1, 3)  # the stream is gone
        )
        assert dst.open_connections() == [http]

    @pytest.mark.parametrize("role", list(Mode))
    def test_session_reset_closes_everything(self, role: Mode) -> None:
        session = TunnelSession(role)
        if role is Mode.SOURCE:
            setup = (
                Playbook(session)
                >> Open("SSH1", ref("SSH1", 1, 1))
                << stream_start(1)
                >> Open("HTTP1", ref("HTTP1", 2, 1))
                << stream_start(2, "HTTP1")
            )
        else:
            setup = (
                Playbook(session)
                >> stream_start(1)
                << OpenLocal(ref("SSH1", 1, 1))
                >> stream_start(2, "HTTP1")
                << OpenLocal(ref("HTTP1", 2, 1))
            )
        assert setup
        assert (
            Playbook(session)
            >> load_hex("session_reset")
            << CloseLocal(ref("SSH1", 1, 1), reset=True)
            << CloseLocal(ref("HTTP1", 2, 1), reset=True)
            >> SESSION_RESET
        )
        assert session.connection_count == 0

    def test_new_stream_start_replaces_the_stream(self, dst: TunnelSession) -> None:
        old1, old2, new = ref("SSH1", 1, 1), ref("SSH1", 1, 2), ref("SSH1", 2, 1)
        assert (
            Playbook(dst)
            >> stream_start(1)
            << OpenLocal(old1)
            >> connection_start(1, 2)
            << OpenLocal(old2)
            >> stream_start(2)
            << CloseLocal(old1, reset=True)
            << CloseLocal(old2, reset=True)
            << OpenLocal(new)
            >> data(1, b"old stream: stale")
            >> Write(old1, b"dead")
            >> data(2, b"new")
            << WriteLocal(new, b"new")
        )

    def test_same_stream_start_twice_reopens(self, dst: TunnelSession) -> None:
        conn = ref("SSH1", 1, 1)
        assert (
            Playbook(dst)
            >> stream_start(1)
            << OpenLocal(conn)
            >> stream_start(1)
            << CloseLocal(conn, reset=True)
            << OpenLocal(conn)
        )


# ---------------------------------------------------------------------- unknown message types


class TestUnknownTypes:
    def test_ignorable_skipped_silently(self, dst: TunnelSession) -> None:
        assert (
            Playbook(dst)
            >> load_hex("unknown_type_ignorable")
            >> Message(T.UNKNOWN, ignorable=True)
            >> Message(2**31 - 1, stream_id=1, ignorable=True)
        )

    @pytest.mark.parametrize("type_", [0, 8, 99, -1])
    def test_not_ignorable_recorded(self, dst: TunnelSession, type_: int) -> None:
        assert (
            Playbook(dst)
            >> stream_start(1)
            << OpenLocal(ref("SSH1", 1, 1))
            >> Message(type_, stream_id=1, service_id="SSH1", payload=b"?")
            << Err(f"unknown message type {type_} (not ignorable)")
            >> data(1, b"still fine")
            << WriteLocal(ref("SSH1", 1, 1), b"still fine")
        )


# ---------------------------------------------------------------------- reset() and broken framing


class TestReset:
    def test_reset_closes_everything_and_forgets_service_ids(self, dst: TunnelSession) -> None:
        assert (
            Playbook(dst)
            >> service_ids("SSH1", "HTTP1")
            << ServiceIdsReceived(("SSH1", "HTTP1"))
            >> stream_start(1)
            << OpenLocal(ref("SSH1", 1, 1))
            >> stream_start(2, "HTTP1")
            << OpenLocal(ref("HTTP1", 2, 1))
            >> load_hex("data_v3")[:5]  # part of a frame is buffered ...
            >> Reset()
            << CloseLocal(ref("SSH1", 1, 1), reset=True)
            << CloseLocal(ref("HTTP1", 2, 1), reset=True)
            >> data(1, b"stale after reset")  # ... and dropped: this frame decodes cleanly
            >> stream_start(3, "VNC1")  # SERVICE_IDS forgotten: no longer unannounced
            << OpenLocal(ref("VNC1", 3, 1))
        )
        assert dst.service_ids is None

    def test_reset_drops_frames_not_yet_sent(self, src: TunnelSession) -> None:
        """A connection accepted while the WebSocket is down must not reach the next WebSocket.

        Regression: reset() used to keep the queued STREAM_START, which a shell would then send
        on the new WebSocket, making the destination open a connection the source had closed.
        """
        conn = src.open_connection("SSH1")
        src.reset()
        assert src.actions() == [CloseLocal(conn, reset=True)]
        assert src.data_to_send() == []
        assert (
            Playbook(src)
            >> Open("SSH1", ref("SSH1", 2, 1))  # stream ids are not reused after a reset
            << stream_start(2)
        )

    def test_broken_framing_closes_everything(self, dst: TunnelSession) -> None:
        assert (
            Playbook(dst)
            >> stream_start(1)
            << OpenLocal(ref("SSH1", 1, 1))
            >> b"\x00\x00"
            << Err("tunnel frame length 0", fatal=True)
            << CloseLocal(ref("SSH1", 1, 1), reset=True)
        )
        assert dst.broken
        # Until reset(), nothing more is read.
        assert Playbook(dst) >> stream_start(2) >> load_hex("data_v3")
        assert Playbook(dst) >> Reset() >> stream_start(3) << OpenLocal(ref("SSH1", 3, 1))
        assert not dst.broken

    def test_undecodable_message_breaks_the_session(self, src: TunnelSession) -> None:
        conn = ref("SSH1", 1, 1)
        assert (
            Playbook(src)
            >> Open("SSH1", conn)
            << stream_start(1)
            >> b"\x00\x01\xff"
            << Err("undecodable tunnel message", fatal=True)
            << CloseLocal(conn, reset=True)
            >> Write(conn, b"x")
        )
        assert src.broken


# ---------------------------------------------------------------------- the local side's API


class TestLocalApi:
    def test_encode_data_none_for_dead_connections(self, src: TunnelSession) -> None:
        conn = src.open_connection("SSH1")
        assert src.encode_data(conn, b"x") is not None
        assert src.encode_data(ref("SSH1", 1, 2), b"x") is None  # never opened
        assert src.encode_data(ref("SSH1", 2, 1), b"x") is None  # no such stream
        assert src.encode_data(ref("HTTP1", 1, 1), b"x") is None  # no such service
        src.connection_closed(conn)
        assert src.encode_data(conn, b"x") is None

    def test_encode_data_limits(self, src: TunnelSession) -> None:
        conn = src.open_connection("SSH1")
        frame = src.encode_data(conn, b"\xab" * MAX_PAYLOAD)
        assert frame is not None
        assert decode_frame(frame) == data(1, b"\xab" * MAX_PAYLOAD)
        with pytest.raises(LocalProtocolError, match="exceeds"):
            src.encode_data(conn, b"\xab" * (MAX_PAYLOAD + 1))
        assert decode_frame(src.encode_data(conn, b"") or b"") == data(1, b"")

    def test_connection_closed_for_unknown_connection_is_silent(self, dst: TunnelSession) -> None:
        assert Playbook(dst) >> Closed(ref("SSH1", 1, 1))

    def test_queries(self, dst: TunnelSession) -> None:
        assert dst.open_connections() == []
        assert dst.connection_count == 0
        dst.receive_data(encode(stream_start(4, "SSH1")) + encode(connection_start(4, 9)))
        dst.receive_data(encode(stream_start(2, "HTTP1")) + encode(connection_start(4, 3)))
        assert dst.open_connections() == [
            ref("SSH1", 4, 1),
            ref("SSH1", 4, 3),
            ref("SSH1", 4, 9),
            ref("HTTP1", 2, 1),
        ]
        assert dst.connection_count == 4
        assert dst.is_open(ref("SSH1", 4, 9))
        assert not dst.is_open(ref("SSH1", 4, 2))
        assert not dst.is_open(ref("SSH1", 3, 1))

    def test_outputs_are_taken_once(self, dst: TunnelSession) -> None:
        dst.receive_data(encode(stream_start(0)) + encode(stream_start(1)))
        dst.connection_closed(ref("SSH1", 1, 1))
        assert len(dst.errors()) == 1
        assert len(dst.actions()) == 1
        assert len(dst.data_to_send()) == 1
        assert (dst.errors(), dst.actions(), dst.data_to_send()) == ([], [], [])

    def test_several_messages_in_one_chunk_are_handled_in_order(self, dst: TunnelSession) -> None:
        conn = ref("SSH1", 1, 1)
        chunk = b"".join(
            encode(m) for m in [stream_start(1), data(1, b"a"), data(1, b"b"), stream_reset(1)]
        )
        assert (
            Playbook(dst)
            >> chunk
            << OpenLocal(conn)
            << WriteLocal(conn, b"a")
            << WriteLocal(conn, b"b")
            << CloseLocal(conn)
        )


# ---------------------------------------------------------------------- a whole tunnel


@pytest.mark.parametrize("version", [1, 2, 3])
def test_source_and_destination_exchange_bytes(version: int) -> None:
    source = TunnelSession(Mode.SOURCE, version=version)
    destination = TunnelSession(Mode.DESTINATION)
    link = Link(source, destination)
    link.service_says(service_ids("SSH1", "HTTP1"))
    link.run()
    assert source.service_ids == destination.service_ids == ("SSH1", "HTTP1")

    ssh = link.open("SSH1")
    assert link.send(source, ssh, b"SSH-2.0-client\r\n")  # before the destination saw anything
    link.run()
    assert link.local[id(destination)] == {ssh}
    assert link.got(destination, ssh) == b"SSH-2.0-client\r\n"

    assert link.send(destination, ssh, b"SSH-2.0-server\r\n")
    big = bytes(range(256)) * (MAX_PAYLOAD // 256)
    assert link.send(source, ssh, big)
    link.run()
    assert link.got(source, ssh) == b"SSH-2.0-server\r\n"
    assert link.got(destination, ssh) == b"SSH-2.0-client\r\n" + big

    http = link.open("HTTP1")
    link.run()
    if version == 3:
        assert set(destination.open_connections()) == {ssh, http}
    else:  # V1 and V2 carry one connection per service (V1: one in all)
        expect = {http} if version == 1 else {ssh, http}
        assert set(destination.open_connections()) == expect
    assert set(source.open_connections()) == set(destination.open_connections())
    assert link.local[id(source)] == link.local[id(destination)] == set(source.open_connections())

    # The destination's end of the HTTP connection closes; the source's follows.
    link.close(destination, http)
    link.run()
    assert not source.is_open(http)
    assert http not in link.local[id(source)]
    assert set(source.open_connections()) == set(destination.open_connections())

    link.drop()
    assert source.connection_count == destination.connection_count == 0
    assert link.local == {id(source): set(), id(destination): set()}
    assert link.errors == []


def test_the_playbook_itself_reports_mismatches(dst: TunnelSession) -> None:
    with pytest.raises(AssertionError, match=r"(?s)<< OpenLocal.*produced:.*connection_id=1"):
        assert Playbook(dst) >> stream_start(1) << OpenLocal(ref("SSH1", 1, 2))
    with pytest.raises(AssertionError, match="produced"):
        assert Playbook(TunnelSession(Mode.DESTINATION)) >> stream_start(1)  # unexpected output
    with pytest.raises(AssertionError, match="produced"):
        assert Playbook(TunnelSession(Mode.DESTINATION)) >> stream_start(0) << Err("other text")
