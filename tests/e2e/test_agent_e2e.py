"""End to end, the device side: a real mosquitto that requires client certificates, the tunnel
service, the agent as a real process with its destination proxies, real HTTP, echo and sshd
servers behind them, and a real ``ssh`` client in front of the source proxy.

The walk-through starts from the real AWS CLI (``open-tunnel`` against the service's management
API, which publishes the notification, then ``close-tunnel``). The other tests publish
notifications to the broker themselves, as AWS IoT Core would, to test the agent alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.clients import echo_roundtrips, http_get, recv_exactly
from testbed.harness import HarnessError, Proc, Stack, Tunnel, agent_ini
from testbed.mqtt import Publisher, mosquitto_binary
from testbed.pki import PKI, CertPair
from testbed.sshd import ssh_command, sshd_binary

pytest.importorskip("awscrt", reason="the agent extra (awsiotsdk) is not installed")
pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None, reason="mosquitto is not installed (Debian package 'mosquitto')"
)

THING = "thing-1"
TOPIC = f"$aws/things/{THING}/tunnels/notify"
STARTED_RE = re.compile(r"\[(t\d+)\] started a destination proxy, pid (\d+)")


@dataclass
class Device:
    """The broker, the agent's settings, and the agent once started."""

    stack: Stack
    pki: PKI
    broker: Proc
    broker_port: int
    ini: Path
    operator: CertPair
    agent: Proc | None = None
    pids: list[int] = field(default_factory=list)

    def start_agent(self, env: Mapping[str, str] | None = None) -> Proc:
        self.agent = self.stack.agent(self.ini, env=env)
        return self.agent

    def publish(self, payload: bytes) -> None:
        with Publisher(self.broker_port, self.pki.ca.cert, self.operator) as publisher:
            publisher.publish(TOPIC, payload)

    def notify(
        self, token: str | None, services: tuple[str, ...] = ("HTTP1", "SSH1"), **fields: object
    ) -> None:
        document: dict[str, object] = {
            "clientAccessToken": token,
            "clientMode": "destination",
            "region": "us-east-1",
            "services": list(services),
        }
        document.update(fields)
        self.publish(json.dumps({k: v for k, v in document.items() if v is not None}).encode())

    @property
    def log(self) -> str:
        assert self.agent is not None
        return self.agent.output()

    def started(self) -> list[tuple[str, int]]:
        """(tag, pid) of every proxy the agent started so far."""
        found = [(tag, int(pid)) for tag, pid in STARTED_RE.findall(self.log)]
        self.pids.extend(pid for _, pid in found if pid not in self.pids)
        return found

    def wait_started(self, count: int, timeout: float = 30.0) -> list[tuple[str, int]]:
        assert self.agent is not None
        self.agent.wait_for(rf"(?s)(?:started a destination proxy.*){{{count}}}", timeout)
        return self.started()


@pytest.fixture
def device(stack: Stack, pki: PKI, tmp_path: Path) -> Iterator[Device]:
    """A broker with client-certificate auth and the agent's settings (not started)."""
    broker, port = stack.mosquitto(pki)
    cert = pki.issue_client(THING)
    mappings = tmp_path / "destination.d"
    mappings.mkdir()
    ini = agent_ini(
        tmp_path / "agent.ini",
        {
            "endpoint": "127.0.0.1",
            "port": port,
            "client_id": THING,
            "cert": cert.cert,
            "key": cert.key,
            "root_ca": pki.ca.cert,
            "mapping_dir": mappings,
            "tunnel_ca": pki.ca.cert,
            "log_level": "debug",
        },
    )
    dev = Device(stack, pki, broker, port, ini, pki.issue_client("operator"))
    yield dev
    # The agent stops its children; make sure of it even when a test failed half-way.
    stack.close()
    if dev.agent is not None:
        dev.started()
    for pid in dev.pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def configure(device: Device, service_port: int, mappings: Mapping[str, int]) -> None:
    """Point the agent at the tunnel service and write the service-ID mappings."""
    directory = device.ini.parent / "destination.d"
    (directory / "SSHDestination.ini").write_text(
        "".join(f"{sid} = {port}\n" for sid, port in mappings.items())
    )
    with device.ini.open("a") as ini:
        ini.write(f"tunnel_endpoint = wss://127.0.0.1:{service_port}\n")


