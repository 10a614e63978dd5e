"""Side by side: the reference ``localproxy`` and iotunnel in the same run, interleaved.

Both pairs of proxies run at once, each through its own iotunnel tunnel service over TLS, to
their own ``blob`` and echo servers. Every scenario is run ``rounds`` times for each
implementation, alternating (A B, B A, A B, ...), so that a noisy neighbour on a shared machine
weighs on both. A figure is the median of its runs, with the range of the runs beside it; a
ratio is iotunnel's median over the reference's.

The reference's source buffers whatever its tunnel brings without bound, so every transfer here
is paced by its *sender*: at 1 Gbit/s (125 MB/s) for CPU per byte, at 20 MB/s under the round
trips of SSH1 (at 1 Gbit/s its source falls behind on this machine and exits). The ``blob``
server sends a download at that rate, so nothing piles up in either implementation. There is no
upload: at 1 Gbit/s the reference's destination exits ("basic_multi_buffer too long") even when
the client paces it. A run that fails that way is noted and run again on a fresh start.
"""

from __future__ import annotations

import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from testbed.harness import rss_kib
from testbed.pki import PKI
from testbed.reference import find_localproxy

#: 1 Gbit/s, the pace of the transfers that measure CPU per byte.
GBIT = 125_000_000
#: The pace of the bulk download under the round trips of SSH1: at 1 Gbit/s on this machine's
#: two shared cores the reference's source falls behind and exits ("basic_multi_buffer too long").
BULK = 20_000_000
#: Where a checkout finds the reference binary: ``shared/`` beside the repository.

#: (key, label, unit, lower is better) of every figure compared, in table order.
METRICS: list[tuple[str, str]] = [
    ("idle_rss_source_mib", "idle RSS, source proxy (MiB)"),
    ("idle_rss_destination_mib", "idle RSS, destination proxy (MiB)"),
    ("download_destination_cpu_s_per_gb", "download 1 Gbit/s paced: destination CPU s/GB"),
    ("download_source_cpu_s_per_gb", "download 1 Gbit/s paced: source CPU s/GB"),
    ("rtt_idle_median_ms", "RTT 64 B idle, median (ms)"),
    ("rtt_idle_p99_ms", "RTT 64 B idle, p99 (ms)"),
    ("rtt_bulk_median_ms", "SSH1 RTT under 20 MB/s paced bulk, median (ms)"),
    ("rtt_bulk_p99_ms", "SSH1 RTT under 20 MB/s paced bulk, p99 (ms)"),
    ("first_byte_median_ms", "first byte 5 ms after connect, median (ms)"),
    ("first_byte_p99_ms", "first byte 5 ms after connect, p99 (ms)"),
]


#: The scenarios, in the order they run (``python -m bench --side-by-side-scenario NAME``).
SCENARIOS = ("rtt_idle", "first_byte", "download", "rtt_bulk")

#: Runs of a scenario that fail (the reference's buffer limits) are run again, this many times.
RETRIES = 3


