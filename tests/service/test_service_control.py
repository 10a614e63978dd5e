"""The control plane without sockets: operations, limits, rotation, lifetimes, persistence.

Time is a :class:`ManualClock`; the data plane is a recorder; notifications are recorded.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import pytest

from iotunnel.mode import Mode
from service.clock import ManualClock
from service.control import (
    ControlPlane,
    ControlSettings,
    InvalidRequest,
    LimitExceeded,
    Limits,
    ResourceNotFound,
)
from service.notify import RecordingNotifier
from service.registry import Claim, TunnelRegistry, TunnelStatus
from service.store import SqliteStore, StoreError

ARN_PREFIX = "arn:aws:iot:us-east-1:123456789012:tunnel/"


class FakeDataPlane:
    """Records what the control plane asks of the data plane."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []
        self.disconnected: list[tuple[str, tuple[Mode, ...], str]] = []

    async def end_tunnel(self, tunnel_id: str, reason: str) -> None:
        self.ended.append((tunnel_id, reason))

    async def disconnect(self, tunnel_id: str, modes: Iterable[Mode], reason: str) -> None:
        self.disconnected.append((tunnel_id, tuple(modes), reason))


class World:
    def __init__(
        self, store: SqliteStore | None = None, settings: ControlSettings | None = None
    ) -> None:
        self.clock = ManualClock()
        self.registry = TunnelRegistry(store, clock=self.clock)
        self.data = FakeDataPlane()
        self.notifier = RecordingNotifier()
        self.control = ControlPlane(
            self.registry, data_plane=self.data, notifier=self.notifier, settings=settings
        )


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_open_registers_tokens_and_notifies_the_thing() -> None:
    w = World()
    opened = run(
        w.control.open_tunnel(
            services=["HTTP1", "SSH1"],
            thing_name="thing-1",
            description="d",
            lifetime_minutes=30,
            tags={"env": "test"},
        )
    )
    tunnel = opened.tunnel
    assert w.registry.lookup(opened.source_token) == (tunnel, Mode.SOURCE)
    assert w.registry.lookup(opened.destination_token) == (tunnel, Mode.DESTINATION)
    assert opened.source_token != opened.destination_token
    assert len(opened.source_token) >= 64
    assert tunnel.services == ("HTTP1", "SSH1")
    assert tunnel.expires_at == w.clock.now() + 30 * 60
    assert tunnel.tags == {"env": "test"}
    assert w.control.arn(tunnel.tunnel_id) == ARN_PREFIX + tunnel.tunnel_id
    [note] = w.notifier.sent
    assert note.thing_name == "thing-1"
    assert note.notification.token.reveal() == opened.destination_token
    assert note.services == ("HTTP1", "SSH1")
    assert note.notification.region == "us-east-1"
    assert opened.destination_token not in repr(opened)
    assert opened.destination_token not in repr(note)


def test_open_without_thing_sends_nothing_and_defaults_to_720_minutes() -> None:
    w = World()
    opened = run(w.control.open_tunnel(services=["SSH1"]))
    assert w.notifier.sent == []
    assert opened.tunnel.lifetime_minutes == 720
    assert opened.tunnel.expires_at == w.clock.now() + 720 * 60


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"services": ["A", "B", "C", "D"]}, LimitExceeded, "at most 3 services"),
        ({"services": ["SSH 1"]}, InvalidRequest, "services[0]: must match"),
        ({"services": ["A", "x" * 129]}, InvalidRequest, "services[1]: must be 1 to 128"),
        ({"services": ["A", "A"]}, InvalidRequest, "unique"),
        ({"lifetime_minutes": 0}, InvalidRequest, "must be 1 to 720"),
        ({"lifetime_minutes": 721}, InvalidRequest, "must be 1 to 720"),
        ({"tags": {f"k{i}": "v" for i in range(51)}}, LimitExceeded, "at most 50 tags"),
    ],
)
def test_open_refuses(kwargs: dict, error: type, fragment: str) -> None:  # type: ignore[type-arg]
    w = World()
    with pytest.raises(error) as info:
        run(w.control.open_tunnel(**kwargs))
    assert fragment in info.value.message
    assert len(w.registry) == 0


def test_limits_are_configurable() -> None:
    settings = ControlSettings(limits=Limits(max_services=5, max_tunnels=2))
    w = World(settings=settings)
    run(w.control.open_tunnel(services=["A", "B", "C", "D", "E"]))
    opened = run(w.control.open_tunnel())
    with pytest.raises(LimitExceeded, match="at most 2 tunnels"):
        run(w.control.open_tunnel())
    run(w.control.close_tunnel(opened.tunnel.tunnel_id))
    run(w.control.open_tunnel())  # closed tunnels do not count