def command_lines() -> list[str]:
    """What ``ps -eo args`` shows, read from /proc (and from ps, when it is installed)."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    if shutil.which("ps"):
        lines.append(
            subprocess.run(["ps", "-eo", "args", "ww"], capture_output=True, text=True).stdout
        )
    return lines


def spawn_proxies(device: Device) -> None:
    """``launcher = spawn``, for the tests that read a proxy's environment: /proc/PID/environ
    shows what a process was started (exec'd) with, and a forked proxy's is its launcher's. A
    forked proxy gets the same environment over the launcher's socket (the launcher's own tests:
    tests/agent/test_agent_launcher.py and test_the_launcher_forks_... below)."""
    with device.ini.open("a") as ini:
        ini.write("launcher = spawn\n")


def child_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def http_until_ok(port: int, path: str, attempts: int = 50) -> tuple[int, bytes]:
    """GET, retried while the destination (re)connects: connection resets are expected then."""
    for _ in range(attempts - 1):
        try:
            return http_get(port, path, timeout=10)
        except (OSError, ConnectionError):
            time.sleep(0.2)
    return http_get(port, path, timeout=10)


# --------------------------------------------------------------------------- the walk-through


def aws_cli(api_port: int, ca: Path, *args: str) -> dict[str, object]:
    """Run the real AWS CLI against the service's management API; returns its JSON output."""
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "AKIDIOTUNNELTEST",
        "AWS_SECRET_ACCESS_KEY": "iotunnel-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    argv = [sys.executable, "-m", "awscli", "iotsecuretunneling", *args]
    argv += ["--endpoint-url", f"https://127.0.0.1:{api_port}", "--ca-bundle", str(ca)]
    done = subprocess.run(
        [*argv, "--output", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout or "{}")


def test_open_tunnel_then_http_and_real_ssh_at_the_same_time(
    device: Device, stack: Stack, pki: PKI, www: Path
) -> None:
    """README.md's walk-through, from ``aws iotsecuretunneling open-tunnel`` to ``ssh``."""
    if sshd_binary() is None:
        pytest.skip("sshd/ssh are not installed (openssh-server, openssh-client)")
    pytest.importorskip("awscli", reason="the AWS CLI (test extra) is not installed")
    _, ssh_port, ssh = stack.sshd()
    _, service_port, api_port = stack.control_plane(
        pki, device.broker_port, pki.issue_client("iotunnel-service")
    )
    _, http_port = stack.http_server(www)
    configure(device, service_port, {"HTTP1": http_port, "SSH1": ssh_port})
    agent = device.start_agent()

    opened = aws_cli(
        api_port,
        pki.ca.cert,
        "open-tunnel",
        "--destination-config",
        f"thingName={THING},services=HTTP1,SSH1",
    )
    source_token = str(opened["sourceAccessToken"])
    destination_token = str(opened["destinationAccessToken"])
    [(tag, _pid)] = device.wait_started(1)
    agent.wait_for(rf"\[{tag}\] proxy.link: connected to the tunnel service")
    source = stack.source(
        source_token, service_port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=pki.ca.cert
    )

    index = (www / "index.html").read_bytes()
    results: list[tuple[int, bytes]] = []
    browser = threading.Thread(
        target=lambda: results.extend(
            http_get(source.ports["HTTP1"], "/index.html") for _ in range(20)
        )
    )
    browser.start()
    ssh_run = subprocess.run(
        ssh_command(ssh, source.ports["SSH1"], "echo ok"),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    browser.join(60)
    assert ssh_run.returncode == 0, ssh_run.stderr
    assert ssh_run.stdout == "ok\n"
    assert results == [(200, index)] * 20
    # The audit trail: one line per connection, 20 HTTP requests and one ssh session.
    agent.wait_for(
        rf"<6>\[{tag}\] SSH1 connection \S+ to 127\.0\.0\.1:{ssh_port} closed \(\w+\): ", 60
    )
    http_closed = (
        rf"<6>\[{tag}\] HTTP1 connection \S+ to 127\.0\.0\.1:{http_port} "
        r"closed \((?:local|peer)\): "
    )
    deadline = time.monotonic() + 60
    while len(re.findall(http_closed, device.log)) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(re.findall(http_closed, device.log)) == 20

    # The tokens: in the state file (and the forked child's environment) only, nowhere in a
    # command line or a log.
    kept = json.loads((device.ini.parent / "state" / f"tunnel-{tag}.json").read_text())
    assert kept["clientAccessToken"] == destination_token
    client_token = kept["clientToken"]
    assert re.fullmatch(r"[a-zA-Z0-9-]{32,128}", client_token)
    for secret in (destination_token, client_token):
        assert not any(secret in line for line in command_lines())
        assert secret not in device.log

    # CloseTunnel: the proxy exits 0 and is not restarted.
    aws_cli(api_port, pki.ca.cert, "close-tunnel", "--tunnel-id", str(opened["tunnelId"]))
    agent.wait_for(
        rf"<6>\[{tag}\] the tunnel was closed by the service \(proxy exit code 0\); not restarting"
    )
    assert len(device.started()) == 1
    assert agent.popen.poll() is None


# --------------------------------------------------------------------------- rejections


def test_bad_notifications_are_rejected_and_duplicates_dropped(
    device: Device, stack: Stack, pki: PKI
) -> None:
    tunnel = Tunnel("dup", ("SSH1",))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"SSH1": echo_port})
    agent = device.start_agent()
    token = tunnel.destination_token

    cases = [
        (lambda: device.notify(token, ("SSH1",), clientMode="source"), "clientMode is 'source'"),
        (lambda: device.notify(token, ("SSH1", "VNC1")), "service VNC1 not mapped in"),
        (lambda: device.notify(None, ("SSH1",)), "no clientAccessToken"),
        (lambda: device.publish(b'{"clientMode": "destination", '), "malformed JSON"),
    ]
    for number, (publish, reason) in enumerate(cases, 1):
        publish()
        agent.wait_for(rf"(?s)(?:notification rejected: .*){{{number}}}")
        assert f"<4>notification rejected: {reason}" in device.log
    assert device.started() == []
    assert agent.popen.poll() is None

    device.notify(token, ("SSH1",))
    device.notify(token, ("SSH1",))
    agent.wait_for(r"duplicate notification for SSH1 \(region us-east-1\)")
    assert len(device.started()) == 1
    assert token not in device.log
    assert agent.popen.poll() is None


