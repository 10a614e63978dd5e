"""End to end through the control plane, all real processes on loopback:

the AWS CLI opens a tunnel on ``iotunnel-service`` (HTTPS, SigV4 checked) -> the service
publishes the notification on mosquitto (client certificates) -> this test, in the device
agent's place, starts a destination proxy with the delivered token -> a source proxy with the
source token -> HTTP and echo traffic flows; DescribeTunnel shows both CONNECTED; rotation,
a service restart on the same state file, CloseTunnel; and a lifetime that expires.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iotunnel.exits import ExitCode
from iotunnel.notify import notify_topic
from testbed.awsapi import (
    Subscriber,
    aws_env,
    aws_json,
    boto3_client,
    start_api_service,
    write_credentials,
)
from testbed.clients import echo_roundtrips, http_get
from testbed.harness import Stack, free_port
from testbed.mqtt import mosquitto_binary
from testbed.pki import PKI

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None, reason="mosquitto is not installed (Debian package 'mosquitto')"
)



def states(client: Any, tunnel_id: str) -> tuple[str, str, str]:
    tunnel = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
    return (
        tunnel["status"],
        tunnel["sourceConnectionState"]["status"],
        tunnel["destinationConnectionState"]["status"],
    )


def eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def test_cli_notification_proxies_rotate_restart_close(
    stack: Stack, pki: PKI, www: Path, tmp_path: Path
) -> None:
    credentials = write_credentials(tmp_path / "credentials")
    env = aws_env(credentials, pki.ca.cert)
    _, mqtt_port = stack.mosquitto(pki)
    state = tmp_path / "service.db"
    ports = {"port": free_port(), "api_port": free_port()}  # kept across the restart
    options: dict[str, Any] = {
        "state": state,
        "credentials": credentials,
        "mqtt_port": mqtt_port,
        "mqtt_client": pki.issue_client("iotunnel-service"),
    }
    service = start_api_service(stack, pki, **ports, **options)
    client = boto3_client(service, pki.ca.cert)
    _, http_port = stack.http_server(www)
    _, echo_port = stack.echo_server()
    index = (www / "index.html").read_bytes()
    mapping = f"HTTP1={http_port},SSH1={echo_port}"
    proxy_argv = stack.proxy_argv(
        "dst", service.port, ca=pki.ca.cert, verbosity=4, args=["-d", mapping]
    )

    with Subscriber(
        mqtt_port, pki.ca.cert, pki.issue_client("thing-1"), notify_topic("thing-1")
    ) as device:
        # 1. the operator opens a tunnel with the real AWS CLI
        opened = aws_json(
            ["open-tunnel", "--destination-config", "thingName=thing-1,services=HTTP1,SSH1"],
            service,
            env,
        )
        tunnel_id = opened["tunnelId"]

        # 2. the device gets the notification, exactly as from AWS IoT Core
        topic, payload, qos = device.next()
        assert (topic, qos) == ("$aws/things/thing-1/tunnels/notify", 1)
        note = json.loads(payload)
        assert note == {
            "clientAccessToken": opened["destinationAccessToken"],
            "clientMode": "destination",
            "region": "us-east-1",
            "services": ["HTTP1", "SSH1"],
        }

        # 3. destination with the delivered token, source with the operator's: traffic flows
        destination = stack.destination(
            note["clientAccessToken"], service.port, mapping, ca=pki.ca.cert
        )
        source = stack.source(
            opened["sourceAccessToken"],
            service.port,
            "HTTP1=0,SSH1=0",
            ["HTTP1", "SSH1"],
            ca=pki.ca.cert,
        )
        assert http_get(source.ports["HTTP1"], "/index.html") == (200, index)
        assert echo_roundtrips(source.ports["SSH1"], 20) == 20
        tunnel = aws_json(["describe-tunnel", "--tunnel-id", tunnel_id], service, env)["tunnel"]
        assert tunnel["sourceConnectionState"]["status"] == "CONNECTED"
        assert tunnel["destinationConnectionState"]["status"] == "CONNECTED"

        # the token was spent: another process cannot use it again
        intruder = stack.start(
            "intruder",
            proxy_argv,
            env={"AWSIOT_TUNNEL_ACCESS_TOKEN": note["clientAccessToken"]},
        )
        assert intruder.wait() == ExitCode.REFUSED

        # 4. rotate the destination token: the old peer is dropped, the device is notified
        rotated = aws_json(
            [
                "rotate-tunnel-access-token",
                "--tunnel-id",
                tunnel_id,
                "--client-mode",
                "DESTINATION",
                "--destination-config",
                "thingName=thing-1,services=HTTP1,SSH1",
            ],
            service,
            env,
        )
        assert destination.wait() == ExitCode.CLOSED
        _, payload, _ = device.next()
        new_token = json.loads(payload)["clientAccessToken"]
        assert new_token == rotated["destinationAccessToken"] != note["clientAccessToken"]
        stale = stack.start(
            "stale-token",
            proxy_argv,
            env={"AWSIOT_TUNNEL_ACCESS_TOKEN": note["clientAccessToken"]},
        )
        assert stale.wait() == ExitCode.REFUSED
        destination = stack.destination(
            new_token, service.port, mapping, ca=pki.ca.cert, name="destination-2"
        )
        eventually(lambda: states(client, tunnel_id)[2] == "CONNECTED", "new destination")
        assert echo_roundtrips(source.ports["SSH1"], 5) == 5

        # 5. restart the service on the same state file: the tunnel and both peers come back
        assert service.proc.stop() == 0
        service = start_api_service(stack, pki, name="service-2", **ports, **options)
        eventually(
            lambda: states(client, tunnel_id) == ("OPEN", "CONNECTED", "CONNECTED"),
            "both proxies reconnected after the restart",
            timeout=60,
        )
        assert http_get(source.ports["HTTP1"], "/index.html") == (200, index)
        assert echo_roundtrips(source.ports["SSH1"], 5) == 5

        # 6. CloseTunnel ends both proxies normally
        assert aws_json(["close-tunnel", "--tunnel-id", tunnel_id], service, env) == {}
        assert destination.wait() == ExitCode.CLOSED
        assert source.proc.wait() == ExitCode.CLOSED
        assert states(client, tunnel_id) == ("CLOSED", "DISCONNECTED", "DISCONNECTED")

    logs = "".join(p.output() for p in stack.procs if p.name.startswith("service"))
    for token in (opened["sourceAccessToken"], note["clientAccessToken"], new_token):
        assert token not in logs


def test_lifetime_expires_the_tunnel_and_both_proxies_exit(
    stack: Stack, pki: PKI, tmp_path: Path, ms: float
) -> None:
    credentials = write_credentials(tmp_path / "credentials")
    env = aws_env(credentials, pki.ca.cert)
    # TESTING ONLY option: a minute of lifetime lasts a few seconds
    minute = max(5.0, 5000 * ms)
    service = start_api_service(
        stack, pki, credentials=credentials, extra=["--minute-seconds", str(minute)]
    )
    _, echo_port = stack.echo_server()
    opened = aws_json(
        [
            "open-tunnel",
            "--destination-config",
            "services=SSH1",
            "--timeout-config",
            "maxLifetimeTimeoutMinutes=1",
        ],
        service,
        env,
    )
    destination = stack.destination(
        opened["destinationAccessToken"], service.port, f"SSH1={echo_port}", ca=pki.ca.cert
    )
    source = stack.source(
        opened["sourceAccessToken"], service.port, "SSH1=0", ["SSH1"], ca=pki.ca.cert
    )
    assert echo_roundtrips(source.ports["SSH1"], 3) == 3
    assert destination.wait(timeout=minute + 30) == ExitCode.CLOSED
    assert source.proc.wait(timeout=30) == ExitCode.CLOSED
    tunnel = aws_json(["describe-tunnel", "--tunnel-id", opened["tunnelId"]], service, env)
    assert tunnel["tunnel"]["status"] == "CLOSED"
    assert tunnel["tunnel"]["timeoutConfig"] == {"maxLifetimeTimeoutMinutes": 1}
    assert "expired after its lifetime of 1 min" in service.proc.output()
