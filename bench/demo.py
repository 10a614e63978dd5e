"""``make demo``: the whole walk-through, on this machine, end to end.

One tunnel with two services, as in the AWS guide *Multiplex data streams in a secure tunnel*:
HTTP1 reaches a web server on the device and SSH1 its SSH server, both at the same time through
one tunnel. Everything runs on loopback, with a throw-away CA:

- an MQTT broker (mosquitto) that requires client certificates, standing in for AWS IoT Core;
- iotunnel's own tunnel service, with its management API and MQTT notifications;
- the device: ``iotunnel-agent``, subscribed to its thing's notify topic, with a web server and
  a real sshd (or, when openssh-server is not installed, an interactive echo service);
- the operator: ``aws iotsecuretunneling open-tunnel`` against the management API, then a
  source-mode proxy, ``curl``-like downloads and ``ssh`` sessions at the same time.

Logs stay in ``.demo/logs/`` for a look afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.clients import http_get
from bench.harness import HarnessError, Stack, agent_ini
from bench.mqtt import mosquitto_binary
from bench.pki import PKI
from bench.sshd import SshSetup, ssh_command, sshd_binary

MiB = 1 << 20
THING = "demo-thing"
OK_LINE = "ok\n"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interactive(port: int, count: int) -> list[float]:
    """Keystroke-sized round trips on one connection; returns each one's time in ms."""
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(count):
            message = f"echo {i:06d}\n".encode()
            start = time.perf_counter()
            sock.sendall(message)
            got = b""
            while len(got) < len(message):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("echo connection closed")
                got += chunk
            times.append((time.perf_counter() - start) * 1000)
            assert got == message
            time.sleep(0.005)
    return times


