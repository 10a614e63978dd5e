"""The command line as the reference reads it: the same arguments, the same meaning.

Both implementations are run with the same arguments against an endpoint where nothing
listens: a command line they accept keeps them retrying; one they refuse ends them at once.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LocalProxy

#: Seconds a proxy that accepted its command line keeps running here (it retries the endpoint).
ACCEPTED_AFTER = 3.0


def _dead_port() -> int:
    """A port that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(implementation: str, localproxy: LocalProxy) -> list[str]:
    if implementation == "reference":
        return [str(localproxy.binary)]
    return [sys.executable, "-m", "proxy"]


def _accepts(command: list[str], args: list[str], cwd: Path) -> tuple[bool, str]:
    """Whether the proxy is still running after :data:`ACCEPTED_AFTER`, and what it printed
    when it was not."""
    proc = subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        proc.wait(timeout=ACCEPTED_AFTER)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return True, ""
    output, _ = proc.communicate()
    return False, output


@pytest.mark.parametrize("implementation", ["reference", "ours"])
def test_a_token_that_starts_with_a_dash_is_taken_by_both(
    localproxy: LocalProxy, tmp_path: Path, implementation: str
) -> None:
    token = "-Qx" + secrets.token_urlsafe(32)
    args = ["-t", token, "-e", f"127.0.0.1:{_dead_port()}", "-d", "22"]
    accepted, output = _accepts(_command(implementation, localproxy), args, tmp_path)
    assert accepted, output


@pytest.mark.parametrize("implementation", ["reference", "ours"])
def test_a_flag_after_t_leaves_t_without_a_value_for_both(
    localproxy: LocalProxy, tmp_path: Path, implementation: str
) -> None:
    args = ["-e", f"127.0.0.1:{_dead_port()}", "-t", "-d", "22"]
    accepted, output = _accepts(_command(implementation, localproxy), args, tmp_path)
    assert not accepted
    assert "access-token" in output
