"""The agent's side of the launcher (:mod:`agent.zygote`): start it, ask it for children,
supervise them, restart it when it dies.

``launcher = fork`` (the default): the agent forks the zygote from itself at start
(:func:`fork_zygote`: before awscrt is imported or any thread runs, so that the zygote, and so
every proxy, shares the interpreter and the modules imported so far with the agent), and asks
it over a socket pair to fork each destination proxy; the
environment (the tokens) travels over the socket, the status pipe and stderr as descriptors.
The zygote answers with the child's pid and a pidfd: the agent waits for the child's exit on the
pidfd and signals it through it (no pid reuse race), and takes its exit code from the zygote's
report (or, when the zygote died meanwhile, from the child's own ``exited`` status event).

When the zygote dies, the next start restarts it, as a new process (``python -m agent.zygote``,
:mod:`subprocess`: the agent runs awscrt's threads by then, and a process with threads must not
fork Python); when it cannot start (or dies too often), the agent starts its proxies as new
processes (``launcher = spawn``), as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from agent.zygote import MAX_MESSAGE

__all__ = [
    "ForkedProcess",
    "Launcher",
    "LauncherError",
    "Preforked",
    "fork_zygote",
    "zygote_environment",
]

log = logging.getLogger("agent.launcher")

#: Seconds the zygote may take to import the proxy and say it is ready.
READY_TIMEOUT = 30.0
#: Seconds to wait for the zygote's exit report of a child whose pidfd says it exited.
EXIT_REPORT_TIMEOUT = 5.0
#: More restarts than this within RESTART_WINDOW seconds: give up, spawn instead.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Where the ``agent`` and ``proxy`` packages live; the zygote runs the same ones.
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class LauncherError(Exception):
    """The zygote cannot start a child now; the text says why (never a token)."""


class _Died(LauncherError):
    """The zygote died before it answered: a restarted one may."""


def zygote_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The zygote's own environment: ``base`` without the agent's, the tunnels' and proxy
    variables (each child gets its whole environment with its request)."""
    env = {
        name: value
        for name, value in base.items()
        if not name.startswith(("IOTUNNEL_", "AWSIOT_TUNNEL_", "NOTIFY_", "WATCHDOG_"))
        and not name.lower().endswith("_proxy")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_ROOT, base.get("PYTHONPATH")]))
    return env


def _zygote_argv(fd: int, tunnel_ca: str | None) -> list[str]:
    """:func:`agent.zygote.main`'s arguments."""
    return [str(fd)] if tunnel_ca is None else [str(fd), tunnel_ca]


class _Closable(Protocol):
    def close(self) -> None: ...


