"""Device notifications: the payload, and the awscrt publisher against a real mosquitto that
requires client certificates (skipped only when mosquitto is not installed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotunnel.mode import Mode
from iotunnel.notify import Notification, notify_topic
from iotunnel.secret import Secret
from service.control import ControlPlane
from service.notify import Delivery, MqttNotifier, MqttSettings
from service.registry import TunnelRegistry
from testbed.awsapi import Subscriber
from testbed.harness import Stack
from testbed.mqtt import mosquitto_binary
from testbed.pki import PKI

needs_mosquitto = pytest.mark.skipif(
    mosquitto_binary() is None, reason="mosquitto is not installed (Debian package 'mosquitto')"
)


def test_payload_is_exactly_what_aws_sends() -> None:
    note = Delivery("thing-1", Notification(Secret("the-token"), "eu-west-1", ("HTTP1", "SSH1")))
    assert note.topic == "$aws/things/thing-1/tunnels/notify" == notify_topic("thing-1")
    assert json.loads(note.notification.payload()) == {
        "clientAccessToken": "the-token",
        "clientMode": "destination",
        "region": "eu-west-1",
        "services": ["HTTP1", "SSH1"],
    }
    assert "the-token" not in repr(note)


@pytest.fixture
def broker(tmp_path: Path, pki: PKI) -> Iterator[int]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (Debian package 'mosquitto')")
    with Stack(tmp_path / "broker") as stack:
        _, port = stack.mosquitto(pki)
        yield port


@needs_mosquitto
def test_open_tunnel_notifies_the_thing_over_mutual_tls(
    broker: int, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    thing = pki.issue_client("thing-7")
    publisher = pki.issue_client("iotunnel-service")
    settings = MqttSettings("127.0.0.1", broker, publisher.cert, publisher.key, pki.ca.cert)

    async def scenario(subscriber: Subscriber) -> str:
        notifier = MqttNotifier(settings)
        await notifier.start()
        try:
            control = ControlPlane(TunnelRegistry(), notifier=notifier)
            opened = await control.open_tunnel(services=["SSH1", "HTTP1"], thing_name="thing-7")
            await control.open_tunnel(services=["SSH1"], thing_name="another-thing")
            topic, payload, qos = await asyncio.to_thread(subscriber.next)
            assert (topic, qos) == (notify_topic("thing-7"), 1)
            assert json.loads(payload) == {
                "clientAccessToken": opened.destination_token,
                "clientMode": "destination",
                "region": "us-east-1",
                "services": ["SSH1", "HTTP1"],
            }
            tokens = await control.rotate(
                opened.tunnel.tunnel_id,
                [Mode.DESTINATION],
                destination_services=["HTTP1", "SSH1"],
                thing_name="thing-7",
            )
            _, payload, _ = await asyncio.to_thread(subscriber.next)
            assert json.loads(payload)["clientAccessToken"] == tokens[Mode.DESTINATION]
            return opened.destination_token
        finally:
            await notifier.close()

    with (
        caplog.at_level("INFO"),
        Subscriber(broker, pki.ca.cert, thing, notify_topic("thing-7")) as subscriber,
    ):
        token = asyncio.run(scenario(subscriber))
        assert subscriber.received.empty()  # the other thing's notification is not ours
    assert token not in caplog.text
    assert "MQTT: connected to 127.0.0.1" in caplog.text


@needs_mosquitto
def test_a_broker_that_refuses_the_client_is_logged_not_fatal(
    broker: int, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    # no client certificate: the broker requires one, so the TLS handshake fails
    settings = MqttSettings("127.0.0.1", broker, None, None, pki.ca.cert)

    async def scenario() -> None:
        notifier = MqttNotifier(settings, connect_wait=1.0)
        await notifier.start()
        notifier.publish(
            Delivery("thing-1", Notification(Secret("token-value"), "us-east-1", ("SSH1",)))
        )
        await notifier.close()

    with caplog.at_level("INFO"):
        asyncio.run(scenario())
    assert "MQTT: connection to 127.0.0.1" in caplog.text
    assert "token-value" not in caplog.text
