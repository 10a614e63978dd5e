"""``python -m bench``: throughput, CPU, memory, latency and fairness of a tunnel, on loopback.

Every scenario runs through iotunnel's own tunnel service over TLS, with one tunnel carrying
two services: HTTP1 (to a bulk ``blob`` server) and SSH1 (to an echo server). Results are
printed as a table and written as JSON (``--json``, default ``bench/out/results.json``).

``--proxy-cmd "/path/to/localproxy"`` runs the same scenarios with another implementation that
takes the reference's ``-s/-d/-e/-t/-c`` flags (the token then goes on its command line, as the
reference requires), so that builds can be compared side by side in one run.

By default the run ends with :mod:`bench.sidebyside`: the reference ``localproxy`` (``$LOCALPROXY``
or ``../shared/peers/localproxy/localproxy-x86_64``; skipped with a note when it does not run
here) and iotunnel in the same run, interleaved, with ratios; ``--also NAME=CMD`` adds another
implementation to it (for example an older checkout), ``--no-side-by-side`` leaves it out,
``--side-by-side-scenario NAME`` (repeatable) runs only some of its scenarios.
The charts (:mod:`bench.charts`, matplotlib from the ``bench`` extra) go to ``bench/charts/``.

``--soak`` runs the soak scenarios instead (:mod:`bench.soak`: 200 tunnels opened and closed
through the management API with a pair of proxies each, 2,000 more with in-process peers,
10,000 connections through one tunnel; about two minutes), written to ``bench/out/soak.json``
unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import agent_scale, charts, sidebyside, soak
from testbed.harness import (
    ROOT,
    HarnessError,
    Proc,
    Stack,
    Tunnel,
    agent_ini,
    free_port,
    peak_rss_kib,
    rss_kib,
)
from testbed.mqtt import mosquitto_binary
from testbed.pki import PKI

MB = 1_000_000
#: The paced runs of scenario 1, in bytes/s across all connections.
PACE = 20 * MB
MiB = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Setup:
    """One tunnel and its processes."""

    stack: Stack
    service: Proc
    destination: Proc
    source: Proc
    http1: int
    ssh1: int

    def procs(self) -> dict[str, Proc]:
        return {"source": self.source, "destination": self.destination, "service": self.service}


def start(workdir: Path, pki: PKI, proxy_cmd: str | None, service_args: list[str]) -> Setup:
    stack = Stack(workdir)
    try:
        tunnel = Tunnel("bench", ("HTTP1", "SSH1"))
        service, port = stack.service(
            [tunnel], cert=pki.server.cert, key=pki.server.key, extra=service_args
        )
        _, blob = stack.blob_server()
        _, echo = stack.echo_server()
        dmap = f"HTTP1={blob},SSH1={echo}"
        if proxy_cmd is None:
            dst = stack.destination(tunnel.destination_token, port, dmap, ca=pki.ca.cert)
            ours = stack.source(
                tunnel.source_token, port, "HTTP1=0,SSH1=0", ["HTTP1", "SSH1"], ca=pki.ca.cert
            )
            return Setup(stack, service, dst, ours.proc, ours.ports["HTTP1"], ours.ports["SSH1"])
        ca_dir = str(pki.hashed_ca_directory(workdir / "ca-dir"))
        base = [*shlex.split(proxy_cmd), "-e", f"127.0.0.1:{port}", "-c", ca_dir]
        dst = stack.start("destination", [*base, "-d", dmap, "-t", tunnel.destination_token])
        _wait_connected(service, dst, "destination")
        http1, ssh1 = free_port(), free_port()
        smap = f"HTTP1={http1},SSH1={ssh1}"
        src = stack.start("source", [*base, "-s", smap, "-t", tunnel.source_token])
        _wait_connected(service, src, "source")
        time.sleep(1.0)  # no portable readiness line: give the listeners a moment
        return Setup(stack, service, dst, src, http1, ssh1)
    except BaseException:
        stack.close()
        raise


def _wait_connected(service: Proc, proxy: Proc, mode: str) -> None:
    """Wait for the service to see ``proxy`` connect; on failure, say what the proxy printed."""
    try:
        service.wait_for(rf"peer connected: tunnel bench {mode}", timeout=60)
    except HarnessError as exc:
        raise HarnessError(f"{exc}\n{mode} proxy output:\n{proxy.output()[-3000:]}") from None


def load(kind: str, port: int, *args: str, timeout: float = 900) -> dict[str, Any]:
    """Run a ``bench.load`` client in its own process and return its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "bench.load", kind, "--port", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"bench.load {kind} failed: {result.stderr.strip()[-2000:]}")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def background(kind: str, port: int, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "bench.load", kind, "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


# ---------------------------------------------------------------------------------- scenarios


def throughput(s: Setup, total: int) -> dict[str, Any]:
    """1: MB/s at the receiver, 1 and 4 connections, unpaced and paced; 2: CPU s/GB, peak RSS."""
    out: dict[str, Any] = {}
    procs = s.procs()
    for direction in ("download", "upload"):
        for paced in (False, True):
            for conns in (1, 4):
                # Paced runs move a quarter of the bytes: 20 MB/s is a tenth of the unpaced rate.
                size, rate = (total // 4, ["--rate", str(PACE)]) if paced else (total, [])
                args = ["--bytes", str(size), "--conns", str(conns), *rate]
                before = {name: cpu_seconds(p.pid) for name, p in procs.items()}
                result = load(direction, s.http1, *args)
                cpu = {name: cpu_seconds(p.pid) - before[name] for name, p in procs.items()}
                gb = result["bytes"] / 1e9
                result["cpu_s_per_gb"] = {name: round(v / gb, 2) for name, v in cpu.items()}
                pace = "paced_20MBps" if paced else "unpaced"
                out[f"{direction}_{conns}conn_{pace}"] = result
    out["peak_rss_kib"] = {name: peak_rss_kib(p.pid) for name, p in procs.items()}
    return out


def latency_idle(s: Setup, count: int) -> dict[str, Any]:
    """3: 64-byte round trips on an idle tunnel."""
    return load("rtt", s.ssh1, "--count", str(count), "--interval", "0.002")


def latency_under_bulk(s: Setup, count: int, total: int) -> dict[str, Any]:
    """4: 64-byte round trips on SSH1 while HTTP1 carries an unpaced bulk download."""
    bulk = background("download", s.http1, "--bytes", str(total))
    time.sleep(0.5)
    try:
        rtt = load("rtt", s.ssh1, "--count", str(count), "--interval", "0.01")
        running = bulk.poll() is None
    finally:
        out, _ = bulk.communicate(timeout=900)
    result = {"rtt": rtt, "bulk": json.loads(out) if out else None, "bulk_overlapped": running}
    result["peak_rss_kib"] = {name: peak_rss_kib(p.pid) for name, p in s.procs().items()}
    return result


def connection_setup(s: Setup, count: int) -> dict[str, Any]:
    """5: connect + first echoed byte, and the same with the byte sent 5 ms after connect."""
    return {
        "immediate": load("setup", s.ssh1, "--count", str(count)),
        "first_byte_after_5ms": load("setup", s.ssh1, "--count", str(count), "--delay", "0.005"),
    }


def many_connections(s: Setup, count: int) -> dict[str, Any]:
    """6: simultaneous connections through one tunnel."""
    result = load("many", s.ssh1, "--count", str(count))
    result["rss_kib_after"] = {name: rss_kib(p.pid) for name, p in s.procs().items()}
    return result


def idle_rss(s: Setup) -> dict[str, Any]:
    """7: resident memory of idle processes (before any traffic)."""
    return {name: rss_kib(p.pid) for name, p in s.procs().items()}


def agent_idle_rss(workdir: Path, pki: PKI) -> dict[str, Any]:
    """7: resident memory of an idle agent, connected to a broker and waiting for tunnels."""
    if mosquitto_binary() is None:
        return {"skipped": "mosquitto is not installed (Debian package 'mosquitto')"}
    if importlib.util.find_spec("awscrt") is None:
        return {"skipped": "the agent extra (awsiotsdk) is not installed"}
    stack = Stack(workdir)
    try:
        _, port = stack.mosquitto(pki)
        thing = pki.issue_client("bench-thing")
        mappings = workdir / "destination.d"
        mappings.mkdir(parents=True, exist_ok=True)
        (mappings / "bench.ini").write_text("HTTP1 = 80\nSSH1 = 22\n")
        settings = {
            "endpoint": "127.0.0.1",
            "port": port,
            "client_id": "bench-thing",
            "cert": thing.cert,
            "key": thing.key,
            "root_ca": pki.ca.cert,
            "mapping_dir": mappings,
        }
        agent = stack.agent(agent_ini(workdir / "agent.ini", settings))
        time.sleep(1.0)  # settle after the subscription
        return {"agent": rss_kib(agent.pid)}
    finally:
        stack.close()


def _prepare(args: argparse.Namespace) -> tuple[Path, PKI, dict[str, Any]]:
    """Compiled bytecode, the work directory, a PKI, and the results' header."""
    # Processes start from bytecode, as installed ones do (the .deb's postinst compiles it):
    # compiling the source at every start would count in the idle memory of scenario 7.
    for package in ("proxy", "service", "agent", "testbed", "bench"):
        compileall.compile_dir(ROOT / package, quiet=1)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pki = PKI.create(workdir / "pki")
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{platform.python_implementation()} {platform.python_version()}"
        ),
        "implementation": args.proxy_cmd or "iotunnel",
    }
    return workdir, pki, results


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """The soak scenarios (:mod:`bench.soak`)."""
    workdir, pki, results = _prepare(args)
    results["tunnel_churn"] = soak.tunnel_churn(
        workdir / "soak-tunnels", pki, args.soak_tunnels, parallel=args.soak_parallel
    )
    results["peer_churn"] = soak.peer_churn(workdir / "soak-peers", pki, args.soak_peers)
    setup = start(workdir / "soak-connections", pki, args.proxy_cmd, [])
    try:
        results["connection_churn"] = soak.connection_churn(
            setup.procs(), setup.ssh1, args.soak_connections, args.soak_wave
        )
    finally:
        setup.stack.close()
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    total = (64 if quick else 512) * MiB
    workdir, pki, results = _prepare(args)
    results["quick"] = quick
    runs: list[tuple[str, list[str]]] = [("unlimited", [])]
    if args.cap:
        runs.append((f"cap_{args.cap // 1000}KBps", ["--bandwidth-limit", str(args.cap)]))
    for label, service_args in [] if args.only_side_by_side else runs:
        setup = start(workdir / label, pki, args.proxy_cmd, service_args)
        try:
            section: dict[str, Any] = {}
            if label == "unlimited":
                section["idle_rss_kib"] = idle_rss(setup)
                section["latency_idle"] = latency_idle(setup, 500 if quick else 2000)
                section["connection_setup"] = connection_setup(setup, 50 if quick else 200)
                section["throughput"] = throughput(setup, total)
                section["latency_under_bulk"] = latency_under_bulk(
                    setup, 200 if quick else 1000, (1024 if quick else 8192) * MiB
                )
                section["many_connections"] = many_connections(setup, 1000)
                section["agent_idle_rss_kib"] = agent_idle_rss(workdir / "agent", pki)
            else:
                # The bulk must outlast the round trips (each 0.1-0.2 s under an 800 KB/s cap):
                # 10 s of the cap for 50 of them, 50 s for 200.
                section["latency_under_bulk"] = latency_under_bulk(
                    setup, 50 if quick else 200, args.cap * (10 if quick else 50)
                )
            results[label] = section
        finally:
            setup.stack.close()
    if args.proxy_cmd is None and not args.only_side_by_side:  # the agent, 1, 4, 16 tunnels (50 s)
        results["agent_scale"] = agent_scale.agent_scale(workdir / "agent-scale", pki)
    if args.side_by_side or args.only_side_by_side:
        results["side_by_side"] = side_by_side(args, workdir, pki)
    return results


