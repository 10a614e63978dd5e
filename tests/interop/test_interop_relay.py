"""iotunnel against the reference C++ localproxy through a relay that forwards every WebSocket
message untouched (``conftest.Relay``), so that the tunnel service cannot mask a proxy bug.

Each case runs both ways where the flag applies to both roles: the reference as the source with
iotunnel as the destination, and iotunnel as the source with the reference as the destination.

- protocol V3 (HTTP1 + SSH1, parallel HTTP requests during an SSH session), ``-y V2`` (one
  connection per service at a time) and ``-y V1`` (one unnamed service, ``-s PORT``/``-d PORT``);
- ``-k`` against a relay with a self-signed certificate, and without it (refused by both);
- ``-c`` with a hashed CA directory for both (our ``-c`` with a CA file is what every other case
  uses; the reference's ``-c`` takes no file);
- ``-b``: the source's listen address; in destination mode, the host of port-only mappings
  (what the reference does with it).
"""

from __future__ import annotations

import pytest
from conftest import (
    Backends,
    Endpoint,
    LocalProxy,
    Relay,
    carry_traffic,
    free_port,
    listening,
    session,
    start_peers,
    token,
    wait_listening,
)

from testbed.clients import echo_roundtrips, http_get
from testbed.harness import Stack
from testbed.pki import PKI

ALT = "127.0.0.2"  # another loopback address, for -b
TLS_REFUSED_OURS = "TLS verification of the service failed"
TLS_REFUSED_REFERENCE = "certificate verify failed"


@pytest.mark.parametrize("version", [3, 2, 1])
@pytest.mark.parametrize("reference", ["source", "destination"])
def test_protocol_versions(
    stack: Stack,
    localproxy: LocalProxy,
    pki: PKI,
    ca_dir,
    relay_factory,
    backends: Backends,
    reference: str,
    version: int,
) -> None:
    relay: Relay = relay_factory(["SSH1"] if version == 1 else ["HTTP1", "SSH1"])
    endpoint = Endpoint(relay.ports["ca"], token(), token())
    peers = start_peers(
        stack, localproxy, pki, ca_dir, endpoint, backends, reference=reference, version=version
    )
    carry_traffic(peers, backends)
    assert relay.messages["source"]
    assert relay.messages["destination"]


# --------------------------------------------------------------------------- -k


def _ours_destination(stack: Stack, port: int, mapping: str, args: list[str]) -> str:
    """Start our destination against ``wss://127.0.0.1:port``; returns the line that says
    whether it connected or its TLS check refused the service."""
    argv = stack.proxy_argv("dst", port, ca=None, tls=True, verbosity=4, args=["-d", mapping])
    proc = stack.start("destination", [*argv, *args], env={"AWSIOT_TUNNEL_ACCESS_TOKEN": token()})
    return proc.wait_for(f"connected to the tunnel service|{TLS_REFUSED_OURS}.*").group(0)


def test_without_k_a_self_signed_service_is_refused_by_both(
    stack: Stack, localproxy: LocalProxy, relay_factory, backends: Backends
) -> None:
    relay: Relay = relay_factory(["HTTP1", "SSH1"])
    port = relay.ports["self-signed"]
    ours = _ours_destination(stack, port, backends.mapping(), [])
    assert ours.startswith(TLS_REFUSED_OURS), ours
    theirs = localproxy.start(
        stack, "ref-source", port, ["-s", f"SSH1={free_port()}"], token=token()
    )
    theirs.wait_for(TLS_REFUSED_REFERENCE)
    assert relay.offered == {"source": [], "destination": []}  # no upgrade got through


def test_k_reference_source_with_a_self_signed_service(
    stack: Stack, localproxy: LocalProxy, pki: PKI, relay_factory, backends: Backends
) -> None:
    relay: Relay = relay_factory(["HTTP1", "SSH1"])
    stack.destination(token(), relay.ports["ca"], backends.mapping(), ca=pki.ca.cert)
    ports = {"HTTP1": free_port(), "SSH1": free_port()}
    localproxy.source(
        stack,
        relay.ports["self-signed"],
        f"HTTP1={ports['HTTP1']},SSH1={ports['SSH1']}",
        list(ports.values()),
        token=token(),
        insecure=True,
    )
    assert http_get(ports["HTTP1"], "/index.html") == (
        200,
        (backends.www / "index.html").read_bytes(),
    )
    session(backends, ports["SSH1"])


def test_k_our_destination_with_a_self_signed_service(
    stack: Stack, localproxy: LocalProxy, ca_dir, relay_factory, backends: Backends
) -> None:
    relay: Relay = relay_factory(["HTTP1", "SSH1"])
    line = _ours_destination(stack, relay.ports["self-signed"], backends.mapping(), ["-k"])
    assert line == "connected to the tunnel service", line
    ports = {"HTTP1": free_port(), "SSH1": free_port()}
    localproxy.source(
        stack,
        relay.ports["ca"],
        f"HTTP1={ports['HTTP1']},SSH1={ports['SSH1']}",
        list(ports.values()),
        token=token(),
        ca_dir=ca_dir,
    )
    assert http_get(ports["HTTP1"], "/index.html") == (
        200,
        (backends.www / "index.html").read_bytes(),
    )
    session(backends, ports["SSH1"])


# --------------------------------------------------------------------------- -c