def test_close_ends_connections_keeps_it_describable_and_delete_forgets_it() -> None:
    w = World()
    opened = run(w.control.open_tunnel(services=["SSH1"]))
    tunnel_id = opened.tunnel.tunnel_id
    w.clock.advance(5)
    run(w.control.close_tunnel(tunnel_id))
    tunnel = w.control.describe(tunnel_id)
    assert tunnel.status is TunnelStatus.CLOSED
    assert tunnel.closed_at == tunnel.updated_at == w.clock.now()
    assert w.data.ended == [(tunnel_id, "tunnel closed")]
    run(w.control.close_tunnel(tunnel_id))  # again: fine
    run(w.control.close_tunnel(tunnel_id, delete=True))
    with pytest.raises(ResourceNotFound, match=tunnel_id):
        w.control.describe(tunnel_id)
    assert w.registry.lookup(opened.source_token) is None
    with pytest.raises(ResourceNotFound):
        run(w.control.close_tunnel(tunnel_id))


def test_rotate_revokes_old_tokens_and_disconnects_their_peers() -> None:
    w = World()
    opened = run(w.control.open_tunnel(services=["SSH1"], thing_name="thing-1"))
    tunnel_id = opened.tunnel.tunnel_id
    lifetime_end = opened.tunnel.expires_at
    w.clock.advance(60)
    tokens = run(w.control.rotate(tunnel_id, [Mode.SOURCE]))
    assert list(tokens) == [Mode.SOURCE]
    assert w.registry.lookup(opened.source_token) is None
    assert w.registry.lookup(tokens[Mode.SOURCE]) == (opened.tunnel, Mode.SOURCE)
    assert w.registry.lookup(opened.destination_token) is not None  # not rotated
    assert w.data.disconnected == [(tunnel_id, (Mode.SOURCE,), "access token rotated")]
    assert opened.tunnel.expires_at == lifetime_end  # rotation does not extend the lifetime
    assert len(w.notifier.sent) == 1  # only the OpenTunnel one: no destinationConfig

    both = run(
        w.control.rotate(
            tunnel_id,
            [Mode.SOURCE, Mode.DESTINATION],
            destination_services=["SSH1"],
            thing_name="thing-2",
        )
    )
    assert set(both) == {Mode.SOURCE, Mode.DESTINATION}
    assert w.registry.lookup(tokens[Mode.SOURCE]) is None
    assert w.registry.lookup(opened.destination_token) is None
    note = w.notifier.sent[-1]
    assert note.thing_name == "thing-2"
    assert note.notification.token.reveal() == both[Mode.DESTINATION]
    assert opened.tunnel.thing_name == "thing-2"


@pytest.mark.parametrize(
    ("modes", "services", "fragment"),
    [
        ([Mode.SOURCE], ["SSH1"], "cannot be used with clientMode SOURCE"),
        ([Mode.DESTINATION], ["HTTP1"], "must be the tunnel's services: SSH1"),
    ],
)
def test_rotate_refuses_bad_destination_config(
    modes: list[Mode], services: list[str], fragment: str
) -> None:
    w = World()
    opened = run(w.control.open_tunnel(services=["SSH1"]))
    with pytest.raises(InvalidRequest, match=fragment):
        run(w.control.rotate(opened.tunnel.tunnel_id, modes, destination_services=services))
    assert w.registry.lookup(opened.source_token) is not None


def test_rotate_unknown_or_closed_tunnel() -> None:
    w = World()
    with pytest.raises(ResourceNotFound):
        run(w.control.rotate("nope", [Mode.SOURCE]))
    opened = run(w.control.open_tunnel())
    run(w.control.close_tunnel(opened.tunnel.tunnel_id))
    with pytest.raises(InvalidRequest, match="is closed"):
        run(w.control.rotate(opened.tunnel.tunnel_id, [Mode.SOURCE]))


def test_lifetime_expires_the_tunnel_on_the_injected_clock() -> None:
    w = World()
    short = run(w.control.open_tunnel(services=["SSH1"], lifetime_minutes=1)).tunnel
    long = run(w.control.open_tunnel(services=["SSH1"], lifetime_minutes=2)).tunnel
    w.clock.advance(59)
    assert run(w.control.expire_due()) == []
    w.clock.advance(1)
    assert run(w.control.expire_due()) == [short.tunnel_id]
    assert short.status is TunnelStatus.CLOSED
    assert long.status is TunnelStatus.OPEN
    assert w.data.ended == [(short.tunnel_id, "tunnel expired")]
    assert run(w.control.expire_due()) == []


def test_closed_tunnels_are_removed_after_the_retention() -> None:
    w = World(settings=ControlSettings(closed_retention=3600))
    opened = run(w.control.open_tunnel())
    run(w.control.close_tunnel(opened.tunnel.tunnel_id))
    w.clock.advance(3599)
    assert w.control.purge_closed() == []
    assert w.registry.next_deadline(3600) == w.clock.now() + 1
    w.clock.advance(1)
    assert w.control.purge_closed() == [opened.tunnel.tunnel_id]
    assert len(w.registry) == 0