def find_reference() -> tuple[str | None, str]:
    """The reference binary as a command (``testbed.reference``), else None and why not."""
    path, why = find_localproxy()
    return (None, why) if path is None else (shlex.quote(str(path)), "")


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def run(
    workdir: Path,
    pki: PKI,
    impls: dict[str, str | None],
    *,
    rounds: int,
    transfer_bytes: int,
    rtt_count: int,
    bulk_rtt_count: int,
    setup_count: int,
    scenarios: Sequence[str] = SCENARIOS,
) -> dict[str, Any]:
    """Every implementation in ``impls`` (name -> ``--proxy-cmd``, None for iotunnel's own
    proxies started as the bench starts them), each of ``scenarios`` (names from
    :data:`SCENARIOS`) ``rounds`` times, interleaved."""
    from bench.__main__ import background, cpu_seconds, load, start

    names = list(impls)
    runs: dict[str, dict[str, list[float]]] = {n: {k: [] for k, _ in METRICS} for n in names}
    bulk_samples: dict[str, list[float]] = {n: [] for n in names}
    failures: dict[str, list[str]] = {n: [] for n in names}
    setups = {}
    try:
        for name, cmd in impls.items():
            setups[name] = start(workdir / name, pki, cmd, [])
        time.sleep(1.0)  # settle before the idle figures
        for name, s in setups.items():
            runs[name]["idle_rss_source_mib"].append(round(rss_kib(s.source.pid) / 1024, 2))
            runs[name]["idle_rss_destination_mib"].append(
                round(rss_kib(s.destination.pid) / 1024, 2)
            )

        def transfer(name: str, direction: str) -> None:
            s = setups[name]
            procs = {"source": s.source, "destination": s.destination}
            before = {k: cpu_seconds(p.pid) for k, p in procs.items()}
            args = ["--bytes", str(transfer_bytes), "--rate", str(GBIT)]
            if direction == "download":
                args.append("--server-paced")  # else the reference's source buffers it all
            result = load(direction, s.http1, *args, timeout=300)
            if result["bytes"] != transfer_bytes:
                raise RuntimeError(f"{name}: {direction} moved {result['bytes']} bytes")
            gb = result["bytes"] / 1e9
            for k, p in procs.items():
                key = f"{direction}_{k}_cpu_s_per_gb"
                runs[name][key].append(round((cpu_seconds(p.pid) - before[k]) / gb, 3))

        def rtt_idle(name: str) -> None:
            r = load("rtt", setups[name].ssh1, "--count", str(rtt_count), "--interval", "0.002")
            runs[name]["rtt_idle_median_ms"].append(r["median_ms"])
            runs[name]["rtt_idle_p99_ms"].append(r["p99_ms"])

        def rtt_bulk(name: str) -> None:
            s = setups[name]
            # The bulk outlasts the round trips: each takes at most a few ms plus the 10 ms gap.
            size = int(BULK * (1.0 + bulk_rtt_count * 0.03))
            bulk = background(
                "download", s.http1, "--bytes", str(size), "--rate", str(BULK), "--server-paced"
            )
            try:
                time.sleep(0.5)
                r = load(
                    "rtt",
                    s.ssh1,
                    "--count",
                    str(bulk_rtt_count),
                    "--interval",
                    "0.01",
                    "--samples",
                )
            finally:
                bulk.kill()
                bulk.communicate(timeout=60)
            runs[name]["rtt_bulk_median_ms"].append(r["median_ms"])
            runs[name]["rtt_bulk_p99_ms"].append(r["p99_ms"])
            bulk_samples[name].extend(r["samples_ms"])

        def first_byte(name: str) -> None:
            r = load("setup", setups[name].ssh1, "--count", str(setup_count), "--delay", "0.005")
            runs[name]["first_byte_median_ms"].append(r["median_ms"])
            runs[name]["first_byte_p99_ms"].append(r["p99_ms"])

        by_name: dict[str, Callable[[str], None]] = {
            "rtt_idle": rtt_idle,
            "first_byte": first_byte,
            "download": lambda n: transfer(n, "download"),
            "rtt_bulk": rtt_bulk,
        }
        restarts = 0
        for scenario in [by_name[name] for name in SCENARIOS if name in scenarios]:
            for i in range(rounds):
                for name in names if i % 2 == 0 else reversed(names):
                    for attempt in range(RETRIES + 1):
                        try:
                            scenario(name)
                            break
                        except RuntimeError as exc:
                            # The reference gives up a connection (or its whole tunnel) when a
                            # burst outruns its buffers: note it, start it afresh and run again.
                            failures[name].append(f"{type(exc).__name__}: {str(exc)[-300:]}")
                            if attempt == RETRIES:
                                raise
                            setups[name].stack.close()
                            restarts += 1
                            setups[name] = start(
                                workdir / f"{name}-{restarts}", pki, impls[name], []
                            )
        peak = {
            name: {
                "source": round(_peak_mib(s.source.pid), 1),
                "destination": round(_peak_mib(s.destination.pid), 1),
            }
            for name, s in setups.items()
        }
    finally:
        for s in setups.values():
            s.stack.close()
    figures = {
        name: {
            key: {"median": _median(v), "min": min(v), "max": max(v), "runs": v}
            for key, v in metrics.items()
            if v
        }
        for name, metrics in runs.items()
    }
    return {
        "implementations": {n: c or "iotunnel" for n, c in impls.items()},
        "rounds": rounds,
        "transfer_bytes": transfer_bytes,
        "pace_bytes_per_s": GBIT,
        "bulk_bytes_per_s": BULK,
        "figures": figures,
        "ratios": ratios(figures),
        "peak_rss_mib": peak,
        "rtt_bulk_samples_ms": bulk_samples,
        "failed_runs": failures,
    }


def _peak_mib(pid: int) -> float:
    from testbed.harness import peak_rss_kib

    return peak_rss_kib(pid) / 1024


def ratios(figures: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Each implementation's medians over the reference's (none without a reference)."""
    reference = figures.get("reference")
    if not reference:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, metrics in figures.items():
        if name == "reference":
            continue
        out[name] = {
            key: round(value["median"] / reference[key]["median"], 2)
            for key, value in metrics.items()
            if key in reference and reference[key]["median"]
        }
    return out


def table(section: dict[str, Any]) -> str:
    """The side-by-side figures: median [min-max] per implementation, then the ratios."""
    if "skipped" in section:
        return f"side by side: skipped: {section['skipped']}"
    figures = section["figures"]
    names = list(figures)
    rat = section.get("ratios", {})
    others = [n for n in names if n in rat]
    header = f"  {'':52}" + "".join(f"{n:>24}" for n in names)
    header += "".join(f"{n + ' / ref':>18}" for n in others)
    lines = [
        f"side by side: {section['rounds']} interleaved runs each, median [range];"
        f" transfers of {section['transfer_bytes'] // (1 << 20)} MiB paced at"
        f" {section['pace_bytes_per_s'] // 1_000_000} MB/s by the sender",
        header,
    ]
    for key, label in METRICS:
        cells = []
        for n in names:
            f = figures[n].get(key)
            cells.append(f"{f['median']:.3g} [{f['min']:.3g}-{f['max']:.3g}]" if f else "-")
        row = f"  {label:52}" + "".join(f"{c:>24}" for c in cells)
        row += "".join(f"{rat[n][key]:>18.2f}" if key in rat[n] else f"{'-':>18}" for n in others)
        lines.append(row)
    failed = {n: len(f) for n, f in section.get("failed_runs", {}).items() if f}
    if failed:
        lines.append(
            "  runs failed and run again (the implementation restarted): "
            + ", ".join(f"{n} {k}" for n, k in failed.items())
        )
    peak = section.get("peak_rss_mib", {})
    if peak:
        lines.append(
            "  peak RSS (MiB): "
            + "; ".join(
                f"{n} source {p['source']}, destination {p['destination']}" for n, p in peak.items()
            )
        )
    return "\n".join(lines)
