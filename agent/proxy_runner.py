"""One destination-mode proxy child process: its command line, environment, output and stop.

The child is ``python -m proxy -m dst --config-dir DIR -r REGION`` (or ``-e ENDPOINT [-c CA]``
with a tunnel endpoint override). With ``launcher = fork`` (the default) the agent's launcher
forks it from a process that has the proxy imported already (:mod:`agent.launcher`: the agent
itself never forks, awscrt is not fork-safe); with ``launcher = spawn``, or when the launcher
cannot, it is started with :func:`asyncio.create_subprocess_exec`. The access token and the
client token reach it through its environment only (over the launcher's socket when forked),
never its command line; the systemd variables do not reach it at all. It inherits the agent's
stderr (its stdout goes there too) and writes its records there itself, in the agent's form
and tagged with the tunnel's tag, as the agent tells it in its environment
(:func:`agent.logs.child_log_env`): the agent reads none of its lines. Its verbosity follows
the agent's ``log_level``.

What the agent knows of a child's state (connected, its services, its open connections) comes
from the child's status channel (:mod:`iotunnel.status`): a pipe whose write end the child
inherits, named by ``IOTUNNEL_STATUS_FD``, carrying JSON lines. Never from its log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from agent.config import AgentSettings
from agent.launcher import ForkedProcess, Launcher, LauncherError
from agent.logs import tagged
from agent.systemd import ENV_VARIABLES
from iotunnel.exits import ExitCode
from iotunnel.handshake import ENV_ACCESS_TOKEN, ENV_CLIENT_TOKEN
from iotunnel.notify import Notification
from iotunnel.secret import Secret
from iotunnel.status import (
    ENV_STATUS_FD,
    Closed,
    Connected,
    Event,
    Exited,
    LineSplitter,
    Opened,
    Reconnecting,
    Services,
    StatusError,
    decode,
)

__all__ = ["ChildStatus", "ProxyChild", "child_argv", "child_environment", "child_verbosity"]

log = logging.getLogger("agent.proxy")

#: The proxy's ``-v`` for the agent's ``log_level``.
_VERBOSITY = {logging.DEBUG: "5", logging.INFO: "4", logging.WARNING: "3", logging.ERROR: "2"}
#: Where the ``proxy`` package the agent runs lives; the child runs the same one.
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
#: The child's stdout goes to the agent's stderr (it writes nothing there in destination mode).
_STDERR = 2


def child_argv(settings: AgentSettings, notification: Notification) -> list[str]:
    """The child's command line: no token in it, ever."""
    argv = [sys.executable, "-m", "proxy", "-m", "dst", "--config-dir", str(settings.mapping_dir)]
    if settings.tunnel_endpoint is not None:
        argv += ["-e", settings.tunnel_endpoint]
        if settings.tunnel_ca is not None:
            argv += ["-c", str(settings.tunnel_ca)]
    else:
        argv += ["-r", notification.region]
    return [*argv, "-v", child_verbosity(settings.log_level)]


def child_verbosity(level: int) -> str:
    """The proxy's ``-v`` that logs what the agent's ``level`` lets through."""
    for at_least, verbosity in sorted(_VERBOSITY.items()):
        if level <= at_least:
            return verbosity
    return "2"


#: Proxy variables that the child's WebSocket client would prefer to ``https_proxy``.
_OTHER_PROXIES = ("wss_proxy", "socks_proxy")


