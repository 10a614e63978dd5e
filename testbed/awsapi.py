"""The tunnel service's control plane in tests and benchmarks: the service with its management
API, the real AWS CLI pointed at it, and an MQTT subscriber that sees what a device sees.

::

    svc = start_api_service(stack, pki, credentials=write_credentials(dir / "creds"))
    env = aws_env(dir / "creds", pki.ca.cert)
    out = aws_cli(["open-tunnel", "--destination-config", "services=SSH1"], svc, env)
    thing = pki.issue_client("thing-1")
    with Subscriber(mqtt_port, pki.ca.cert, thing, notify_topic("thing-1")) as sub:
        topic, payload, qos = sub.next()

The subscriber is awscrt's MQTT5 client (the ``agent``/``service`` extras). awscrt is not
fork-safe: processes are started with subprocess (fork + exec), never multiprocessing's fork.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from testbed.harness import Proc, Stack
from testbed.mqtt import Publisher
from testbed.pki import PKI, CertPair

#: Throw-away credentials that the service is told to accept (never real ones).
TEST_KEY_ID = "AKIAIOTUNNELTEST0001"
TEST_SECRET = "iotunnel/test/secret/key/not/a/real/one/0000"  # noqa: S105 - a test value
REGION = "us-east-1"

_API_LISTENING = r"API listening on https?://[^\s]+:(\d+)"
_WS_LISTENING = r"listening on wss?://[^\s]+:(\d+)"


@dataclass
class ApiService:
    """A running ``iotunnel-service`` with its management API."""

    proc: Proc
    #: port of the /tunnel WebSocket endpoint
    port: int
    #: port of the management API
    api_port: int
    tls: bool = True

    @property
    def endpoint(self) -> str:
        """The API's URL, for ``--endpoint-url`` and ``endpoint_url``."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.api_port}"


def write_credentials(path: Path, key_id: str = TEST_KEY_ID, secret: str = TEST_SECRET) -> Path:
    """An AWS shared-credentials file with one ``[default]`` profile (mode 0600)."""
    path.write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    path.chmod(0o600)
    return path


def start_api_service(
    stack: Stack,
    pki: PKI,
    *,
    name: str = "service",
    port: int = 0,
    api_port: int = 0,
    state: Path | None = None,
    credentials: Path | None = None,
    mqtt_port: int | None = None,
    mqtt_client: CertPair | None = None,
    extra: Sequence[str] = (),
) -> ApiService:
    """Start ``iotunnel-service`` over TLS with the management API (and MQTT, if given).

    Returns once both listeners (and the MQTT connection attempt) are up.
    """
    argv = [
        stack.python,
        "-m",
        "service",
        "--port",
        str(port),
        "--api-port",
        str(api_port),
        "--cert",
        str(pki.server.cert),
        "--key",
        str(pki.server.key),
    ]
    if state is not None:
        argv += ["--state", str(state)]
    if credentials is not None:
        argv += ["--credentials", str(credentials)]
    if mqtt_port is not None:
        client = mqtt_client or pki.issue_client("iotunnel-service")
        argv += [
            "--mqtt-host",
            "127.0.0.1",
            "--mqtt-port",
            str(mqtt_port),
            "--mqtt-ca",
            str(pki.ca.cert),
            "--mqtt-cert",
            str(client.cert),
            "--mqtt-key",
            str(client.key),
        ]
    proc = stack.start(name, [*argv, *extra])
    api = int(proc.wait_for(_API_LISTENING, timeout=30).group(1))
    ws = int(proc.wait_for(_WS_LISTENING).group(1))
    return ApiService(proc, ws, api)


def aws_env(credentials: Path, ca: Path | None, region: str = REGION) -> dict[str, str]:
    """Environment for the AWS CLI or boto3: these credentials and CA, no user config."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "AWSIOT_TUNNEL_")) and k != "PYTHONWARNINGS"
    }
    env.update(
        {
            "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_DEFAULT_REGION": region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_PAGER": "",
            # one attempt: a test wants the service's answer, not the CLI's retries
            "AWS_RETRY_MODE": "standard",
            "AWS_MAX_ATTEMPTS": "1",
        }
    )
    if ca is not None:
        env["AWS_CA_BUNDLE"] = str(ca)
    return env


def boto3_client(service: ApiService, ca: Path) -> Any:
    """A boto3 ``iotsecuretunneling`` client for the service, with the test credentials."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=TEST_SECRET, region_name=REGION
    )
    return session.client("iotsecuretunneling", endpoint_url=service.endpoint, verify=str(ca))


def aws_cli(
    args: Sequence[str],
    service: ApiService,
    env: Mapping[str, str],
    *,
    global_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``aws --endpoint-url URL [GLOBAL_ARGS] iotsecuretunneling ARGS...`` (the real CLI)."""
    argv = [
        sys.executable,
        "-m",
        "awscli",
        "--endpoint-url",
        service.endpoint,
        "--output",
        "json",
        *global_args,
        "iotsecuretunneling",
        *args,
    ]
    return subprocess.run(
        argv,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def aws_json(args: Sequence[str], service: ApiService, env: Mapping[str, str]) -> dict[str, Any]:
    """:func:`aws_cli` that must succeed; returns its JSON output ({} for none)."""
    done = aws_cli(args, service, env)
    if done.returncode != 0:
        raise AssertionError(f"aws {' '.join(args[:1])} failed ({done.returncode}): {done.stderr}")
    return json.loads(done.stdout) if done.stdout.strip() else {}


class Subscriber(Publisher):
    """An MQTT5 client with mutual TLS that queues what it receives on one topic filter."""

    def __init__(
        self,
        port: int,
        ca: Path,
        client: CertPair,
        topic_filter: str,
        *,
        client_id: str = "subscriber",
    ) -> None:
        super().__init__(port, ca, client, client_id=client_id)
        self.topic_filter = topic_filter
        self.received: queue.Queue[tuple[str, bytes, int]] = queue.Queue()

    def _on_publish(self, data: Any) -> None:
        packet = data.publish_packet
        self.received.put((packet.topic, bytes(packet.payload), int(packet.qos)))

    def __enter__(self) -> Self:
        super().__enter__()
        mqtt5 = self._mqtt5
        subscribe = mqtt5.SubscribePacket(
            subscriptions=[mqtt5.Subscription(self.topic_filter, mqtt5.QoS.AT_LEAST_ONCE)]
        )
        suback = self._client.subscribe(subscribe).result(20)
        codes = [int(code) for code in suback.reason_codes]
        if any(code >= 0x80 for code in codes):
            self.close()
            raise ConnectionError(f"subscription refused: {codes}")
        return self

    def next(self, timeout: float = 20.0) -> tuple[str, bytes, int]:
        """The next message: topic, payload and QoS."""
        try:
            return self.received.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"nothing received on {self.topic_filter} in {timeout} s") from None
