"""The MQTT link: an awsiotsdk MQTT5 client, its callbacks turned into events on the loop.

awscrt runs the connection on its own threads and calls back from them. Every callback here
does one thing: hand an immutable event to the event loop with ``call_soon_threadsafe``. The
daemon reads :attr:`MqttLink.events` on the loop; nothing else of the agent runs on a CRT
thread.

The client keeps a persistent session (it rejoins the broker's session on every connect, and
asks the broker to keep it for :data:`SESSION_EXPIRY` seconds), so a QoS 1 notification
published while the agent was away is delivered when it is back. It reconnects by itself with
jittered backoff. Subscribing is the daemon's job, after every connect: a broker that lost the
session (restarted without persistence) has lost the subscription too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from awscrt import http, io, mqtt5
from awsiot import mqtt5_client_builder

from agent.config import ALPN_PORT, ALPN_PROTOCOL, AgentSettings, HttpProxy

__all__ = [
    "ConnectFailed",
    "Connected",
    "Disconnected",
    "Message",
    "MqttEvent",
    "MqttLink",
    "is_aws_endpoint",
    "proxy_options",
    "tls_problem",
]

log = logging.getLogger("agent")

#: Seconds the broker keeps the session (and queued QoS 1 messages) while the agent is away.
SESSION_EXPIRY = 3600
#: Seconds between MQTT pings on an idle connection.
KEEP_ALIVE = 120
#: Reconnect backoff bounds, in milliseconds.
MIN_RECONNECT_MS = 1000
MAX_RECONNECT_MS = 60_000
#: Seconds to wait for SUBACK and for the client to stop.
ACK_TIMEOUT = 30
STOP_TIMEOUT = 5.0
#: Messages waiting for the loop beyond this are dropped: notifications are rare.
MAX_PENDING = 100


@dataclass(frozen=True, slots=True)
class Connected:
    """The broker accepted the connection."""

    rejoined: bool  #: the broker still had the session


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """A connection attempt failed; the client retries by itself."""

    reason: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    """An established connection was lost; the client reconnects by itself."""

    reason: str


@dataclass(frozen=True, slots=True)
class Message:
    """A PUBLISH received."""

    topic: str
    payload: bytes


MqttEvent = Connected | ConnectFailed | Disconnected | Message


def is_aws_endpoint(host: str) -> bool:
    """Whether ``host`` is AWS IoT Core (the only broker the SDK's metrics are meant for)."""
    return host.lower().endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _reason(exception: BaseException | None) -> str:
    if exception is None:
        return "no reason given"
    return str(getattr(exception, "name", "") or exception)


def proxy_options(proxy: HttpProxy | None) -> http.HttpProxyOptions | None:
    """awscrt's options for a CONNECT tunnel through ``proxy``, with Basic auth if it has a user."""
    if proxy is None:
        return None
    auth: dict[str, Any] = {}
    if proxy.username is not None and proxy.password is not None:
        auth = {
            "auth_type": http.HttpProxyAuthenticationType.Basic,
            "auth_username": proxy.username,
            "auth_password": proxy.password.reveal(),
        }
    return http.HttpProxyOptions(
        proxy.host, proxy.port, connection_type=http.HttpProxyConnectionType.Tunneling, **auth
    )


def tls_problem(settings: AgentSettings) -> str | None:
    """Load the certificate, key and CA as the MQTT client will; say what is wrong, if anything.

    awscrt reads the files only when the client is built; this lets a bad file fail the start
    as a configuration error instead of a connection that never comes up.
    """
    cert, key = str(settings.cert), str(settings.key)
    try:
        io.ClientTlsContext(io.TlsContextOptions.create_client_with_mtls_from_path(cert, key))
    except Exception as exc:  # awscrt raises RuntimeError or AwsCrtError
        return f"cert, key: cannot use {cert} with {key}: {exc}"
    if settings.root_ca is None:
        return None
    options = io.TlsContextOptions.create_client_with_mtls_from_path(cert, key)
    ca = str(settings.root_ca)
    try:
        if settings.root_ca.is_dir():
            options.override_default_trust_store_from_path(ca, None)
        else:
            options.override_default_trust_store_from_path(None, ca)
        io.ClientTlsContext(options)
    except Exception as exc:
        return f"root_ca: cannot use {ca}: {exc}"
    return None


class MqttLink:
    """One MQTT5 connection with mutual TLS, its events queued on ``loop``.

    Args:
        settings: The broker, the client id, the certificate, key and CA.
        loop: The event loop the events go to.
    """

    def __init__(self, settings: AgentSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self._loop = loop
        self.events: asyncio.Queue[MqttEvent] = asyncio.Queue()
        self._stopped = asyncio.Event()
        self._client: mqtt5.Client | None = None

    def _build(self) -> mqtt5.Client:
        s = self.settings
        ca: dict[str, str] = {}
        if s.root_ca is not None:
            ca = {"ca_dirpath" if s.root_ca.is_dir() else "ca_filepath": str(s.root_ca)}
        return mqtt5_client_builder.mtls_from_path(
            endpoint=s.endpoint,
            port=s.port,
            cert_filepath=str(s.cert),
            pri_key_filepath=str(s.key),
            client_id=s.client_id,
            session_behavior=mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS,
            session_expiry_interval_sec=SESSION_EXPIRY,
            keep_alive_interval_sec=KEEP_ALIVE,
            min_reconnect_delay_ms=MIN_RECONNECT_MS,
            max_reconnect_delay_ms=MAX_RECONNECT_MS,
            ack_timeout_sec=ACK_TIMEOUT,
            retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
            enable_metrics_collection=is_aws_endpoint(s.endpoint),
            # Port 443: the builder offers ALPN x-amzn-mqtt-ca, as AWS IoT Core requires there.
            http_proxy_options=proxy_options(s.mqtt_proxy),
            on_publish_received=self._on_publish,
            on_lifecycle_connection_success=self._on_success,
            on_lifecycle_connection_failure=self._on_failure,
            on_lifecycle_disconnection=self._on_disconnection,
            on_lifecycle_stopped=self._on_stopped,
            **ca,
        )

    def start(self) -> None:
        """Create the client and start connecting (in the background)."""
        self._client = self._build()
        via = self.settings.mqtt_proxy
        alpn = self.settings.port == ALPN_PORT and io.is_alpn_available()
        log.info(
            "connecting to the MQTT broker %s:%d%s as %s%s",
            self.settings.endpoint,
            self.settings.port,
            f" (ALPN {ALPN_PROTOCOL})" if alpn else "",
            self.settings.client_id,
            "" if via is None else f" through the HTTP proxy {via}",
        )
        self._client.start()

    async def subscribe(self, topic: str) -> str | None:
        """Subscribe to ``topic`` with QoS 1; returns ``None``, or why it failed."""
        if self._client is None:
            return "not started"
        packet = mqtt5.SubscribePacket(
            subscriptions=[mqtt5.Subscription(topic_filter=topic, qos=mqtt5.QoS.AT_LEAST_ONCE)]
        )
        try:
            async with asyncio.timeout(ACK_TIMEOUT + 5):
                suback = await asyncio.wrap_future(self._client.subscribe(packet))
        except TimeoutError:
            return "no SUBACK"
        except Exception as exc:  # awscrt reports every failure as AwsCrtError
            return _reason(exc)
        codes = list(suback.reason_codes or [])
        if not codes or any(int(code) >= 0x80 for code in codes):
            return f"the broker refused it ({', '.join(getattr(c, 'name', str(c)) for c in codes)})"
        return None

    async def stop(self) -> None:
        """Disconnect and stop reconnecting; waits a little for the client to stop."""
        client, self._client = self._client, None
        if client is None:
            return
        client.stop()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self._stopped.wait()
        except TimeoutError:
            log.warning("the MQTT client did not stop in time")

    # ------------------------------------------------------------------ CRT threads

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """From a CRT thread: run ``callback(*args)`` on the loop (dropped once it is closed)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is exiting
            self._loop.call_soon_threadsafe(callback, *args)

    def _queue(self, event: MqttEvent) -> None:
        if isinstance(event, Message) and self.events.qsize() >= MAX_PENDING:
            log.warning("dropping an MQTT message: %d are waiting already", MAX_PENDING)
            return
        self.events.put_nowait(event)

    def _on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        try:
            packet = data.publish_packet
            message = Message(packet.topic or "", bytes(packet.payload or b""))
        except Exception as exc:  # never into awscrt's thread: one line, the message is lost
            log.error("cannot read an MQTT message: %s; dropped", type(exc).__name__)
            return
        self._post(self._queue, message)

    def _on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        rejoined = bool(data.negotiated_settings and data.negotiated_settings.rejoined_session)
        self._post(self._queue, Connected(rejoined))

    def _on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self._post(self._queue, ConnectFailed(_reason(data.exception)))

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self._post(self._queue, Disconnected(_reason(data.exception)))

    def _on_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self._post(self._stopped.set)
