"""The proxy's link against a tunnel service that misbehaves (tests/hostile_service.py).

Each test runs real proxy processes, in both roles, against a hostile WebSocket server and
checks that the proxy stays up (reconnecting with backoff) or exits with its documented code
and one line, never a traceback, and never repeats a token.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_service import Behaviour, HostileService, Listener

from iotunnel.exits import ExitCode
from testbed.harness import Proc, Stack, Tunnel
from testbed.pki import PKI

ROLES = ("src", "dst")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path / "run") as s:
        yield s


def start_proxy(
    stack: Stack,
    role: str,
    url: str,
    token: str,
    *,
    extra: tuple[str, ...] = (),
    name: str = "proxy",
) -> Proc:
    mapping = ["-s", "SSH1=0"] if role == "src" else ["-d", "SSH1=22"]
    argv = [stack.python, "-m", "proxy", "-m", role, "-e", url, "-v", "5", *mapping, *extra]
    return stack.start(f"{name}-{role}", argv, env={"AWSIOT_TUNNEL_ACCESS_TOKEN": token})


def token() -> str:
    return "AQGA" + secrets.token_urlsafe(40)


def assert_clean(proc: Proc, *secret: str) -> str:
    """No traceback, no secret in the output; returns the output."""
    output = proc.output()
    assert "Traceback" not in output, output[-3000:]
    for value in secret:
        assert value not in output, f"{proc.name} printed a token"
    return output


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " ERROR " in line or "error:" in line]


# --------------------------------------------------------------------------- reconnect storm


@pytest.mark.parametrize(
    ("behaviour", "role"), [(Behaviour.CLOSE_1011, "src"), (Behaviour.DROP, "dst")]
)
def test_accept_then_drop_is_no_reconnect_storm(
    stack: Stack, behaviour: Behaviour, role: str
) -> None:
    """A service that accepts every WebSocket and drops it at once: a few reconnects in 10 s.

    Before the fix a successful handshake reset the backoff and the proxy reconnected at
    once, thousands of times in 10 s. The bound is generous: the backoff allows 5.
    """
    secret = token()
    with HostileService(behaviour) as hostile:
        proc = start_proxy(stack, role, hostile.url, secret)
        hostile.wait_for_connections(1)
        window_end = time.monotonic() + 10
        hostile.wait_for_connections(2)  # it does reconnect
        time.sleep(max(0.0, window_end - time.monotonic()))  # the observation window
        seen = hostile.connections
        assert proc.popen.poll() is None, "the proxy gave up"
    assert 2 <= seen <= 8, f"{seen} connections in 10 s"
    output = assert_clean(proc, secret)
    cause = "closed by the service: 1011 internal error" if role == "src" else "dropped without"
    assert re.search(
        rf"lost the connection to the tunnel service after [0-9.]+ s \({cause}[^)]*\); "
        "reconnecting in",
        output,
    )


def test_reconnect_attempts_counts_connections_that_drop_at_once(stack: Stack) -> None:
    """iotunnel.reconnect_attempts still ends the run: a dropped connection is a failed try."""
    settings = stack.workdir / "settings.json"
    settings.write_text('{"iotunnel.reconnect_attempts": 2, "iotunnel.reconnect_base": 0.05}')
    secret = token()
    with HostileService(Behaviour.CLOSE_1011) as hostile:
        proc = start_proxy(
            stack, "dst", hostile.url, secret, extra=("--settings-json", str(settings))
        )
        assert proc.wait(60) == ExitCode.NETWORK
        assert hostile.connections == 3
    output = assert_clean(proc, secret)
    assert "giving up after 3 attempts" in output


# --------------------------------------------------------------------------- misbehaving peers


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("behaviour", "said"),
    [
        (Behaviour.GARBAGE, "(closed by this proxy: 1002 invalid tunnel frame); reconnecting in"),
        (Behaviour.OVERSIZED, "(closed by this proxy: 1009 "),
        (Behaviour.TEXT, "(closed by this proxy: 1003 binary messages only); reconnecting in"),
        (Behaviour.NOT_HTTP, "did not receive a valid HTTP response; retrying in"),
    ],
    ids=lambda b: b.value if isinstance(b, Behaviour) else "",
)
def test_misbehaving_service_makes_the_proxy_reconnect(
    stack: Stack, behaviour: Behaviour, said: str, role: str
) -> None:
    secret = token()
    with HostileService(behaviour) as hostile:
        proc = start_proxy(stack, role, hostile.url, secret)
        hostile.wait_for_connections(2)
        assert proc.popen.poll() is None
    output = assert_clean(proc, secret)
    assert said in output
    assert not error_lines(output) or behaviour is Behaviour.TEXT


@pytest.mark.parametrize("role", ROLES)
def test_unknown_message_type_is_dropped_and_the_link_stays(stack: Stack, role: str) -> None:
    secret = token()
    with HostileService(Behaviour.UNKNOWN_TYPE) as hostile:
        proc = start_proxy(stack, role, hostile.url, secret)
        proc.wait_for("unknown message type 99 \\(not ignorable\\) dropped")
        assert hostile.connections == 1
        assert proc.popen.poll() is None
    assert_clean(proc, secret)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("role", ROLES)
def test_refusal_reason_from_the_body_is_shown_sanitised(stack: Stack, role: str) -> None:
    secret = token()
    body = f"invalid access token {secret}\x1b[31m\x00 " + "long " * 200
    with HostileService(Behaviour.REFUSE, status=403, body=body.encode()) as hostile:
        proc = start_proxy(stack, role, hostile.url, secret)
        assert proc.wait(30) == ExitCode.REFUSED
    output = assert_clean(proc, secret)
    [line] = error_lines(output)
    assert "refused the connection: HTTP 403 (invalid access token [secure] [31m long" in line
    assert "\x1b" not in line
    assert "\x00" not in line
    assert "..." in line  # bounded
    assert "the access token is wrong, used or revoked: rotate it" in line
    assert "aws iotsecuretunneling rotate-tunnel-access-token" in line


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (401, "the access token is wrong, used or revoked"),
        (403, "the access token is wrong, used or revoked"),
        (410, "the tunnel is closed or has expired: open a new tunnel"),
        (404, "no tunnel endpoint at this address: check -e or -r"),
        (400, "check the endpoint (-e/-r), the mode (-m) and the access token"),
    ],
)
def test_refusal_without_a_body_is_explained_by_its_status(
    stack: Stack, status: int, hint: str
) -> None:
    """AWS's service may answer with a status alone."""
    secret = token()
    with HostileService(Behaviour.REFUSE, status=status) as hostile:
        proc = start_proxy(stack, "dst", hostile.url, secret)
        assert proc.wait(30) == ExitCode.REFUSED
    [line] = error_lines(assert_clean(proc, secret))
    assert f"refused the connection: HTTP {status} (" in line
    assert hint in line


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_not_followed(stack: Stack, role: str, status: int) -> None:
    """A redirect would carry the access token to another address: it is a refusal (exit 3)."""
    secret = token()
    with Listener() as elsewhere:
        target = f"ws://127.0.0.1:{elsewhere.port}/tunnel?local-proxy-mode=source"
        with HostileService(
            Behaviour.REDIRECT, redirect_to=target, redirect_status=status
        ) as hostile:
            proc = start_proxy(stack, role, hostile.url, secret)
            assert proc.wait(30) == ExitCode.REFUSED
            assert hostile.requests[0].header("access-token") == secret  # it was sent there
        assert elsewhere.connections == 0
        assert secret.encode() not in elsewhere.received
    [line] = error_lines(assert_clean(proc, secret))
    assert (
        f"the tunnel service answered with a redirect to 127.0.0.1 (HTTP {status}); "
        "not following it" in line
    )


