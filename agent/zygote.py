"""The launcher (zygote): one process that imports the destination proxy once and forks a child
per tunnel, so that the tunnels share the interpreter's pages (copy-on-write) instead of each
paying a whole one.

``python -m agent.zygote FD [CA]``: ``FD`` is its end of a ``SOCK_SEQPACKET`` socket pair with
the agent; ``CA`` the agent's ``tunnel_ca``, whose TLS context it builds once for every child.
The agent forks it from itself at start, before it imports awscrt or runs a thread
(:func:`agent.launcher.fork_zygote`), and calls :func:`main`; to restart it, it starts
``python -m agent.zygote`` with :mod:`subprocess` (awscrt's threads run by then, and this
process never imports awscrt). Its name (``comm``, what ``ps -e`` and ``top`` show) is
``iotunnel-zygote``, its children's ``iotunnel-proxy``. It imports everything the proxy needs, runs
one rehearsal tunnel on loopback (:mod:`agent.rehearsal`: what a child would write to on its
way up, it writes to once here), freezes the garbage collector (so that collections in the
children do not touch, and so copy, the shared objects), tells the agent it is ready (with the
rehearsal's exit code), then serves, one JSON message at a time:

- ``{"op": "fork", "id": N, "argv": [...], "env": {...}}`` with two descriptors, the status
  pipe's write end and the child's stderr: it forks a child that makes ``env`` its environment
  (the tokens travel here, never on a command line), points ``IOTUNNEL_STATUS_FD`` at the pipe,
  and runs ``python -m proxy`` with ``argv[3:]`` as that would; it answers
  ``{"op": "started", "id": N, "pid": P}`` with a pidfd of the child (race-free: the child
  cannot be reaped before), or ``{"op": "failed", "id": N, "error": "..."}``.
- whenever a child exits it reaps it and reports ``{"op": "exited", "pid": P, "code": C}``
  (``C`` negative for a signal, as :mod:`subprocess` has it).

It ignores SIGINT and SIGTERM (the agent stops the children, then closes the socket) and exits
when the agent's end closes. It writes no log lines: the agent reports its failures.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import sys
import traceback
from typing import Any, NoReturn

#: The largest message either side sends (an environment of a few kilobytes in practice).
MAX_MESSAGE = 1 << 20
#: prctl(2): set the calling thread's name.
_PR_SET_NAME = 15
#: ``python -m proxy`` as the agent's child command line has it.
PROXY_MODULE = ["-m", "proxy"]


def preload(ca_path: str | None) -> None:
    """Import what a destination proxy runs, and build its TLS context once."""
    import asyncio  # noqa: F401
    import ssl  # noqa: F401

    import google.protobuf  # noqa: F401
    import websockets  # noqa: F401

    import proxy.__main__  # the child names its argv[0] after it
    import proxy.cli
    import proxy.io.tunnel
    import proxy.runner  # noqa: F401
    from proxy.tls import prebuild

    # A CA that does not load now: the child builds the context itself and reports it.
    with contextlib.suppress(Exception):
        prebuild(ca_path, verify=True)


def _rehearse() -> int:
    """The rehearsal (:mod:`agent.rehearsal`), then the heap's free pages returned (its
    buffers, freed as its connections closed); its exit code (-1: it raised).

    Its cyclic garbage is not collected: as for the imports (below), a collection leaves
    holes in pages the children share, which their allocations then fill, and so copy.
    Measured with 16 tunnels (bench's agent scale): 180 MiB without a collection, 184 with."""
    from agent.rehearsal import rehearse
    from proxy.io.memory import trim_heap

    try:
        code = rehearse()
    except Exception:  # a failed rehearsal costs memory, never a tunnel
        code = -1
    trim_heap()
    return code


def set_name(name: bytes) -> None:
    """This process's name as ``ps -e`` and ``top`` show it (Linux ``comm``, 15 bytes)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or not argv[0].isdigit():
        sys.stderr.write("usage: python -m agent.zygote FD [CA]\n")
        return 2
    sock = socket.socket(fileno=int(argv[0]))
    set_name(b"iotunnel-zygote")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # As the gc module's documentation advises for fork without exec: no collection here (it
    # would leave freed holes in the pages the children share, which their allocations would
    # then fill, and so copy), everything frozen, collections enabled again in each child.
    try:  # no pidfds (Linux < 5.3, a seccomp filter): the agent spawns its proxies instead
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return 3
    gc.disable()
    ca_path = argv[1] if len(argv) == 2 else None
    preload(ca_path)
    rehearsal = _rehearse()
    gc.freeze()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    send(sock, {"op": "ready", "pid": os.getpid(), "rehearsal": rehearsal})
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
                except (ConnectionError, OSError):
                    data, fds = b"", []
                if not data:  # the agent is gone
                    return 0
                _serve(sock, data, fds, (sock.fileno(), wake_r, wake_w, selector))
            else:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
        _reap(sock)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            send(sock, {"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def _serve(sock: socket.socket, data: bytes, fds: list[int], closing: tuple[Any, ...]) -> None:
    request_id: object = None
    try:
        request = json.loads(data)
        request_id = request["id"]
        argv, env = request["argv"], request["env"]
        if request["op"] != "fork" or len(fds) != 2 or argv[1:3] != PROXY_MODULE:
            raise ValueError("a malformed request")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("a malformed environment")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child([str(a) for a in argv[3:]], env, fds[0], fds[1], closing)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)  # the agent could not supervise it: it must not run
            raise
        try:
            send(sock, {"op": "started", "id": request_id, "pid": pid}, [pidfd])
        except OSError:
            os.kill(pid, signal.SIGKILL)
            raise
        finally:
            os.close(pidfd)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        with contextlib.suppress(OSError):
            send(sock, {"op": "failed", "id": request_id, "error": problem[:200]})
    finally:
        for fd in fds:
            os.close(fd)


def _child(
    args: list[str], env: dict[str, str], status_fd: int, err_fd: int, closing: tuple[Any, ...]
) -> NoReturn:
    """In the forked child: become ``python -m proxy ARGS`` with ``env``; never returns."""
    code: int = 1
    try:
        gc.enable()
        set_name(b"iotunnel-proxy")
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sock_fd, wake_r, wake_w, selector = closing
        selector.close()
        for fd in (sock_fd, wake_r, wake_w):
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(err_fd, 1)
        os.dup2(err_fd, 2)
        os.close(err_fd)
        os.chdir("/")
        from iotunnel.status import ENV_STATUS_FD

        env[ENV_STATUS_FD] = str(status_fd)
        os.environ.clear()
        os.environ.update(env)
        import proxy.__main__ as entry
        from proxy.cli import main as proxy_main

        sys.argv = [entry.__file__ or "proxy", *args]
        code = proxy_main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