def test_nested_json_is_rejected_and_the_running_tunnel_keeps_carrying_data(
    device: Device, stack: Stack, pki: PKI
) -> None:
    """Issue 11 #1: 2 KB of brackets raised RecursionError, the agent exited 1 and its proxies
    died. Now: one rejection line; the agent, its proxy and an open connection go on."""
    tunnel = Tunnel("nested", ("SSH1",))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"SSH1": echo_port})
    agent = device.start_agent()
    device.notify(tunnel.destination_token, ("SSH1",))
    [(tag, pid)] = device.wait_started(1)
    agent.wait_for(rf"\[{tag}\] proxy.link: connected to the tunnel service")
    source = stack.source(tunnel.source_token, service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)

    with socket.create_connection(("127.0.0.1", source.ports["SSH1"]), timeout=30) as session:
        session.sendall(b"before\n")
        assert recv_exactly(session, 7) == b"before\n"
        device.publish(b"[" * 1000 + b"]" * 1000)
        agent.wait_for(r"<4>notification rejected: malformed JSON: nested more than \d+ levels")
        device.publish(b'{"clientAccessToken": ' * 300 + b"1" + b"}" * 300)
        agent.wait_for(r"(?s)(?:notification rejected: malformed JSON: nested.*){2}")
        session.sendall(b"after\n")
        assert recv_exactly(session, 6) == b"after\n"
    assert agent.popen.poll() is None
    assert Path(f"/proc/{pid}").exists()
    assert "Traceback" not in device.log
    assert "RecursionError" not in device.log
    assert echo_roundtrips(source.ports["SSH1"], 3) == 3


# --------------------------------------------------------------------------- faults


