"""A real MQTT broker (Debian's mosquitto) with client-certificate auth, and a small publisher.

Used by the agent's end-to-end tests and the demo::

    conf = mosquitto_config(workdir, port, pki)          # require_certificate true
    proc = stack.start("mosquitto", [mosquitto_binary(), "-c", str(conf)])
    with Publisher(port, pki.ca.cert, pki.issue_client("operator")) as pub:
        pub.publish("$aws/things/thing-1/tunnels/notify", b"{...}")

The publisher is awscrt's MQTT5 client (the ``agent`` extra), like the agent's own.
"""

from __future__ import annotations

import getpass
import os
import shutil
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from testbed.pki import PKI, CertPair

#: The line mosquitto logs once it serves.
MOSQUITTO_RUNNING = r"mosquitto version \S+ running"


def mosquitto_binary() -> str | None:
    """The mosquitto executable (Debian puts it in /usr/sbin), or ``None``."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("mosquitto", path=path)


def mosquitto_config(workdir: Path, port: int, pki: PKI, *, name: str = "mosquitto") -> Path:
    """Write a mosquitto config: one TLS listener on loopback that requires a client
    certificate signed by the test CA (its common name becomes the user name)."""
    conf = workdir / f"{name}.conf"
    conf.write_text(
        "\n".join(
            [
                "per_listener_settings false",
                "persistence false",
                # As root, mosquitto drops to the 'mosquitto' user unless told otherwise, and
                # then cannot read the test keys.
                f"user {getpass.getuser()}",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_type information",
                "connection_messages true",
                f"listener {port} 127.0.0.1",
                f"cafile {pki.ca.cert}",
                f"certfile {pki.server.cert}",
                f"keyfile {pki.server.key}",
                "require_certificate true",
                "use_identity_as_username true",
                "tls_version tlsv1.2",
                "",
            ]
        )
    )
    return conf


class Publisher:
    """A synchronous MQTT5 client with mutual TLS that publishes, for tests and the demo."""

    def __init__(
        self, port: int, ca: Path, client: CertPair, *, client_id: str = "publisher"
    ) -> None:
        from awscrt import mqtt5
        from awsiot import mqtt5_client_builder

        self._mqtt5 = mqtt5
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self._client = mqtt5_client_builder.mtls_from_path(
            endpoint="127.0.0.1",
            port=port,
            cert_filepath=str(client.cert),
            pri_key_filepath=str(client.key),
            ca_filepath=str(ca),
            client_id=client_id,
            enable_metrics_collection=False,
            on_publish_received=self._on_publish,
            on_lifecycle_connection_success=lambda _: self._connected.set(),
            on_lifecycle_stopped=lambda _: self._stopped.set(),
        )

    def _on_publish(self, data: Any) -> None:
        """A message arrived on a subscription (a publisher has none)."""

    def __enter__(self) -> Self:
        self._client.start()
        if not self._connected.wait(20):
            self.close()
            raise ConnectionError(f"{type(self).__name__} could not connect to the broker")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def publish(self, topic: str, payload: bytes, timeout: float = 20.0) -> Any:
        """Publish with QoS 1 and wait for the PUBACK."""
        packet = self._mqtt5.PublishPacket(
            topic=topic, payload=payload, qos=self._mqtt5.QoS.AT_LEAST_ONCE
        )
        return self._client.publish(packet).result(timeout)

    def close(self) -> None:
        """Disconnect."""
        self._client.stop()
        self._stopped.wait(5)
