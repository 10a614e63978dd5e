"""End to end: tunnels outlive the agent (issue 13, item 4).

The agent, mosquitto and the project's tunnel service run as real processes (the harness of
``test_agent_e2e.py``). A tunnel's notification and client token are kept in ``state_dir``; an
agent that is stopped (SIGTERM, as ``systemctl restart`` and ``apt upgrade`` do) or killed
(SIGKILL: a crash) and started again resumes the tunnel with the same tokens, and THE SAME
running source proxy carries traffic again, without a new tunnel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import pytest
from test_agent_e2e import (  # the agent's harness: broker, settings, helpers
    Device,
    aws_cli,
    child_environ,
    configure,
    device,
    http_until_ok,
    open_tunnel,
    spawn_proxies,
)

from bench import resume
from testbed.clients import echo_roundtrips
from testbed.harness import Proc, Stack, Tunnel
from testbed.pki import PKI

__all__ = ["device"]  # the fixture, imported

pytest.importorskip("awscrt", reason="the agent extra (awsiotsdk) is not installed")


def state_dir(dev: Device) -> Path:
    return dev.ini.parent / "state"


def kept(dev: Device) -> dict[str, Path]:
    """The tunnel files of the state directory, by tag."""
    found = {}
    for path in state_dir(dev).glob("tunnel-*.json"):
        found[path.name.removeprefix("tunnel-").removesuffix(".json")] = path
    return found


def restart_agent(dev: Device, name: str, env: dict[str, str] | None = None) -> Proc:
    """Start the agent again (a new log file), as systemd would after a stop or a crash."""
    dev.agent = dev.stack.agent(dev.ini, name=name, env=env)
    return dev.agent


def echo_until_ok(port: int, attempts: int = 100) -> int:
    """Round trips, retried while the destination (re)connects: until then the service resets
    new streams, and the local connection closes."""
    for _ in range(attempts - 1):
        try:
            return echo_roundtrips(port, 3, timeout=10)
        except (OSError, ConnectionError, AssertionError):
            time.sleep(0.2)
    return echo_roundtrips(port, 3, timeout=10)


def test_a_sigterm_restarted_agent_resumes_the_tunnel_and_the_same_source_works_again(
    device: Device, stack: Stack, pki: PKI, www: Path
) -> None:
    pytest.importorskip("awscli", reason="the AWS CLI (test extra) is not installed")
    _, service_port, api_port = stack.control_plane(
        pki, device.broker_port, pki.issue_client("iotunnel-service")
    )
    _, http_port = stack.http_server(www)
    configure(device, service_port, {"HTTP1": http_port})
    spawn_proxies(device)  # reads the proxies' environments
    agent = device.start_agent()

    opened = open_tunnel(api_port, pki, "HTTP1")
    token = str(opened["destinationAccessToken"])
    [(tag, pid)] = device.wait_started(1)
    agent.wait_for(rf"\[{tag}\] proxy.link: connected to the tunnel service")
    client_token = child_environ(pid)["AWSIOT_TUNNEL_CLIENT_TOKEN"]

    # One file, 0600 in a 0700 directory, holding the tokens (and nothing in the log).
    files = kept(device)
    assert list(files) == [tag]
    assert stat.S_IMODE(state_dir(device).stat().st_mode) == 0o700
    assert stat.S_IMODE(files[tag].stat().st_mode) == 0o600
    document = json.loads(files[tag].read_text())
    assert (document["clientAccessToken"], document["clientToken"]) == (token, client_token)

    source = stack.source(
        str(opened["sourceAccessToken"]), service_port, "HTTP1=0", ["HTTP1"], ca=pki.ca.cert
    )
    index = (www / "index.html").read_bytes()
    assert http_until_ok(source.ports["HTTP1"], "/index.html") == (200, index)

    # systemctl restart: SIGTERM stops the proxies, the file stays.
    assert agent.stop(signal.SIGTERM) == 0
    assert not Path(f"/proc/{pid}").exists()
    assert list(kept(device)) == [tag]

    again = restart_agent(device, "agent-restarted")
    again.wait_for(rf"<6>\[{tag}\] resuming the tunnel for HTTP1 \(region us-east-1\)")
    again.wait_for(rf"\[{tag}\] proxy.link: connected to the tunnel service")
    [(resumed_tag, resumed_pid)] = device.wait_started(1)
    assert resumed_tag == tag
    env = child_environ(resumed_pid)
    assert (env["AWSIOT_TUNNEL_ACCESS_TOKEN"], env["AWSIOT_TUNNEL_CLIENT_TOKEN"]) == (
        token,
        client_token,
    )
    # The same source proxy, never restarted, serves its local users again.
    assert http_until_ok(source.ports["HTTP1"], "/index.html") == (200, index)
    assert source.proc.popen.poll() is None

    # The broker redelivers the notification (persistent session): a duplicate, no new proxy.
    notification = {k: document[k] for k in ("clientAccessToken", "clientMode", "region")}
    device.publish(json.dumps({**notification, "services": document["services"]}).encode())
    again.wait_for(r"duplicate notification for HTTP1 \(region us-east-1\)")
    assert len(device.started()) == 1
    for secret in (token, client_token):
        assert secret not in device.log

    # CloseTunnel: the proxy exits 0, the file goes.
    aws_cli(api_port, pki.ca.cert, "close-tunnel", "--tunnel-id", str(opened["tunnelId"]))
    again.wait_for(rf"\[{tag}\] the tunnel was closed by the service \(proxy exit code 0\)")
    assert kept(device) == {}
    assert again.popen.poll() is None


def test_a_killed_agent_resumes_within_max_tunnels_and_skips_a_corrupt_file(
    device: Device, stack: Stack, pki: PKI
) -> None:
    tunnels = [Tunnel("first", ("SSH1",)), Tunnel("second", ("SSH1",))]
    _, service_port = stack.service(tunnels, cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"SSH1": echo_port})
    agent = device.start_agent()
    device.notify(tunnels[0].destination_token, ("SSH1",))
    [(first_tag, _)] = device.wait_started(1)
    agent.wait_for(rf"\[{first_tag}\] proxy.link: connected to the tunnel service")
    device.notify(tunnels[1].destination_token, ("SSH1",))
    [_, (second_tag, _)] = device.wait_started(2)
    agent.wait_for(rf"\[{second_tag}\] proxy.link: connected to the tunnel service")
    source = stack.source(tunnels[0].source_token, service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
    assert echo_until_ok(source.ports["SSH1"]) == 3
    assert sorted(kept(device)) == sorted([first_tag, second_tag])

    # A crash: SIGKILL to the agent; then, as systemd does for KillMode=mixed once the main
    # process is gone, SIGKILL to what is left of the unit (its proxies).
    agent.stop(signal.SIGKILL)
    for _, pid in device.started():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    # A file broken while the agent was down (a full disk, an editor).
    corrupt = state_dir(device) / "tunnel-t9.json"
    corrupt.write_text('{"version": 1, "clientAccessToken": "' + tunnels[1].destination_token)

    # Started again with room for one tunnel only: the oldest is resumed.
    again = restart_agent(device, "agent-after-crash", env={"IOTUNNEL_MAX_TUNNELS": "1"})
    again.wait_for(rf"\[{first_tag}\] proxy.link: connected to the tunnel service")
    log = device.log
    [line] = [line for line in log.splitlines() if "tunnel-t9.json" in line]
    assert re.fullmatch(rf"<4>state file {corrupt}: malformed JSON: .*; removed", line), line
    assert f"<6>[{first_tag}] resuming the tunnel for SSH1" in log
    assert (
        f"<4>[{second_tag}] the tunnel for SSH1 (region us-east-1) is not resumed: "
        "1 tunnels already run (max_tunnels = 1)"
    ) in log
    assert len(device.started()) == 1
    assert list(kept(device)) == [first_tag]
    for secret in (tunnels[0].destination_token, tunnels[1].destination_token):
        assert secret not in log

    # The same source proxy carries traffic again.
    assert echo_until_ok(source.ports["SSH1"]) == 3
    assert source.proc.popen.poll() is None
    assert again.popen.poll() is None


def test_a_tunnel_closed_while_the_agent_was_down_is_dropped_at_resume(
    device: Device, stack: Stack, pki: PKI
) -> None:
    pytest.importorskip("awscli", reason="the AWS CLI (test extra) is not installed")
    _, service_port, api_port = stack.control_plane(
        pki, device.broker_port, pki.issue_client("iotunnel-service")
    )
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"SSH1": echo_port})
    agent = device.start_agent()
    opened = open_tunnel(api_port, pki, "SSH1")
    [(tag, _)] = device.wait_started(1)
    agent.wait_for(rf"\[{tag}\] proxy.link: connected to the tunnel service")
    assert agent.stop(signal.SIGTERM) == 0
    aws_cli(api_port, pki.ca.cert, "close-tunnel", "--tunnel-id", str(opened["tunnelId"]))
    assert list(kept(device)) == [tag]

    again = restart_agent(device, "agent-restarted")
    again.wait_for(rf"\[{tag}\] resuming the tunnel for SSH1")
    again.wait_for(rf"\[{tag}\] the tunnel service refused the token \(proxy exit code 3\)")
    assert kept(device) == {}
    assert again.popen.poll() is None


def test_the_resume_gap_benchmark_runs(tmp_path: Path) -> None:
    """``python -m bench.resume``, one run of each kind: it restarts the agent and the same
    source proxy serves again (the figures are not checked here)."""
    results = resume.measure(tmp_path / "bench", 1)
    for kind in ("sigterm", "sigkill"):
        [run] = results[kind]["runs"]
        assert 0 < run["old_agent_gone"] <= run["resuming"] <= run["serving_again"]
    assert results["source_proxy_restarted"] is False