def test_broker_restart_the_agent_reconnects_and_still_receives(
    device: Device, stack: Stack, pki: PKI
) -> None:
    tunnel = Tunnel("after-restart", ("SSH1",))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"SSH1": echo_port})
    agent = device.start_agent()

    device.broker.stop()
    agent.wait_for("lost the MQTT connection")
    stack.mosquitto(pki, port=device.broker_port, name="mosquitto-again")
    agent.wait_for(r"(?s)subscribed to .*subscribed to ", timeout=60)
    assert agent.popen.poll() is None

    device.notify(tunnel.destination_token, ("SSH1",))
    [(tag, _)] = device.wait_started(1)
    agent.wait_for(rf"\[{tag}\] proxy.link: connected to the tunnel service")
    source = stack.source(tunnel.source_token, service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
    assert echo_roundtrips(source.ports["SSH1"], 3) == 3


def test_a_killed_proxy_is_restarted_and_the_tunnel_works_again(
    device: Device, stack: Stack, pki: PKI, www: Path
) -> None:
    tunnel = Tunnel("crashy", ("HTTP1",))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, http_port = stack.http_server(www)
    configure(device, service_port, {"HTTP1": http_port})
    agent = device.start_agent()

    device.notify(tunnel.destination_token, ("HTTP1",))
    [(tag, pid)] = device.wait_started(1)
    agent.wait_for(rf"\[{tag}\] proxy.link: connected to the tunnel service")
    source = stack.source(tunnel.source_token, service_port, "HTTP1=0", ["HTTP1"], ca=pki.ca.cert)
    assert http_get(source.ports["HTTP1"], "/index.html")[0] == 200

    os.kill(pid, signal.SIGKILL)
    agent.wait_for(rf"\[{tag}\] proxy failed \(signal SIGKILL\); restart 1 of 5")
    [_, (again_tag, again_pid)] = device.wait_started(2)
    assert (again_tag, again_pid != pid) == (tag, True)
    agent.wait_for(rf"(?s)(?:\[{tag}\] proxy.link: connected to the tunnel service.*){{2}}")
    assert http_until_ok(source.ports["HTTP1"], "/index.html")[0] == 200


def open_tunnel(api_port: int, pki: PKI, services: str) -> dict[str, object]:
    """OpenTunnel through the management API, notified to the device's thing."""
    return aws_cli(
        api_port,
        pki.ca.cert,
        "open-tunnel",
        "--destination-config",
        f"thingName={THING},services={services}",
    )


def test_two_tunnels_to_the_same_services_carry_traffic_at_the_same_time(
    device: Device, stack: Stack, pki: PKI, www: Path
) -> None:
    """Issue 10 #3: two operators, two tunnels, the same services; neither stops the other."""
    pytest.importorskip("awscli", reason="the AWS CLI (test extra) is not installed")
    _, service_port, api_port = stack.control_plane(
        pki, device.broker_port, pki.issue_client("iotunnel-service")
    )
    _, http_port = stack.http_server(www)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"HTTP1": http_port, "SSH1": echo_port})
    spawn_proxies(device)  # reads the proxies' environments
    agent = device.start_agent()

    first = open_tunnel(api_port, pki, "HTTP1,SSH1")
    [(first_tag, first_pid)] = device.wait_started(1)
    agent.wait_for(rf"\[{first_tag}\] proxy.link: connected to the tunnel service")
    sources = [
        stack.source(
            str(first["sourceAccessToken"]),
            service_port,
            "HTTP1=0,SSH1=0",
            ["HTTP1", "SSH1"],
            ca=pki.ca.cert,
            name="source-1",
        )
    ]
    # The first operator's session is open while the second tunnel is opened.
    sessions = [socket.create_connection(("127.0.0.1", sources[0].ports["SSH1"]), timeout=30)]
    try:
        sessions[0].sendall(b"first, before\n")
        assert recv_exactly(sessions[0], 14) == b"first, before\n"

        second = open_tunnel(api_port, pki, "HTTP1,SSH1")
        [_, (second_tag, second_pid)] = device.wait_started(2)
        agent.wait_for(rf"\[{second_tag}\] proxy.link: connected to the tunnel service")
        sources.append(
            stack.source(
                str(second["sourceAccessToken"]),
                service_port,
                "HTTP1=0,SSH1=0",
                ["HTTP1", "SSH1"],
                ca=pki.ca.cert,
                name="source-2",
            )
        )
        sessions.append(socket.create_connection(("127.0.0.1", sources[1].ports["SSH1"]), 30))

        # Both sessions at once, interleaved, while both tunnels also serve HTTP.
        index = (www / "index.html").read_bytes()
        for turn in range(5):
            lines = [f"tunnel {n} turn {turn}\n".encode() for n in range(2)]
            for session, line in zip(sessions, lines, strict=True):
                session.sendall(line)
            for session, line in zip(sessions, lines, strict=True):
                assert recv_exactly(session, len(line)) == line
            for source in sources:
                assert http_get(source.ports["HTTP1"], "/index.html") == (200, index)
        sessions[0].sendall(b"first, after\n")
        assert recv_exactly(sessions[0], 13) == b"first, after\n"
    finally:
        for session in sessions:
            session.close()

    # Each proxy has its own tunnel's token; neither was stopped.
    assert child_environ(first_pid)["AWSIOT_TUNNEL_ACCESS_TOKEN"] == first["destinationAccessToken"]
    assert (
        child_environ(second_pid)["AWSIOT_TUNNEL_ACCESS_TOKEN"] == second["destinationAccessToken"]
    )
    assert "replaced" not in device.log
    assert "proxy stopped" not in device.log
    assert "closed by the service" not in device.log
    assert Path(f"/proc/{first_pid}").exists()
    assert agent.popen.poll() is None


