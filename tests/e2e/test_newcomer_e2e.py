"""The newcomer's path: proxies started from the checkout's top, and ``make demo``."""

from __future__ import annotations

from bench.clients import echo_roundtrips
from bench.harness import ROOT, Stack, Tunnel
from bench.pki import PKI


def test_proxies_start_from_the_checkout(stack: Stack, pki: PKI) -> None:
    """``config/`` at the top of the checkout holds the agent's and the service's settings and
    both mapping examples, so it is no mapping directory: a proxy started there, without -s/-d,
    must not stop at it (a source skips it with a warning and takes free ports), and one with
    -d does not read it."""
    assert (ROOT / "config" / "agent.ini").is_file()
    tunnel = Tunnel("checkout", ("HTTP1", "SSH1"))
    _, port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
    _, echo_port = stack.echo_server()
    destination = stack.start(
        "destination",
        stack.proxy_argv(
            "dst",
            port,
            ca=pki.ca.cert,
            verbosity=4,
            args=["-d", f"HTTP1={echo_port},SSH1={echo_port}"],
        ),
        env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.destination_token},
        cwd=ROOT,
    )
    destination.wait_for("connected to the tunnel service")
    source = stack.start(
        "source",
        stack.proxy_argv("src", port, ca=pki.ca.cert, verbosity=4, args=[]),
        env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token},
        cwd=ROOT,
    )
    source.wait_for(r"WARNING proxy: not using \./config for mappings \(config/\S+:\d+: ")
    ports = {
        sid: int(source.wait_for(rf"service {sid}: listening on \S+:(\d+)").group(1))
        for sid in tunnel.services
    }
    assert all(ports.values())
    assert echo_roundtrips(ports["SSH1"], 5) == 5
    assert echo_roundtrips(ports["HTTP1"], 5) == 5
    assert "not using ./config" not in destination.output()
