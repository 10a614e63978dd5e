"""The installed package under the unit's seccomp restrictions.

systemd is not PID 1 on the test machines, so ``packaging/unit_sandbox.py`` installs the
seccomp filter that systemd would install for the packaged unit's MemoryDenyWriteExecute=yes,
SystemCallFilter=, SystemCallErrorNumber=, SystemCallArchitectures=, RestrictAddressFamilies=
and NoNewPrivileges=. Under it the installed agent runs a real tunnel: MQTT with mutual TLS to
mosquitto (awscrt), a notification, a destination proxy child (websockets with its C speedups,
protobuf's upb), the self-hosted tunnel service, a source proxy and an HTTP GET through it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from deb_harness import (
    SANDBOX,
    SYSTEM_PYTHON,
    entry_point,
    has_mount_namespaces,
    installed_argv,
    run,
)

from testbed.clients import http_get
from testbed.harness import Stack, Tunnel, agent_ini
from testbed.mqtt import mosquitto_binary
from testbed.pki import PKI

THING = "mdwe-thing"


def _seccomp(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return {k: fields[k] for k in ("Seccomp", "NoNewPrivs")}


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path / "run") as s:
        yield s


def sandbox_ready(unit: Path) -> None:
    """Skip when the sandbox cannot be built here (no systemd-analyze or kernel headers)."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3")
    done = run([SYSTEM_PYTHON, SANDBOX, "--unit", unit, "--check"])
    if "systemd-analyze" in done.stderr or "linux-libc-dev" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr
    assert "W+X mappings are refused (EPERM)" in done.stdout
    assert "AF_NETLINK sockets are refused (EAFNOSUPPORT)" in done.stdout
    assert "setuid() is refused (EPERM)" in done.stdout


def test_the_sandbox_refuses_what_the_unit_forbids() -> None:
    unit = SANDBOX.parent.parent / "systemd/iotunnel-agent.service"
    sandbox_ready(unit)
    probes = {
        "import mmap; mmap.mmap(-1, 4096, prot=7)": "PermissionError: [Errno 1]",  # W+X
        "import os; os.chown('/', 0, 0)": "PermissionError: [Errno 1]",  # ~@privileged
        "import os; os.sched_setaffinity(0, {0})": "PermissionError: [Errno 1]",  # ~@resources
        "import socket; socket.socket(socket.AF_PACKET)": "[Errno 97]",  # EAFNOSUPPORT
    }
    for code, error in probes.items():
        done = run([SYSTEM_PYTHON, SANDBOX, "--unit", unit, "--", SYSTEM_PYTHON, "-c", code])
        assert done.returncode == 1, code
        assert error in done.stderr, (code, done.stderr)
    allowed = "import socket, subprocess; socket.socket(socket.AF_INET6).close(); "
    allowed += "subprocess.run(['/bin/true'], check=True)"
    done = run([SYSTEM_PYTHON, SANDBOX, "--unit", unit, "--", SYSTEM_PYTHON, "-c", allowed])
    assert done.returncode == 0, done.stderr


def test_installed_agent_runs_a_tunnel_in_the_units_sandbox(
    installed: Path, stack: Stack, pki: PKI, tmp_path: Path
) -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")
    if not has_mount_namespaces():
        pytest.skip("needs a mount namespace to see the root's /opt/iotunnel at /opt/iotunnel")
    pytest.importorskip("awscrt", reason="the agent extra (awsiotsdk) is not installed")
    unit = installed / "lib/systemd/system/iotunnel-agent.service"
    sandbox_ready(unit)
    from testbed.mqtt import Publisher

    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("<h1>hello from the packaged device</h1>\n")
    _, http_port = stack.http_server(www)
    tunnel = Tunnel("mdwe-tunnel", ("HTTP1",))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, broker_port = stack.mosquitto(pki)

    # As the unit does it: the key is a credential, found through IOTUNNEL_KEY.
    device = pki.issue_client(THING)
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    shutil.copyfile(device.key, credentials / "device.key")
    mappings = tmp_path / "destination.d"
    mappings.mkdir()
    (mappings / "SSHDestination.ini").write_text(f"HTTP1 = {http_port}\n")
    ini = agent_ini(
        tmp_path / "agent.ini",
        {
            # Names, not addresses: resolved by awscrt and asyncio without AF_NETLINK.
            "endpoint": "localhost",
            "port": broker_port,
            "client_id": THING,
            "cert": device.cert,
            "key": "/nonexistent/replaced-by-IOTUNNEL_KEY",
            "root_ca": pki.ca.cert,
            "mapping_dir": mappings,
            "tunnel_endpoint": f"wss://localhost:{service_port}",
            "tunnel_ca": pki.ca.cert,
            "log_level": "debug",
        },
    )
    argv = [
        SYSTEM_PYTHON,
        SANDBOX,
        "--",
        entry_point(installed, "iotunnel-agent"),
        "--config",
        ini,
    ]
    agent = stack.start(
        "agent",
        installed_argv(installed, argv),
        env={"PYTHONPATH": "", "IOTUNNEL_KEY": str(credentials / "device.key")},
    )
    agent.wait_for("ready: waiting for tunnel notifications", timeout=30)
    assert _seccomp(agent.pid) == {"Seccomp": "2", "NoNewPrivs": "1"}
    assert "/opt/iotunnel/lib/_awscrt.abi3.so" in _maps(agent.pid)

    notification = {
        "clientAccessToken": tunnel.destination_token,
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["HTTP1"],
    }
    with Publisher(broker_port, pki.ca.cert, pki.issue_client("operator")) as publisher:
        publisher.publish(f"$aws/things/{THING}/tunnels/notify", json.dumps(notification).encode())
    started = agent.wait_for(r"\[(t\d+)\] started a destination proxy, pid (\d+)", timeout=30)
    tag, child = started.group(1), int(started.group(2))
    agent.wait_for(rf"\[{tag}\] proxy.link: connected to the tunnel service", timeout=30)
    source = stack.source(tunnel.source_token, service_port, "HTTP1=0", ["HTTP1"], ca=pki.ca.cert)

    assert http_get(source.ports["HTTP1"], "/index.html") == (
        200,
        b"<h1>hello from the packaged device</h1>\n",
    )
    # The proxy child inherited the filter, and runs the packaged native code.
    assert _seccomp(child) == {"Seccomp": "2", "NoNewPrivs": "1"}
    maps = _maps(child)
    assert "/opt/iotunnel/lib/google/_upb/_message.abi3.so" in maps
    assert re.search(r"/opt/iotunnel/lib/websockets/speedups\.cpython-311-\S+\.so", maps)
    assert "Operation not permitted" not in agent.output()
    assert "Address family not supported" not in agent.output()
