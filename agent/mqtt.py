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
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awscrt import http, io, mqtt5
from awsiot import mqtt5_client_builder

from agent.config import ALPN_PORT, ALPN_PROTOCOL, AgentSettings, HttpProxy, Pkcs11Key
from iotunnel.rules import is_aws_host

__all__ = [
    "ConnectFailed",
    "Connected",
    "Disconnected",
    "Message",
    "MqttEvent",
    "MqttLink",
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


def _reason(exception: BaseException | None) -> str:
    if exception is None:
        return "no reason given"
    return str(getattr(exception, "name", "") or exception)


_pkcs11_libs: dict[Path, io.Pkcs11Lib] = {}


def pkcs11_lib(path: Path) -> io.Pkcs11Lib:
    """The loaded PKCS#11 library at ``path``: loaded (and ``C_Initialize``d) once per process.

    awscrt never calls ``C_Finalize`` (the default behaviour), so the library stays usable for
    the life of the agent. The agent's children are started with exec, never a bare fork: a
    token's sessions are never shared with another process.
    """
    lib = _pkcs11_libs.get(path)
    if lib is None:
        lib = _pkcs11_libs[path] = io.Pkcs11Lib(file=str(path))
    return lib


def _pkcs11_kwargs(key: Pkcs11Key) -> dict[str, Any]:
    """The PKCS#11 arguments of :func:`mqtt5_client_builder.mtls_with_pkcs11`; the PIN is
    revealed here, to awscrt only."""
    return {
        "pkcs11_lib": pkcs11_lib(key.lib),
        "user_pin": key.pin.reveal(),
        "slot_id": key.slot,
        "token_label": key.token_label,
        "private_key_label": key.key_label,
    }


def tls_builder(settings: AgentSettings) -> tuple[Callable[..., mqtt5.Client], dict[str, Any]]:
    """The MQTT5 client builder for the device key, and its certificate and key arguments:
    ``mtls_from_path`` for a PEM key file, ``mtls_with_pkcs11`` for a key in a PKCS#11 token."""
    if settings.pkcs11 is None:
        kwargs = {"cert_filepath": str(settings.cert), "pri_key_filepath": str(settings.key)}
        return mqtt5_client_builder.mtls_from_path, kwargs
    kwargs = {"cert_filepath": str(settings.cert), **_pkcs11_kwargs(settings.pkcs11)}
    return mqtt5_client_builder.mtls_with_pkcs11, kwargs


def _crt_error(exc: BaseException) -> str:
    """awscrt's error name: ``CKR_PIN_INCORRECT`` of ``1117 (AWS_ERROR_PKCS11_CKR_PIN_INCORRECT):
    A PKCS#11 (Cryptoki) library function failed ...``; the whole text if it is not one."""
    found = re.match(r"\d+ \((?:AWS_ERROR_PKCS11_|AWS_ERROR_|AWS_IO_)?([A-Z0-9_]+)\)", str(exc))
    return found.group(1) if found else str(exc)


def _pkcs11_problem(exc: BaseException, key: Pkcs11Key) -> str:
    """One line for awscrt's failure to use the token: the setting at fault, never the PIN."""
    text = _crt_error(exc)
    if "PIN" in text:
        return f"pkcs11_pin_file: {key.pin_file}: the token did not take the PIN in it ({text})"
    if "KEY_NOT_FOUND" in text:
        return (
            f"pkcs11_key_label: {key.key_label!r}: not exactly one private key with this label "
            f"in the token ({text})"
        )
    if "TOKEN_NOT_FOUND" in text:
        if key.slot is not None:
            return f"pkcs11_slot: {key.slot}: no token in this slot ({text})"
        return f"pkcs11_token_label: {key.token_label!r}: not exactly one such token ({text})"
    return f"pkcs11_lib: {key.lib}: cannot use the token: {text}"


def _tls_options(settings: AgentSettings) -> io.TlsContextOptions:
    """The MQTT client's TLS options, as the builder makes them (logs in to a PKCS#11 token),
    with ``root_ca`` as the trust store as the builder sets it: a device without a system trust
    store (no ca-certificates) needs none."""
    cert = str(settings.cert)
    if settings.pkcs11 is None:
        options = io.TlsContextOptions.create_client_with_mtls_from_path(cert, str(settings.key))
    else:
        kwargs = _pkcs11_kwargs(settings.pkcs11)
        options = io.TlsContextOptions.create_client_with_mtls_pkcs11(cert_file_path=cert, **kwargs)
    if settings.root_ca is not None:
        _trust(options, settings.root_ca)
    return options


def _trust(options: io.TlsContextOptions, ca: Path) -> None:
    if ca.is_dir():
        options.override_default_trust_store_from_path(str(ca), None)
    else:
        options.override_default_trust_store_from_path(None, str(ca))


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
    as a configuration error instead of a connection that never comes up. With a PKCS#11 key,
    making the TLS context loads the library, logs in to the token with the PIN and finds the
    key: a missing library, a wrong PIN, a wrong token or key label fail here, not at connect.
    """
    if settings.pkcs11 is not None:
        try:
            pkcs11_lib(settings.pkcs11.lib)
        except Exception as exc:  # awscrt raises RuntimeError
            lib, problem = settings.pkcs11.lib, _crt_error(exc)
            return f"pkcs11_lib: {lib}: cannot load it as a PKCS#11 library ({problem})"
    if settings.root_ca is not None:
        # The CA alone first, so that a bad CA file is named as such.
        options = io.TlsContextOptions()
        try:
            _trust(options, settings.root_ca)
            io.ClientTlsContext(options)
        except Exception as exc:  # awscrt raises RuntimeError or AwsCrtError
            return f"root_ca: cannot use {settings.root_ca}: {exc}"
    try:
        io.ClientTlsContext(_tls_options(settings))
    except Exception as exc:
        if settings.pkcs11 is not None:
            return _pkcs11_problem(exc, settings.pkcs11)
        return f"cert, key: cannot use {settings.cert} with {settings.key}: {exc}"
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
        build, device_key = tls_builder(s)
        return build(
            endpoint=s.endpoint,
            port=s.port,
            **device_key,
            client_id=s.client_id,
            session_behavior=mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS,
            session_expiry_interval_sec=SESSION_EXPIRY,
            keep_alive_interval_sec=KEEP_ALIVE,
            min_reconnect_delay_ms=MIN_RECONNECT_MS,
            max_reconnect_delay_ms=MAX_RECONNECT_MS,
            ack_timeout_sec=ACK_TIMEOUT,
            retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
            # the SDK's metrics are meant for AWS IoT Core only
            enable_metrics_collection=is_aws_host(s.endpoint),
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
