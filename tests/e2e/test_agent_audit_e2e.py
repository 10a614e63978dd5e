"""End to end: the audit trail and ``iotunnel-agent status`` (issue 13, item 6).

The agent, mosquitto, the project's tunnel service, a real HTTP server and an echo server, and
a source proxy in front, all real processes (the harness of ``test_agent_e2e.py``). The agent's
stderr is made "the journal" as systemd does it (``JOURNAL_STREAM`` names its device and inode)
and the native socket is a stand-in (``IOTUNNEL_JOURNAL_SOCKET``): the agent and its proxy then
send native records with fields, and each local connection leaves exactly one audit record.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_agent_e2e import Device, configure, device

from testbed.clients import recv_exactly
from testbed.harness import Stack, Tunnel
from testbed.journal import FakeJournal
from testbed.pki import PKI

__all__ = ["device"]  # the fixture, imported

pytest.importorskip("awscrt", reason="the agent extra (awsiotsdk) is not installed")

ROOT = Path(__file__).resolve().parents[2]


def agent_status(dev: Device, *args: str) -> tuple[int, str]:
    """``iotunnel-agent status --config agent.ini ARGS``: (exit code, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("IOTUNNEL_")}
    done = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--config", str(dev.ini), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.stderr == ""
    return done.returncode, done.stdout


def status_until(
    dev: Device, predicate: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The JSON status, polled until ``predicate`` holds (the file is rewritten within ~1 s)."""
    deadline = time.monotonic() + 60
    while True:
        code, text = agent_status(dev, "--json")
        document = json.loads(text)
        if code == 0 and predicate(document):
            return document
        if time.monotonic() > deadline:
            raise AssertionError(f"no status with {what}: {document}")
        time.sleep(0.2)


def audits(records: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in records if r.get("IOTUNNEL_EVENT") == "connection-closed"]


def test_one_audit_record_per_connection_and_the_status_command(
    device: Device, stack: Stack, pki: PKI, www: Path, tmp_path: Path
) -> None:
    tunnel = Tunnel("audited", ("HTTP1", "SSH1"))
    _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, http_port = stack.http_server(www)
    _, echo_port = stack.echo_server()
    configure(device, service_port, {"HTTP1": http_port, "SSH1": echo_port})
    assert agent_status(device) == (
        3,
        f"iotunnel-agent is not running (no {device.ini.parent / 'state' / 'status.json'})\n",
    )

    journal = FakeJournal(tmp_path / "journal.sock")
    try:
        # systemd's JOURNAL_STREAM: the device and inode of the agent's stderr (its log file).
        log_path = stack.workdir / "agent.log"
        log_path.touch()
        info = log_path.stat()
        env = {
            "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}",
            "IOTUNNEL_JOURNAL_SOCKET": journal.path,
        }
        agent = device.agent = stack.agent(device.ini, env=env, ready=False)
        journal.wait_for(
            lambda r: any(x["MESSAGE"] == "ready: waiting for tunnel notifications" for x in r),
            "ready",
        )
        device.notify(tunnel.destination_token, ("HTTP1", "SSH1"))
        connected = journal.wait_for(
            lambda r: any("proxy.link: connected to the tunnel service" in x["MESSAGE"] for x in r),
            "the proxy's connected line",
        )
        [line] = [x for x in connected if "proxy.link: connected" in x["MESSAGE"]]
        # The proxy's own record, with its tunnel's field: no relay through the agent.
        assert (line["TUNNEL"], line["SYSLOG_IDENTIFIER"], line["PRIORITY"]) == (
            "t1",
            "iotunnel-proxy",
            "6",
        )
        assert line["MESSAGE"].startswith("[t1] proxy.link: connected to the tunnel service")
        source = stack.source(
            tunnel.source_token, service_port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=pki.ca.cert
        )

        # An HTTP request, answered and closed by the server.
        request = b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n"
        with socket.create_connection(("127.0.0.1", source.ports["HTTP1"]), timeout=30) as http:
            http.sendall(request)
            response = b""
            while chunk := http.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 200 OK")
        [first] = audits(journal.wait_for(lambda r: len(audits(r)) == 1, "an audit record"))

        # An echo session, open while the status is read.
        payload = os.urandom(3000)
        session = socket.create_connection(("127.0.0.1", source.ports["SSH1"]), timeout=30)
        try:
            session.sendall(payload)
            assert recv_exactly(session, len(payload)) == payload
            running = status_until(
                device, lambda d: d["tunnels"] and d["tunnels"][0]["open"] == 1, "an open stream"
            )
            code, table = agent_status(device)
        finally:
            session.close()
        records = journal.wait_for(lambda r: len(audits(r)) == 2, "two audit records")
        second = audits(records)[1]

        # One record per connection, with the service, the local endpoint, the bytes each way.
        assert first["SERVICE_ID"] == "HTTP1"
        assert first["TUNNEL"] == "t1"
        assert first["LOCAL_ENDPOINT"] == f"127.0.0.1:{http_port}"
        assert (int(first["BYTES_IN"]), int(first["BYTES_OUT"])) == (len(request), len(response))
        assert first["CLOSED_BY"] == "local"  # the HTTP server closed it
        assert first["MESSAGE"].startswith(
            f"[t1] HTTP1 connection {first['CONNECTION'].removeprefix('HTTP1/')} to "
            f"127.0.0.1:{http_port} closed (local): {len(request)} B in, "
        )
        assert second["SERVICE_ID"] == "SSH1"
        assert second["TUNNEL"] == "t1"
        assert second["LOCAL_ENDPOINT"] == f"127.0.0.1:{echo_port}"
        assert (second["BYTES_IN"], second["BYTES_OUT"]) == ("3000", "3000")
        assert ": 2.9 KiB in, 2.9 KiB out, " in second["MESSAGE"]
        assert float(second["DURATION_S"]) >= 0
        assert second["PRIORITY"] == "6"
        assert second["SYSLOG_IDENTIFIER"] == "iotunnel-agent"

        # The status: the tunnel, its services, its open connection; the table says the same.
        assert running["running"] is True
        assert running["pid"] == agent.pid
        [shown] = running["tunnels"]
        assert (shown["tag"], shown["services"], shown["state"]) == (
            "t1",
            ["HTTP1", "SSH1"],
            "connected",
        )
        assert (shown["closed"], shown["bytes_in"], shown["bytes_out"]) == (
            1,
            len(request),
            len(response),
        )
        assert code == 0
        lines = table.splitlines()
        assert lines[0].endswith("MQTT connected; 1 tunnel, 1 stream")
        assert lines[2].split()[:2] == ["t1", "HTTP1,SSH1"]
        done = status_until(device, lambda d: d["tunnels"][0]["closed"] == 2, "two closed")
        assert done["tunnels"][0]["open"] == 0
        assert done["tunnels"][0]["bytes_in"] == len(request) + 3000

        status_file = device.ini.parent / "state" / "status.json"
        texts = [status_file.read_text(), table, json.dumps(journal.seen()), agent.output()]
        assert agent.stop(signal.SIGTERM) == 0
        journal.wait_for(lambda r: r[-1]["MESSAGE"] == "stopped", "stopped")
    finally:
        journal.close()

    # Stopped: the status file is gone, and the command says so (exit 3, as systemctl status).
    assert not status_file.exists()
    code, text = agent_status(device)
    assert (code, text) == (3, f"iotunnel-agent is not running (no {status_file})\n")
    assert len(audits(journal.seen())) == 2
    # No token anywhere: not in the journal, the status file or output, the agent's stderr.
    for text in texts:
        assert tunnel.destination_token not in text
        assert tunnel.source_token not in text