def child_environment(
    base: Mapping[str, str],
    access_token: Secret,
    client_token: Secret,
    https_proxy: Secret | None = None,
    log_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The child's environment: ``base`` without systemd's, the agent's and stray tunnel
    variables, plus the two tokens and how to log (``log_env``); with ``https_proxy`` (the
    agent's proxy URL, which may hold a password: the environment is the only place it goes) as
    ``https_proxy`` and ``HTTPS_PROXY``, and no other proxy variable that could win over them.
    ``NO_PROXY`` passes.
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
    env.update(log_env or {})
    return env


class _Process(Protocol):
    """What a child needs of its process: a spawned one or one the launcher forked."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class ChildStatus:
    """A child's state as its status channel tells it: connection, services, open streams."""

    def __init__(self) -> None:
        self.connected = False
        self.protocol: int | None = None
        self.channel_id: str | None = None
        self.services: tuple[str, ...] = ()
        #: Open connections: connection id -> service ID.
        self.open: dict[str, str] = {}
        self.reconnect_reason: str | None = None
        self.exit: Exited | None = None
        #: Events the child reported having dropped (a full pipe).
        self.dropped = 0
        #: Bytes carried by the connections that closed: tunnel -> local, local -> tunnel.
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def streams(self) -> int:
        """The number of open connections."""
        return len(self.open)

    def apply(self, event: Event) -> bool:
        """Take one event; True when the number of open connections changed."""
        before = len(self.open)
        match event:
            case Connected(protocol=protocol, channel_id=channel):
                self.connected, self.protocol, self.channel_id = True, protocol, channel
                self.open.clear()
            case Services(service_ids=ids):
                self.services = ids
            case Opened(service_id=service, connection=conn):
                self.open[conn] = service
            case Closed(connection=conn):
                self.open.pop(conn, None)
                self.bytes_in += event.bytes_in
                self.bytes_out += event.bytes_out
            case Reconnecting(reason=reason):
                self.connected, self.reconnect_reason = False, reason
                self.open.clear()
            case Exited():
                self.connected, self.exit = False, event
                self.open.clear()
        return len(self.open) != before

    def ended(self) -> bool:
        """The process is gone: nothing of it is open any more; True when that changed the
        number of open connections."""
        before = len(self.open)
        self.connected = False
        self.open.clear()
        return before != 0


class _StatusReader(asyncio.Protocol):
    """Reads a child's status pipe: lines to events to :class:`ChildStatus`, as they come."""

    def __init__(self, child: ProxyChild) -> None:
        self._child = child
        self._lines = LineSplitter()
        self._complained = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            if line is None:
                self._complain("a line longer than the limit")
            else:
                self._line(line)

    def _line(self, line: bytes) -> None:
        child = self._child
        try:
            event, dropped = decode(line)
        except StatusError as exc:
            self._complain(str(exc))
            return
        if dropped > child.status.dropped:
            if not child.status.dropped:
                log.warning(
                    "the proxy dropped status events (its pipe was full): "
                    "the stream count may be off until it reconnects",
                    extra=tagged(child.tag),
                )
            child.status.dropped = dropped
        if event is None:  # a newer proxy's event: nothing to learn from it here
            return
        if isinstance(event, Exited):
            log.debug(
                "the proxy reports its exit: %s (exit code %d)",
                event.reason,
                event.code,
                extra=tagged(child.tag),
            )
        if child.status.apply(event):
            child.changed()
        if child.on_event is not None:
            child.on_event(event)

    def _complain(self, problem: str) -> None:
        """One warning per child; later bad lines only at debug level."""
        level = logging.DEBUG if self._complained else logging.WARNING
        self._complained = True
        log.log(
            level,
            "ignoring a line on the proxy's status channel: %s",
            problem,
            extra=tagged(self._child.tag),
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class ProxyChild:
    """A running (or about to run) proxy process for one tunnel.

    Args:
        tag: The tunnel's tag, for logs.
        argv: The command line (:func:`child_argv`).
        env: The environment (:func:`child_environment`).
        on_streams: Called with no argument whenever the number of open connections changes.
        on_event: Called with every event of the status channel, after :attr:`status` took it.
        stop_grace: Seconds between SIGTERM and SIGKILL in :meth:`stop`.
        launcher: The zygote that forks the child (:mod:`agent.launcher`), or ``None`` to
            spawn it (also when the launcher cannot).
    """

    def __init__(
        self,
        tag: str,
        argv: list[str],
        env: dict[str, str],
        *,
        on_streams: Callable[[], None],
        on_event: Callable[[Event], None] | None = None,
        stop_grace: float = 10.0,
        launcher: Launcher | None = None,
    ) -> None:
        self.tag = tag
        self._argv = argv
        self._env = env
        self._on_streams = on_streams
        self.on_event = on_event
        self._stop_grace = stop_grace
        self._launcher = launcher
        self._process: _Process | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._stop_requested = False
        #: What the child's status channel reported.
        self.status = ChildStatus()

    @property
    def pid(self) -> int | None:
        """The process id once started."""
        return None if self._process is None else self._process.pid

    async def run(self) -> tuple[int, float]:
        """Start the process, read its status channel until it exits; returns (exit code,
        uptime).

        A process that cannot be started counts as exit code 1 (a crash).
        """
        started = time.monotonic()
        read_end, write_end = os.pipe()
        env = {**self._env, ENV_STATUS_FD: str(write_end)}
        try:
            if self._launcher is not None and self._launcher.usable:
                try:
                    self._process = await self._launcher.spawn(self._argv, env, write_end, _STDERR)
                except LauncherError as exc:
                    log.warning(
                        "the launcher cannot start the proxy (%s); starting a new process",
                        exc,
                        extra=tagged(self.tag),
                    )
            if self._process is None:
                self._process = await asyncio.create_subprocess_exec(
                    *self._argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=_STDERR,
                    stderr=None,  # inherited: the child writes its own records
                    env=env,
                    pass_fds=(write_end,),
                    cwd="/",
                )
        except OSError as exc:
            os.close(read_end)
            log.error("cannot start the proxy: %s", exc, extra=tagged(self.tag))
            return ExitCode.INTERNAL, 0.0  # restarted like a crash
        except asyncio.CancelledError:  # a forked child is killed by the launcher
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the child's copy is the only one: its exit ends the pipe
        log.info("started a destination proxy, pid %d", self._process.pid, extra=tagged(self.tag))
        if self._stop_requested:
            self.stop()
        reader = _StatusReader(self)
        pipe = os.fdopen(read_end, "rb", buffering=0)  # the transport closes it
        transport: asyncio.ReadTransport | None = None
        try:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.connect_read_pipe(lambda: reader, pipe)
            code = await self._process.wait()
            # The pipe ends with the child (unless a grandchild holds it: then do not wait).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await reader.done
        finally:
            if transport is None:
                pipe.close()
            else:
                transport.close()
            if self._process.returncode is None:  # cancelled: do not leave it behind
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()
                await self._process.wait()
            if self._kill_timer is not None:
                self._kill_timer.cancel()
        if isinstance(self._process, ForkedProcess) and self._process.code_unknown:
            # The zygote died before it reported the exit: the child's own report tells.
            code = ExitCode.INTERNAL if self.status.exit is None else self.status.exit.code
        if self.status.ended():
            self._on_streams()
        return code, time.monotonic() - started

    def changed(self) -> None:
        """The number of open connections changed."""
        self._on_streams()

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
