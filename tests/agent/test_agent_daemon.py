"""agent.daemon: no MQTT message, however it is handled, stops the agent's event reader."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from agent_files import DeviceFiles

from agent import daemon
from agent.config import AgentSettings
from agent.logs import Redactor
from agent.mqtt import Message
from agent.report import Snapshot
from agent.systemd import Notifier

SECRET = "AQGAAXiT2bY7-secret-in-an-exception-0123456789"


class FakeLink:
    """What :meth:`Agent._mqtt_events` reads: the event queue of an MQTT link."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[Message] = asyncio.Queue()


def agent_settings(device: DeviceFiles) -> AgentSettings:
    return AgentSettings(
        endpoint="127.0.0.1",
        port=8883,
        client_id="thing-1",
        thing_name="thing-1",
        cert=device.cert,
        key=device.key,
        root_ca=device.ca,
        mapping_dir=device.mappings,
        tunnel_endpoint=None,
        tunnel_ca=None,
        max_tunnels=4,
        log_level=logging.DEBUG,
        config_file=None,
    )


def test_an_exception_while_handling_a_message_is_one_log_line_and_the_agent_goes_on(
    device: DeviceFiles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_parse = daemon.parse
    calls = 0

    def parse(payload: bytes, mapped: object, *, mapping_dir: str = "") -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(f"a bug that quotes {SECRET}")
        return real_parse(payload, mapped, mapping_dir=mapping_dir)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon, "parse", parse)
    settings = agent_settings(device)
    topic = settings.topic
    second = json.dumps({"clientMode": "source"}).encode()

    async def scenario() -> bool:
        agent = daemon.Agent(settings, Notifier(None), {}, Redactor())
        link = FakeLink()
        reader = asyncio.create_task(agent._mqtt_events(link))  # type: ignore[arg-type]
        link.events.put_nowait(Message(topic, b"{}"))
        link.events.put_nowait(Message(topic, second))
        async with asyncio.timeout(30):
            while calls < 2 or "notification rejected" not in caplog.text:
                await asyncio.sleep(0.01)
                if reader.done():
                    break
        alive = not reader.done()
        if reader.done():
            reader.result()  # re-raises what killed the reader
        reader.cancel()
        return alive

    with caplog.at_level(logging.DEBUG, logger="agent"):
        assert asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "cannot handle an MQTT message on $aws/things/thing-1/tunnels/notify: "
        "internal error (RuntimeError); dropped"
    ]
    assert errors[0].exc_info is None
    assert SECRET not in caplog.text
    assert "notification rejected: clientMode is 'source'" in caplog.text


def test_the_nested_json_of_issue_11_is_rejected_by_the_running_handler(
    device: DeviceFiles, caplog: pytest.LogCaptureFixture
) -> None:
    settings = agent_settings(device)

    async def scenario() -> None:
        agent = daemon.Agent(settings, Notifier(None), {}, Redactor())
        agent._on_message(settings.topic, b"[" * 1000 + b"]" * 1000)

    with caplog.at_level(logging.DEBUG, logger="agent"):
        asyncio.run(scenario())
    assert "notification rejected: malformed JSON: nested more than" in caplog.text


def test_a_publish_that_cannot_be_read_is_dropped_on_the_crt_thread(
    device: DeviceFiles, caplog: pytest.LogCaptureFixture
) -> None:
    from agent.mqtt import MqttLink

    async def scenario() -> int:
        link = MqttLink(agent_settings(device), asyncio.get_running_loop())
        unreadable = SimpleNamespace(publish_packet=SimpleNamespace(topic="t", payload=object()))
        link._on_publish(unreadable)  # type: ignore[arg-type]
        readable = SimpleNamespace(publish_packet=SimpleNamespace(topic="t", payload=b"{}"))
        link._on_publish(readable)  # type: ignore[arg-type]
        event = await asyncio.wait_for(link.events.get(), 30)
        assert event == Message("t", b"{}")
        return link.events.qsize()

    with caplog.at_level(logging.DEBUG, logger="agent"):
        assert asyncio.run(scenario()) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "cannot read an MQTT message: TypeError; dropped"
    ]