def _ssh_interactive(setup: SshSetup, port: int, count: int) -> list[float]:
    """Line-by-line round trips through a real SSH session running ``cat`` on the device."""
    times = []
    with subprocess.Popen(
        ssh_command(setup, port, "cat"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as session:
        assert session.stdin is not None
        assert session.stdout is not None
        for i in range(count):
            line = f"keystroke {i:06d}\n".encode()
            start = time.perf_counter()
            session.stdin.write(line)
            session.stdin.flush()
            if session.stdout.readline() != line:
                raise ConnectionError("the SSH session did not echo the line")
            times.append((time.perf_counter() - start) * 1000)
            time.sleep(0.005)
        session.stdin.close()
        session.wait(30)
    return times


def _aws(api_port: int, ca: Path, *args: str) -> dict[str, object]:
    """The real AWS CLI against the management API (boto3 when the CLI is not installed)."""
    endpoint = f"https://127.0.0.1:{api_port}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "AKIDIOTUNNELDEMO",
        "AWS_SECRET_ACCESS_KEY": "iotunnel-demo-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    print(f"  $ aws iotsecuretunneling {' '.join(args)} --endpoint-url {endpoint}")
    if importlib.util.find_spec("awscli") is None:
        import boto3

        client = boto3.client(
            "iotsecuretunneling",
            endpoint_url=endpoint,
            verify=str(ca),
            region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        if args[0] == "open-tunnel":
            answer = client.open_tunnel(
                destinationConfig={"thingName": THING, "services": ["HTTP1", "SSH1"]}
            )
        else:
            answer = client.close_tunnel(tunnelId=args[-1])
        return {k: v for k, v in answer.items() if k != "ResponseMetadata"}
    argv = [sys.executable, "-m", "awscli", "iotsecuretunneling", *args]
    argv += ["--endpoint-url", endpoint, "--ca-bundle", str(ca), "--output", "json"]
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise HarnessError(f"aws {args[0]} failed: {done.stderr.strip()}")
    return dict(json.loads(done.stdout or "{}"))


def run(workdir: Path) -> int:
    if mosquitto_binary() is None:
        raise HarnessError(
            "mosquitto is not installed (Debian package 'mosquitto'; 'make demo' as root adds it)"
        )
    shutil.rmtree(workdir, ignore_errors=True)
    www = workdir / "www"
    www.mkdir(parents=True)
    (www / "index.html").write_text("<h1>device settings</h1>\n")
    big = (hashlib.sha256(b"demo").digest() * (16 * MiB // 32))[: 16 * MiB]
    (www / "firmware.bin").write_bytes(big)
    pki = PKI.create(workdir / "pki")
    device_dir = workdir / "device"
    (device_dir / "destination.d").mkdir(parents=True)

    print("iotunnel demo: open a tunnel, the device agent answers, HTTP1 and SSH1 at once\n")
    with Stack(workdir / "logs") as stack:
        _, mqtt_port = stack.mosquitto(pki)
        print(
            f"  MQTT broker      mosquitto on 127.0.0.1:{mqtt_port}, client certificates required"
        )
        _, ws_port, api_port = stack.control_plane(
            pki, mqtt_port, pki.issue_client("iotunnel-service")
        )
        print(
            f"  tunnel service   wss://127.0.0.1:{ws_port}/tunnel, management API "
            f"https://127.0.0.1:{api_port}"
        )

        _, http_port = stack.http_server(www)
        ssh: SshSetup | None = None
        if sshd_binary() is not None:
            _, ssh_port, ssh = stack.sshd()
            ssh_what = f"sshd on 127.0.0.1:{ssh_port}"
        else:
            _, ssh_port = stack.echo_server()
            ssh_what = f"an echo service on 127.0.0.1:{ssh_port} (no openssh-server here)"
        (device_dir / "destination.d" / "SSHDestination.ini").write_text(
            f"HTTP1 = {http_port}\nSSH1 = {ssh_port}\n"
        )
        thing_cert = pki.issue_client(THING)
        ini = agent_ini(
            device_dir / "agent.ini",
            {
                "endpoint": "127.0.0.1",
                "port": mqtt_port,
                "client_id": THING,
                "cert": thing_cert.cert,
                "key": thing_cert.key,
                "root_ca": pki.ca.cert,
                "mapping_dir": device_dir / "destination.d",
                "tunnel_endpoint": f"wss://127.0.0.1:{ws_port}",
                "tunnel_ca": pki.ca.cert,
            },
        )
        agent = stack.agent(ini)
        print(f"  device           iotunnel-agent ({ini}), thing {THING}")
        print(
            f"                   HTTP1 -> web server on 127.0.0.1:{http_port}, SSH1 -> {ssh_what}"
        )
        print()

        opened = _aws(
            api_port,
            pki.ca.cert,
            "open-tunnel",
            "--destination-config",
            f"thingName={THING},services=HTTP1,SSH1",
        )
        print(f"    -> tunnel {opened['tunnelId']}, sourceAccessToken, destinationAccessToken")
        pid = agent.wait_for(r"\[t1\] started a destination proxy, pid (\d+)").group(1)
        agent.wait_for(r"\[t1\] proxy.link: connected to the tunnel service")
        print(f"  agent            notified over MQTT; destination proxy [t1] pid {pid} connected")

        wanted = {"HTTP1": 5555, "SSH1": 3333}
        mapping = ",".join(f"{s}={p if _port_free(p) else 0}" for s, p in wanted.items())
        source = stack.source(
            str(opened["sourceAccessToken"]), ws_port, mapping, list(wanted), ca=pki.ca.cert
        )
        http1, ssh1 = source.ports["HTTP1"], source.ports["SSH1"]
        print(f"  source proxy     HTTP1 on 127.0.0.1:{http1}, SSH1 on 127.0.0.1:{ssh1}\n")

        results: dict[str, object] = {}

        def browse() -> None:
            start = time.perf_counter()
            status, body = http_get(http1, "/firmware.bin", timeout=60)
            elapsed = time.perf_counter() - start
            results["download"] = (status == 200 and body == big, len(body) / MiB / elapsed)
            pages = [http_get(http1, "/index.html") for _ in range(20)]
            results["pages"] = sum(1 for s, _ in pages if s == 200)

        browser = threading.Thread(target=browse)
        browser.start()
        if ssh is not None:
            commands = [
                subprocess.run(
                    ssh_command(ssh, ssh1, "echo ok"),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    stdin=subprocess.DEVNULL,
                ).stdout
                for _ in range(3)
            ]
            times = _ssh_interactive(ssh, ssh1, 200)
        else:
            commands = []
            times = _interactive(ssh1, 200)
        browser.join(120)

        _aws(api_port, pki.ca.cert, "close-tunnel", "--tunnel-id", str(opened["tunnelId"]))
        agent.wait_for(r"\[t1\] the tunnel was closed by the service .*not restarting")
        print("    -> closed; the agent's proxy exited 0 and was not restarted")

    download = results.get("download", (False, 0.0))
    assert isinstance(download, tuple)
    ok_download, rate = download
    pages = results.get("pages", 0)
    p99 = sorted(times)[int(len(times) * 0.99) - 1]
    print("\n  traffic, at the same time through the one tunnel:")
    print(
        f"    HTTP1  GET /firmware.bin 16 MiB: "
        f"{'sha256 ok' if ok_download else 'FAILED'}, {rate:.0f} MiB/s"
    )
    print(f"    HTTP1  GET /index.html x 20: {pages} x 200 OK")
    if ssh is not None:
        print(f"    SSH1   ssh {ssh.user}@device echo ok x 3: {commands.count(OK_LINE)} x ok")
        what = "line round trips in an ssh session (cat)"
    else:
        what = "interactive round trips"
    print(f"    SSH1   200 {what}: median {statistics.median(times):.2f} ms, p99 {p99:.2f} ms")
    good = (
        bool(ok_download)
        and pages == 20
        and len(times) == 200
        and (ssh is None or commands == [OK_LINE] * 3)
    )
    print(f"\nresult: {'OK' if good else 'FAILED'} (logs in {workdir}/logs)")
    return 0 if good else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    try:
        return run(args.workdir.resolve())
    except HarnessError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
