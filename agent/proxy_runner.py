"""One destination-mode proxy child process: its command line, environment, output and stop.

The child is ``python -m proxy -m dst --config-dir DIR -r REGION`` (or ``-e ENDPOINT [-c CA]``
with a tunnel endpoint override), started with :func:`asyncio.create_subprocess_exec`: awscrt
is not fork-safe, and a spawned child runs no code of the parent. The access token and the
client token reach it through its environment only, never its command line; the systemd
variables do not reach it at all. Its stdout and stderr are read line by line and re-logged,
tagged with the tunnel's tag, at the level the proxy gave each line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from agent.config import AgentSettings
from agent.logs import parse_proxy_line, tagged
from agent.notify import Notification
from agent.systemd import ENV_VARIABLES
from proxy.config import ENV_ACCESS_TOKEN, ENV_CLIENT_TOKEN, Secret

__all__ = ["ProxyChild", "StreamCounter", "child_argv", "child_environment"]

log = logging.getLogger("agent.proxy")

#: The proxy's verbosity: debug, so that connection opens and closes can be counted.
_CHILD_VERBOSITY = "5"
#: Where the ``proxy`` package the agent runs lives; the child runs the same one.
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
_LINE_LIMIT = 64 * 1024


def child_argv(settings: AgentSettings, notification: Notification) -> list[str]:
    """The child's command line: no token in it, ever."""
    argv = [sys.executable, "-m", "proxy", "-m", "dst", "--config-dir", str(settings.mapping_dir)]
    if settings.tunnel_endpoint is not None:
        argv += ["-e", settings.tunnel_endpoint]
        if settings.tunnel_ca is not None:
            argv += ["-c", str(settings.tunnel_ca)]
    else:
        argv += ["-r", notification.region]
    return [*argv, "-v", _CHILD_VERBOSITY]


#: Proxy variables that the child's WebSocket client would prefer to ``https_proxy``.
_OTHER_PROXIES = ("wss_proxy", "socks_proxy")


def child_environment(
    base: Mapping[str, str],
    access_token: Secret,
    client_token: Secret,
    https_proxy: Secret | None = None,
) -> dict[str, str]:
    """The child's environment: ``base`` without systemd's, the agent's and stray tunnel
    variables, plus the two tokens; with ``https_proxy`` (the agent's proxy URL, which may hold
    a password: the environment is the only place it goes) as ``https_proxy`` and
    ``HTTPS_PROXY``, and no other proxy variable that could win over them. ``NO_PROXY`` passes.
    """
    env = {
        name: value
        for name, value in base.items()
        if name not in ENV_VARIABLES
        and not name.startswith(("IOTUNNEL_", "AWSIOT_TUNNEL_"))
        and not (https_proxy is not None and name.lower() in _OTHER_PROXIES)
    }
    if https_proxy is not None:
        env["https_proxy"] = env["HTTPS_PROXY"] = https_proxy.reveal()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_ROOT, base.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env[ENV_ACCESS_TOKEN] = access_token.reveal()
    env[ENV_CLIENT_TOKEN] = client_token.reveal()
    return env


class StreamCounter:
    """Counts the local connections a proxy has open, from its debug log lines."""

    _OPENED = re.compile(r"proxy: connection (\S+): connected to the local service")
    _CLOSED = re.compile(r"proxy: connection (\S+) closed (?:by the peer|locally)")
    _RESET = re.compile(
        r"proxy: (?:lost the connection to the tunnel service|the tunnel service closed)"
    )

    def __init__(self) -> None:
        self._open: set[str] = set()

    def __len__(self) -> int:
        return len(self._open)

    def feed(self, text: str) -> bool:
        """Take one line's text; True when the count changed."""
        before = len(self._open)
        if match := self._OPENED.match(text):
            self._open.add(match[1])
        elif match := self._CLOSED.match(text):
            self._open.discard(match[1])
        elif self._RESET.match(text):
            self._open.clear()
        return len(self._open) != before


class ProxyChild:
    """A running (or about to run) proxy process for one tunnel.

    Args:
        tag: The tunnel's tag, for logs.
        argv: The command line (:func:`child_argv`).
        env: The environment (:func:`child_environment`).
        on_streams: Called with no argument whenever the number of open connections changes.
        stop_grace: Seconds between SIGTERM and SIGKILL in :meth:`stop`.
    """

    def __init__(
        self,
        tag: str,
        argv: list[str],
        env: dict[str, str],
        *,
        on_streams: Callable[[], None],
        stop_grace: float = 10.0,
    ) -> None:
        self.tag = tag
        self._argv = argv
        self._env = env
        self._on_streams = on_streams
        self._stop_grace = stop_grace
        self._process: asyncio.subprocess.Process | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._stop_requested = False
        self.streams = StreamCounter()

    @property
    def pid(self) -> int | None:
        """The process id once started."""
        return None if self._process is None else self._process.pid

    async def run(self) -> tuple[int, float]:
        """Start the process, relay its output until it exits; returns (exit code, uptime).

        A process that cannot be started counts as exit code 1 (a crash).
        """
        started = time.monotonic()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env,
                cwd="/",
                limit=_LINE_LIMIT,
            )
        except OSError as exc:
            log.error("cannot start the proxy: %s", exc, extra=tagged(self.tag))
            return 1, 0.0
        log.info("started a destination proxy, pid %d", self._process.pid, extra=tagged(self.tag))
        if self._stop_requested:
            self.stop()
        try:
            assert self._process.stdout is not None
            await self._relay(self._process.stdout)
            code = await self._process.wait()
        finally:
            if self._process.returncode is None:  # cancelled: do not leave it behind
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()
                await self._process.wait()
            if self._kill_timer is not None:
                self._kill_timer.cancel()
        if len(self.streams):
            self.streams.feed("proxy: lost the connection to the tunnel service")
            self._on_streams()
        return code, time.monotonic() - started

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        level = logging.INFO
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: drop what is buffered
                raw = await stream.read(_LINE_LIMIT)
                log.warning("the proxy wrote an overlong line", extra=tagged(self.tag))
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            parsed, text = parse_proxy_line(line)
            if parsed is not None:
                level = parsed  # a line without a level continues the record before it
                if self.streams.feed(text):
                    self._on_streams()
            if log.isEnabledFor(level):
                log.log(level, "%s", text, extra=tagged(self.tag))

    def stop(self) -> None:
        """SIGTERM now, SIGKILL after the grace period if it is still running."""
        self._stop_requested = True
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_later(self._stop_grace, self.kill)

    def kill(self) -> None:
        """SIGKILL, if it is still running."""
        process = self._process
        if process is not None and process.returncode is None:
            log.warning("the proxy did not stop in time; killing it", extra=tagged(self.tag))
            with contextlib.suppress(ProcessLookupError):
                process.kill()