# --------------------------------------------------------------------------- -c and -k


def test_unloadable_ca_is_a_config_error_before_any_connect(stack: Stack) -> None:
    (stack.workdir / "ca.pem").write_text("not a certificate\n")
    secret = token()
    with Listener() as service:
        url = f"wss://127.0.0.1:{service.port}"
        proc = start_proxy(stack, "dst", url, secret, extra=("-c", "ca.pem"))
        assert proc.wait(30) == ExitCode.CONFIG
        assert service.connections == 0
    output = assert_clean(proc, secret)
    assert output.strip().splitlines() == [
        "iotunnel-proxy: error: -c: 'ca.pem': not a PEM CA certificate"
    ]


@pytest.mark.parametrize("role", ROLES)
def test_k_connects_to_an_untrusted_service_and_warns_once(
    stack: Stack, pki: PKI, role: str
) -> None:
    """-k as in the reference: no verification at all (the test CA is not given with -c)."""
    secret = token()
    with HostileService(Behaviour.CLOSE_1011, ssl_context=pki.server_context()) as hostile:
        proc = start_proxy(stack, role, hostile.url, secret, extra=("-k",))
        hostile.wait_for_connections(3)
        assert proc.popen.poll() is None
    output = assert_clean(proc, secret)
    assert output.count("TLS certificate verification is OFF (-k)") == 1
    assert "TLS verification of the service failed" not in output


def test_untrusted_service_without_k_keeps_retrying_with_a_clear_line(
    stack: Stack, pki: PKI
) -> None:
    secret = token()
    with HostileService(Behaviour.CLOSE_1011, ssl_context=pki.server_context()) as hostile:
        proc = start_proxy(stack, "dst", hostile.url, secret)
        proc.wait_for("retrying in .*\n(?s:.*)retrying in")
        assert proc.popen.poll() is None
        assert hostile.connections == 0
    output = assert_clean(proc, secret)
    assert "TLS verification of the service failed: " in output
    assert "give it with -c" in output


# --------------------------------------------------------------------------- a healthy tunnel


def echo_roundtrips(port: int, count: int) -> int:
    done = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for i in range(count):
            payload = f"ping {i}\n".encode()
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(4096)
                assert chunk, "echo connection closed"
                got += chunk
            assert got == payload
            done += 1
    return done


def test_a_healthy_tunnel_carries_traffic_while_proxies_are_attacked(
    stack: Stack, pki: PKI
) -> None:
    tunnel = Tunnel("healthy", ("SSH1",))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    stack.destination(tunnel.destination_token, port, f"SSH1={echo_port}", ca=pki.ca.cert)
    source = stack.source(tunnel.source_token, port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
    secret = token()
    behaviours = (Behaviour.GARBAGE, Behaviour.DROP, Behaviour.OVERSIZED, Behaviour.TEXT)
    hostiles = [HostileService(b).start() for b in behaviours]
    try:
        attacked = [
            start_proxy(stack, role, h.url, secret, name=f"attacked-{h.behaviour.value}")
            for h in hostiles
            for role in ROLES
        ]
        for hostile in hostiles:
            hostile.wait_for_connections(4)  # both proxies connected and reconnected
            assert echo_roundtrips(source.ports["SSH1"], 20) == 20
        for proc in attacked:
            assert proc.popen.poll() is None
            assert_clean(proc, secret)
    finally:
        for hostile in hostiles:
            hostile.close()
    assert echo_roundtrips(source.ports["SSH1"], 5) == 5
