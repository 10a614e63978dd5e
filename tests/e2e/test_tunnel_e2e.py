"""End to end: the service over TLS, a destination and a source proxy as real processes, real
HTTP and echo servers behind them and real clients in front, all on loopback.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed.clients import echo_roundtrips, echo_transfer, http_get, recv_exactly, wait_closed
from testbed.harness import Stack, Tunnel, free_port, peak_rss_kib

MiB = 1 << 20


def test_http_and_interactive_stream_at_the_same_time(two_services, www: Path) -> None:
    index = (www / "index.html").read_bytes()
    errors: list[BaseException] = []

    def browse() -> None:
        try:
            for _ in range(30):
                assert http_get(two_services.http, "/index.html") == (200, index)
        except BaseException as exc:
            errors.append(exc)

    browser = threading.Thread(target=browse)
    browser.start()
    assert echo_roundtrips(two_services.ssh, 300) == 300
    browser.join(60)
    assert not browser.is_alive()
    assert not errors, errors


def test_hundred_simultaneous_http_connections(two_services, www: Path) -> None:
    blob = (www / "blob.bin").read_bytes()
    barrier = threading.Barrier(100)

    def fetch(_: int) -> tuple[int, bytes]:
        barrier.wait(30)
        return http_get(two_services.http, "/blob.bin")

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(fetch, range(100)))
    assert all(status == 200 for status, _ in results)
    assert all(body == blob for _, body in results)


def test_256_mib_both_ways_with_matching_sha256(two_services) -> None:
    sent, received = echo_transfer(two_services.ssh, 256 * MiB, timeout=300)
    assert sent == received


def test_small_and_large_writes_mixed_keep_their_order(two_services) -> None:
    """A small read on an idle tunnel is sent at once, past the scheduler; a large one is
    queued. Writes of both kinds, back to back and with pauses, on two connections at once,
    come back whole and in order (a small write sent at once must never overtake queued data)."""
    rng = random.Random(15)
    plans = [
        [(rng.choice((1, 64, 4096, 4097, 65536, 300_000)), rng.random() < 0.2) for _ in range(300)]
        for _ in range(2)
    ]
    failures: list[BaseException] = []

    def converse(plan: list[tuple[int, bool]], seed: int) -> None:
        try:
            data = random.Random(seed).randbytes(sum(size for size, _ in plan))
            with socket.create_connection(("127.0.0.1", two_services.ssh), timeout=60) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                got: list[bytes] = []
                reader = threading.Thread(target=lambda: got.append(recv_exactly(sock, len(data))))
                reader.start()
                offset = 0
                for size, pause in plan:
                    sock.sendall(data[offset : offset + size])
                    offset += size
                    if pause:
                        time.sleep(0.002)  # let the tunnel go idle: the next small write is direct
                reader.join(120)
                assert not reader.is_alive()
                assert got == [data]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=converse, args=(plan, i)) for i, plan in enumerate(plans)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not failures, failures


def test_thousand_connections_on_one_tunnel(two_services) -> None:
    socks = []
    try:
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", two_services.ssh), timeout=30)
            socks.append(sock)
        for i, sock in enumerate(socks):
            sock.sendall(i.to_bytes(4, "big"))
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, 4) == i.to_bytes(4, "big")
    finally:
        for sock in socks:
            sock.close()
    assert echo_roundtrips(two_services.ssh, 5) == 5


def test_unreachable_destination_resets_only_that_connection(stack: Stack, pki, www) -> None:
    tunnel = Tunnel("down", ("HTTP1", "SSH1"))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, http_port = stack.http_server(www)
    dead = free_port()
    dst = stack.destination(
        tunnel.destination_token, port, f"HTTP1={http_port},SSH1={dead}", ca=pki.ca.cert
    )
    src = stack.source(
        tunnel.source_token, port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=pki.ca.cert
    )
    # A long-lived (keep-alive) HTTP connection is open while the SSH1 connect fails.
    keep = http.client.HTTPConnection("127.0.0.1", src.ports["HTTP1"], timeout=20)
    try:
        keep.request("GET", "/index.html")
        assert keep.getresponse().read() == (www / "index.html").read_bytes()
        with socket.create_connection(("127.0.0.1", src.ports["SSH1"]), timeout=20) as ssh:
            ssh.sendall(b"hello?")
            assert wait_closed(ssh) == b""
        dst.wait_for("cannot connect to")
        keep.request("GET", "/blob.bin")
        assert keep.getresponse().read() == (www / "blob.bin").read_bytes()
    finally:
        keep.close()
    assert http_get(src.ports["HTTP1"], "/index.html")[0] == 200


def test_service_restart_both_proxies_reconnect(stack: Stack, pki) -> None:
    tunnel = Tunnel("restart", ("SSH1",))
    service, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    dst = stack.destination(tunnel.destination_token, port, f"SSH1={echo_port}", ca=pki.ca.cert)
    src = stack.source(tunnel.source_token, port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
    assert echo_roundtrips(src.ports["SSH1"], 3) == 3

    service.stop(signal.SIGKILL)
    stack.service(
        [tunnel], cert=pki.server.cert, key=pki.server.key, port=port, name="service-again"
    )
    for proc in (dst, src.proc):
        proc.wait_for(r"(?s)connected to the tunnel service.*connected to the tunnel service", 60)
    src.proc.wait_for(r"(?s)reconnecting.*the tunnel carries services", 60)
    assert echo_roundtrips(src.ports["SSH1"], 3) == 3


def test_service_closing_the_tunnel_makes_both_exit_0(
    stack: Stack, pki, threaded_service_factory
) -> None:
    tunnel = Tunnel("closing", ("SSH1",))
    service = threaded_service_factory([tunnel])
    _, echo_port = stack.echo_server()
    dst = stack.destination(
        tunnel.destination_token, service.port, f"SSH1={echo_port}", ca=pki.ca.cert
    )
    src = stack.source(tunnel.source_token, service.port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
    assert echo_roundtrips(src.ports["SSH1"], 2) == 2
    service.call(service.service.close_tunnel("closing"))
    assert dst.wait(30) == 0
    assert src.proc.wait(30) == 0
    assert "closed the tunnel" in dst.output()


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_older_sources_talk_to_our_destination(stack: Stack, pki, version: str) -> None:
    tunnel = Tunnel(f"old-{version}", ("SSH1",))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    stack.destination(tunnel.destination_token, port, f"SSH1={echo_port}", ca=pki.ca.cert)
    mapping = "0" if version == "V1" else "SSH1=0"
    expect = "SSH1"  # the service announces it; a V1 source still sends no service id
    src = stack.source(
        tunnel.source_token, port, mapping, [expect], ca=pki.ca.cert, extra=["-y", version]
    )
    assert echo_roundtrips(src.ports[expect], 20) == 20
    # V1 and V2 carry one connection per service: a new one replaces the old.
    assert echo_roundtrips(src.ports[expect], 5) == 5


def test_service_without_a_destination_mapping_exits_2(stack: Stack, pki) -> None:
    tunnel = Tunnel("unmapped", ("HTTP1", "SSH1"))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    argv = stack.proxy_argv("dst", port, ca=pki.ca.cert, verbosity=4, args=["-d", "HTTP1=80"])
    proc = stack.start(
        "destination", argv, env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.destination_token}
    )
    assert proc.wait(30) == 2
    assert "no destination mapping for service SSH1" in proc.output()
    assert "Traceback" not in proc.output()


def test_refused_token_exits_3_with_one_line(stack: Stack, pki) -> None:
    tunnel = Tunnel("refused", ("SSH1",))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    argv = stack.proxy_argv("dst", port, ca=pki.ca.cert, verbosity=4, args=["-d", "SSH1=22"])
    wrong = "x" * 40
    proc = stack.start("destination", argv, env={"AWSIOT_TUNNEL_ACCESS_TOKEN": wrong})
    assert proc.wait(30) == 3
    assert "refused the connection: HTTP 403 (invalid access token): the access token is wrong" in (
        proc.output()
    )
    assert "aws iotsecuretunneling rotate-tunnel-access-token" in proc.output()
    assert "Traceback" not in proc.output()
    assert wrong not in proc.output()


@pytest.mark.parametrize("case", ["wrong-mode", "closed", "used"])
def test_refusals_give_the_service_reason_and_what_to_do(
    stack: Stack, pki, threaded_service_factory, case: str
) -> None:
    """The service says why in the response body; the proxy repeats it in one line, with a hint."""
    tunnel = Tunnel(f"refusal-{case}", ("SSH1",))
    service = threaded_service_factory([tunnel])
    token = tunnel.source_token if case == "wrong-mode" else tunnel.destination_token
    if case == "closed":
        service.call(service.service.close_tunnel(tunnel.tunnel_id))
    if case == "used":  # a first destination holds the token, bound to its own client token
        stack.destination(tunnel.destination_token, service.port, "SSH1=22", ca=pki.ca.cert)
    argv = stack.proxy_argv(
        "dst", service.port, ca=pki.ca.cert, verbosity=4, args=["-d", "SSH1=22"]
    )
    proc = stack.start("refused", argv, env={"AWSIOT_TUNNEL_ACCESS_TOKEN": token})
    assert proc.wait(30) == 3
    output = proc.output()
    assert "Traceback" not in output
    assert token not in output
    [line] = [line for line in output.splitlines() if " ERROR " in line]
    expected = {
        "wrong-mode": "HTTP 400 (access token is for source mode, not destination): the access "
        "token is for the other end of the tunnel: use the other token",
        "closed": "HTTP 410 (tunnel is closed): the tunnel is closed or has expired: open a new "
        "tunnel",
        "used": "HTTP 403 (client token does not match the one bound to this access token): the "
        "access token is bound to another client token (another proxy uses it",
    }[case]
    assert expected in line


def test_unreachable_service_gives_up_with_exit_4(stack: Stack, tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps({"iotunnel.reconnect_attempts": 2, "iotunnel.reconnect_base": 0.05})
    )
    argv = stack.proxy_argv(
        "dst",
        free_port(),
        ca=None,
        verbosity=4,
        args=["-d", "22", "--settings-json", str(settings)],
    )
    proc = stack.start("destination", argv, env={"AWSIOT_TUNNEL_ACCESS_TOKEN": "t" * 40})
    assert proc.wait(60) == 4
    assert "giving up after 3 attempts" in proc.output()


def test_tokens_never_reach_logs_or_argv_at_trace_level(stack: Stack, pki, www) -> None:
    tunnel = Tunnel("secret", ("HTTP1", "SSH1"))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key, extra=["-v"])
    _, http_port = stack.http_server(www)
    _, echo_port = stack.echo_server()
    client_token = "c" * 8 + "-" + "d" * 31
    dst = stack.destination(
        tunnel.destination_token,
        port,
        f"HTTP1={http_port},SSH1={echo_port}",
        ca=pki.ca.cert,
        verbosity=6,
        env={"AWSIOT_TUNNEL_CLIENT_TOKEN": client_token},
    )
    src = stack.source(
        tunnel.source_token, port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=pki.ca.cert, verbosity=6
    )
    assert http_get(src.ports["HTTP1"], "/index.html")[0] == 200
    assert echo_roundtrips(src.ports["SSH1"], 3) == 3
    secrets = (tunnel.source_token, tunnel.destination_token, client_token)
    for proc in stack.procs:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        for secret in secrets:
            assert secret not in cmdline
    for proc in (dst, src.proc):
        proc.stop()
    assert "TRACE" in dst.output()
    for proc in stack.procs:
        for secret in secrets:
            assert secret not in proc.output(), f"{proc.name} logged a token"


def test_slow_reader_keeps_memory_bounded(two_services) -> None:
    """A client that sends 96 MiB to the echo service without reading: backpressure must stop
    it (bounded memory in every proxy), then everything arrives intact once it reads."""
    total = 96 * MiB
    with socket.create_connection(("127.0.0.1", two_services.ssh), timeout=60) as sock:
        sock.setblocking(False)
        block = b"z" * MiB
        sent = 0
        stalls = 0
        import time

        while sent < total and stalls < 200:
            try:
                sent += sock.send(block[: min(MiB, total - sent)])
                stalls = 0
            except BlockingIOError:
                stalls += 1
                time.sleep(0.01)
        assert sent < total, "nothing pushed back on a client that does not read"
        for proc in (two_services.destination, two_services.source.proc):
            assert peak_rss_kib(proc.pid) < 128 * 1024, f"{proc.name} grew past 128 MiB"
        # Now read everything back while sending the rest.
        sock.setblocking(True)
        received = 0
        remaining = total - sent
        while received < total:
            if remaining:
                sock.setblocking(False)
                try:
                    n = sock.send(block[: min(MiB, remaining)])
                    remaining -= n
                except BlockingIOError:
                    pass
                sock.setblocking(True)
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed early"
            assert chunk == b"z" * len(chunk)
            received += len(chunk)
    assert echo_roundtrips(two_services.ssh, 3) == 3


def test_through_an_https_proxy_with_basic_auth(stack: Stack, pki) -> None:
    tunnel = Tunnel("proxied", ("SSH1",))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    script = str(Path(__file__).with_name("connect_proxy.py"))
    connect = stack.start("connect-proxy", [stack.python, script, "operator:s3cret-pass"])
    proxy_port = int(connect.wait_for(r"port (\d+)").group(1))
    via = {"HTTPS_PROXY": f"http://operator:s3cret-pass@127.0.0.1:{proxy_port}", "NO_PROXY": ""}
    dst = stack.destination(
        tunnel.destination_token, port, f"SSH1={echo_port}", ca=pki.ca.cert, env=via
    )
    src = stack.source(tunnel.source_token, port, "SSH1=0", ["SSH1"], ca=pki.ca.cert, env=via)
    assert echo_roundtrips(src.ports["SSH1"], 10) == 10
    assert connect.output().count(f"CONNECT 127.0.0.1:{port}") == 2
    for proc in (dst, src.proc):
        assert "s3cret-pass" not in proc.output()

    wrong = {"https_proxy": f"http://operator:b4d-pa55@127.0.0.1:{proxy_port}", "NO_PROXY": ""}
    argv = stack.proxy_argv("dst", port, ca=pki.ca.cert, verbosity=4, args=["-d", "SSH1=22"])
    settings = stack.workdir / "fast.json"
    settings.write_text(
        json.dumps({"iotunnel.reconnect_attempts": 1, "iotunnel.reconnect_base": 0.05})
    )
    refused = stack.start(
        "refused",
        [*argv, "--settings-json", str(settings)],
        env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.destination_token, **wrong},
    )
    assert refused.wait(30) == 4
    assert "407" in refused.output()
    assert "b4d-pa55" not in refused.output()


def test_both_proxies_on_uvloop(stack: Stack, pki, www: Path) -> None:
    """The optional uvloop event loop (IOTUNNEL_EVENT_LOOP=uvloop) carries the same traffic."""
    pytest.importorskip("uvloop")
    tunnel = Tunnel("uvloop", ("HTTP1", "SSH1"))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, http_port = stack.http_server(www)
    _, echo_port = stack.echo_server()
    uv = {"IOTUNNEL_EVENT_LOOP": "uvloop"}
    dst = stack.destination(
        tunnel.destination_token,
        port,
        f"HTTP1={http_port},SSH1={echo_port}",
        ca=pki.ca.cert,
        env=uv,
    )
    src = stack.source(
        tunnel.source_token, port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=pki.ca.cert, env=uv
    )
    assert http_get(src.ports["HTTP1"], "/blob.bin") == (200, (www / "blob.bin").read_bytes())
    assert echo_roundtrips(src.ports["SSH1"], 50) == 50
    sent, received = echo_transfer(src.ports["SSH1"], 32 * MiB)
    assert sent == received
    for proc in (dst, src.proc):
        assert "event loop: uvloop" in proc.output()
