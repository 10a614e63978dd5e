"""Device notifications: what AWS IoT Core publishes to a thing when a tunnel is opened for it.

Topic ``$aws/things/<thing>/tunnels/notify``, QoS 1; the payload is
:class:`iotunnel.notify.Notification`'s, the schema the agent parses
(proxy/protocol/PROTOCOL.md, section 'Device notification').

The control plane hands a :class:`Delivery` (a thing and its notification) to a
:class:`Notifier`, which must neither
block nor raise: delivery is best effort, as with AWS (OpenTunnel succeeds whether or not the
device is online). :class:`MqttNotifier` publishes with awscrt's MQTT5 client (the client the
device agent uses, from awsiotsdk) over TLS, with a client certificate for mutual TLS;
:class:`LogNotifier` only logs that no broker is configured; :class:`RecordingNotifier` keeps
what it was given (tests).

awscrt runs its callbacks on its own threads and is not fork-safe: the service never forks.
The access token is never logged: log lines name the thing and the services.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from iotunnel.notify import Notification, notify_topic

log = logging.getLogger(__name__)

#: Seconds :meth:`MqttNotifier.start` waits for the first connection before going on (the
#: client keeps trying in the background, and QoS 1 publishes wait in its offline queue).
CONNECT_WAIT = 10.0
#: Seconds :meth:`MqttNotifier.close` waits for the client to stop.
STOP_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One destination notification, and the thing it is for."""

    thing_name: str
    notification: Notification

    @property
    def topic(self) -> str:
        return notify_topic(self.thing_name)

    @property
    def services(self) -> tuple[str, ...]:
        return self.notification.services


class Notifier(Protocol):
    """Delivers notifications; :meth:`publish` never blocks and never raises."""

    async def start(self) -> None:
        """Connect (or get ready to); called once before the first publish."""
        ...

    def publish(self, delivery: Delivery) -> None:
        """Queue ``delivery`` and return at once."""
        ...

    async def close(self) -> None:
        """Deliver or drop what is queued, disconnect; idempotent."""
        ...


class LogNotifier:
    """No broker configured: log each notification that would have been sent."""

    async def start(self) -> None:
        pass

    def publish(self, delivery: Delivery) -> None:
        log.warning(
            "no MQTT broker configured (--mqtt-host): notification for thing %s not sent",
            delivery.thing_name,
        )

    async def close(self) -> None:
        pass