class FakeChild:
    """Stands in for ProxyChild: runs until told to exit; the test feeds its status events."""

    def __init__(self, tag: str, argv: list[str], env: dict[str, str], **kwargs: object) -> None:
        from agent.proxy_runner import ChildStatus

        self.tag, self.env = tag, env
        self.on_event = kwargs["on_event"]
        self.status = ChildStatus()
        self.exit: asyncio.Future[tuple[int, float]] = asyncio.get_running_loop().create_future()
        CHILDREN.append(self)

    async def run(self) -> tuple[int, float]:
        return await self.exit

    def event(self, event: object) -> None:
        self.status.apply(event)  # type: ignore[arg-type]
        self.on_event(event)  # type: ignore[operator]

    def stop(self) -> None:
        if not self.exit.done():
            self.exit.set_result((143, 1.0))


CHILDREN: list[FakeChild] = []


def test_child_events_make_audit_lines_and_the_status(
    device: DeviceFiles,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    from agent.logs import AUDIT
    from agent.report import status_line
    from iotunnel.notify import Notification
    from iotunnel.secret import Secret
    from iotunnel.status import Closed, Connected, Opened, Reconnecting, Services

    monkeypatch.setattr(daemon, "ProxyChild", FakeChild)
    CHILDREN.clear()
    settings = dataclasses.replace(agent_settings(device), state_dir=tmp_path / "state")
    token = "AQGAA-destination-token-0123456789abcdef"

    async def scenario() -> tuple[daemon.Agent, Snapshot]:
        agent = daemon.Agent(settings, Notifier(None), {}, Redactor())
        async with asyncio.TaskGroup() as tg:
            agent._tg = tg
            agent._notified(Notification(Secret(token), "us-east-1", ("SSH1",)))
            [child] = CHILDREN
            assert child.env["IOTUNNEL_LOG_TAG"] == "t1"
            assert child.env["IOTUNNEL_LOG_FORMAT"] == "journal"
            child.event(Connected(3))
            child.event(Services(("SSH1",)))
            child.event(Opened("SSH1", "SSH1/1/1"))
            child.event(Opened("SSH1", "SSH1/1/2"))
            assert agent.summary() == "MQTT connecting; 1 tunnel, 2 streams"
            child.event(Closed("SSH1", "SSH1/1/1", 2048, 100, 3.5, "peer", "127.0.0.1:22"))
            child.event(Reconnecting("lost the connection (1006)", 1.0))
            shot = agent.snapshot()
            agent._carry_out(agent.supervisor.shutdown())
        return agent, shot

    with caplog.at_level(logging.DEBUG, logger="agent"):
        agent, shot = asyncio.run(scenario())
    [audit] = [r for r in caplog.records if r.name == AUDIT]
    assert audit.getMessage() == (
        "SSH1 connection 1/1 to 127.0.0.1:22 closed (peer): 2.0 KiB in, 100 B out, 00:00:03"
    )
    assert audit.tunnel == "t1"  # type: ignore[attr-defined]
    assert audit.journal_fields["BYTES_IN"] == "2048"  # type: ignore[attr-defined]
    [tunnel] = shot.tunnels
    assert (tunnel.tag, tunnel.services, tunnel.state, tunnel.open) == (
        "t1",
        ("SSH1",),
        "reconnecting",
        0,
    )
    assert (tunnel.closed, tunnel.bytes_in, tunnel.bytes_out) == (1, 2048, 100)
    assert tunnel.last_error == "lost the connection (1006)"
    assert status_line(shot) == "MQTT connecting; 1 tunnel, 0 streams"
    assert agent.snapshot().tunnels == ()  # stopped: the tunnel is gone
    assert token not in caplog.text
