"""``python -m bench.resume``: how long a tunnel is down while the agent restarts.

The device side for real, on loopback: mosquitto, the project's tunnel service over TLS, an echo
server, the agent with one tunnel, and the operator's source proxy, which runs throughout. Each
run restarts the agent and measures the gap: from the signal to the old agent until a new local
connection through THE SAME source proxy completes a round trip again.

- ``sigterm``: ``systemctl restart`` or ``apt upgrade``: SIGTERM, the old agent stops its proxy
  and exits; the new agent is started at once and resumes the tunnel from ``state_dir``.
- ``sigkill``: a crash: SIGKILL to the agent and (as systemd does for ``KillMode=mixed``) to
  its proxy; the new agent is started at once. Under systemd, ``RestartSec=`` (5 s in the
  shipped unit) comes on top.

Each gap is also split: until the old agent is gone, until the new agent logs that it resumes
the tunnel, until its proxy is connected to the service. Results go to ``--json`` (default
``bench/out/resume.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from testbed.harness import ROOT, Proc, Stack, Tunnel, agent_ini
from testbed.mqtt import Publisher, mosquitto_binary
from testbed.pki import PKI

THING = "bench-resume"
_STARTED = re.compile(r"started a destination proxy, pid (\d+)")


def _round_trip(port: int, timeout: float = 2.0) -> bool:
    """One echo round trip on a new connection through the source proxy."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"resume?\n")
            received = b""
            while len(received) < 8:
                chunk = sock.recv(8 - len(received))
                if not chunk:
                    return False
                received += chunk
            return received == b"resume?\n"
    except OSError:
        return False


def _until(predicate: Any, timeout: float, what: str, poll: float = 0.01) -> float:
    """Poll until ``predicate()``; returns the time it became true (monotonic)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout} s")
        time.sleep(poll)
    return time.monotonic()


def _until_logged(proc: Proc, pattern: str, timeout: float = 60) -> float:
    """Poll ``proc``'s log until it matches; returns the time it did (monotonic)."""
    return _until(lambda: re.search(pattern, proc.output()) is not None, timeout, pattern)


def measure(
    workdir: Path, runs: int, kinds: tuple[str, ...] = ("sigterm", "sigkill")
) -> dict[str, Any]:
    """Restart the agent ``runs`` times for each kind; returns the gaps in seconds."""
    if mosquitto_binary() is None:
        return {"skipped": "mosquitto is not installed (Debian package 'mosquitto')"}
    workdir.mkdir(parents=True, exist_ok=True)
    pki = PKI.create(workdir / "pki")
    stack = Stack(workdir / "run")
    results: dict[str, Any] = {}
    try:
        _, broker_port = stack.mosquitto(pki)
        tunnel = Tunnel("resume", ("SSH1",))
        _, service_port = stack.service([tunnel], cert=pki.server.cert, key=pki.server.key)
        _, echo_port = stack.echo_server()
        device = pki.issue_client(THING)
        mappings = workdir / "destination.d"
        mappings.mkdir(exist_ok=True)
        (mappings / "bench.ini").write_text(f"SSH1 = {echo_port}\n")
        state = workdir / "state"
        for leftover in state.glob("tunnel-*.json"):
            leftover.unlink()
        ini = agent_ini(
            workdir / "agent.ini",
            {
                "endpoint": "127.0.0.1",
                "port": broker_port,
                "client_id": THING,
                "cert": device.cert,
                "key": device.key,
                "root_ca": pki.ca.cert,
                "mapping_dir": mappings,
                "tunnel_endpoint": f"wss://127.0.0.1:{service_port}",
                "tunnel_ca": pki.ca.cert,
                "state_dir": state,
                "log_level": "debug",
            },
        )
        agent = stack.agent(ini, name="agent-0")
        payload = {
            "clientAccessToken": tunnel.destination_token,
            "clientMode": "destination",
            "region": "us-east-1",
            "services": ["SSH1"],
        }
        with Publisher(broker_port, pki.ca.cert, pki.issue_client("operator")) as publisher:
            publisher.publish(f"$aws/things/{THING}/tunnels/notify", json.dumps(payload).encode())
        agent.wait_for("proxy.link: connected to the tunnel service", timeout=60)
        source = stack.source(tunnel.source_token, service_port, "SSH1=0", ["SSH1"], ca=pki.ca.cert)
        port = source.ports["SSH1"]
        _until(lambda: _round_trip(port), 60, "first round trip")

        number = 0
        for kind in kinds:
            samples = []
            for _ in range(runs):
                number += 1
                children = [int(pid) for pid in _STARTED.findall(agent.output())]
                start = time.monotonic()
                if kind == "sigterm":
                    agent.popen.send_signal(signal.SIGTERM)
                    agent.popen.wait(60)
                else:
                    agent.popen.kill()
                    agent.popen.wait(60)
                    for pid in children:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                gone = time.monotonic()
                agent = stack.agent(ini, name=f"agent-{number}", ready=False)
                resumed = _until_logged(agent, r"resuming the tunnel")
                connected = _until_logged(agent, r"proxy.link: connected to the tunnel service")
                serving = _until(lambda: _round_trip(port), 60, "round trip", poll=0.005)
                samples.append(
                    {
                        "old_agent_gone": gone - start,
                        "resuming": resumed - start,
                        "proxy_connected": connected - start,
                        "serving_again": serving - start,
                    }
                )
            gaps = [s["serving_again"] for s in samples]
            results[kind] = {
                "runs": samples,
                "median_s": statistics.median(gaps),
                "min_s": min(gaps),
                "max_s": max(gaps),
            }
        results["source_proxy_restarted"] = source.proc.popen.poll() is not None
    finally:
        stack.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, metavar="N", help="restarts of each kind")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/iotunnel-bench-resume"))
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "resume.json")
    args = parser.parse_args(argv)
    results = measure(args.workdir.resolve(), args.runs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    if "skipped" in results:
        print(f"skipped: {results['skipped']}")
        return 0
    for kind in ("sigterm", "sigkill"):
        r = results[kind]
        parts = {k: statistics.median(s[k] for s in r["runs"]) for k in r["runs"][0]}
        split = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in parts.items())
        print(
            f"{kind}: tunnel serving again after {r['median_s']:.2f} s median "
            f"({r['min_s']:.2f}..{r['max_s']:.2f}, {len(r['runs'])} runs; medians: {split})"
        )
    print(f"source proxy restarted: {results['source_proxy_restarted']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
