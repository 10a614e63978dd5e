"""The benchmark's scenarios, small: on iotunnel's proxies and through ``--proxy-cmd``.

Figures are not checked (tests never assert timings); what is checked is that every scenario
runs through a real tunnel, moves what it should and reports it, and that another
implementation taking the reference's flags can be driven the same way.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as bench
from bench import agent_scale, charts, sidebyside, soak
from testbed.mqtt import mosquitto_binary
from testbed.pki import PKI


@pytest.mark.parametrize("proxy_cmd", [None, f"{shlex.quote(sys.executable)} -m proxy"])
def test_scenarios_run_through_a_tunnel(tmp_path: Path, proxy_cmd: str | None) -> None:
    pki = PKI.create(tmp_path / "pki")
    setup = bench.start(tmp_path / "run", pki, proxy_cmd, [])
    try:
        results = {
            "implementation": proxy_cmd or "iotunnel",
            "machine": "test",
            "date": "today",
            "unlimited": {
                "idle_rss_kib": bench.idle_rss(setup),
                "latency_idle": bench.latency_idle(setup, 20),
                "connection_setup": bench.connection_setup(setup, 5),
                "throughput": bench.throughput(setup, 2 * bench.MiB),
                "latency_under_bulk": bench.latency_under_bulk(setup, 10, 4 * bench.MiB),
                "many_connections": bench.many_connections(setup, 50),
            },
        }
    finally:
        setup.stack.close()
    section = results["unlimited"]
    for key in ("download_1conn_unpaced", "upload_4conn_unpaced"):
        moved = section["throughput"][key]
        assert moved["bytes"] == moved["expected"] == 2 * bench.MiB
        assert set(moved["cpu_s_per_gb"]) == {"source", "destination", "service"}
    assert section["latency_idle"]["count"] == 20
    assert section["connection_setup"]["first_byte_after_5ms"]["count"] == 5
    assert section["latency_under_bulk"]["bulk"]["bytes"] == 4 * bench.MiB
    assert section["many_connections"]["ok"] == 50
    assert all(kib > 1024 for kib in section["idle_rss_kib"].values())
    text = bench.table(results)
    assert "RTT 64 B on SSH1 during HTTP1 bulk [unlimited]" in text
    assert "50 simultaneous connections: 50 ok" in text
    json.dumps(results)


def test_reference_flags_carry_the_token_on_the_command_line(tmp_path: Path) -> None:
    """The reference takes ``-t``; iotunnel's own proxies get it from the environment."""
    pki = PKI.create(tmp_path / "pki")
    setup = bench.start(tmp_path / "run", pki, f"{shlex.quote(sys.executable)} -m proxy", [])
    try:
        argv = Path(f"/proc/{setup.destination.pid}/cmdline").read_bytes().split(b"\0")
        assert {b"-t", b"-d", b"-c"} <= set(argv)
        ours = bench.start(tmp_path / "ours", pki, None, [])
        try:
            argv = Path(f"/proc/{ours.destination.pid}/cmdline").read_bytes().split(b"\0")
            assert b"-t" not in argv
        finally:
            ours.stack.close()
    finally:
        setup.stack.close()


def test_soak_scenarios_run_small(tmp_path: Path) -> None:
    """``python -m bench --soak`` at a tiny size: tunnels through the management API, each
    closed with both proxies exiting cleanly, and connection waves through one tunnel."""
    pki = PKI.create(tmp_path / "pki")
    churn = soak.tunnel_churn(tmp_path / "tunnels", pki, 5, parallel=2, rest=0.0)
    assert churn["failures"] == []
    assert churn["proxies_exited_cleanly"] == churn["proxies"] == 10
    assert churn["retained_closed_tunnels"] == 5
    for key in ("service_before", "service_after_first_tunnel", "service_peak", "service_after"):
        assert set(churn[key]) == {"rss_kib", "fds"}
    assert churn["service_peak"]["fds"] >= churn["service_before"]["fds"]
    peers = soak.peer_churn(tmp_path / "peers", pki, 6, every=3, rest=0.0)
    assert [sample["tunnels"] for sample in peers["service_samples"]] == [3, 6]
    setup = bench.start(tmp_path / "connections", pki, None, [])
    try:
        connections = soak.connection_churn(setup.procs(), setup.ssh1, 200, 50)
    finally:
        setup.stack.close()
    assert (connections["count"], connections["wave"], connections["ok"]) == (200, 50, 200)
    assert set(connections["after"]) == {"source", "destination", "service"}
    results = {
        "machine": "test",
        "date": "today",
        "tunnel_churn": churn,
        "peer_churn": peers,
        "connection_churn": connections,
    }
    text = soak.table(results)
    assert "5 tunnels (2 at a time)" in text
    assert "10/10 proxies exited cleanly" in text
    assert "6 tunnels with in-process peers" in text
    assert "200 connections in waves of 50: 200 echoed" in text
    json.dumps(results)


