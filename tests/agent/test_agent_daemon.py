"""agent.daemon: no MQTT message, however it is handled, stops the agent's event reader."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest
from agent_files import DeviceFiles

from agent import daemon
from agent.config import AgentSettings
from agent.logs import Redactor
from agent.mqtt import Message
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