@pytest.mark.parametrize("reference", ["source", "destination"])
def test_c_ca_directory(
    stack: Stack,
    localproxy: LocalProxy,
    pki: PKI,
    ca_dir,
    relay_factory,
    backends: Backends,
    reference: str,
) -> None:
    """Both with ``-c`` a hashed CA directory. (Our ``-c`` with a CA file is what every other
    case runs with; the reference's takes no file: ``test_reference_c_takes_no_ca_file``.)"""
    relay: Relay = relay_factory(["HTTP1", "SSH1"])
    port = relay.ports["ca"]
    if reference == "source":
        stack.destination(token(), port, backends.mapping(), ca=ca_dir)
        ports = {"HTTP1": free_port(), "SSH1": free_port()}
        mapping = f"HTTP1={ports['HTTP1']},SSH1={ports['SSH1']}"
        localproxy.source(stack, port, mapping, list(ports.values()), token=token(), ca_dir=ca_dir)
    else:
        localproxy.destination(stack, port, backends.mapping(), token=token(), ca_dir=ca_dir)
        ours = stack.source(token(), port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=ca_dir)
        ports = ours.ports
    index = (backends.www / "index.html").read_bytes()
    assert http_get(ports["HTTP1"], "/index.html") == (200, index)
    session(backends, ports["SSH1"])


def test_reference_c_takes_no_ca_file(
    stack: Stack, localproxy: LocalProxy, pki: PKI, relay_factory
) -> None:
    """The reference's ``-c`` is an OpenSSL CA path (a directory): a CA file there trusts
    nothing (iotunnel takes either)."""
    relay: Relay = relay_factory(["SSH1"])
    theirs = localproxy.start(
        stack,
        "ref-source",
        relay.ports["ca"],
        ["-s", f"SSH1={free_port()}"],
        token=token(),
        ca_dir=pki.ca.cert,
    )
    theirs.wait_for(TLS_REFUSED_REFERENCE)
    assert relay.offered["source"] == []


# --------------------------------------------------------------------------- -b


@pytest.mark.parametrize("implementation", ["reference", "ours"])
def test_b_source_listens_on_the_bind_address(
    stack: Stack,
    localproxy: LocalProxy,
    pki: PKI,
    ca_dir,
    relay_factory,
    backends: Backends,
    implementation: str,
) -> None:
    relay: Relay = relay_factory(["HTTP1", "SSH1"])
    port = relay.ports["ca"]
    if implementation == "reference":
        stack.destination(token(), port, backends.mapping(), ca=pki.ca.cert)
        ports = {"HTTP1": free_port(ALT), "SSH1": free_port(ALT)}
        mapping = f"HTTP1={ports['HTTP1']},SSH1={ports['SSH1']}"
        localproxy.source(
            stack,
            port,
            mapping,
            list(ports.values()),
            host=ALT,
            args=["-b", ALT],
            token=token(),
            ca_dir=ca_dir,
        )
    else:
        localproxy.destination(stack, port, backends.mapping(), token=token(), ca_dir=ca_dir)
        ours = stack.source(
            token(), port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=pki.ca.cert, extra=["-b", ALT]
        )
        ports = ours.ports
        for listen in ports.values():
            wait_listening(ours.proc, ALT, listen)
    assert not any(listening("127.0.0.1", listen) for listen in ports.values())
    index = (backends.www / "index.html").read_bytes()
    assert http_get(ports["HTTP1"], "/index.html", host=ALT) == (200, index)
    session(backends, ports["SSH1"], host=ALT)


@pytest.mark.parametrize("implementation", ["reference", "ours"])
def test_b_destination_connects_port_only_mappings_to_the_bind_address(
    stack: Stack,
    localproxy: LocalProxy,
    pki: PKI,
    ca_dir,
    relay_factory,
    www,
    implementation: str,
) -> None:
    """The reference's ``-b`` in destination mode is the host of ``-d PORT`` mappings (it does
    not bind its outgoing sockets): backends that listen on that address alone are reached."""
    python = stack.python
    http = stack.start(
        "http-alt",
        [python, "-m", "testbed.servers", "http", "--host", ALT, "--directory", str(www)],
    )
    echo = stack.start("echo-alt", [python, "-m", "testbed.servers", "echo", "--host", ALT])
    http_port = int(http.wait_for(r"port (\d+)").group(1))
    echo_port = int(echo.wait_for(r"port (\d+)").group(1))
    mapping = f"HTTP1={http_port},SSH1={echo_port}"
    relay: Relay = relay_factory(["HTTP1", "SSH1"])
    port = relay.ports["ca"]
    if implementation == "reference":
        localproxy.destination(stack, port, mapping, args=["-b", ALT], token=token(), ca_dir=ca_dir)
        ours = stack.source(token(), port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=pki.ca.cert)
        ports = ours.ports
    else:
        stack.destination(token(), port, mapping, ca=pki.ca.cert, extra=["-b", ALT])
        ports = {"HTTP1": free_port(), "SSH1": free_port()}
        smap = f"HTTP1={ports['HTTP1']},SSH1={ports['SSH1']}"
        localproxy.source(stack, port, smap, list(ports.values()), token=token(), ca_dir=ca_dir)
    assert http_get(ports["HTTP1"], "/index.html") == (200, (www / "index.html").read_bytes())
    assert echo_roundtrips(ports["SSH1"], 20) == 20