def test_the_agent_scale_scenario_runs_both_launchers_at_tiny_size(tmp_path: Path) -> None:
    """bench --agent-scale with one tunnel: the agent, its launcher and proxies measured."""
    pytest.importorskip("awscrt", reason="the agent extra (awsiotsdk) is not installed")
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (Debian package 'mosquitto')")
    pki = PKI.create(tmp_path / "pki")
    section = agent_scale.agent_scale(tmp_path / "scale", pki, sizes=(1,), transfer=200_000)
    runs = {run["launcher"]: run for run in section["runs"]}
    assert set(runs) == {"fork", "spawn"}
    for launcher, run in runs.items():
        assert run["tunnels"] == 1
        # The agent and one proxy; with fork, the launcher too.
        assert run["processes"] == (3 if launcher == "fork" else 2)
        assert run["pss_total_mib"] > run["pss_agent_mib"] > 0
        assert (run["pss_launcher_mib"] > 0) == (launcher == "fork")
        assert run["notify_to_connected_ms"]["count"] == 1
        assert run["cpu_at_cap_detail"]["bytes"] == 200_000
        assert run["cpu_at_cap"] >= 0
    text = agent_scale.table(section)
    assert "fork   1 tunnel(s): PSS" in text
    json.dumps(section)


def tiny_side_by_side(tmp_path: Path, **options: Any) -> dict[str, Any]:
    """The side-by-side at a tiny size, the reference against iotunnel (skips without the
    reference); ``options`` go to :func:`bench.sidebyside.run`."""
    reference, why = sidebyside.find_reference()
    if reference is None:
        pytest.skip(why)
    section: dict[str, Any] = sidebyside.run(
        tmp_path / "run",
        PKI.create(tmp_path / "pki"),
        {"reference": reference, "iotunnel": None},
        transfer_bytes=2 * bench.MiB,
        rtt_count=10,
        bulk_rtt_count=10,
        setup_count=5,
        **options,
    )
    return section


def test_side_by_side_with_the_reference_runs_small(tmp_path: Path) -> None:
    """The side-by-side runs at a tiny size: the reference and iotunnel interleaved through
    their own tunnels, each figure with its runs and a ratio, and the charts (or a note that
    matplotlib is missing)."""
    section = tiny_side_by_side(tmp_path, rounds=2)
    figures = section["figures"]
    for name in ("reference", "iotunnel"):
        assert set(figures[name]) == {key for key, _ in sidebyside.METRICS}
        assert len(figures[name]["rtt_idle_median_ms"]["runs"]) == 2
        assert len(figures[name]["idle_rss_source_mib"]["runs"]) == 1
        assert len(section["rtt_bulk_samples_ms"][name]) == 2 * 10
    ratios = section["ratios"]["iotunnel"]
    # 2 MiB can take less CPU than a clock tick: a zero figure of the reference has no ratio.
    reference_figures = figures["reference"]
    assert set(ratios) == {k for k, _ in sidebyside.METRICS if reference_figures[k]["median"]}
    assert {"idle_rss_destination_mib", "rtt_idle_median_ms", "first_byte_p99_ms"} <= set(ratios)
    # ... and iotunnel's own CPU figure can be zero ticks too (a ratio of 0)
    assert all(value > 0 for key, value in ratios.items() if "_cpu_" not in key)
    assert all(value >= 0 for value in ratios.values())
    text = sidebyside.table(section)
    assert "iotunnel / ref" in text
    assert "destination CPU s/GB" in text
    notes = charts.draw({"side_by_side": section}, tmp_path / "charts")
    if importlib.util.find_spec("matplotlib") is None:
        assert notes[0].startswith("charts skipped: matplotlib is not installed")
    else:
        assert (tmp_path / "charts" / "rtt_under_bulk.png").stat().st_size > 1000
        assert notes[1].startswith("chart of memory per tunnel skipped")
    json.dumps(section)


def test_side_by_side_runs_only_the_scenarios_asked_for(tmp_path: Path) -> None:
    """``--side-by-side-scenario rtt_idle``: the idle round trips and the idle figures only."""
    section = tiny_side_by_side(tmp_path, rounds=1, scenarios=("rtt_idle",))
    for figures in section["figures"].values():
        assert set(figures) == {
            "idle_rss_source_mib",
            "idle_rss_destination_mib",
            "rtt_idle_median_ms",
            "rtt_idle_p99_ms",
        }
    assert "rtt_idle_median_ms" in section["ratios"]["iotunnel"]
    assert "download_destination_cpu_s_per_gb" not in section["ratios"]["iotunnel"]
    assert "first byte 5 ms after connect, median (ms)" in sidebyside.table(section)


def test_memory_chart_is_drawn_from_agent_scale(tmp_path: Path) -> None:
    """With an ``agent_scale`` section the memory chart is drawn, one line per launcher."""
    pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")
    rows = [
        {"tunnels": n, "pss_total_mib": 26 + per * n, "launcher": launcher}
        for launcher, per in (("fork", 6.0), ("spawn", 22.0))
        for n in (1, 4, 16)
    ]
    # the shape bench/agent_scale.py writes: {"runs": [...], ...}
    notes = charts.draw({"agent_scale": {"runs": rows}}, tmp_path)
    assert notes[0].startswith("chart of round trips under bulk skipped")
    assert (tmp_path / "memory_per_tunnel.png").stat().st_size > 1000