def test_a_rotated_destination_token_ends_the_old_proxy_and_starts_the_new_one(
    device: Device, stack: Stack, pki: PKI
) -> None:
    """RotateTunnelAccessToken DESTINATION: the service closes the old token's connection
    (1000), the old proxy exits 0, the new token's notification starts the one proxy left."""
    pytest.importorskip("awscli", reason="the AWS CLI (test extra) is not installed")
    _, service_port, api_port = stack.control_plane(
        pki, device.broker_port, pki.issue_client("iotunnel-service")
    )
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"SSH1": echo_port})
    spawn_proxies(device)  # reads the proxies' environments
    agent = device.start_agent()

    opened = open_tunnel(api_port, pki, "SSH1")
    [(old_tag, old_pid)] = device.wait_started(1)
    agent.wait_for(rf"\[{old_tag}\] proxy.link: connected to the tunnel service")
    rotated = aws_cli(
        api_port,
        pki.ca.cert,
        "rotate-tunnel-access-token",
        "--tunnel-id",
        str(opened["tunnelId"]),
        "--client-mode",
        "DESTINATION",
        "--destination-config",
        f"thingName={THING},services=SSH1",
    )
    agent.wait_for(
        rf"<6>\[{old_tag}\] the tunnel was closed by the service \(proxy exit code 0\); "
        "not restarting"
    )
    [_, (new_tag, new_pid)] = device.wait_started(2)
    assert new_tag != old_tag
    agent.wait_for(rf"\[{new_tag}\] proxy.link: connected to the tunnel service")
    assert child_environ(new_pid)["AWSIOT_TUNNEL_ACCESS_TOKEN"] == rotated["destinationAccessToken"]

    # The source token was not rotated: the operator's source proxy reaches the new proxy.
    source = stack.source(
        str(opened["sourceAccessToken"]), service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert
    )
    assert echo_roundtrips(source.ports["SSH1"], 3) == 3
    # One proxy for the tunnel: the old one is gone, the new one runs, nothing else started.
    assert len(device.started()) == 2
    assert not Path(f"/proc/{old_pid}").exists()
    assert Path(f"/proc/{new_pid}").exists()
    assert f"[{new_tag}] proxy" in device.log
    assert "proxy stopped" not in device.log
    assert agent.popen.poll() is None
    assert str(rotated["destinationAccessToken"]) not in device.log


