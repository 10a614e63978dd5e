"""agent.launcher and agent.zygote: proxies forked from the zygote, supervised by the agent.

A real zygote process and real ``python -m proxy`` children (the end to end tests run them
against the service: tests/e2e/test_agent_e2e.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.launcher import ForkedProcess, Launcher, fork_zygote, zygote_environment
from agent.proxy_runner import ProxyChild, child_environment
from iotunnel.secret import Secret
from iotunnel.status import Connected, Event, Reconnecting

TOKEN = Secret("launcher-test-destination-token-0123456789")
CLIENT = Secret("launcher-test-client-token-0123456789abcdef")
#: Generous: a loaded 2-core machine.
WAIT = 60.0


def proxy_argv(mappings: Path, port: int) -> list[str]:
    """A destination proxy that keeps reconnecting to a port where nothing answers TLS."""
    return [
        sys.executable, "-m", "proxy", "-m", "dst", "--config-dir", str(mappings),
        "-e", f"wss://127.0.0.1:{port}", "-v", "5",
    ]  # fmt: skip


@pytest.fixture
def mappings(tmp_path: Path) -> Path:
    directory = tmp_path / "destination.d"
    directory.mkdir()
    (directory / "SSHDestination.ini").write_text("SSH1 = 22\n")
    return directory


@pytest.fixture
def dead_port() -> int:
    """A port that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment() -> dict[str, str]:
    return child_environment(os.environ, TOKEN, CLIENT)