class RecordingNotifier:
    """Keeps every notification in :attr:`sent` (tests)."""

    def __init__(self) -> None:
        self.sent: list[Delivery] = []

    async def start(self) -> None:
        pass

    def publish(self, delivery: Delivery) -> None:
        self.sent.append(delivery)

    async def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Where and how to publish."""

    host: str
    port: int = 8883
    #: client certificate and key (PEM) for mutual TLS; both or neither
    cert: Path | None = None
    key: Path | None = None
    #: CA bundle (PEM) to verify the broker with; None: the system's trust store
    ca: Path | None = None
    client_id: str = field(default_factory=lambda: f"iotunnel-service-{uuid.uuid4().hex[:12]}")


class MqttNotifier:
    """Publishes notifications at QoS 1 with an awscrt MQTT5 client."""

    def __init__(self, settings: MqttSettings, *, connect_wait: float = CONNECT_WAIT) -> None:
        self.settings = settings
        self.connect_wait = connect_wait
        self._client: Any = None
        self._connected = threading.Event()  # connected at least once
        self._online = threading.Event()  # connected now
        self._stopped = threading.Event()
        self._pending: set[Future[Any]] = set()
        self._lock = threading.Lock()

    async def start(self) -> None:
        """Start the client and wait (up to ``connect_wait`` s) for its first connection."""
        from awscrt import mqtt5
        from awsiot import mqtt5_client_builder

        s = self.settings
        common: dict[str, Any] = {
            "endpoint": s.host,
            # Give the port, or the builder picks 443 with ALPN for AWS IoT Core.
            "port": s.port,
            "client_id": s.client_id,
            # SDK metrics go into the MQTT username, which other brokers take for a user name.
            "enable_metrics_collection": False,
            # QoS 1 publishes wait in the offline queue while the broker is unreachable.
            "offline_queue_behavior": (
                mqtt5.ClientOperationQueueBehaviorType.FAIL_NON_QOS1_PUBLISH_ON_DISCONNECT
            ),
            "on_lifecycle_connection_success": self._on_connected,
            "on_lifecycle_connection_failure": self._on_failure,
            "on_lifecycle_disconnection": self._on_disconnected,
            "on_lifecycle_stopped": self._on_stopped,
        }
        if s.ca is not None:
            common["ca_filepath"] = str(s.ca)
        if s.cert is not None and s.key is not None:
            self._client = mqtt5_client_builder.mtls_from_path(
                cert_filepath=str(s.cert), pri_key_filepath=str(s.key), **common
            )
        else:
            self._client = mqtt5_client_builder.new_default_builder(**common)
        log.info("MQTT: connecting to %s:%d as %s", s.host, s.port, s.client_id)
        self._client.start()
        connected = await asyncio.to_thread(self._connected.wait, self.connect_wait)
        if not connected:
            log.warning(
                "MQTT: not connected to %s:%d after %.0f s; notifications wait until it is",
                s.host,
                s.port,
                self.connect_wait,
            )

    def publish(self, delivery: Delivery) -> None:
        from awscrt import mqtt5

        if self._client is None:
            log.error("MQTT: not started; notification for thing %s dropped", delivery.thing_name)
            return
        packet = mqtt5.PublishPacket(
            topic=delivery.topic,
            payload=delivery.notification.payload(),
            qos=mqtt5.QoS.AT_LEAST_ONCE,
        )
        thing = delivery.thing_name
        services = ",".join(delivery.services) or "(none)"
        try:
            future = self._client.publish(packet)
        except Exception as exc:  # awscrt raises for a stopped client or a bad topic
            log.error("MQTT: cannot publish the notification for thing %s: %s", thing, exc)
            return
        with self._lock:
            self._pending.add(future)

        def done(f: Future[Any]) -> None:
            with self._lock:
                self._pending.discard(f)
            try:
                result = f.result()
            except Exception as exc:
                log.error("MQTT: notification for thing %s not delivered: %s", thing, exc)
                return
            code = getattr(getattr(result, "puback", None), "reason_code", None)
            if code is not None and int(code) >= 0x80:
                log.error(
                    "MQTT: broker refused the notification for thing %s: %s", thing, code.name
                )
            else:
                log.info("MQTT: notified thing %s (services %s)", thing, services)

        future.add_done_callback(done)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        with self._lock:
            pending = list(self._pending)
        if pending and self._online.is_set():  # offline, they would only wait for the timeout
            await asyncio.to_thread(_wait_all, pending, STOP_WAIT)
        if pending:
            log.warning("MQTT: stopping with %d notification(s) undelivered", len(pending))
        client.stop()
        await asyncio.to_thread(self._stopped.wait, STOP_WAIT)

    # awscrt callbacks (on awscrt's threads)

    def _on_connected(self, data: Any) -> None:
        log.info("MQTT: connected to %s:%d", self.settings.host, self.settings.port)
        self._online.set()
        self._connected.set()

    def _on_failure(self, data: Any) -> None:
        self._online.clear()
        log.warning(
            "MQTT: connection to %s:%d failed: %s",
            self.settings.host,
            self.settings.port,
            _error_name(getattr(data, "exception", None)),
        )

    def _on_disconnected(self, data: Any) -> None:
        self._online.clear()
        log.info("MQTT: disconnected: %s", _error_name(getattr(data, "exception", None)))

    def _on_stopped(self, data: Any) -> None:
        self._stopped.set()


def _wait_all(futures: list[Future[Any]], timeout: float) -> None:
    from concurrent.futures import wait

    wait(futures, timeout)


def _error_name(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    return getattr(exc, "name", None) or str(exc) or type(exc).__name__
