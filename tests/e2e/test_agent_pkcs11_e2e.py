"""The device key in a PKCS#11 token (issue 13 #3), end to end: a real SoftHSM token holds the
device's private key, the real agent logs in to it with the PIN handed over as a systemd
credential (``$CREDENTIALS_DIRECTORY/pkcs11-pin``), opens its MQTT session to a real mosquitto
that requires client certificates, and a tunnel notification starts a destination proxy that
carries traffic through the tunnel service. Once more under the unit's seccomp filter
(``packaging/unit_sandbox.py``: MemoryDenyWriteExecute=, SystemCallFilter=, ...), which the
PKCS#11 module, loaded into the agent with dlopen, must live with too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.clients import echo_roundtrips
from testbed.harness import Stack, Tunnel, agent_ini
from testbed.mqtt import Publisher, mosquitto_binary
from testbed.pki import PKI
from testbed.softhsm import SoftToken, softhsm_missing

pytest.importorskip("awscrt", reason="the agent extra (awsiotsdk) is not installed")
pytestmark = [
    pytest.mark.skipif(
        mosquitto_binary() is None, reason="mosquitto is not installed (Debian package 'mosquitto')"
    ),
    pytest.mark.skipif(softhsm_missing() is not None, reason=str(softhsm_missing())),
]

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = ROOT / "packaging" / "unit_sandbox.py"
THING = "thing-hsm"
TOPIC = f"$aws/things/{THING}/tunnels/notify"
#: The token's user PIN: distinctive, so that finding it anywhere is no accident.
PIN = "5821-hsm-pin-0374"


def command_lines() -> str:
    """Every process's command line, from /proc."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return "\n".join(lines)


def sandbox_problem() -> str | None:
    """Why the unit's seccomp filter cannot be installed here, or ``None``."""
    done = subprocess.run(
        [sys.executable, str(SANDBOX), "--check"], capture_output=True, text=True, timeout=120
    )
    return None if done.returncode == 0 else done.stderr.strip() or "unit_sandbox.py failed"


@pytest.mark.parametrize("sandboxed", [False, True], ids=["plain", "unit-seccomp"])
def test_the_key_in_softhsm_opens_the_mqtt_session_and_a_tunnel_runs(
    stack: Stack, pki: PKI, tmp_path: Path, sandboxed: bool
) -> None:
    if sandboxed and (problem := sandbox_problem()) is not None:
        pytest.skip(f"the unit's seccomp filter cannot be installed here: {problem}")
    device = pki.issue_client(THING)
    token = SoftToken.create(tmp_path / "softhsm", pin=PIN)
    token.import_key(device.key)
    device.key.unlink()  # the token holds the only copy
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "pkcs11-pin").write_text(PIN + "\n")

    tunnel = Tunnel("hsm-tunnel", ("SSH1",))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    mappings = tmp_path / "destination.d"
    mappings.mkdir()
    (mappings / "SSHDestination.ini").write_text(f"SSH1 = {echo_port}\n")
    _, broker_port = stack.mosquitto(pki)
    ini = agent_ini(
        tmp_path / "agent.ini",
        {
            "endpoint": "127.0.0.1",
            "port": broker_port,
            "client_id": THING,
            "cert": device.cert,
            "root_ca": pki.ca.cert,
            "pkcs11_lib": token.lib,
            "pkcs11_token_label": token.label,
            "pkcs11_key_label": "device-key",
            "mapping_dir": mappings,
            "tunnel_endpoint": f"wss://127.0.0.1:{service_port}",
            "tunnel_ca": pki.ca.cert,
            "log_level": "debug",
        },
    )
    env = {**token.env, "CREDENTIALS_DIRECTORY": str(credentials)}
    if sandboxed:  # the sandbox execs the agent: same pid, the filter inherited by children
        argv = [sys.executable, str(SANDBOX), "--", sys.executable, "-m", "agent"]
        agent = stack.start("agent", [*argv, "--config", str(ini)], env=env)
        agent.wait_for("ready: waiting for tunnel notifications", timeout=30)
        status = Path(f"/proc/{agent.popen.pid}/status").read_text()
        assert "\nSeccomp:\t2\n" in status
    else:
        agent = stack.agent(ini, env=env)  # waits for "ready: waiting for tunnel notifications"
    assert agent.popen.poll() is None
    maps = Path(f"/proc/{agent.popen.pid}/maps").read_text()
    assert str(token.lib.resolve().name) in maps  # the key operations ran in SoftHSM

    notification = {
        "clientAccessToken": tunnel.destination_token,
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["SSH1"],
    }
    operator = pki.issue_client("operator")
    with Publisher(broker_port, pki.ca.cert, operator) as publisher:
        publisher.publish(TOPIC, json.dumps(notification).encode())
    found = agent.wait_for(r"\[(t\d+)\] started a destination proxy, pid (\d+)", timeout=30)
    child = int(found.group(2))
    source = stack.source(tunnel.source_token, service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
    agent.wait_for(r"proxy\.link: connected to the tunnel service", timeout=30)
    assert echo_roundtrips(source.ports["SSH1"], 5) == 5

    # The PIN is in no command line, no log line, and not in the proxy child's environment.
    assert PIN not in command_lines()
    assert PIN not in agent.output()
    environ = Path(f"/proc/{child}/environ").read_bytes()
    assert PIN.encode() not in environ
    assert os.path.exists(credentials / "pkcs11-pin")
