"""``make demo``: the whole walk-through, on this machine, end to end.

One tunnel with two services, as in the AWS guide *Multiplex data streams in a secure tunnel*:
HTTP1 reaches a web server on the device and SSH1 its SSH server, both at the same time through
one tunnel. Everything runs on loopback, with a throw-away CA:

- an MQTT broker (mosquitto) that requires client certificates, standing in for AWS IoT Core;
- iotunnel's own tunnel service, with its management API and MQTT notifications, capping the
  tunnel's bandwidth as AWS does (800 kB/s each way), so that the tunnel is the bottleneck;
- the device: ``iotunnel-agent``, subscribed to its thing's notify topic, with a web server and
  a real sshd (or, when openssh-server is not installed, an interactive echo service);
- the operator: ``aws iotsecuretunneling open-tunnel`` against the management API, then a
  source-mode proxy, a download over HTTP1 and, while it runs, ``ssh`` over SSH1.

The SSH round trips that count are those that started and ended inside the download. Logs stay
in ``.demo/logs/``; keys are in ``.demo/pki/`` (mode 0700), never in the logs folder, and the
demo checks that no log holds a private key or an access token.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.clients import http_get
from testbed.harness import HarnessError, Stack, agent_ini
from testbed.mqtt import mosquitto_binary
from testbed.pki import PKI
from testbed.sshd import SshSetup, ssh_command, sshd_binary

MiB = 1 << 20
THING = "demo-thing"
OK_LINE = "ok\n"
#: The service's per-tunnel cap, each way (AWS's per-tunnel limit is 800 kB/s).
BANDWIDTH = "800k"
BANDWIDTH_SHOWN = "800 kB/s"
#: Big enough for a download of several seconds at the cap (about 8).
DOWNLOAD_BYTES = 6 * MiB
#: Where the operator's source proxy listens, when these ports are free.
PREFERRED_PORTS = {"HTTP1": 5555, "SSH1": 3333}
IDLE_ROUND_TRIPS = 20
KEYSTROKE_GAP = 0.02  # seconds between two "keystrokes"
PRIVATE_KEY_MARKERS = (b"PRIVATE KEY-----", b"OPENSSH PRIVATE KEY")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Timed:
    """Something done between ``start`` and ``end`` (``time.perf_counter`` seconds)."""

    start: float
    end: float
    ok: bool = True

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000

    def inside(self, other: Timed) -> bool:
        return other.start <= self.start and self.end <= other.end


class LineSession:
    """Keystroke-sized round trips on one interactive connection: a real ``ssh`` session running
    ``cat`` on the device, or (without openssh-server) a TCP connection to an echo service."""

    def __init__(self, ssh: SshSetup | None, port: int) -> None:
        self._count = 0
        self._ssh: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        if ssh is not None:
            self._ssh = subprocess.Popen(
                ssh_command(ssh, port, "cat"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        else:
            self._sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._reader = self._sock.makefile("rb")

    def round_trip(self) -> Timed:
        """Send one line and wait for it to come back."""
        self._count += 1
        line = f"keystroke {self._count:06d}\n".encode()
        start = time.perf_counter()
        if self._ssh is not None:
            assert self._ssh.stdin is not None
            assert self._ssh.stdout is not None
            self._ssh.stdin.write(line)
            self._ssh.stdin.flush()
            got = self._ssh.stdout.readline()
        else:
            assert self._sock is not None
            self._sock.sendall(line)
            got = self._reader.readline()
        if got != line:
            raise HarnessError("the SSH1 session did not echo the line")
        return Timed(start, time.perf_counter())

    def close(self) -> None:
        if self._ssh is not None:
            assert self._ssh.stdin is not None
            self._ssh.stdin.close()
            try:
                self._ssh.wait(30)
            except subprocess.TimeoutExpired:
                self._ssh.kill()
                self._ssh.wait()
            if self._ssh.stdout is not None:
                self._ssh.stdout.close()
        if self._sock is not None:
            self._reader.close()
            self._sock.close()


@dataclass
class Overlap:
    """What happened while the download ran."""

    download: Timed = field(default_factory=lambda: Timed(0.0, 0.0, ok=False))
    keystrokes: list[Timed] = field(default_factory=list)
    ssh_commands: list[Timed] = field(default_factory=list)
    pages: list[Timed] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _while_downloading(
    http_port: int, ssh: SshSetup | None, ssh_port: int, session: LineSession, big: bytes
) -> Overlap:
    """Download over HTTP1 and, until it ends, use SSH1 (and fetch small pages) alongside."""
    result = Overlap()
    started = threading.Event()
    finished = threading.Event()

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except Exception as exc:  # reported in the summary, never interleaved
                result.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                if work is download:
                    finished.set()

        return run

    def download() -> None:
        start = time.perf_counter()
        started.set()
        status, body = http_get(http_port, "/firmware.bin", timeout=120)
        result.download = Timed(start, time.perf_counter(), ok=status == 200 and body == big)

    def ssh_commands() -> None:
        started.wait()
        while ssh is not None and not finished.is_set():
            start = time.perf_counter()
            done = subprocess.run(
                ssh_command(ssh, ssh_port, "echo ok"),
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            result.ssh_commands.append(Timed(start, time.perf_counter(), done.stdout == OK_LINE))

    def pages() -> None:
        started.wait()
        while not finished.is_set() and len(result.pages) < 20:
            start = time.perf_counter()
            status, _ = http_get(http_port, "/index.html", timeout=60)
            result.pages.append(Timed(start, time.perf_counter(), status == 200))
            time.sleep(0.1)

    threads = [threading.Thread(target=guarded(w)) for w in (download, ssh_commands, pages)]
    for thread in threads:
        thread.start()
    started.wait()
    try:
        while not finished.is_set():
            result.keystrokes.append(session.round_trip())
            time.sleep(KEYSTROKE_GAP)
    finally:
        for thread in threads:
            thread.join(180)
    return result


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


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _stats(times: Sequence[Timed]) -> str:
    if not times:
        return "none"
    ms = [t.ms for t in times]
    return f"p50 {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms"


def leaked_secrets(logs: Path, secrets: Sequence[str]) -> list[str]:
    """Files under ``logs`` that hold a private key or one of ``secrets``."""
    found = []
    for path in sorted(logs.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if any(m in data for m in PRIVATE_KEY_MARKERS) or any(
                s.encode() in data for s in secrets if s
            ):
                found.append(str(path.relative_to(logs)))
    return found


class Steps:
    """Numbered lines of the summary, printed by the main thread only, in order."""

    def __init__(self) -> None:
        self.number = 0

    def __call__(self, what: str, text: str, *more: str) -> None:
        self.number += 1
        print(f"{self.number:2d}. {what:<13}{text}", flush=True)
        for line in more:
            print(f"    {'':<13}{line}", flush=True)


def run(workdir: Path, *, ports: dict[str, int] | None = None) -> int:
    """The walk-through in ``workdir``; the source listens on ``ports`` when they are free
    (:data:`PREFERRED_PORTS` by default; 0 picks free ones). Returns 0 when all went well."""
    if mosquitto_binary() is None:
        raise HarnessError(
            "mosquitto is not installed (Debian package 'mosquitto'; 'make demo' as root adds it)"
        )
    wanted = PREFERRED_PORTS if ports is None else ports
    shutil.rmtree(workdir, ignore_errors=True)
    www = workdir / "www"
    www.mkdir(parents=True)
    (www / "index.html").write_text("<h1>device settings</h1>\n")
    big = (hashlib.sha256(b"demo").digest() * (DOWNLOAD_BYTES // 32 + 1))[:DOWNLOAD_BYTES]
    (www / "firmware.bin").write_bytes(big)
    keys = workdir / "pki"  # every private key; the logs folder gets none
    pki = PKI.create(keys)
    keys.chmod(0o700)
    device_dir = workdir / "device"
    (device_dir / "destination.d").mkdir(parents=True)
    logs = workdir / "logs"
    step = Steps()

    print("iotunnel demo: one tunnel, HTTP1 and SSH1 at the same time (all on loopback)\n")
    with Stack(logs) as stack:
        _, mqtt_port = stack.mosquitto(pki)
        step("MQTT broker", f"mosquitto on 127.0.0.1:{mqtt_port}, client certificates required")
        _, ws_port, api_port = stack.control_plane(
            pki,
            mqtt_port,
            pki.issue_client("iotunnel-service"),
            extra=["--bandwidth-limit", BANDWIDTH],
        )
        step(
            "service",
            f"wss://127.0.0.1:{ws_port}/tunnel, management API https://127.0.0.1:{api_port}",
            f"each tunnel capped at {BANDWIDTH_SHOWN} each way, as AWS caps a tunnel",
        )

        _, http_port = stack.http_server(www)
        ssh: SshSetup | None = None
        if sshd_binary() is not None:
            _, ssh_port, ssh = stack.sshd(keys=keys / "ssh")
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
        step(
            "device",
            f"iotunnel-agent ({_shown(ini)}), thing {THING}, waiting for notifications",
            f"HTTP1 -> web server on 127.0.0.1:{http_port}, SSH1 -> {ssh_what}",
        )

        services = f"thingName={THING},services=HTTP1,SSH1"
        open_args = ("open-tunnel", "--destination-config", services)
        opened = _aws(api_port, pki.ca.cert, *open_args)
        tokens = [str(opened.get("sourceAccessToken")), str(opened.get("destinationAccessToken"))]
        step(
            "operator",
            f"$ aws iotsecuretunneling {' '.join(open_args)}",
            f"-> tunnel {opened['tunnelId']}, sourceAccessToken, destinationAccessToken",
        )
        pid = agent.wait_for(r"\[t1\] started a destination proxy, pid (\d+)").group(1)
        agent.wait_for(r"\[t1\] proxy.link: connected to the tunnel service")
        step("device", f"the agent, notified over MQTT, runs destination proxy [t1] (pid {pid})")

        mapping = ",".join(f"{s}={p if p and _port_free(p) else 0}" for s, p in wanted.items())
        source = stack.source(tokens[0], ws_port, mapping, list(wanted), ca=pki.ca.cert)
        http1, ssh1 = source.ports["HTTP1"], source.ports["SSH1"]
        step("operator", f"source proxy: HTTP1 on 127.0.0.1:{http1}, SSH1 on 127.0.0.1:{ssh1}")

        session = LineSession(ssh, ssh1)
        try:
            t0 = session.round_trip().end  # the first one waits for the login
            idle = [session.round_trip() for _ in range(IDLE_ROUND_TRIPS)]
            what = f"ssh {ssh.user}@device cat" if ssh is not None else "the echo service"
            step("SSH1 alone", f"{len(idle)} line round trips in {what}: {_stats(idle)}")
            overlap = _while_downloading(http1, ssh, ssh1, session, big)
        finally:
            session.close()

        window = overlap.download
        inside = [t for t in overlap.keystrokes if t.inside(window)]
        commands = [t for t in overlap.ssh_commands if t.inside(window)]
        pages = [t for t in overlap.pages if t.inside(window)]
        rate = DOWNLOAD_BYTES / 1e3 / max(window.end - window.start, 1e-9)

        def span(times: Sequence[Timed]) -> str:
            return f"t={times[0].start - t0:.2f}..{times[-1].end - t0:.2f} s" if times else ""

        lines = [
            f"meanwhile, inside that window (t counts from step {step.number}):",
            f"  SSH1   {len(inside)} line round trips (same session), {span(inside)}: "
            f"{_stats(inside)}",
        ]
        if ssh is not None:
            answered = sum(t.ok for t in commands)
            took = [t.ms / 1000 for t in commands] or [0.0]
            lines.append(
                f"  SSH1   {len(commands)} x ssh {ssh.user}@device echo ok, {span(commands)}: "
                f"{answered} x ok ({min(took):.1f}..{max(took):.1f} s each, with login)"
            )
        lines.append(
            f"  HTTP1  {len(pages)} x GET /index.html, {span(pages)}: "
            f"{sum(t.ok for t in pages)} x 200 OK"
        )
        lines += [f"  error  {e}" for e in overlap.errors]
        step(
            "HTTP1 + SSH1",
            f"GET /firmware.bin ({DOWNLOAD_BYTES // MiB} MiB), "
            f"t={window.start - t0:.2f}..{window.end - t0:.2f} s: "
            f"{'sha256 ok' if window.ok else 'FAILED'}, {rate:.0f} kB/s",
            *lines,
        )

        close_args = ("close-tunnel", "--tunnel-id", str(opened["tunnelId"]))
        _aws(api_port, pki.ca.cert, *close_args)
        agent.wait_for(r"\[t1\] the tunnel was closed by the service .*not restarting")
        step(
            "operator",
            f"$ aws iotsecuretunneling {' '.join(close_args)}",
            "-> closed; the agent's proxy exited 0 and was not restarted",
        )

    leaks = leaked_secrets(logs, tokens)
    step(
        "logs",
        f"{_shown(logs)}: {sum(1 for p in logs.rglob('*') if p.is_file())} files, "
        + (f"SECRETS IN {', '.join(leaks)}" if leaks else "no private key or access token"),
        f"keys and certificates: {_shown(keys)} (mode {keys.stat().st_mode & 0o777:o})",
    )
    good = (
        window.ok
        and len(inside) >= 10
        and len(pages) > 0
        and all(t.ok for t in pages)
        and (ssh is None or (bool(commands) and all(t.ok for t in commands)))
        and not overlap.errors
        and not leaks
    )
    print(f"\nresult: {'OK' if good else 'FAILED'}")
    return 0 if good else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    try:
        return run(args.workdir.resolve())
    except HarnessError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