def proc_text(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def test_the_zygote_environment_holds_no_tunnel_or_proxy_variable() -> None:
    env = zygote_environment(
        {"PATH": "/bin", "IOTUNNEL_X": "1", "HTTPS_PROXY": "http://u:p@h:1", "NOTIFY_SOCKET": "/s"}
    )
    assert env["PATH"] == "/bin"
    assert not {"IOTUNNEL_X", "HTTPS_PROXY", "NOTIFY_SOCKET"} & set(env)


def test_a_forked_childs_exit_code_reaches_the_supervisor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent")

    async def scenario() -> tuple[int, ProxyChild]:
        launcher = Launcher(os.environ, None)
        launcher.start()
        try:
            argv = [sys.executable, "-m", "proxy", "--no-such-flag"]
            child = ProxyChild(
                "t1", argv, environment(), on_streams=lambda: None, launcher=launcher
            )
            code, _ = await child.run()
            return code, child
        finally:
            launcher.close()

    code, child = asyncio.run(scenario())
    assert isinstance(child._process, ForkedProcess)
    assert not child._process.code_unknown
    assert code == 2  # the proxy's usage error, as its own process would exit
    assert "launcher" not in caplog.text


def test_a_forked_child_stops_on_sigterm_and_no_token_is_on_a_command_line(
    mappings: Path, dead_port: int
) -> None:
    async def scenario() -> tuple[int, list[bytes]]:
        launcher = Launcher(os.environ, None)
        launcher.start()
        seen: list[bytes] = []
        retrying = asyncio.Event()

        def on_event(event: Event) -> None:
            if isinstance(event, Reconnecting | Connected):
                retrying.set()

        try:
            child = ProxyChild(
                "t1",
                proxy_argv(mappings, dead_port),
                environment(),
                on_streams=lambda: None,
                on_event=on_event,
                launcher=launcher,
                stop_grace=30,
            )
            task = asyncio.create_task(child.run())
            await asyncio.wait_for(retrying.wait(), WAIT)  # it runs, with its status channel
            assert child.pid is not None
            assert launcher.pid is not None
            assert parent(child.pid) == launcher.pid
            assert parent(launcher.pid) == os.getpid()
            for pid in (child.pid, launcher.pid):
                seen += [proc_text(pid, "cmdline"), proc_text(pid, "environ")]
            child.stop()
            code, _ = await asyncio.wait_for(task, WAIT)
            return code, seen
        finally:
            launcher.close()

    code, seen = asyncio.run(scenario())
    assert code == 143  # the proxy's exit on SIGTERM, reported by the zygote
    for secret in (TOKEN.reveal(), CLIENT.reveal()):
        assert not any(secret.encode() in text for text in seen)


def test_a_killed_zygote_is_restarted_for_the_next_child(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent")

    async def scenario() -> tuple[int, int, int, bool]:
        launcher = Launcher(os.environ, None)
        launcher.start()
        try:
            argv = [sys.executable, "-m", "proxy", "--no-such-flag"]
            first = ProxyChild(
                "t1", argv, environment(), on_streams=lambda: None, launcher=launcher
            )
            await first.run()
            old = launcher.pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            again = ProxyChild(
                "t2", argv, environment(), on_streams=lambda: None, launcher=launcher
            )
            code, _ = await again.run()
            assert launcher.pid is not None
            return code, old, launcher.pid, isinstance(again._process, ForkedProcess)
        finally:
            launcher.close()

    code, old, new, forked = asyncio.run(scenario())
    assert (code, forked) == (2, True)
    assert new != old
    assert "the launcher (zygote) exited; it is restarted" in caplog.text


def test_without_a_launcher_the_proxies_are_spawned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A zygote that cannot start: one warning, and each proxy is a new process as before."""
    caplog.set_level(logging.WARNING, logger="agent")
    argv = [sys.executable, "-m", "proxy", "--no-such-flag"]
    monkeypatch.setattr("agent.launcher.sys.executable", "/nonexistent/python")

    async def scenario() -> list[tuple[int, bool]]:
        launcher = Launcher(os.environ, None)
        launcher.start()
        try:
            results = []
            for tag in ("t1", "t2"):
                child = ProxyChild(
                    tag, argv, environment(), on_streams=lambda: None, launcher=launcher
                )
                code, _ = await child.run()
                results.append((code, isinstance(child._process, ForkedProcess)))
            return results
        finally:
            launcher.close()

    assert asyncio.run(scenario()) == [(2, False), (2, False)]
    assert caplog.text.count("starting each proxy as a new process instead") == 1


def test_no_zygote_is_forked_from_a_process_that_runs_threads() -> None:
    """A thread (awscrt's, in the agent) could hold a lock the child would inherit taken."""
    import threading

    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert fork_zygote(os.environ, None) is None
    finally:
        release.set()
        thread.join()


#: Run in a fresh interpreter (one thread, as the agent before awscrt): the zygote forked from
#: it serves the first child, a killed one is restarted as a new process, close reaps it.
PREFORK_SCRIPT = """
import asyncio, json, os, signal, sys
from pathlib import Path
from agent.launcher import Launcher, fork_zygote, ForkedProcess
from agent.proxy_runner import ProxyChild, child_environment
from iotunnel.secret import Secret
from iotunnel.status import Connected, Reconnecting

mappings, port = sys.argv[1], sys.argv[2]
argv = [sys.executable, "-m", "proxy", "-m", "dst", "--config-dir", mappings,
        "-e", f"wss://127.0.0.1:{port}", "-v", "5"]
env = child_environment(os.environ, Secret("prefork-test-token-0123456789"),
                        Secret("prefork-test-client-0123456789abcdef"))

def proc(pid, name):
    return Path(f"/proc/{pid}/{name}").read_bytes()

def parent(pid):
    return int(proc(pid, "stat").decode().rpartition(")")[2].split()[1])

async def one_child(launcher, tag):
    up = asyncio.Event()
    child = ProxyChild(tag, argv, env, on_streams=lambda: None, launcher=launcher,
                       on_event=lambda e: isinstance(e, Reconnecting | Connected) and up.set(),
                       stop_grace=30)
    task = asyncio.create_task(child.run())
    await asyncio.wait_for(up.wait(), 60)
    seen = {"forked": isinstance(child._process, ForkedProcess),
            "child_parent_is_zygote": parent(child.pid) == launcher.pid,
            "zygote_parent_is_agent": parent(launcher.pid) == os.getpid(),
            "zygote_name": proc(launcher.pid, "comm").decode().strip(),
            "child_name": proc(child.pid, "comm").decode().strip(),
            "zygote_cmdline_is_the_agents":
                proc(launcher.pid, "cmdline") == proc(os.getpid(), "cmdline")}
    child.stop()
    seen["code"] = (await asyncio.wait_for(task, 60))[0]
    return seen

async def main(preforked):
    launcher = Launcher(os.environ, None, preforked)
    launcher.start()
    try:
        first = await one_child(launcher, "t1")
        first_zygote = launcher.pid
        os.kill(first_zygote, signal.SIGKILL)
        second = await one_child(launcher, "t2")
        return first_zygote, first, second
    finally:
        launcher.close()

preforked = fork_zygote(os.environ, None)
assert preforked is not None
first_zygote, first, second = asyncio.run(main(preforked))
try:
    os.waitpid(first_zygote, os.WNOHANG)
    reaped = False
except ChildProcessError:
    reaped = True
print(json.dumps({"first": first, "second": second, "reaped": reaped}))
"""


def test_the_zygote_forked_from_the_agent_serves_until_it_dies(
    mappings: Path, dead_port: int
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PREFORK_SCRIPT, str(mappings), str(dead_port)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    first, second = result["first"], result["second"]
    assert first == {
        "forked": True,
        "child_parent_is_zygote": True,
        "zygote_parent_is_agent": True,
        "zygote_name": "iotunnel-zygote",
        "child_name": "iotunnel-proxy",
        "zygote_cmdline_is_the_agents": True,
        "code": 143,
    }
    # Killed, the zygote is started again as a new process (python -m agent.zygote).
    assert second["forked"]
    assert second["child_parent_is_zygote"]
    assert second["zygote_name"] == "iotunnel-zygote"
    assert not second["zygote_cmdline_is_the_agents"]
    assert second["code"] == 143
    assert result["reaped"], "the first zygote was left a zombie"
