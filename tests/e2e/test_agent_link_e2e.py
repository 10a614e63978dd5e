"""End to end, the agent's MQTT link in a real fleet's network (issue 13, items 1, 2 and 5):

- port 443: the agent offers ALPN ``x-amzn-mqtt-ca`` (as AWS IoT Core requires there), seen by a
  TLS endpoint on port 443 in a network namespace of its own; on another port it offers none;
- an HTTP CONNECT proxy (Debian's tinyproxy, whose log shows every CONNECT): the MQTT
  connection and every destination proxy's WebSocket go through it, with Basic auth from the
  URL, from ``agent.ini`` or from ``HTTPS_PROXY``/``NO_PROXY``; a wrong password is one clear
  line, retried, and no password is ever logged or on a command line;
- a clock before the certificates' start: one line that says to check the clock, retried.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_agent_e2e import child_environ, command_lines

from testbed.clients import echo_roundtrips
from testbed.harness import Proc, Stack, Tunnel, agent_ini
from testbed.httpproxy import HttpProxyServer, start_tinyproxy, tinyproxy_binary
from testbed.mqtt import Publisher, mosquitto_binary
from testbed.pki import PKI

pytest.importorskip("awscrt", reason="the agent extra (awsiotsdk) is not installed")
pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None, reason="mosquitto is not installed (Debian package 'mosquitto')"
)
needs_tinyproxy = pytest.mark.skipif(
    tinyproxy_binary() is None, reason="tinyproxy is not installed (Debian package 'tinyproxy')"
)

THING = "thing-1"
TOPIC = f"$aws/things/{THING}/tunnels/notify"
PASSWORD = "pr0xy-s3cret-pass"
#: No proxy exemptions from the test's own environment.
NO_EXEMPTIONS = {"NO_PROXY": "", "no_proxy": "", "HTTPS_PROXY": "", "https_proxy": ""}
STARTED_RE = re.compile(r"\[(t\d+)\] started a destination proxy, pid (\d+)")


@dataclass
class Link:
    """A broker, a tunnel service with one tunnel, an echo server, and the agent's settings."""

    stack: Stack
    pki: PKI
    broker_port: int
    service_port: int
    tunnel: Tunnel
    settings: dict[str, object]

    def ini(self, **extra: object) -> Path:
        return agent_ini(self.stack.workdir / "agent.ini", {**self.settings, **extra})

    def notify(self) -> None:
        payload = {
            "clientAccessToken": self.tunnel.destination_token,
            "clientMode": "destination",
            "region": "us-east-1",
            "services": ["SSH1"],
        }
        operator = self.pki.issue_client("operator")
        with Publisher(self.broker_port, self.pki.ca.cert, operator) as publisher:
            publisher.publish(TOPIC, json.dumps(payload).encode())

    def tunnel_works(self, agent: Proc) -> int:
        """Notify, wait for the proxy to connect, carry traffic; returns the proxy's pid."""
        self.notify()
        match = agent.wait_for(STARTED_RE, timeout=30)
        agent.wait_for(rf"\[{match[1]}\] proxy.link: connected to the tunnel service", 30)
        source = self.stack.source(
            self.tunnel.source_token, self.service_port, "SSH1=0", ["SSH1"], ca=self.pki.ca.cert
        )
        assert echo_roundtrips(source.ports["SSH1"], 3) == 3
        return int(match[2])


def make_link(stack: Stack, pki: PKI) -> Link:
    _, broker_port = stack.mosquitto(pki)
    tunnel = Tunnel("proxied", ("SSH1",))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    mappings = stack.workdir / "destination.d"
    mappings.mkdir(exist_ok=True)
    (mappings / "SSHDestination.ini").write_text(f"SSH1 = {echo_port}\n")
    cert = pki.issue_client(THING)
    settings: dict[str, object] = {
        "endpoint": "127.0.0.1",
        "port": broker_port,
        "client_id": THING,
        "cert": cert.cert,
        "key": cert.key,
        "root_ca": pki.ca.cert,
        "mapping_dir": mappings,
        "tunnel_endpoint": f"wss://127.0.0.1:{service_port}",
        "tunnel_ca": pki.ca.cert,
        "log_level": "debug",
    }
    return Link(stack, pki, broker_port, service_port, tunnel, settings)


