"""The agent with 1, 4 and 16 tunnels: memory, time to tunnel, CPU at the 800 KB/s cap.

``python -m bench --agent-scale``. For each launcher (``fork``: proxies forked from the agent's
zygote, ``spawn``: a new interpreter each), one agent, one mosquitto and one tunnel service
(``--bandwidth-limit``, the AWS cap) on loopback. Notifications are published to the broker as
AWS IoT Core would, one at a time: each tunnel's time from the notification's arrival at the
agent to its proxy's handshake done is the agent's own ``tunnel up N ms after its
notification`` line. Once 1, 4 and 16 tunnels are up: the proportional memory (PSS, from
``/proc/PID/smaps_rollup``: shared pages count once) of the agent and all its descendants.
Then a transfer through the first tunnel, paced by the cap: CPU seconds of the agent and its
descendants per GB (``cpu_at_cap``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from testbed.harness import Stack, Tunnel, agent_ini
from testbed.mqtt import Publisher, mosquitto_binary
from testbed.pki import PKI

__all__ = ["LAUNCHERS", "SIZES", "agent_scale", "pss_kib", "table"]

#: The numbers of tunnels measured.
SIZES = (1, 4, 16)
LAUNCHERS = ("spawn", "fork")
THING = "bench-thing"
TOPIC = f"$aws/things/{THING}/tunnels/notify"
MiB = 1 << 20


def pss_kib(pid: int) -> int:
    """Proportional set size of a process, from /proc/PID/smaps_rollup."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return 0