def side_by_side(args: argparse.Namespace, workdir: Path, pki: PKI) -> dict[str, Any]:
    """The reference and iotunnel (and ``--also`` ones), interleaved (:mod:`bench.sidebyside`)."""
    impls: dict[str, str | None] = {}
    if args.reference:
        impls["reference"] = args.reference
    else:
        found, why = sidebyside.find_reference()
        if found is None:
            return {"skipped": why}
        impls["reference"] = found
    impls["iotunnel"] = None
    for name, cmd in args.also:
        impls[name] = cmd
    quick = args.quick
    return sidebyside.run(
        workdir / "side-by-side",
        pki,
        impls,
        rounds=args.rounds or (2 if quick else 3),
        transfer_bytes=(64 if quick else 256) * MiB,
        rtt_count=500 if quick else 2000,
        bulk_rtt_count=200 if quick else 500,
        setup_count=50 if quick else 200,
        scenarios=args.side_by_side_scenario or sidebyside.SCENARIOS,
    )


def table(results: dict[str, Any]) -> str:
    """The results as a plain-text table."""
    lines = [f"{results['implementation']} — {results['machine']} — {results['date']}"]
    u = results.get("unlimited", {})
    tp = u.get("throughput", {})
    for key, value in tp.items():
        if key == "peak_rss_kib":
            continue
        cpu = value.get("cpu_s_per_gb")
        cpu_text = ", ".join(f"{k} {v}" for k, v in cpu.items()) if cpu else ""
        lines.append(f"  throughput {key:28} {value['mb_per_s']:8.1f} MB/s   cpu s/GB: {cpu_text}")
    if "peak_rss_kib" in tp:
        lines.append(f"  peak RSS during throughput (MiB): {_mib(tp['peak_rss_kib'])}")
    if "latency_idle" in u:
        lines.append(f"  RTT 64 B idle: {_lat(u['latency_idle'])}")
    for label in ("unlimited", *(k for k in results if k.startswith("cap_"))):
        lub = results.get(label, {}).get("latency_under_bulk")
        if lub:
            bulk = lub.get("bulk") or {}
            lines.append(
                f"  RTT 64 B on SSH1 during HTTP1 bulk [{label}]: {_lat(lub['rtt'])}"
                f" (bulk {bulk.get('mb_per_s', '?')} MB/s, overlapped={lub['bulk_overlapped']},"
                f" peak RSS MiB {_mib(lub['peak_rss_kib'])})"
            )
    cs = u.get("connection_setup")
    if cs:
        lines.append(f"  connect + first echoed byte: {_lat(cs['immediate'])}")
        lines.append(f"  first byte sent 5 ms after connect: {_lat(cs['first_byte_after_5ms'])}")
    mc = u.get("many_connections")
    if mc:
        lines.append(
            f"  {mc['count']} simultaneous connections: {mc['ok']} ok, opened in {mc['open_s']} s,"
            f" all echoed in {mc['total_s']} s, RSS after (MiB) {_mib(mc['rss_kib_after'])}"
        )
    if "idle_rss_kib" in u:
        agent = u.get("agent_idle_rss_kib", {})
        agent_text = f"agent skipped: {agent['skipped']}" if "skipped" in agent else _mib(agent)
        lines.append(f"  idle RSS (MiB): {_mib(u['idle_rss_kib'])}; {agent_text}")
    if "side_by_side" in results:
        lines.append(sidebyside.table(results["side_by_side"]))
    return "\n".join(lines)