@pytest.fixture
def link(stack: Stack, pki: PKI) -> Link:
    return make_link(stack, pki)


def tinyproxy(link: Link, *, auth: bool = True) -> HttpProxyServer:
    return start_tinyproxy(
        link.stack,
        connect_ports=[link.broker_port, link.service_port],
        auth=("agent", PASSWORD) if auth else None,
    )


def assert_no_password(*texts: str) -> None:
    """Neither the password nor the Basic credentials (as Proxy-Authorization carries them)."""
    basic = base64.b64encode(f"agent:{PASSWORD}".encode()).decode()
    for text in texts:
        assert PASSWORD not in text
        assert basic not in text
    assert not any(PASSWORD in line for line in command_lines())


# --------------------------------------------------------------------------- HTTP proxy


@needs_tinyproxy
def test_mqtt_and_the_tunnel_go_through_tinyproxy_with_basic_auth(link: Link) -> None:
    proxy = tinyproxy(link)
    # launcher = spawn: the test reads the proxy's environment (see spawn_proxies).
    ini = link.ini(https_proxy=proxy.url, launcher="spawn")
    agent = link.stack.agent(ini, env=NO_EXEMPTIONS)
    # The MQTT connection went through the proxy, with the right credentials (else no CONNACK).
    proxy.wait_for_connect(link.broker_port)
    assert f"through the HTTP proxy http://127.0.0.1:{proxy.port}" in agent.output()

    pid = link.tunnel_works(agent)
    # ... and so did the destination proxy's WebSocket: the agent handed it the proxy.
    proxy.wait_for_connect(link.service_port)
    env = child_environ(pid)
    assert env["HTTPS_PROXY"] == env["https_proxy"] == proxy.url
    assert_no_password(agent.output())


@needs_tinyproxy
def test_https_proxy_from_the_environment_and_no_proxy(link: Link) -> None:
    """``HTTPS_PROXY`` without ``https_proxy`` in agent.ini; ``NO_PROXY`` exempts the broker
    (host:port), not the tunnel service: MQTT goes direct, the WebSocket through the proxy."""
    if os.environ.get("https_proxy") or os.environ.get("no_proxy"):
        pytest.skip("https_proxy or no_proxy is set here, and would win over the upper-case ones")
    proxy = tinyproxy(link, auth=False)
    exempt = f"127.0.0.1:{link.broker_port}"
    env = {"HTTPS_PROXY": proxy.url, "NO_PROXY": exempt}
    check = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(link.ini()), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert check.returncode == 0, check.stderr
    assert "directly (NO_PROXY), tunnels via the HTTP proxy" in check.stdout

    agent = link.stack.agent(link.ini(), env=env)
    assert "through the HTTP proxy" not in agent.output()
    link.tunnel_works(agent)
    proxy.wait_for_connect(link.service_port)
    assert proxy.connects(link.broker_port) == 0


@needs_tinyproxy
def test_a_wrong_proxy_password_is_one_clear_line_and_retried(link: Link) -> None:
    proxy = tinyproxy(link)
    wrong = proxy.url.replace(PASSWORD, "wr0ng-" + PASSWORD[::-1])
    agent = link.stack.agent(link.ini(https_proxy=wrong), env=NO_EXEMPTIONS, ready=False)
    line = (
        rf"<4>cannot connect to the MQTT broker: the HTTP proxy http://127\.0\.0\.1:{proxy.port} "
        rf"refused to open a tunnel to 127\.0\.0\.1:{link.broker_port} "
        r"\(AWS_ERROR_HTTP_PROXY_CONNECT_FAILED\): check the user and password of https_proxy "
        r"\(\S+agent\.ini:\d+: https_proxy\), and that the proxy allows CONNECT to port \d+; "
        r"retrying\n"
    )
    agent.wait_for(rf"(?s)(?:{line}.*){{2}}", timeout=60)  # and it tries again
    assert agent.popen.poll() is None
    proxy.wait_for_connect(link.broker_port, count=2)
    # The proxy goes away: that is what the line says then.
    proxy.proc.stop()
    agent.wait_for(
        rf"<4>cannot connect to the MQTT broker: cannot reach the HTTP proxy "
        rf"http://127\.0\.0\.1:{proxy.port} \(AWS_IO_SOCKET_CONNECTION_REFUSED\): check "
        r"https_proxy \(\S+agent\.ini:\d+: https_proxy\), and that the proxy runs; retrying",
        timeout=120,
    )
    assert agent.popen.poll() is None
    assert "Traceback" not in agent.output()
    assert_no_password(agent.output(), wrong)
    assert PASSWORD[::-1] not in agent.output()