def test_scheduler_expires_on_time_with_a_short_minute() -> None:
    async def scenario() -> None:
        registry = TunnelRegistry()
        control = ControlPlane(registry, settings=ControlSettings(minute_seconds=0.05))
        task = asyncio.create_task(control.run())
        try:
            opened = await control.open_tunnel(lifetime_minutes=1)
            async with asyncio.timeout(10):
                while opened.tunnel.is_open:  # noqa: ASYNC110 - polls state the loop changes
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(scenario())


def test_list_is_newest_first_filters_by_thing_and_pages() -> None:
    w = World()
    ids = []
    for index in range(5):
        thing = "thing-a" if index % 2 == 0 else "thing-b"
        ids.append(run(w.control.open_tunnel(services=["S"], thing_name=thing)).tunnel.tunnel_id)
        w.clock.advance(1)
    newest_first = ids[::-1]
    page, token = w.control.list_tunnels()
    assert [t.tunnel_id for t in page] == newest_first
    assert token is None
    seen: list[str] = []
    token = None
    while True:
        page, token = w.control.list_tunnels(max_results=2, next_token=token)
        seen += [t.tunnel_id for t in page]
        if token is None:
            break
    assert seen == newest_first
    page, _ = w.control.list_tunnels(thing_name="thing-a")
    assert [t.tunnel_id for t in page] == [ids[4], ids[2], ids[0]]
    with pytest.raises(InvalidRequest, match="nextToken"):
        w.control.list_tunnels(next_token="bm9wZQ==")


def test_tags_by_arn() -> None:
    w = World()
    opened = run(w.control.open_tunnel(tags={"a": "1"}))
    arn = ARN_PREFIX + opened.tunnel.tunnel_id
    w.control.tag(arn, {"b": "2", "a": "3"})
    assert w.control.tags(arn) == {"a": "3", "b": "2"}
    w.control.untag(arn, ["a", "missing"])
    assert w.control.tags(arn) == {"b": "2"}
    for bad in (
        ARN_PREFIX + "nope",
        arn.replace("us-east-1", "eu-west-1"),
        arn.replace("123456789012", "000000000000"),
        "not-an-arn",
    ):
        with pytest.raises(ResourceNotFound):
            w.control.tags(bad)
    with pytest.raises(LimitExceeded):
        w.control.tag(arn, {f"k{i}": "v" for i in range(50)})


def test_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    w = World(store)
    kept = run(
        w.control.open_tunnel(
            services=["HTTP1", "SSH1"], thing_name="t", description="kept", tags={"k": "v"}
        )
    )
    closed = run(w.control.open_tunnel(services=["SSH1"]))
    deleted = run(w.control.open_tunnel())
    kept_id = kept.tunnel.tunnel_id
    assert w.registry.claim(kept_id, Mode.SOURCE, None) is Claim.ACCEPTED
    w.registry.set_connected(kept_id, Mode.SOURCE, True)
    new_destination = run(w.control.rotate(kept_id, [Mode.DESTINATION]))[Mode.DESTINATION]
    run(w.control.close_tunnel(closed.tunnel.tunnel_id))
    run(w.control.close_tunnel(deleted.tunnel.tunnel_id, delete=True))
    store.close()
    assert path.stat().st_mode & 0o777 == 0o600

    w2 = World(SqliteStore(path))
    assert {t.tunnel_id for t in w2.registry} == {kept_id, closed.tunnel.tunnel_id}
    tunnel = w2.control.describe(kept_id)
    assert tunnel.services == ("HTTP1", "SSH1")
    assert (tunnel.description, tunnel.thing_name, tunnel.tags) == ("kept", "t", {"k": "v"})
    assert tunnel.expires_at == kept.tunnel.expires_at
    assert tunnel.created_at == kept.tunnel.created_at
    assert tunnel.is_open
    assert not tunnel.source_state.connected  # nobody is connected to a fresh service
    # single-use state and rotations survive: the used token stays used, the old one unknown
    assert w2.registry.claim(kept_id, Mode.SOURCE, None) is Claim.TOKEN_USED
    assert w2.registry.lookup(kept.destination_token) is None
    assert w2.registry.lookup(new_destination) == (tunnel, Mode.DESTINATION)
    assert w2.control.describe(closed.tunnel.tunnel_id).status is TunnelStatus.CLOSED
    assert w2.registry.lookup(kept.source_token) == (tunnel, Mode.SOURCE)
    # the file holds digests, never tokens
    raw = path.read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("state.db-*") if p.is_file()
    )
    for token in (kept.source_token, new_destination, closed.destination_token):
        assert token.encode() not in raw


def test_state_file_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"garbage\.db: not a usable state file"):
        SqliteStore(garbage)
    newer = tmp_path / "newer.db"
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore(newer)
    with pytest.raises(StoreError, match="cannot open state file"):
        SqliteStore(tmp_path / "missing-dir" / "state.db")