def _lat(value: dict[str, Any]) -> str:
    return f"median {value['median_ms']} ms, p99 {value['p99_ms']} ms, max {value['max_ms']} ms"


def _mib(values: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 1024:.1f}" for k, v in values.items())


def _named_cmd(text: str) -> tuple[str, str]:
    name, sep, cmd = text.partition("=")
    if not sep or not name or not cmd.strip() or name in ("reference", "iotunnel"):
        raise argparse.ArgumentTypeError(f"expected NAME=CMD with a new NAME, got {text!r}")
    return name, cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs (under 2 minutes)")
    parser.add_argument("--proxy-cmd", help="another local proxy to measure instead")
    parser.add_argument(
        "--cap",
        type=int,
        default=800_000,
        help="also run scenario 4 with this per-tunnel bandwidth cap in bytes/s (0: skip)",
    )
    parser.add_argument(
        "--no-side-by-side",
        dest="side_by_side",
        action="store_false",
        help="leave out the side-by-side comparison with the reference",
    )
    parser.add_argument(
        "--reference", metavar="CMD", help="the reference localproxy (default: found as above)"
    )
    parser.add_argument(
        "--also",
        type=_named_cmd,
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="another implementation in the side-by-side runs (repeatable)",
    )
    parser.add_argument(
        "--only-side-by-side", action="store_true", help="run the side-by-side comparison only"
    )
    parser.add_argument("--rounds", type=int, default=0, help="side-by-side runs per scenario")
    parser.add_argument(
        "--side-by-side-scenario",
        action="append",
        choices=sidebyside.SCENARIOS,
        metavar="NAME",
        help=f"run only this side-by-side scenario (repeatable; {', '.join(sidebyside.SCENARIOS)})",
    )
    parser.add_argument("--charts", type=Path, help="default: bench/charts/ (none with --json)")
    parser.add_argument(
        "--soak", action="store_true", help="run the soak scenarios instead (a few minutes)"
    )
    parser.add_argument("--soak-tunnels", type=int, default=200, metavar="N")
    parser.add_argument("--soak-parallel", type=int, default=4, metavar="N")
    parser.add_argument("--soak-peers", type=int, default=2000, metavar="N")
    parser.add_argument("--soak-connections", type=int, default=10_000, metavar="N")
    parser.add_argument("--soak-wave", type=int, default=100, metavar="N")
    parser.add_argument("--json", type=Path, help="default: bench/out/results.json (soak.json)")
    parser.add_argument("--workdir", default="/tmp/iotunnel-bench")
    parser.add_argument(
        "--agent-scale", action="store_true", help="only the agent with 1, 4, 16 tunnels"
    )
    args = parser.parse_args(argv)
    if args.agent_scale:
        workdir, pki, results = _prepare(args)
        results["agent_scale"] = agent_scale.agent_scale(workdir / "agent-scale", pki)
        text = agent_scale.table(results["agent_scale"])
    elif args.soak:
        results = run_soak(args)
        text = soak.table(results)
    else:
        results = run(args)
        text = table(results)
        if "agent_scale" in results:
            text += "\n" + agent_scale.table(results["agent_scale"])
    json_path = args.json or ROOT / "bench" / "out" / ("soak.json" if args.soak else "results.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    print(text)
    if not args.soak:
        chart_dir = args.charts or (None if args.json else ROOT / "bench" / "charts")
        if chart_dir is not None:
            for line in charts.draw(results, chart_dir):
                print(line)
    print(f"\nJSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
