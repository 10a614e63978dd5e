"""iotunnel against the reference C++ localproxy through iotunnel's own tunnel service over TLS.

- protocol V3, ``-y V2`` and ``-y V1``, each both ways (the reference as the source with our
  destination, and our source with the reference as the destination): see
  ``conftest.carry_traffic`` for what each carries;
- the operator's usual case: our device agent (real mosquitto, the service's management API
  driven by the real AWS CLI) runs the destination proxy, and the operator connects with the
  reference source: HTTP and SSH at the same time, then CloseTunnel ends both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    Backends,
    Endpoint,
    LocalProxy,
    carry_traffic,
    free_port,
    http_and_ssh_at_once,
    start_peers,
)

from testbed.harness import Stack, Tunnel, agent_ini
from testbed.mqtt import mosquitto_binary
from testbed.pki import PKI

THING = "interop-thing"


@pytest.mark.parametrize("version", [3, 2, 1])
@pytest.mark.parametrize("reference", ["source", "destination"])
def test_protocol_versions(
    stack: Stack,
    localproxy: LocalProxy,
    pki: PKI,
    ca_dir: Path,
    backends: Backends,
    reference: str,
    version: int,
) -> None:
    tunnel = Tunnel(f"interop-v{version}", ("SSH1",) if version == 1 else ("HTTP1", "SSH1"))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    endpoint = Endpoint(port, tunnel.source_token, tunnel.destination_token)
    peers = start_peers(
        stack, localproxy, pki, ca_dir, endpoint, backends, reference=reference, version=version
    )
    carry_traffic(peers, backends)


def test_agent_destination_with_the_reference_source(
    stack: Stack,
    localproxy: LocalProxy,
    pki: PKI,
    ca_dir: Path,
    backends: Backends,
    tmp_path: Path,
) -> None:
    pytest.importorskip("awscrt", reason="the agent extra (awsiotsdk) is not installed")
    pytest.importorskip("awscli", reason="the AWS CLI (test extra) is not installed")
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (Debian package 'mosquitto')")
    from testbed.awsapi import aws_env, aws_json, start_api_service, write_credentials

    _, mqtt_port = stack.mosquitto(pki)
    credentials = write_credentials(tmp_path / "credentials")
    service = start_api_service(stack, pki, credentials=credentials, mqtt_port=mqtt_port)
    mappings = tmp_path / "destination.d"
    mappings.mkdir()
    (mappings / "SSHDestination.ini").write_text(
        f"HTTP1 = {backends.http}\nSSH1 = {backends.ssh}\n"
    )
    device = pki.issue_client(THING)
    ini = agent_ini(
        tmp_path / "agent.ini",
        {
            "endpoint": "127.0.0.1",
            "port": mqtt_port,
            "client_id": THING,
            "cert": device.cert,
            "key": device.key,
            "root_ca": pki.ca.cert,
            "mapping_dir": mappings,
            "tunnel_endpoint": f"wss://127.0.0.1:{service.port}",
            "tunnel_ca": pki.ca.cert,
        },
    )
    agent = stack.agent(ini)
    env = aws_env(credentials, pki.ca.cert)
    opened = aws_json(
        ["open-tunnel", "--destination-config", f"thingName={THING},services=HTTP1,SSH1"],
        service,
        env,
    )
    agent.wait_for("proxy.link: connected to the tunnel service", timeout=30)

    ports = {"HTTP1": free_port(), "SSH1": free_port()}
    source = localproxy.source(
        stack,
        service.port,
        f"HTTP1={ports['HTTP1']},SSH1={ports['SSH1']}",
        list(ports.values()),
        token=str(opened["sourceAccessToken"]),
        ca_dir=ca_dir,
    )
    http_and_ssh_at_once(backends, ports["HTTP1"], ports["SSH1"])

    aws_json(["close-tunnel", "--tunnel-id", str(opened["tunnelId"])], service, env)
    agent.wait_for(r"the tunnel was closed by the service \(proxy exit code 0\); not restarting")
    assert source.wait(30) == 0
    assert str(opened["sourceAccessToken"]) not in source.output()
