"""agent.state: the tunnel files of the state directory (pure file I/O on tmp_path), the
supervisor's resumed tunnels, and ``--check`` of ``state_dir``."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest
from agent_files import DeviceFiles
from test_agent_daemon import agent_settings

from agent import cli, daemon
from agent import state as state_module
from agent.logs import TAG, Redactor
from agent.state import StateStore
from agent.supervisor import Log, StartProxy, Supervisor
from agent.systemd import Notifier
from iotunnel.notify import Notification
from iotunnel.secret import Secret
from testbed.pki import PKI

TOKEN = "access-token-that-must-never-be-quoted-" + "x" * 40
CLIENT = "c" * 64
MAPPED = {"HTTP1", "SSH1"}


def note(token: str = TOKEN, services: tuple[str, ...] = ("SSH1",)) -> Notification:
    return Notification(Secret(token), "us-east-1", services)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    s = StateStore(tmp_path / "state")
    s.prepare()
    return s


def test_prepare_creates_a_private_directory(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "var" / "lib" / "iotunnel")
    s.prepare()
    assert mode(s.directory) == 0o700


def test_save_then_load_gives_the_tunnel_back(store: StateStore) -> None:
    store.save("t3", note(services=("HTTP1", "SSH1")), Secret(CLIENT), 1700000000.5)
    path = store.directory / "tunnel-t3.json"
    assert mode(path) == 0o600
    assert os.listdir(store.directory) == ["tunnel-t3.json"]  # no temporary file left
    loaded = store.load(MAPPED)
    assert loaded.problems == []
    [saved] = loaded.tunnels
    assert saved.tag == "t3"
    assert saved.notification == note(services=("HTTP1", "SSH1"))
    assert saved.client_token.reveal() == CLIENT
    assert saved.since == 1700000000.5


def test_the_file_is_0600_from_its_creation_whatever_the_umask(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary file is created 0600 with O_EXCL: no moment where others could read it."""
    created: list[tuple[int, int]] = []
    real_open = os.open

    def spy(path: object, flags: int, mode: int = 0o777, **kw: object) -> int:
        fd = real_open(path, flags, mode, **kw)  # type: ignore[arg-type]
        if flags & os.O_CREAT:
            created.append((flags, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(state_module.os, "open", spy)
    old = os.umask(0)
    try:
        store.save("t1", note(), Secret(CLIENT), 1.0)
    finally:
        os.umask(old)
    [(flags, created_mode)] = created
    assert flags & os.O_EXCL
    assert created_mode == 0o600
    assert mode(store.path("t1")) == 0o600


def test_saving_again_replaces_the_file(store: StateStore) -> None:
    store.save("t1", note(), Secret(CLIENT), 1.0)
    store.save("t1", note(), Secret("d" * 64), 2.0)
    [saved] = store.load(MAPPED).tunnels
    assert saved.client_token.reveal() == "d" * 64
    assert os.listdir(store.directory) == ["tunnel-t1.json"]


def test_a_failed_write_leaves_nothing_behind(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_module.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        store.save("t1", note(), Secret(CLIENT), 1.0)
    assert os.listdir(store.directory) == []


def test_remove_and_remove_again(store: StateStore) -> None:
    store.save("t1", note(), Secret(CLIENT), 1.0)
    store.remove("t1")
    store.remove("t1")
    assert os.listdir(store.directory) == []


def test_tunnels_come_back_oldest_first(store: StateStore) -> None:
    store.save("t10", note("token-b"), Secret(CLIENT), 20.0)
    store.save("t2", note("token-a"), Secret(CLIENT), 10.0)
    store.save("t9", note("token-c"), Secret(CLIENT), 20.0)
    assert [t.tag for t in store.load(MAPPED).tunnels] == ["t2", "t9", "t10"]


CORRUPT = [
    (b"", "malformed JSON"),
    (b'{"version": 1, "clientAccessToken": "' + TOKEN.encode(), "malformed JSON"),
    (b"[" * 100 + b"]" * 100, "malformed JSON: nested more than"),
    (b"\xff\xfe", "malformed JSON: not UTF-8"),
    (b"x" * 40_000, "malformed JSON: too large"),
    (b"[]", "not a JSON object"),
    (json.dumps({"version": 2}).encode(), "not a version 1 tunnel file"),
    (json.dumps({"version": 1, "clientToken": "short"}).encode(), "no clientToken matching"),
    (json.dumps({"version": 1, "clientToken": CLIENT}).encode(), "no since"),
    (
        json.dumps(
            {"version": 1, "clientToken": CLIENT, "since": 1, "clientMode": "source"}
        ).encode(),
        "clientMode is 'source'",
    ),
]


@pytest.mark.parametrize(("content", "reason"), CORRUPT)
def test_a_corrupt_file_is_one_line_without_its_content_and_removed(
    store: StateStore, content: bytes, reason: str
) -> None:
    store.save("t1", note("good-token"), Secret(CLIENT), 1.0)
    bad = store.directory / "tunnel-t2.json"
    bad.write_bytes(content)
    loaded = store.load(MAPPED)
    assert [t.tag for t in loaded.tunnels] == ["t1"]
    [problem] = loaded.problems
    assert problem.startswith(f"state file {bad}: {reason}")
    assert problem.endswith("; removed")
    assert "\n" not in problem
    assert TOKEN not in problem
    assert not bad.exists()


def test_a_tunnel_whose_service_is_no_longer_mapped_is_dropped(store: StateStore) -> None:
    store.save("t1", note(services=("SSH1", "VNC1")), Secret(CLIENT), 1.0)
    loaded = store.load(MAPPED, mapping_dir="/etc/iotunnel/destination.d")
    assert loaded.tunnels == []
    assert loaded.problems == [
        f"state file {store.path('t1')}: service VNC1 not mapped in /etc/iotunnel/destination.d; "
        "removed"
    ]
    assert not store.path("t1").exists()


def test_an_unreadable_file_is_skipped_and_kept(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save("t1", note(), Secret(CLIENT), 1.0)
    store.save("t2", note("other"), Secret(CLIENT), 2.0)
    store.path("t1").chmod(0)
    real_open = os.open

    def as_another_user(path: object, flags: int, *args: object, **kw: object) -> int:
        if os.geteuid() == 0 and str(path) == str(store.path("t1")):  # root reads mode 000
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(state_module.os, "open", as_another_user)
    loaded = store.load(MAPPED)
    assert [t.tag for t in loaded.tunnels] == ["t2"]
    assert loaded.problems == [
        f"state file {store.path('t1')}: cannot read: Permission denied; skipped"
    ]
    assert store.path("t1").exists()


def test_a_fifo_or_a_symlink_in_place_of_a_file_does_not_hang_or_follow(
    store: StateStore, tmp_path: Path
) -> None:
    os.mkfifo(store.directory / "tunnel-t1.json")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    (store.directory / "tunnel-t2.json").symlink_to(elsewhere)
    loaded = store.load(MAPPED)
    assert loaded.tunnels == []
    assert loaded.problems[0] == f"state file {store.path('t1')}: not a regular file; removed"
    assert loaded.problems[1].startswith(f"state file {store.path('t2')}: cannot read: ")
    assert elsewhere.read_text() == "{}"


def test_leftovers_of_an_interrupted_write_go_and_other_files_stay(store: StateStore) -> None:
    leftover = store.directory / ".tunnel-t1.json.0123456789abcdef.tmp"
    leftover.write_text("{")
    other = store.directory / "status.json"  # not ours: left alone
    other.write_text("{}")
    loaded = store.load(MAPPED)
    assert (loaded.tunnels, loaded.problems) == ([], [])
    assert not leftover.exists()
    assert other.exists()


def test_a_missing_directory_holds_no_tunnel(tmp_path: Path) -> None:
    loaded = StateStore(tmp_path / "nowhere").load(MAPPED)
    assert (loaded.tunnels, loaded.problems) == ([], [])


# --------------------------------------------------------------------------- supervisor


def make(max_tunnels: int = 2) -> Supervisor:
    counter = itertools.count(1)
    return Supervisor(max_tunnels, new_client_token=lambda: f"client-{next(counter):032d}")


def test_a_resumed_tunnel_keeps_its_tag_and_client_token() -> None:
    sup = make()
    actions = sup.resumed("t7", note(), Secret(CLIENT))
    assert actions == [
        Log(logging.INFO, "resuming the tunnel for SSH1 (region us-east-1)", "t7"),
        StartProxy("t7", note(), Secret(CLIENT), 0),
    ]
    # New tunnels are numbered after the resumed ones.
    start = [a for a in sup.notified(note("other")) if isinstance(a, StartProxy)]
    assert start[0].tag == "t8"


def test_a_redelivered_notification_of_a_resumed_tunnel_is_a_duplicate() -> None:
    sup = make()
    sup.resumed("t1", note(), Secret(CLIENT))
    assert sup.notified(note()) == [
        Log(logging.INFO, "duplicate notification for SSH1 (region us-east-1)")
    ]
    assert sup.active == 1


def test_resumed_tunnels_respect_max_tunnels() -> None:
    sup = make(max_tunnels=1)
    assert any(isinstance(a, StartProxy) for a in sup.resumed("t1", note("a"), Secret(CLIENT)))
    refused = sup.resumed("t2", note("b"), Secret(CLIENT))
    assert not any(isinstance(a, StartProxy) for a in refused)
    assert refused == [
        Log(
            logging.WARNING,
            "the tunnel for SSH1 (region us-east-1) is not resumed: 1 tunnels already run "
            "(max_tunnels = 1)",
            "t2",
        )
    ]
    assert sup.state("t2") is None


# --------------------------------------------------------------------------- --check


def check(
    device: DeviceFiles, pki: PKI, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    argv = [
        "--config", str(device.ini), "--check", "--state-dir", str(state_dir),
        "--cert", str(pki.client.cert), "--key", str(pki.client.key), "--root-ca", str(pki.ca.cert),
    ]  # fmt: skip
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_accepts_a_state_dir_it_can_create(
    device: DeviceFiles, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = check(device, pki, tmp_path / "new" / "state", capsys)
    assert (code, err) == (0, "")
    assert out.rstrip("\n").endswith(f"state in {tmp_path / 'new' / 'state'}")
    assert not (tmp_path / "new").exists()  # --check creates nothing


def test_check_refuses_a_state_dir_that_cannot_be_used(
    device: DeviceFiles, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for state_dir, problem in (
        (a_file, f"state_dir: {a_file}: not a directory"),
        (
            a_file / "state",
            f"state_dir: {a_file / 'state'}: cannot be created: {a_file} is not a directory",
        ),
    ):
        code, out, err = check(device, pki, state_dir, capsys)
        assert (code, out, err) == (2, "", f"iotunnel-agent: error: {problem}\n")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, out, err = check(device, pki, locked, capsys)
        assert (code, err) == (2, f"iotunnel-agent: error: state_dir: {locked}: not writable\n")


# --------------------------------------------------------------------------- the daemon


class FakeChild:
    """Stands in for :class:`agent.proxy_runner.ProxyChild`: exits with ``EXIT`` at once, or
    (``EXIT is None``) runs until stopped."""

    EXIT: int | None = None
    started: ClassVar[list[FakeChild]] = []

    def __init__(self, tag: str, argv: list[str], env: dict[str, str], **_: object) -> None:
        self.tag, self.argv, self.env = tag, argv, env
        self.streams: list[object] = []
        self._stopped = asyncio.Event()
        FakeChild.started.append(self)

    async def run(self) -> tuple[int, float]:
        if self.EXIT is not None:
            return self.EXIT, 0.0
        await self._stopped.wait()
        return -signal.SIGTERM, 1.0

    def stop(self) -> None:
        self._stopped.set()


@pytest.fixture
def fake_children(monkeypatch: pytest.MonkeyPatch) -> type[FakeChild]:
    monkeypatch.setattr(daemon, "ProxyChild", FakeChild)
    monkeypatch.setattr(FakeChild, "started", [])
    return FakeChild


def payload(token: str = TOKEN) -> bytes:
    document = {
        "clientAccessToken": token,
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["SSH1"],
    }
    return json.dumps(document).encode()


async def until(condition: Callable[[], bool]) -> None:
    """Poll a condition of the supervisor (it has no event to await)."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def test_a_stopped_agent_keeps_the_tunnel_and_the_next_one_resumes_it(
    device: DeviceFiles,
    fake_children: type[FakeChild],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = replace(agent_settings(device), state_dir=tmp_path / "state")
    store = StateStore(settings.state_dir)

    async def first_run() -> None:
        agent = daemon.Agent(settings, Notifier(None), {}, Redactor())
        async with asyncio.TaskGroup() as tg:
            agent._tg = tg
            agent._resume_safely()
            agent._on_message(settings.topic, payload())
            [child] = fake_children.started
            assert os.listdir(settings.state_dir) == ["tunnel-t1.json"]
            assert mode(store.path("t1")) == 0o600
            [saved] = store.load(MAPPED).tunnels
            assert saved.client_token.reveal() == child.env["AWSIOT_TUNNEL_CLIENT_TOKEN"]
            agent._carry_out(agent.supervisor.shutdown())  # SIGTERM
            await until(lambda: agent.supervisor.idle)

    async def second_run() -> None:
        agent = daemon.Agent(settings, Notifier(None), {}, Redactor())
        async with asyncio.TaskGroup() as tg:
            agent._tg = tg
            agent._resume_safely()
            assert [c.tag for c in fake_children.started] == ["t1", "t1"]
            agent._on_message(settings.topic, payload())  # the broker redelivers it
            agent._on_message(settings.topic, payload("another-token"))
            assert [c.tag for c in fake_children.started] == ["t1", "t1", "t2"]
            agent._carry_out(agent.supervisor.shutdown())
            await until(lambda: agent.supervisor.idle)

    with caplog.at_level(logging.DEBUG, logger="agent"):
        asyncio.run(first_run())
        assert os.listdir(settings.state_dir) == ["tunnel-t1.json"]
        asyncio.run(second_run())
    first, resumed = fake_children.started[:2]
    for name in ("AWSIOT_TUNNEL_ACCESS_TOKEN", "AWSIOT_TUNNEL_CLIENT_TOKEN"):
        assert resumed.env[name] == first.env[name]
    [resuming] = [r for r in caplog.records if r.getMessage().startswith("resuming")]
    assert resuming.getMessage() == "resuming the tunnel for SSH1 (region us-east-1)"
    assert getattr(resuming, TAG) == "t1"
    assert "duplicate notification for SSH1 (region us-east-1)" in caplog.text
    assert sorted(os.listdir(settings.state_dir)) == ["tunnel-t1.json", "tunnel-t2.json"]
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("code", "why"),
    [(0, "closed by the service"), (3, "refused the token"), (1, "giving up on this tunnel")],
)
def test_the_file_goes_when_the_tunnel_ends(
    device: DeviceFiles,
    fake_children: type[FakeChild],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: int,
    why: str,
) -> None:
    settings = replace(agent_settings(device), state_dir=tmp_path / "state")
    monkeypatch.setattr(FakeChild, "EXIT", code)

    async def scenario() -> None:
        agent = daemon.Agent(settings, Notifier(None), {}, Redactor())
        agent.supervisor = Supervisor(4, backoff_base=0.001, backoff_cap=0.001)
        async with asyncio.TaskGroup() as tg:
            agent._tg = tg
            agent._resume_safely()
            agent._on_message(settings.topic, payload())
            await until(lambda: agent.supervisor.idle)

    with caplog.at_level(logging.DEBUG, logger="agent"):
        asyncio.run(scenario())
    assert why in caplog.text
    assert os.listdir(settings.state_dir) == []


def test_an_unusable_state_dir_is_one_warning_and_tunnels_still_run(
    device: DeviceFiles,
    fake_children: type[FakeChild],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    settings = replace(agent_settings(device), state_dir=a_file)

    async def scenario() -> None:
        agent = daemon.Agent(settings, Notifier(None), {}, Redactor())
        async with asyncio.TaskGroup() as tg:
            agent._tg = tg
            agent._resume_safely()
            agent._on_message(settings.topic, payload())
            agent._carry_out(agent.supervisor.shutdown())
            await until(lambda: agent.supervisor.idle)

    with caplog.at_level(logging.DEBUG, logger="agent"):
        asyncio.run(scenario())
    assert len(fake_children.started) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"state_dir: {a_file}: File exists; tunnels will not survive a restart"]
