"""The newcomer's path: proxies started from the checkout's top, and ``make demo``."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from demo import __main__ as demo
from testbed.clients import echo_roundtrips
from testbed.harness import ROOT, Stack, Tunnel
from testbed.mqtt import mosquitto_binary
from testbed.pki import PKI


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


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_demo_overlaps_ssh_with_the_download_and_keeps_keys_out_of_its_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "demo"
    code = demo.run(workdir, ports={"HTTP1": 0, "SSH1": 0})
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("result: OK")
    # The summary: numbered steps, in order, one writer.
    numbers = [int(n) for n in re.findall(r"^ ?(\d+)\. ", out, re.MULTILINE)]
    assert numbers == list(range(1, 11)), out
    window = re.search(r"GET /firmware\.bin \(6 MiB\), t=([\d.]+)\.\.([\d.]+) s: sha256 ok", out)
    inside = re.search(
        r"SSH1 +(\d+) line round trips \(same session\), t=([\d.]+)\.\.([\d.]+) s", out
    )
    assert window is not None, out
    assert inside is not None, out
    start, end = float(window.group(1)), float(window.group(2))
    assert int(inside.group(1)) >= 10
    assert start <= float(inside.group(2)) < float(inside.group(3)) <= end
    # Keys live in pki/ (0700); the logs folder the demo points at holds none.
    keys, logs = workdir / "pki", workdir / "logs"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert any(p.name.endswith("_key") or p.suffix == ".key" for p in keys.rglob("*"))
    assert sorted(p.name for p in logs.glob("*.log"))
    assert demo.leaked_secrets(logs, []) == []
    assert not [p for p in logs.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


def test_leak_check_finds_keys_and_tokens(tmp_path: Path, pki: PKI) -> None:
    """The demo's own check is not vacuous."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "clean.log").write_text("nothing to see\n")
    assert demo.leaked_secrets(tmp_path, ["token-abc"]) == []
    (tmp_path / "sub" / "key.log").write_bytes(pki.client.key.read_bytes())
    (tmp_path / "token.log").write_text("got token-abc\n")
    assert demo.leaked_secrets(tmp_path, ["token-abc"]) == ["sub/key.log", "token.log"]
