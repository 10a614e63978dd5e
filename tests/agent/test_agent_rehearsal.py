"""agent.rehearsal: the zygote's loopback tunnel before its first fork.

Each case runs the rehearsal in a fresh interpreter (it forks, runs an event loop and changes
signal handlers and the environment meanwhile: never inside pytest's process) and checks, from
there, that it ran a real tunnel and left nothing behind that a forked child would inherit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: Generous: a loaded 2-core machine.
WAIT = 120.0

#: Runs the rehearsal and prints, as JSON, its exit code and what changed in the process.
SCRIPT = textwrap.dedent(
    """
    import json, logging, os, signal, sys, time
    from agent.zygote import preload
    import agent.rehearsal as rehearsal

    preload(None)
    {patch}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as the zygote has it
    fds = sorted(os.listdir("/proc/self/fd"))
    env = dict(os.environ)
    started = time.monotonic()
    code = rehearsal.rehearse()
    try:
        os.waitpid(-1, os.WNOHANG)
        children = True
    except ChildProcessError:
        children = False
    print(json.dumps({{
        "code": code,
        "seconds": time.monotonic() - started,
        "fds_same": sorted(os.listdir("/proc/self/fd")) == fds,
        "env_same": dict(os.environ) == env,
        "handlers": len(logging.getLogger().handlers),
        "sigterm_ignored": signal.getsignal(signal.SIGTERM) is signal.SIG_IGN,
        "sigalrm_default": signal.getsignal(signal.SIGALRM) is signal.SIG_DFL,
        "children": children,
        "scratch": os.listdir(os.environ["TMPDIR"]),
    }}))
    """
)

#: A stage that takes the proxy's handshake and then never answers: the timeout's case.
SILENT_STAGE = textwrap.dedent(
    """
    rehearsal.TIMEOUT = 3.0

    async def _silent(ports_w, pair):
        import asyncio
        from websockets.asyncio.server import serve
        from websockets.typing import Subprotocol

        async def hold(ws):
            await asyncio.sleep(3600)

        async with serve(hold, "127.0.0.1", 0, ssl=None,
                         subprotocols=[Subprotocol("aws.iot.securetunneling-3.0")]) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            os.write(ports_w, f"{port} 9\\n".encode())
            os.close(ports_w)
            await asyncio.sleep(3600)

    rehearsal._stage = _silent
    rehearsal._certificate = lambda directory: None
    """
)


def rehearse(tmp_path: Path, *, patch: str = "", path: str | None = None) -> dict[str, object]:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    if path is not None:
        env["PATH"] = path
    script = SCRIPT.format(patch=textwrap.indent(patch, "").strip())
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "the rehearsal must write nothing"
    result: dict[str, object] = json.loads(done.stdout)
    return result


def left_nothing_behind(result: dict[str, object]) -> None:
    assert result["fds_same"], "a descriptor leaked or was closed"
    assert result["env_same"], "the token or status variable stayed in the environment"
    assert result["handlers"] == 0, "the proxy's log handler stayed"
    assert result["sigterm_ignored"], "the zygote's SIGTERM disposition was not restored"
    assert result["sigalrm_default"]
    assert not result["children"], "the stage process was not reaped"
    assert result["scratch"] == [], "the certificate's directory stayed"


def test_the_rehearsal_runs_a_tls_tunnel_and_leaves_nothing_behind(tmp_path: Path) -> None:
    if subprocess.run(["openssl", "version"], capture_output=True, check=False).returncode:
        pytest.skip("no openssl command")
    result = rehearse(tmp_path)
    assert result["code"] == 0
    left_nothing_behind(result)


def test_without_openssl_the_rehearsal_runs_over_plain_websocket(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = rehearse(tmp_path, path=str(empty))
    assert result["code"] == 0
    left_nothing_behind(result)


def test_a_rehearsal_that_hangs_is_stopped_after_its_timeout(tmp_path: Path) -> None:
    result = rehearse(tmp_path, patch=SILENT_STAGE)
    assert result["code"] == 143  # stopped as the agent stops a proxy: SIGTERM
    left_nothing_behind(result)


def test_a_stage_that_dies_at_once_fails_the_rehearsal_quickly(tmp_path: Path) -> None:
    patch = "rehearsal._stage_main = lambda ports_w, pair: os._exit(1)"
    result = rehearse(tmp_path, patch=patch)
    assert result["code"] == 1
    left_nothing_behind(result)


def test_the_zygote_reports_its_rehearsal_when_ready() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    root = Path(__file__).resolve().parents[2]
    with ours:
        zygote = subprocess.Popen(
            [sys.executable, "-m", "agent.zygote", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            cwd=root,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        try:
            ours.settimeout(WAIT)
            ready = json.loads(ours.recv(65536))
        finally:
            ours.close()  # the zygote exits when the agent's end closes
            _, stderr = zygote.communicate(timeout=WAIT)
    assert ready["op"] == "ready"
    assert ready["rehearsal"] == 0
    assert zygote.returncode == 0
    assert stderr == b""
