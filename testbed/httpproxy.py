"""A real HTTP CONNECT proxy (Debian's tinyproxy) on loopback, whose log shows what it carried.

Used by the agent's end-to-end tests::

    proxy = start_tinyproxy(stack, connect_ports=[broker_port, service_port], auth=("u", "p"))
    proxy.url                      # http://u:p@127.0.0.1:PORT
    proxy.wait_for_connect(port)   # its log has "Request (...): CONNECT 127.0.0.1:port"
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from testbed.harness import HarnessError, Proc, Stack, free_port

#: What tinyproxy logs when it listens.
TINYPROXY_RUNNING = "Starting main loop. Accepting connections."


def tinyproxy_binary() -> str | None:
    """The tinyproxy executable (Debian package ``tinyproxy``), or ``None``."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin"])
    return shutil.which("tinyproxy", path=path)


@dataclass
class HttpProxyServer:
    """A running tinyproxy: its process, port, log file and credentials."""

    proc: Proc
    port: int
    log_path: Path
    auth: tuple[str, str] | None

    @property
    def url(self) -> str:
        """``http://[user:password@]127.0.0.1:port``."""
        userinfo = "" if self.auth is None else f"{self.auth[0]}:{self.auth[1]}@"
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def log(self) -> str:
        """tinyproxy's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connects(self, port: int) -> int:
        """How many CONNECT requests to ``127.0.0.1:port`` it has received."""
        return len(re.findall(rf"CONNECT 127\.0\.0\.1:{port} HTTP", self.log()))

    def wait_for_connect(self, port: int, count: int = 1, timeout: float = 30.0) -> None:
        """Until its log shows ``count`` CONNECT requests to ``127.0.0.1:port``."""
        pattern = rf"(?s)(?:CONNECT 127\.0\.0\.1:{port} HTTP.*){{{count}}}"
        _wait_for_file(self.proc, self.log_path, pattern, timeout)


def _wait_for_file(proc: Proc, path: Path, pattern: str, timeout: float) -> None:
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while not regex.search(path.read_text(errors="replace") if path.exists() else ""):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise HarnessError(
                f"{proc.name}: no {pattern!r} in its log:\n"
                f"{(path.read_text(errors='replace') if path.exists() else '')[-3000:]}\n"
                f"{proc.output()[-2000:]}"
            )
        time.sleep(0.05)


def start_tinyproxy(
    stack: Stack,
    *,
    connect_ports: Iterable[int],
    auth: tuple[str, str] | None = None,
    name: str = "tinyproxy",
) -> HttpProxyServer:
    """Start tinyproxy in the foreground on a free loopback port, allowing CONNECT to
    ``connect_ports`` only, with Basic auth when ``auth`` is given; wait until it listens."""
    binary = tinyproxy_binary()
    if binary is None:
        raise HarnessError("tinyproxy is not installed (Debian package 'tinyproxy')")
    port = free_port()
    log_path = stack.workdir / f"{name}-access.log"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 600",
        f'LogFile "{log_path}"',
        "LogLevel Info",
        "MaxClients 50",
        "Allow 127.0.0.1",
        *(f"ConnectPort {p}" for p in connect_ports),
    ]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf = stack.workdir / f"{name}.conf"
    conf.write_text("\n".join([*lines, ""]))
    conf.chmod(0o600)
    proc = stack.start(name, [binary, "-d", "-c", str(conf)])
    server = HttpProxyServer(proc, port, log_path, auth)
    _wait_for_file(proc, log_path, re.escape(TINYPROXY_RUNNING), 20.0)
    return server
