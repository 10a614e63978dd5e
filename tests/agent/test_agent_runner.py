"""agent.proxy_runner: the child's command line and environment, its output, its stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import pytest

from agent.config import AgentSettings
from agent.proxy_runner import (
    ChildStatus,
    ProxyChild,
    child_argv,
    child_environment,
    child_verbosity,
)
from iotunnel.notify import Notification
from iotunnel.secret import Secret
from iotunnel.status import Closed, Connected, Exited, Opened, Reconnecting, Services, encode

TOKEN = Secret("destination-token-value")
CLIENT = Secret("c" * 64)


def settings(
    tunnel_endpoint: str | None = None, tunnel_ca: Path | None = None, level: int = logging.INFO
) -> AgentSettings:
    return AgentSettings(
        endpoint="broker",
        port=8883,
        client_id="thing-1",
        thing_name="thing-1",
        cert=Path("/c"),
        key=Path("/k"),
        root_ca=None,
        mapping_dir=Path("/etc/iotunnel/destination.d"),
        tunnel_endpoint=tunnel_endpoint,
        tunnel_ca=tunnel_ca,
        max_tunnels=4,
        log_level=level,
        config_file=None,
    )


NOTE = Notification(TOKEN, "eu-west-1", ("SSH1",))


def test_argv_uses_the_region_and_never_holds_a_token() -> None:
    argv = child_argv(settings(), NOTE)
    assert argv[:3] == [sys.executable, "-m", "proxy"]
    assert argv[3:] == [
        "-m", "dst", "--config-dir", "/etc/iotunnel/destination.d", "-r", "eu-west-1", "-v", "4",
    ]  # fmt: skip
    assert TOKEN.reveal() not in " ".join(argv)


def test_argv_with_a_tunnel_endpoint_override() -> None:
    argv = child_argv(settings("wss://127.0.0.1:8443", Path("/ca.pem")), NOTE)
    assert argv[5:] == [
        "--config-dir", "/etc/iotunnel/destination.d",
        "-e", "wss://127.0.0.1:8443", "-c", "/ca.pem", "-v", "4",
    ]  # fmt: skip
    assert "-r" not in argv


def test_environment_carries_the_tokens_and_nothing_of_systemd() -> None:
    base = {
        "PATH": "/usr/bin",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "1",
        "WATCHDOG_PID": "1",
        "IOTUNNEL_CLIENT_ID": "x",
        "AWSIOT_TUNNEL_ENDPOINT": "elsewhere",
        "PYTHONPATH": "/opt/lib",
    }
    env = child_environment(base, TOKEN, CLIENT)
    assert env["AWSIOT_TUNNEL_ACCESS_TOKEN"] == TOKEN.reveal()
    assert env["AWSIOT_TUNNEL_CLIENT_TOKEN"] == CLIENT.reveal()
    assert env["PATH"] == "/usr/bin"
    assert env["PYTHONPATH"].endswith(":/opt/lib")
    for gone in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "IOTUNNEL_CLIENT_ID"):
        assert gone not in env
    assert "AWSIOT_TUNNEL_ENDPOINT" not in env
    assert "IOTUNNEL_LOG_TAG" not in env


def test_environment_tells_the_child_how_to_log() -> None:
    base = {"IOTUNNEL_LOG_FORMAT": "text", "IOTUNNEL_LOG_TAG": "t9"}
    env = child_environment(
        base, TOKEN, CLIENT, log_env={"IOTUNNEL_LOG_FORMAT": "journal", "IOTUNNEL_LOG_TAG": "t3"}
    )
    assert (env["IOTUNNEL_LOG_FORMAT"], env["IOTUNNEL_LOG_TAG"]) == ("journal", "t3")


@pytest.mark.parametrize(
    ("level", "verbosity"),
    [(logging.DEBUG, "5"), (logging.INFO, "4"), (logging.WARNING, "3"), (logging.ERROR, "2")],
)
def test_the_child_logs_at_the_agents_level(level: int, verbosity: str) -> None:
    assert child_verbosity(level) == verbosity
    argv = child_argv(settings(level=level), NOTE)
    assert argv[argv.index("-v") + 1] == verbosity


def test_child_status_counts_open_connections() -> None:
    status = ChildStatus()
    assert not status.apply(Connected(3, "ch-1"))
    assert (status.connected, status.protocol, status.channel_id) == (True, 3, "ch-1")
    assert not status.apply(Services(("HTTP1", "SSH1")))
    assert status.services == ("HTTP1", "SSH1")
    assert status.apply(Opened("HTTP1", "HTTP1/1/1"))
    assert status.apply(Opened("SSH1", "SSH1/2/1"))
    assert status.streams == 2
    assert status.apply(Closed("HTTP1", "HTTP1/1/1", 10, 20, 1.5, "local"))
    assert not status.apply(Closed("HTTP1", "HTTP1/1/1", 0, 0, 0.0, "peer"))  # already gone
    assert (status.streams, status.bytes_in, status.bytes_out) == (1, 10, 20)
    assert status.apply(Reconnecting("lost the connection", 1.0))
    assert (status.streams, status.connected) == (0, False)
    assert status.apply(Opened("SSH1", "SSH1/3/1"))
    assert status.apply(Connected(3))
    assert status.streams == 0  # a new connection: nothing of before is open
    status.apply(Opened("SSH1", "SSH1/4/1"))
    assert status.ended()
    assert not status.ended()
    assert not status.apply(Exited(0, "closed"))
    assert status.exit == Exited(0, "closed")


FAKE_PROXY = f"""
import os, sys
status = int(os.environ["IOTUNNEL_STATUS_FD"])
sys.stderr.write("<6>[t7] proxy: starting in destination mode\\n")
print("on stdout", flush=True)
os.write(status, {encode(Connected(3))!r})
os.write(status, {encode(Opened("A", "A/1/1"))!r})
os.write(status, {encode(Opened("A", "A/2/1"))!r})
os.write(status, {encode(Closed("A", "A/2/1", 1, 2, 0.5, "peer"))!r})
os.write(status, b'{{"event": "future", "detail": 1}}\\n')  # a newer proxy's: ignored
os.write(status, b"not json\\n" + b"x" * 10000 + b"\\n" + b"[1]\\n")  # ignored, one warning
os.write(status, {encode(Opened("A", "A/3/1"), dropped=2)!r})
os.write(status, {encode(Closed("A", "A/3/1", 0, 0, 0.1, "peer"), dropped=3)!r})
os.write(status, {encode(Opened("A", "A/4/1"), dropped=3)!r})
sys.stderr.write("<4>[t7] proxy: giving up\\n")
sys.exit(4)
"""


def test_the_child_writes_to_the_agents_stderr_and_reports_on_its_channel(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.proxy")
    changes: list[int] = []
    events: list[object] = []
    child = ProxyChild(
        "t7",
        [sys.executable, "-c", FAKE_PROXY],
        {},
        on_streams=lambda: None,
        on_event=events.append,
    )
    child._on_streams = lambda: changes.append(child.status.streams)
    code, uptime = asyncio.run(child.run())
    assert code == 4
    assert uptime >= 0
    # Its lines reach the agent's stderr as the child wrote them, and the agent reads none.
    assert capfd.readouterr().err == (
        "<6>[t7] proxy: starting in destination mode\non stdout\n<4>[t7] proxy: giving up\n"
    )
    logged = [r.getMessage() for r in caplog.records if "status" not in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].startswith("started a destination proxy, pid ")
    assert events[:4] == [
        Connected(3),
        Opened("A", "A/1/1"),
        Opened("A", "A/2/1"),
        Closed("A", "A/2/1", 1, 2, 0.5, "peer"),
    ]
    assert len(events) == 7
    # Streams counted from the status channel (not from the debug line), cleared at the end.
    assert changes == [1, 2, 1, 2, 1, 2, 0]
    assert child.status.dropped == 3
    assert caplog.text.count("the proxy dropped status events") == 1
    complaints = [
        (r.levelno, r.getMessage().removeprefix("ignoring a line on the proxy's status channel: "))
        for r in caplog.records
        if "status channel" in r.getMessage()
    ]
    assert [level for level, _ in complaints] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert [text.split(":")[0] for _, text in complaints] == [
        "not valid JSON",
        "a line longer than the limit",
        "not a JSON object",
    ]


UP = f"os.write(int(os.environ['IOTUNNEL_STATUS_FD']), {encode(Connected(3))!r})\n"
SLEEPER = "import os, time\n" + UP + "time.sleep(60)"
STUBBORN = (
    "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    + UP
    + "time.sleep(60)"
)


@pytest.mark.parametrize(
    ("script", "code"), [(SLEEPER, -signal.SIGTERM), (STUBBORN, -signal.SIGKILL)]
)
def test_stop_terminates_then_kills(
    script: str, code: int, ms: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.proxy")

    async def scenario() -> int:
        up = asyncio.Event()
        child = ProxyChild(
            "t1",
            [sys.executable, "-c", script],
            {},
            on_streams=lambda: None,
            on_event=lambda _: up.set(),
            stop_grace=0.2,
        )
        task = asyncio.create_task(child.run())
        await asyncio.wait_for(up.wait(), 20_000 * ms)  # its SIGTERM handler is in place
        child.stop()
        got, _ = await asyncio.wait_for(task, 20_000 * ms)
        return got

    assert asyncio.run(scenario()) == code


def test_a_child_that_cannot_start_is_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    child = ProxyChild("t1", ["/nonexistent/python"], {}, on_streams=lambda: None)
    assert asyncio.run(child.run()) == (1, 0.0)
    assert "cannot start the proxy" in caplog.text