class _ZygoteProcess(Protocol):
    """What the launcher needs of the zygote's process (of :class:`subprocess.Popen`)."""

    @property
    def pid(self) -> int: ...
    def kill(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


class _ForkedZygote:
    """A zygote forked from the agent (:func:`fork_zygote`), as :class:`_ZygoteProcess`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Reap it (call :meth:`kill` first: this blocks until it exits)."""
        del timeout  # after SIGKILL the wait is short
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped already
            return 0
        return os.waitstatus_to_exitcode(status)


@dataclass
class Preforked:
    """A zygote forked from the agent (:func:`fork_zygote`), until :class:`Launcher` adopts it."""

    process: _ForkedZygote
    sock: socket.socket
    #: Set when a :class:`Launcher` took it over (and with it, stopping and reaping it).
    adopted: bool = False

    def discard(self) -> None:
        """Stop and reap the zygote, unless a launcher adopted it (the agent stopped before
        it started its launcher, or never started)."""
        if self.adopted:
            return
        self.adopted = True
        self.sock.close()
        self.process.kill()
        self.process.wait()


def fork_zygote(
    base_env: Mapping[str, str], tunnel_ca: Path | None, *, close: tuple[_Closable, ...] = ()
) -> Preforked | None:
    """Fork the zygote from this process now, for :class:`Launcher` to adopt.

    Call it early, before awscrt is imported: only a process with one thread may fork and
    go on running Python in the child, so this forks only when this process has no other thread
    (None otherwise, or when the fork fails: the launcher then starts the zygote as a new
    process). The zygote shares every page imported until now with the agent, as the proxies
    share the zygote's; asyncio and ssl, which both need, are imported first for that. ``close``
    is what the zygote must not hold (the systemd notification socket).
    """
    try:
        if len(os.listdir("/proc/self/task")) != 1:
            return None
    except OSError:  # no /proc: no way to know
        return None
    import selectors  # noqa: F401 - imported here to be shared with the zygote
    import ssl  # noqa: F401

    ca = None if tunnel_ca is None else str(tunnel_ca.absolute())
    env = zygote_environment(base_env)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return None
    if pid == 0:
        ours.close()
        _become_zygote(theirs.detach(), ca, env, close)
    theirs.close()
    return Preforked(_ForkedZygote(pid), ours)


def _become_zygote(
    fd: int, ca: str | None, env: dict[str, str], close: tuple[_Closable, ...]
) -> NoReturn:
    """In the process :func:`fork_zygote` forked: run :func:`agent.zygote.main`; never returns."""
    code = 1
    try:
        for thing in close:
            thing.close()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir("/")
        os.environ.clear()
        os.environ.update(env)
        from agent.zygote import main

        code = main(_zygote_argv(fd, ca))
    except BaseException:  # the agent sees the socket close; there is nothing to log to
        code = 1
    finally:
        os._exit(code)


class ForkedProcess:
    """A child the zygote forked: what :class:`agent.proxy_runner.ProxyChild` needs of a
    process (the interface of :class:`asyncio.subprocess.Process` it uses)."""

    def __init__(self, pid: int, pidfd: int, code: asyncio.Future[int | None]) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._code = code
        self.returncode: int | None = None
        #: True when the zygote died before it could report the exit code.
        self.code_unknown = False

    async def wait(self) -> int:
        """Until the child exits; its exit code (1 when unknown, see :attr:`code_unknown`)."""
        if self.returncode is not None:
            return self.returncode
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()

        def exited() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(self._pidfd, exited)
        try:
            await gone
        finally:
            loop.remove_reader(self._pidfd)
        code: int | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_REPORT_TIMEOUT):
                code = await asyncio.shield(self._code)
        self.code_unknown = code is None
        self.returncode = 1 if code is None else code
        os.close(self._pidfd)
        self._pidfd = -1
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None or self._pidfd < 0:
            return
        signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """The zygote process and the agent's end of its socket.

    Args:
        base_env: The agent's environment (the zygote's own is made from it).
        tunnel_ca: The agent's ``tunnel_ca``, whose TLS context the zygote prepares.
    """

    def __init__(
        self,
        base_env: Mapping[str, str],
        tunnel_ca: Path | None,
        preforked: Preforked | None = None,
    ) -> None:
        self._env = zygote_environment(base_env)
        self._ca = None if tunnel_ca is None else str(tunnel_ca.absolute())
        self._preforked = preforked
        self._process: _ZygoteProcess | None = None
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[tuple[int, int, asyncio.Future[int | None]]]] = {}
        self._codes: dict[int, asyncio.Future[int | None]] = {}
        self._next_id = 0
        self._restarts: list[float] = []
        #: False once the agent gave up on the zygote: children are spawned instead.
        self.usable = True
        self._closing = False

    @property
    def pid(self) -> int | None:
        """The running zygote's pid."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the zygote process (it imports the proxy meanwhile; :meth:`spawn` waits): the
        first time, adopt the one forked at the agent's start, if there is one."""
        if self._preforked is not None and not self._preforked.adopted:
            preforked, self._preforked = self._preforked, None
            preforked.adopted = True
            self._adopt(preforked.process, preforked.sock)
            log.debug(
                "started the launcher (zygote), pid %d, forked from the agent",
                preforked.process.pid,
            )
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "agent.zygote", *_zygote_argv(theirs.fileno(), self._ca)]
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                env=self._env,
                pass_fds=(theirs.fileno(),),
                cwd="/",
            )
        except OSError as exc:
            ours.close()
            self._give_up(f"cannot start it: {exc.strerror or exc}")
            return
        finally:
            theirs.close()
        self._adopt(process, ours)
        log.debug("started the launcher (zygote), pid %d", process.pid)

    def _adopt(self, process: _ZygoteProcess, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._process = process
        self._sock = sock
        self._ready = None

    def _attach(self) -> asyncio.Future[None]:
        """Read the socket in the running loop; the future of the zygote's readiness."""
        if self._ready is None:
            assert self._sock is not None
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            loop.add_reader(self._sock.fileno(), self._readable)
        return self._ready

    def _give_up(self, problem: str) -> None:
        if self.usable:
            log.warning(
                "the launcher (zygote) %s; starting each proxy as a new process instead", problem
            )
        self.usable = False

    async def spawn(
        self, argv: list[str], env: Mapping[str, str], status_fd: int, stderr_fd: int
    ) -> ForkedProcess:
        """Have the zygote fork ``argv`` (``python -m proxy ...``) with ``env``.

        Raises:
            LauncherError: The zygote is not usable or cannot fork now.
        """
        for _ in range(2):
            try:
                return await self._spawn(argv, env, status_fd, stderr_fd)
            except _Died:
                continue
        raise LauncherError("died twice in a row")

    async def _spawn(
        self, argv: list[str], env: Mapping[str, str], status_fd: int, stderr_fd: int
    ) -> ForkedProcess:
        if not self.usable:
            raise LauncherError("not usable")
        if self._sock is None:
            self._restart()
            if self._sock is None:
                raise LauncherError("cannot be restarted")
        ready = self._attach()
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await asyncio.shield(ready)
        except TimeoutError:
            self._died("did not get ready in time")
            raise LauncherError("not ready in time") from None
        sock = self._sock
        if sock is None or ready.exception() is not None:
            raise _Died("died")
        self._next_id += 1
        request_id = self._next_id
        data = json.dumps({"op": "fork", "id": request_id, "argv": argv, "env": dict(env)})
        answer: asyncio.Future[tuple[int, int, asyncio.Future[int | None]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = answer
        try:
            socket.send_fds(sock, [data.encode()], [status_fd, stderr_fd])
        except OSError as exc:
            self._pending.pop(request_id, None)
            if isinstance(exc, BlockingIOError):
                raise LauncherError("busy") from None
            self._died("exited")
            raise _Died("exited") from None
        try:
            pid, pidfd, code = await asyncio.shield(answer)
        except asyncio.CancelledError:
            answer.add_done_callback(_kill_late)
            raise
        return ForkedProcess(pid, pidfd, code)

    def _readable(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._died("exited")
                return
            try:
                self._message(json.loads(data), fds)
            except (ValueError, KeyError, TypeError):
                for fd in fds:
                    os.close(fd)
                self._died("sent a malformed message")
                return

    def _message(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message["op"]
        if op == "ready":
            rehearsal = message.get("rehearsal")
            if rehearsal != 0:  # the zygote works without it, with more memory per child
                log.debug("the launcher's rehearsal tunnel failed (exit code %s)", rehearsal)
            assert self._ready is not None
            if not self._ready.done():
                self._ready.set_result(None)
        elif op == "started":
            pid = int(message["pid"])
            code: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
            self._codes[pid] = code
            answer = self._pending.pop(message["id"], None)
            if answer is not None and not answer.done():
                answer.set_result((pid, fds[0], code))
            else:
                os.close(fds[0])
        elif op == "failed":
            answer = self._pending.pop(message["id"], None)
            if answer is not None and not answer.done():
                answer.set_exception(LauncherError(str(message.get("error"))))
        elif op == "exited":
            reported = self._codes.pop(int(message["pid"]), None)
            if reported is not None and not reported.done():
                reported.set_result(int(message["code"]))
        else:
            raise ValueError(op)

    def _died(self, how: str) -> None:
        """The zygote is gone (or useless): forget it; running children go on."""
        sock, process = self._sock, self._process
        self._sock = None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(_Died(how))
            self._ready.exception()  # retrieved: nobody may be waiting
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(_Died(how))
        self._pending.clear()
        for code in self._codes.values():  # their exit codes come from their status events
            if not code.done():
                code.set_result(None)
        self._codes.clear()
        if not self._closing:
            log.warning("the launcher (zygote) %s; it is restarted for the next proxy", how)

    def _restart(self) -> None:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
        if len(self._restarts) >= MAX_RESTARTS:
            self._give_up(f"died {MAX_RESTARTS} times within {RESTART_WINDOW:.0f} s")
            return
        self._restarts.append(now)
        self.start()

    def close(self) -> None:
        """Close the socket: the zygote exits (its children, stopped before, are gone)."""
        self._closing = True
        if self._preforked is not None:
            self._preforked.discard()
            self._preforked = None
        if self._sock is not None or self._process is not None:
            self._died("closed")
        self._process = None


def _kill_late(answer: asyncio.Future[tuple[int, int, asyncio.Future[int | None]]]) -> None:
    """A start whose caller went away meanwhile: the child must not run unsupervised."""
    if answer.cancelled() or answer.exception() is not None:
        return
    _pid, pidfd, _code = answer.result()
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.close(pidfd)