# --------------------------------------------------------------------------- port 443


def netns_usable() -> str | None:
    """Why a network namespace cannot be made here, or ``None``."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare (util-linux) or ip (iproute2) is not installed"
    done = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30)
    if done.returncode != 0:
        return "cannot make a network namespace here (needs root or CAP_SYS_ADMIN)"
    return None


@pytest.mark.parametrize(("port", "offered"), [(443, "x-amzn-mqtt-ca"), (8883, "none")])
def test_port_443_offers_alpn_x_amzn_mqtt_ca(
    stack: Stack, pki: PKI, port: int, offered: str
) -> None:
    """The agent, its settings saying ``port = 443``, and a TLS endpoint on that port in a
    network namespace of their own (port 443 of the machine is left alone)."""
    if (why := netns_usable()) is not None:
        pytest.skip(why)
    cert = pki.issue_client(THING)
    mappings = stack.workdir / "destination.d"
    mappings.mkdir()
    (mappings / "SSHDestination.ini").write_text("SSH1 = 22\n")
    ini = agent_ini(
        stack.workdir / "agent.ini",
        {
            "endpoint": "127.0.0.1",
            "port": port,
            "client_id": THING,
            "cert": cert.cert,
            "key": cert.key,
            "root_ca": pki.ca.cert,
            "mapping_dir": mappings,
        },
    )
    agent_log = stack.workdir / "agent.log"
    script = str(Path(__file__).with_name("alpn_endpoint.py"))
    endpoint = stack.start(
        "alpn-endpoint",
        [
            "unshare", "--net", stack.python, script,
            str(port), str(pki.server.cert), str(pki.server.key), str(pki.ca.cert), str(agent_log),
            "--", stack.python, "-m", "agent", "--config", str(ini),
        ],
        env=NO_EXEMPTIONS,
    )  # fmt: skip
    endpoint.wait_for(r"first byte 0x[0-9a-f]{2}", timeout=90)
    assert f"alpn {offered}\n" in endpoint.output()
    assert "first byte 0x10" in endpoint.output()  # MQTT CONNECT, after a complete handshake
    assert endpoint.wait(60) == 0
    alpn = " (ALPN x-amzn-mqtt-ca)" if port == 443 else ""
    assert f"connecting to the MQTT broker 127.0.0.1:{port}{alpn} as" in agent_log.read_text()


# --------------------------------------------------------------------------- the clock


def test_a_clock_before_the_certificates_start_says_so_and_retries(
    stack: Stack, tmp_path: Path
) -> None:
    """Every certificate starts tomorrow, as a device whose clock is a day behind sees them:
    the TLS handshake fails, the agent says why in one line, and keeps trying."""
    future = PKI.create(tmp_path / "future-pki", starts_in=datetime.timedelta(days=1))
    link = make_link(stack, future)
    agent = link.stack.agent(link.ini(), env=NO_EXEMPTIONS, ready=False)
    line = (
        r"<4>cannot connect to the MQTT broker: AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE: the "
        r"system clock \([0-9-]+ [0-9:]+ UTC\) is before the device certificate's start "
        r"\([0-9-]+ [0-9:]+ UTC\), so the broker's certificate is not yet valid either: check "
        r"the system clock \(NTP\); retrying\n"
    )
    # s2n delays its answer to a failed handshake by up to 30 s: be patient.
    agent.wait_for(rf"(?s)(?:{line}.*){{2}}", timeout=150)
    assert agent.popen.poll() is None
    assert "Traceback" not in agent.output()