def test_sigterm_stops_every_child_and_exits_0(device: Device, stack: Stack, pki: PKI) -> None:
    tunnels = [Tunnel("a", ("HTTP1",)), Tunnel("b", ("SSH1",))]
    _, service_port = stack.service(tunnels, cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"HTTP1": echo_port, "SSH1": echo_port})
    agent = device.start_agent()
    device.notify(tunnels[0].destination_token, ("HTTP1",))
    device.notify(tunnels[1].destination_token, ("SSH1",))
    started = device.wait_started(2)
    agent.wait_for(r"(?s)(?:proxy.link: connected to the tunnel service.*){2}")

    [launcher] = LAUNCHER_RE.findall(device.log)
    assert agent.stop(signal.SIGTERM) == 0
    for tag, pid in started:
        assert f"[{tag}] proxy stopped (exit code 143)" in device.log
        assert not Path(f"/proc/{pid}").exists()
    assert not Path(f"/proc/{launcher}").exists()
    assert device.log.rstrip().endswith("<6>stopped")


# --------------------------------------------------------------------------- launcher

LAUNCHER_RE = re.compile(r"started the launcher \(zygote\), pid (\d+)")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def ended(pid: int) -> bool:
    """Gone, or a zombie: the orphan of a killed launcher is reaped by whoever adopted it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_launcher_forks_the_proxies_and_a_killed_launcher_is_restarted(
    device: Device, stack: Stack, pki: PKI
) -> None:
    """The zygote forks the proxies; no token reaches its or their command line or initial
    environment; killed, it is restarted for the next tunnel while the running one goes on,
    and the agent still supervises the orphan (its exit code from its own status report)."""
    tunnels = [Tunnel("a", ("SSH1",)), Tunnel("b", ("SSH1",))]
    _, service_port = stack.service(tunnels, cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"SSH1": echo_port})
    agent = device.start_agent()
    [launcher] = map(int, LAUNCHER_RE.findall(device.log))
    assert parent(launcher) == agent.popen.pid

    device.notify(tunnels[0].destination_token, ("SSH1",))
    [(first_tag, first_pid)] = device.wait_started(1)
    agent.wait_for(rf"\[{first_tag}\] proxy.link: connected to the tunnel service")
    agent.wait_for(rf"\[{first_tag}\] tunnel up \d+ ms after its notification")
    assert parent(first_pid) == launcher
    token = tunnels[0].destination_token.encode()
    for pid in (launcher, first_pid):
        assert token not in Path(f"/proc/{pid}/environ").read_bytes()
    assert not any(tunnels[0].destination_token in line for line in command_lines())

    os.kill(launcher, signal.SIGKILL)
    agent.wait_for(r"the launcher \(zygote\) exited; it is restarted")
    first = stack.source(tunnels[0].source_token, service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
    assert echo_roundtrips(first.ports["SSH1"], 3) == 3  # the running tunnel goes on

    device.notify(tunnels[1].destination_token, ("SSH1",))
    [_, (second_tag, second_pid)] = device.wait_started(2)
    agent.wait_for(rf"\[{second_tag}\] proxy.link: connected to the tunnel service")
    [_, again] = map(int, LAUNCHER_RE.findall(device.log))
    assert again != launcher
    assert parent(second_pid) == again
    second = stack.source(tunnels[1].source_token, service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
    assert echo_roundtrips(second.ports["SSH1"], 3) == 3

    assert agent.stop(signal.SIGTERM) == 0
    for tag, pid in ((first_tag, first_pid), (second_tag, second_pid)):
        assert f"[{tag}] proxy stopped (exit code 143)" in device.log
        assert ended(pid)
    assert not Path(f"/proc/{again}").exists()


# --------------------------------------------------------------------------- systemd


class NotifySocket:
    """A fake NOTIFY_SOCKET: every datagram the agent sends, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append(data.decode())

    def wait_for(self, predicate, what: str, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                seen = list(self.messages)
            if predicate(seen):
                return seen
            time.sleep(0.05)
        raise HarnessError(f"no {what} on NOTIFY_SOCKET; got {seen}")

    def close(self) -> None:
        self._running = False
        self._thread.join(5)
        self.sock.close()


def test_systemd_ready_status_watchdog_stopping(
    device: Device, stack: Stack, pki: PKI, tmp_path: Path
) -> None:
    tunnel = Tunnel("watched", ("SSH1",))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"SSH1": echo_port})
    spawn_proxies(device)  # reads the proxy's environment
    fake = NotifySocket(tmp_path / "notify.sock")
    try:
        agent = device.start_agent(env={"NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "400000"})
        seen = fake.wait_for(lambda m: m.count("WATCHDOG=1") >= 3, "three WATCHDOG=1")
        ready = [m for m in seen if m.startswith("READY=1")]
        assert ready == ["READY=1\nSTATUS=MQTT connected; 0 tunnels, 0 streams"]

        device.notify(tunnel.destination_token, ("SSH1",))
        [(tag, pid)] = device.wait_started(1)
        agent.wait_for(rf"\[{tag}\] proxy.link: connected to the tunnel service")
        # systemd's variables are the agent's alone.
        env = child_environ(pid)
        assert "NOTIFY_SOCKET" not in env
        assert "WATCHDOG_USEC" not in env
        source = stack.source(tunnel.source_token, service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
        with socket.create_connection(("127.0.0.1", source.ports["SSH1"]), timeout=20) as conn:
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            fake.wait_for(
                lambda m: "STATUS=MQTT connected; 1 tunnel, 1 stream" in m, "a status with a stream"
            )
        fake.wait_for(lambda m: "STATUS=MQTT connected; 1 tunnel, 0 streams" in m, "stream closed")

        assert agent.stop(signal.SIGTERM) == 0
        seen = fake.wait_for(lambda m: "STOPPING=1\nSTATUS=stopping" in m, "STOPPING=1")
        assert seen.count("READY=1\nSTATUS=MQTT connected; 0 tunnels, 0 streams") == 1
    finally:
        fake.close()


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started, from /proc."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def echo_connection(port: int, attempts: int = 100) -> socket.socket:
    """A connection through the source proxy that has carried a round trip; retried while the
    destination proxy is still connecting to the service."""
    for attempt in range(attempts):
        conn = socket.create_connection(("127.0.0.1", port), timeout=20)
        try:
            conn.sendall(b"ping")
            if recv_exactly(conn, 4) == b"ping":
                return conn
        except (OSError, ConnectionError):
            if attempt == attempts - 1:
                raise
        conn.close()
        time.sleep(0.2)
    raise HarnessError("no round trip through the tunnel")


def test_status_counts_streams_with_the_agent_at_log_level_warning(
    device: Device, stack: Stack, pki: PKI, tmp_path: Path
) -> None:
    """The stream count comes from the children's status channel: it does not need their
    debug lines, and their verbosity follows the agent's log_level."""
    device.ini.write_text(
        device.ini.read_text().replace("log_level = debug", "log_level = warning")
    )
    tunnel = Tunnel("quiet", ("SSH1",))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"SSH1": echo_port})
    spawn_proxies(device)  # reads the proxy's command line
    fake = NotifySocket(tmp_path / "notify.sock")
    try:
        # Ready is READY=1 here: the agent's "ready" line is an info line.
        env = {"NOTIFY_SOCKET": str(fake.path)}
        agent = device.agent = stack.agent(device.ini, env=env, ready=False)
        fake.wait_for(lambda m: any(x.startswith("READY=1") for x in m), "READY=1")
        device.notify(tunnel.destination_token, ("SSH1",))
        fake.wait_for(lambda m: "STATUS=MQTT connected; 1 tunnel, 0 streams" in m, "a tunnel")
        source = stack.source(tunnel.source_token, service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
        first = echo_connection(source.ports["SSH1"])
        second = echo_connection(source.ports["SSH1"])
        fake.wait_for(lambda m: "STATUS=MQTT connected; 1 tunnel, 2 streams" in m, "2 streams")
        # The proxy runs at the operator's verbosity (-v 3: warning), not forced to debug.
        [child] = child_pids(agent.popen.pid)
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"-v") + 1] == b"3"
        first.close()
        fake.wait_for(lambda m: m[-1] == "STATUS=MQTT connected; 1 tunnel, 1 stream", "1 stream")
        second.close()
        fake.wait_for(lambda m: m[-1] == "STATUS=MQTT connected; 1 tunnel, 0 streams", "0 streams")
        assert agent.stop(signal.SIGTERM) == 0
        # Neither the agent nor its proxy logged below warning.
        assert "connected to the tunnel service" not in agent.output()
        assert "started a destination proxy" not in agent.output()
    finally:
        fake.close()
