"""agent.report: the audit line, the status file, the STATUS= line, ``iotunnel-agent status``."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.report import (
    STATUS_FILE,
    Snapshot,
    TunnelReport,
    audit_record,
    human_bytes,
    human_duration,
    process_start,
    read_snapshot,
    remove_snapshot,
    render_table,
    status_command,
    status_line,
    write_snapshot,
)
from agent.state import StateStore
from iotunnel.status import Closed


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (5325, "5.2 KiB"),
        (310 * 1024, "310 KiB"),
        (3 * 1024 * 1024 // 2, "1.5 MiB"),
        (5 << 40, "5.0 TiB"),
    ],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_human_duration() -> None:
    assert human_duration(751.9) == "00:12:31"
    assert human_duration(0.2) == "00:00:00"
    assert human_duration(100 * 3600 + 61) == "100:01:01"


def test_audit_record() -> None:
    closed = Closed("SSH1", "SSH1/2/1", 5325, 310 * 1024, 751.25, "peer", "127.0.0.1:22")
    message, fields = audit_record(closed)
    assert message == (
        "SSH1 connection 2/1 to 127.0.0.1:22 closed (peer): 5.2 KiB in, 310 KiB out, 00:12:31"
    )
    assert fields == {
        "IOTUNNEL_EVENT": "connection-closed",
        "SERVICE_ID": "SSH1",
        "CONNECTION": "SSH1/2/1",
        "LOCAL_ENDPOINT": "127.0.0.1:22",
        "BYTES_IN": "5325",
        "BYTES_OUT": "317440",
        "DURATION_S": "751.250",
        "CLOSED_BY": "peer",
    }
    unknown, _ = audit_record(Closed("A", "A/1/1", 0, 0, 0.0, "reset"))
    assert (
        unknown
        == "A connection 1/1 to an unknown endpoint closed (reset): 0 B in, 0 B out, 00:00:00"
    )


def snapshot(pid: int | None = None, *, tunnels: int = 1) -> Snapshot:
    pid = os.getpid() if pid is None else pid
    reports = tuple(
        TunnelReport(
            tag=f"t{n}",
            services=("HTTP1", "SSH1"),
            since=time.time() - 60,
            state="connected",
            open=2,
            closed=5,
            bytes_in=5325,
            bytes_out=310 * 1024,
            last_error="lost the connection" if n == 2 else None,
        )
        for n in range(1, tunnels + 1)
    )
    return Snapshot(pid, process_start(pid), time.time() - 100, time.time(), "connected", reports)


def test_the_status_line_and_table_come_from_the_same_snapshot() -> None:
    shot = snapshot(tunnels=2)
    assert status_line(shot) == "MQTT connected; 2 tunnels, 4 streams"
    table = render_table(shot)
    lines = table.splitlines()
    assert lines[0].startswith(f"iotunnel-agent running (pid {os.getpid()}, since ")
    assert lines[0].endswith("): MQTT connected; 2 tunnels, 4 streams")
    assert lines[1].split() == [
        "TUNNEL", "SERVICES", "SINCE", "STATE", "OPEN", "CLOSED", "IN", "OUT", "LAST", "ERROR",
    ]  # fmt: skip
    assert lines[2].split()[:2] == ["t1", "HTTP1,SSH1"]
    assert lines[2].split()[4:] == ["connected", "2", "5", "5.2", "KiB", "310", "KiB", "-"]
    assert lines[3].endswith("lost the connection")
    assert status_line(snapshot(tunnels=0)) == "MQTT connected; 0 tunnels, 0 streams"
    assert render_table(snapshot(tunnels=0)).count("\n") == 1


def test_the_file_is_written_atomically_read_back_and_removed(tmp_path: Path) -> None:
    shot = snapshot(tunnels=2)
    write_snapshot(tmp_path, shot)
    path = tmp_path / STATUS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATUS_FILE]
    assert read_snapshot(tmp_path) == shot
    remove_snapshot(tmp_path)
    assert read_snapshot(tmp_path) is None
    remove_snapshot(tmp_path)  # twice is fine


def test_the_resume_loader_leaves_the_status_file_alone(tmp_path: Path) -> None:
    write_snapshot(tmp_path, snapshot())
    (tmp_path / ".status.json.tmp").write_text("{}")
    loaded = StateStore(tmp_path).load({"SSH1"})
    assert (loaded.tunnels, loaded.problems) == ([], [])
    assert (tmp_path / STATUS_FILE).exists()


def run_status(directory: Path, *, as_json: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    code = status_command(directory, as_json=as_json, out=out)
    return code, out.getvalue()


def test_status_of_a_running_agent(tmp_path: Path) -> None:
    write_snapshot(tmp_path, snapshot())
    code, text = run_status(tmp_path)
    assert code == 0
    assert text.splitlines()[2].split()[:2] == ["t1", "HTTP1,SSH1"]
    code, text = run_status(tmp_path, as_json=True)
    document = json.loads(text)
    assert code == 0
    assert document["running"] is True
    assert document["tunnels"][0]["bytes_out"] == 310 * 1024


def test_status_without_an_agent(tmp_path: Path) -> None:
    assert run_status(tmp_path) == (
        3,
        f"iotunnel-agent is not running (no {tmp_path}/status.json)\n",
    )
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(dead.stdout)
    write_snapshot(tmp_path, snapshot(pid))
    code, text = run_status(tmp_path)
    assert code == 3
    assert text == (
        f"iotunnel-agent is not running ({tmp_path}/status.json is left from pid {pid}, "
        "which has exited)\n"
    )
    code, text = run_status(tmp_path, as_json=True)
    assert (code, json.loads(text)["running"]) == (3, False)


def test_status_of_a_reused_pid_is_not_running(tmp_path: Path) -> None:
    shot = snapshot()
    assert shot.pid_start is not None
    stale = Snapshot(shot.pid, shot.pid_start - 1, shot.started, shot.updated, "connected", ())
    write_snapshot(tmp_path, stale)
    assert run_status(tmp_path)[0] == 3


def test_a_broken_status_file_is_one_line_exit_4(tmp_path: Path) -> None:
    (tmp_path / STATUS_FILE).write_text('{"version": 1, "pid": "secret-ish"')
    code, text = run_status(tmp_path)
    assert code == 4
    assert text.count("\n") == 1
    assert "secret-ish" not in text
    (tmp_path / STATUS_FILE).write_text('{"version": 1, "pid": 1}')
    code, text = run_status(tmp_path)
    assert (code, text) == (
        4,
        f"iotunnel-agent: {tmp_path}/status.json: a field is missing or of the wrong type\n",
    )


def test_the_command_finds_the_state_dir_through_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ini = tmp_path / "agent.ini"
    ini.write_text("[agent]\nstate_dir = state\nclient_id = x\n")
    write_snapshot(state, snapshot())
    monkeypatch.delenv("IOTUNNEL_STATE_DIR", raising=False)
    assert main(["status", "--config", str(ini)]) == 0
    assert "HTTP1,SSH1" in capsys.readouterr().out
    assert main(["status", "--config", str(ini), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == os.getpid()
    assert main(["status", "--state-dir", str(tmp_path)]) == 3
    assert "is not running" in capsys.readouterr().out
    ini.write_text("[agent]\nbogus = 1\n")
    assert main(["status", "--config", str(ini)]) == 2
    assert (
        capsys.readouterr().err == f"iotunnel-agent status: error: {ini}:2: unknown key 'bogus'\n"
    )
    assert main(["status", "--nope"]) == 2