def _is_zygote(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_bytes().strip() == b"iotunnel-zygote"
    except OSError:
        return False


def _total(pids: list[int], measure: Any) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += measure(pid)
        except (OSError, ValueError):  # a process that just exited
            continue
    return total


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _one_launcher(
    workdir: Path, pki: PKI, launcher: str, sizes: tuple[int, ...], cap: int, transfer: int
) -> list[dict[str, Any]]:
    from bench.__main__ import cpu_seconds, load

    count = max(sizes)
    shutil.rmtree(workdir, ignore_errors=True)  # a previous run's kept tunnels would resume
    stack = Stack(workdir)
    try:
        _, broker_port = stack.mosquitto(pki)
        tunnels = [Tunnel(f"scale-{i}", ("HTTP1",)) for i in range(count)]
        _, service_port = stack.service(
            tunnels,
            cert=pki.server.cert,
            key=pki.server.key,
            extra=["--bandwidth-limit", str(cap)],
        )
        _, blob = stack.blob_server()
        mappings = workdir / "destination.d"
        mappings.mkdir(parents=True, exist_ok=True)
        (mappings / "bench.ini").write_text(f"HTTP1 = {blob}\n")
        thing = pki.issue_client(THING)
        settings = {
            "endpoint": "127.0.0.1",
            "port": broker_port,
            "client_id": THING,
            "cert": thing.cert,
            "key": thing.key,
            "root_ca": pki.ca.cert,
            "mapping_dir": mappings,
            # A name, as a real endpoint is: each proxy resolves it (an address would spare it)
            "tunnel_endpoint": f"wss://localhost:{service_port}",
            "tunnel_ca": pki.ca.cert,
            "max_tunnels": 64,
            "launcher": launcher,
        }
        agent = stack.agent(agent_ini(workdir / "agent.ini", settings))
        time.sleep(1.0)  # the zygote's imports done, the agent idle
        operator = pki.issue_client("bench-operator")
        results: list[dict[str, Any]] = []
        latencies: list[float] = []
        with Publisher(broker_port, pki.ca.cert, operator) as publisher:
            for index, tunnel in enumerate(tunnels, 1):
                document = {
                    "clientAccessToken": tunnel.destination_token,
                    "clientMode": "destination",
                    "region": "us-east-1",
                    "services": ["HTTP1"],
                }
                publisher.publish(TOPIC, json.dumps(document).encode())
                match = agent.wait_for(_up_re(index), timeout=60)
                latencies.append(float(match.group(1)))
                if index in sizes:
                    time.sleep(1.0)  # settle: the proxies idle, their buffers back
                    pids = descendants(agent.pid)
                    pss = _total(pids, pss_kib) / 1024
                    own = pss_kib(agent.pid) / 1024
                    zygotes = [p for p in pids if _parent(p) == agent.pid and _is_zygote(p)]
                    launcher_mib = _total(zygotes, pss_kib) / 1024
                    results.append(
                        {
                            "launcher": launcher,
                            "tunnels": index,
                            "processes": len(pids),
                            "pss_total_mib": round(pss, 1),
                            "pss_per_tunnel_mib": round(pss / index, 1),
                            "pss_agent_mib": round(own, 1),
                            "pss_launcher_mib": round(launcher_mib, 1),
                            "pss_proxy_mean_mib": round((pss - own - launcher_mib) / index, 1),
                            "notify_to_connected_ms": {
                                "p50": _percentile(latencies, 0.5),
                                "p99": _percentile(latencies, 0.99),
                                "mean": round(statistics.fmean(latencies), 1),
                                "count": len(latencies),
                            },
                        }
                    )
        source = stack.source(
            tunnels[0].source_token, service_port, "HTTP1=0", ["HTTP1"], ca=pki.ca.cert
        )
        pids = descendants(agent.pid)
        before, clock = _total(pids, cpu_seconds), time.monotonic()
        moved = load("download", source.ports["HTTP1"], "--bytes", str(transfer))
        used, elapsed = _total(pids, cpu_seconds) - before, time.monotonic() - clock
        cpu = {
            "cap_bytes_per_s": cap,
            "bytes": moved["bytes"],
            "cpu_s_per_gb": round(used / (moved["bytes"] / 1e9), 2),
            "seconds": round(elapsed, 1),
            "cpu_percent": round(100 * used / elapsed, 1),
        }
        for result in results:
            result["cpu_at_cap"] = cpu["cpu_s_per_gb"]
            result["cpu_at_cap_detail"] = cpu
        return results
    finally:
        stack.close()


def _up_re(index: int) -> re.Pattern[str]:
    """The ``index``-th "tunnel up" line of the agent's log (tags are t1, t2, ...)."""
    return re.compile(rf"\[t{index}\] tunnel up (\d+) ms after its notification")


def agent_scale(
    workdir: Path,
    pki: PKI,
    *,
    sizes: tuple[int, ...] = SIZES,
    launchers: tuple[str, ...] = LAUNCHERS,
    cap: int = 800_000,
    transfer: int = 8_000_000,
) -> dict[str, Any]:
    """The scenario; ``{"skipped": why}`` without mosquitto or the agent's extra."""
    if mosquitto_binary() is None:
        return {"skipped": "mosquitto is not installed (Debian package 'mosquitto')"}
    if importlib.util.find_spec("awscrt") is None:
        return {"skipped": "the agent extra (awsiotsdk) is not installed"}
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    for launcher in launchers:
        runs += _one_launcher(workdir / launcher, pki, launcher, sizes, cap, transfer)
    return {"runs": runs, "seconds": round(time.monotonic() - started, 1)}


def table(section: dict[str, Any]) -> str:
    """The scenario's rows of the results table."""
    if "skipped" in section:
        return f"agent scale: skipped: {section['skipped']}"
    lines = ["agent scale (PSS of agent + zygote + proxies; notification -> connected; CPU at cap)"]
    for run in section["runs"]:
        latency = run["notify_to_connected_ms"]
        lines.append(
            f"  {run['launcher']:5} {run['tunnels']:2} tunnel(s): "
            f"PSS {run['pss_total_mib']:6.1f} MiB ({run['pss_per_tunnel_mib']:.1f}/tunnel; "
            f"agent {run['pss_agent_mib']:.1f}, launcher {run['pss_launcher_mib']:.1f}, "
            f"proxy {run['pss_proxy_mean_mib']:.1f}), "
            f"up p50 {latency['p50']:.0f} ms p99 {latency['p99']:.0f} ms, "
            f"{run['cpu_at_cap']} CPU s/GB at the cap"
        )
    return "\n".join(lines)
