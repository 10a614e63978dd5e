"""Start iotunnel's parts as real processes on loopback, and clean every one of them up.

Used by the end-to-end tests, ``make demo`` and the benchmarks. Tokens reach child processes
through their environment only; each process's output goes to a log file in the work directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.pki import PKI, CertPair
    from testbed.sshd import SshSetup

ROOT = Path(__file__).resolve().parent.parent
LISTENING_RE = re.compile(r"service (\S+): listening on (\S+)")


class HarnessError(RuntimeError):
    """A process did not start or did not say what was expected in time."""


@dataclass
class Proc:
    """A child process whose stdout and stderr go to ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        """Wait until the output matches ``pattern``; raise if the process dies first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                raise HarnessError(
                    f"{self.name} exited with {self.popen.returncode} before printing "
                    f"{regex.pattern!r}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name} did not print {regex.pattern!r} within {timeout} s:\n"
                    f"{self.output()[-3000:]}"
                )
            time.sleep(0.02)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit by itself; returns its exit code."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"{self.name} still running after {timeout} s:\n{self.output()[-3000:]}"
            ) from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the process and wait for it; kill it if it does not go."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Tunnel:
    """A tunnel declared to the service: its id, services and both access tokens."""

    tunnel_id: str
    services: tuple[str, ...]
    source_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    destination_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def as_json(self) -> dict[str, object]:
        return {
            "tunnelId": self.tunnel_id,
            "services": list(self.services),
            "sourceAccessToken": self.source_token,
            "destinationAccessToken": self.destination_token,
        }


@dataclass
class Source:
    """A source-mode proxy and the local ports it listens on, by service id."""

    proc: Proc
    ports: dict[str, int]


class Stack:
    """Processes started for one test, demo or benchmark run; ``close()`` stops them all."""

    def __init__(self, workdir: Path, *, python: str = sys.executable) -> None:
        self.workdir = workdir
        self.python = python
        self.procs: list[Proc] = []
        workdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        """Start ``argv`` with the project on PYTHONPATH and extra ``env``, in ``cwd`` (the
        work directory by default)."""
        log_path = self.workdir / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=self.workdir if cwd is None else cwd,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    # ---------------------------------------------------------------- iotunnel parts

    def service(
        self,
        tunnels: Sequence[Tunnel],
        *,
        cert: Path | None = None,
        key: Path | None = None,
        port: int = 0,
        name: str = "service",
        extra: Sequence[str] = (),
    ) -> tuple[Proc, int]:
        """Start ``iotunnel-service`` with these tunnels; returns it and its port."""
        tunnels_file = self.workdir / f"{name}-tunnels.json"
        tunnels_file.write_text(json.dumps({"tunnels": [t.as_json() for t in tunnels]}))
        tunnels_file.chmod(0o600)
        argv = [self.python, "-m", "service", "--port", str(port), "--tunnels", str(tunnels_file)]
        if cert is not None and key is not None:
            argv += ["--cert", str(cert), "--key", str(key)]
        else:
            argv.append("--plain")
        proc = self.start(name, [*argv, *extra])
        match = proc.wait_for(r"listening on wss?://[^\s]+:(\d+)")
        return proc, int(match.group(1))

    def proxy_argv(
        self,
        mode: str,
        port: int,
        *,
        ca: Path | None,
        verbosity: int,
        args: Sequence[str],
        tls: bool | None = None,
        program: Sequence[str] = (),
    ) -> list[str]:
        """``python -m proxy`` (or ``program``, e.g. an installed ``iotunnel-proxy``) for the
        service on ``port``: ``wss://`` when ``tls`` (default: when a ``ca`` is given, which
        goes to ``-c``), else ``ws://``."""
        scheme = "wss" if (ca is not None if tls is None else tls) else "ws"
        argv = [*(program or [self.python, "-m", "proxy"])]
        argv += ["-m", mode, "-e", f"{scheme}://127.0.0.1:{port}"]
        if ca is not None:
            argv += ["-c", str(ca)]
        argv += ["-v", str(verbosity), *args]
        return argv

    def destination(
        self,
        token: str,
        port: int,
        mapping: str,
        *,
        ca: Path | None = None,
        verbosity: int = 4,
        name: str = "destination",
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        tls: bool | None = None,
    ) -> Proc:
        """Start a destination-mode proxy (``-d mapping``) and wait for its connection."""
        argv = self.proxy_argv(
            "dst", port, ca=ca, verbosity=verbosity, args=["-d", mapping], tls=tls
        )
        proc = self.start(
            name, [*argv, *extra], env={"AWSIOT_TUNNEL_ACCESS_TOKEN": token, **(env or {})}
        )
        proc.wait_for("connected to the tunnel service")
        return proc

    def source(
        self,
        token: str,
        port: int,
        mapping: str,
        services: Sequence[str],
        *,
        ca: Path | None = None,
        verbosity: int = 4,
        name: str = "source",
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        tls: bool | None = None,
        program: Sequence[str] = (),
    ) -> Source:
        """Start a source-mode proxy and wait until it listens for each of ``services``."""
        argv = self.proxy_argv(
            "src",
            port,
            ca=ca,
            verbosity=verbosity,
            args=["-s", mapping],
            tls=tls,
            program=program,
        )
        proc = self.start(
            name, [*argv, *extra], env={"AWSIOT_TUNNEL_ACCESS_TOKEN": token, **(env or {})}
        )
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 20
        while set(services) - set(ports):
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{name} did not listen for {sorted(set(services) - set(ports))}:\n"
                    f"{proc.output()[-3000:]}"
                )
            proc.wait_for(LISTENING_RE, timeout=max(0.1, deadline - time.monotonic()))
            for sid, where in LISTENING_RE.findall(proc.output()):
                ports[sid] = int(where.rsplit(":", 1)[1])
            time.sleep(0.02)
        return Source(proc, ports)

    def echo_server(self, name: str = "echo") -> tuple[Proc, int]:
        proc = self.start(name, [self.python, "-m", "testbed.servers", "echo"])
        return proc, int(proc.wait_for(r"port (\d+)").group(1))

    def blob_server(self, name: str = "blob") -> tuple[Proc, int]:
        proc = self.start(name, [self.python, "-m", "testbed.servers", "blob"])
        return proc, int(proc.wait_for(r"port (\d+)").group(1))

    def http_server(self, directory: Path, name: str = "http") -> tuple[Proc, int]:
        argv = [self.python, "-m", "testbed.servers", "http", "--directory", str(directory)]
        proc = self.start(name, argv)
        return proc, int(proc.wait_for(r"port (\d+)").group(1))

    # ---------------------------------------------------------------- device side (agent)

    def mosquitto(self, pki: PKI, *, port: int = 0, name: str = "mosquitto") -> tuple[Proc, int]:
        """Start mosquitto with client-certificate auth on loopback; returns it and its port.

        ``port=0`` picks a free one; pass the old port to restart a broker in place.
        """
        from testbed.mqtt import MOSQUITTO_RUNNING, mosquitto_binary, mosquitto_config

        binary = mosquitto_binary()
        if binary is None:
            raise HarnessError("mosquitto is not installed (Debian package 'mosquitto')")
        port = port or free_port()
        conf = mosquitto_config(self.workdir, port, pki, name=name)
        proc = self.start(name, [binary, "-c", str(conf)])
        proc.wait_for(MOSQUITTO_RUNNING)
        return proc, port

    def sshd(self, name: str = "sshd", *, keys: Path | None = None) -> tuple[Proc, int, SshSetup]:
        """Start a throw-away sshd on a free loopback port (see :mod:`testbed.sshd`); its keys and
        config go to ``keys`` (default: ``<work directory>/<name>``)."""
        from testbed.sshd import SSHD_LISTENING, prepare_sshd, sshd_binary

        binary = sshd_binary()
        if binary is None:
            raise HarnessError("sshd/ssh are not installed (openssh-server, openssh-client)")
        setup = prepare_sshd(self.workdir / name if keys is None else keys)
        port = free_port()
        proc = self.start(name, setup.argv(binary, port))
        proc.wait_for(SSHD_LISTENING)
        return proc, port, setup

    def control_plane(
        self,
        pki: PKI,
        mqtt_port: int,
        mqtt_client: CertPair,
        *,
        name: str = "service",
        extra: Sequence[str] = (),
    ) -> tuple[Proc, int, int]:
        """Start the tunnel service with its management API (TLS) and MQTT notifications to
        the broker on ``mqtt_port``; returns it, its WebSocket port and its API port."""
        mqtt = [
            "--api-port", "0",
            "--mqtt-host", "127.0.0.1",
            "--mqtt-port", str(mqtt_port),
            "--mqtt-cert", str(mqtt_client.cert),
            "--mqtt-key", str(mqtt_client.key),
            "--mqtt-ca", str(pki.ca.cert),
        ]  # fmt: skip
        proc, port = self.service(
            [], cert=pki.server.cert, key=pki.server.key, name=name, extra=[*mqtt, *extra]
        )
        api = proc.wait_for(r"API listening on https://[^\s]+:(\d+)")
        return proc, port, int(api.group(1))

    def agent(
        self,
        config: Path,
        *,
        name: str = "agent",
        env: Mapping[str, str] | None = None,
        extra: Sequence[str] = (),
        ready: bool = True,
    ) -> Proc:
        """Start ``iotunnel-agent --config FILE``; wait until it is subscribed when ``ready``."""
        argv = [self.python, "-m", "agent", "--config", str(config), *extra]
        proc = self.start(name, argv, env=env)
        if ready:
            proc.wait_for("ready: waiting for tunnel notifications", timeout=30)
        return proc


def agent_ini(path: Path, settings: Mapping[str, object]) -> Path:
    """Write an agent settings file with these ``[agent]`` keys; ``state_dir`` defaults to
    ``state`` next to the file (never the system's ``/var/lib/iotunnel``)."""
    settings = {"state_dir": path.parent / "state", **settings}
    lines = ["[agent]", *(f"{key} = {value}" for key, value in settings.items()), ""]
    path.write_text("\n".join(lines))
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at ``host`` right now (for 'connection refused'
    cases, and for programs that must be told a port)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
