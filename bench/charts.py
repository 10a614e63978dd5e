"""The benchmark's charts (matplotlib, from the ``bench`` extra; without it they are skipped
with a note): SSH1 round trips under a bulk transfer, one curve per implementation, and memory
against the number of tunnels when the results hold an ``agent_scale`` section."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def draw(results: dict[str, Any], outdir: Path) -> list[str]:
    """Draw what ``results`` has data for into ``outdir``; one line per chart drawn or skipped."""
    if importlib.util.find_spec("matplotlib") is None:
        return ["charts skipped: matplotlib is not installed (pip install -e '.[bench]')"]
    import matplotlib

    matplotlib.use("Agg")
    outdir.mkdir(parents=True, exist_ok=True)
    notes = []
    samples = results.get("side_by_side", {}).get("rtt_bulk_samples_ms")
    if samples and any(samples.values()):
        path = outdir / "rtt_under_bulk.png"
        rtt_cdf(samples, path, results.get("side_by_side", {}).get("bulk_bytes_per_s"))
        notes.append(f"chart: {path}")
    else:
        notes.append("chart of round trips under bulk skipped: no side-by-side samples")
    scale = results.get("agent_scale")
    rows = scale.get("runs") if isinstance(scale, dict) else scale  # bench/agent_scale.py's section
    if isinstance(rows, list) and rows:
        path = outdir / "memory_per_tunnel.png"
        memory_per_tunnel(rows, path)
        notes.append(f"chart: {path}")
    else:
        notes.append("chart of memory per tunnel skipped: no agent_scale section")
    return notes


def rtt_cdf(samples: dict[str, list[float]], path: Path, pace: int | None) -> None:
    """The distribution (CDF, log x) of the round trips of each implementation."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, values in samples.items():
        if not values:
            continue
        ordered = sorted(values)
        n = len(ordered)
        ax.step(
            ordered,
            [(i + 1) / n for i in range(n)],
            where="post",
            label=f"{name} ({n} round trips)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("round trip of 64 B on SSH1 (ms, log scale)")
    ax.set_ylabel("fraction of round trips at most this long")
    during = f"a {pace / 1e6:.0f} MB/s paced" if pace else "a"
    ax.set_title(f"SSH1 round trips during {during} HTTP1 download")
    ax.axhline(0.99, color="grey", linewidth=0.6, linestyle=":")
    ax.text(ax.get_xlim()[0], 0.99, " p99", va="bottom", fontsize=8, color="grey")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def memory_per_tunnel(rows: list[dict[str, Any]], path: Path) -> None:
    """Total proportional memory (PSS) of the agent and its proxies against the tunnels open,
    one line per launcher."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    launchers = sorted({str(r.get("launcher", "agent")) for r in rows})
    for launcher in launchers:
        points = sorted(
            (int(r["tunnels"]), float(r["pss_total_mib"]))
            for r in rows
            if str(r.get("launcher", "agent")) == launcher
        )
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=launcher)
    top = max(int(r["tunnels"]) for r in rows)
    ax.plot([0, top], [40, 40 + 8 * top], color="grey", linestyle="--", label="target 40 + 8 N")
    ax.set_xlabel("tunnels open")
    ax.set_ylabel("agent + proxies, PSS (MiB)")
    ax.set_title("Memory against the number of tunnels")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, linewidth=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
