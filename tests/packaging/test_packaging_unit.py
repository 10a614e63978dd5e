"""The systemd unit: what it must say, systemd-analyze verify, and its security exposure."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from deb_harness import REPO, UNIT, run

from agent.config import KEYS

MAX_EXPOSURE = 2.0


def directives() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, values in order (a key may repeat)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    version = run([tool, "--version"]).stdout.split()
    if int(version[1]) < 252:  # --offline= came in 252 (Debian 12)
        pytest.skip(f"systemd-analyze {version[1]} has no --offline")
    return tool


def test_the_unit_is_a_notify_service_with_a_watchdog() -> None:
    d = directives()
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["ExecStart"] == ["/usr/bin/iotunnel-agent"]
    assert d["WatchdogSec"] == ["30"]
    # Ready means subscribed at the broker: an offline boot must not time out into the start
    # limit. The watchdog (pinged from the start) still catches a stuck agent.
    assert d["TimeoutStartSec"] == ["infinity"]
    assert d["Restart"] == ["on-failure"]
    assert int(d["StartLimitBurst"][0]) >= 1
    assert int(d["StartLimitIntervalSec"][0]) > 0
    assert d["RestartPreventExitStatus"] == ["2"]  # the agent's exit code for bad settings
    assert d["KillMode"] == ["mixed"]  # the agent stops its proxies itself
    assert d["WantedBy"] == ["multi-user.target"]


def test_the_unit_starts_after_the_network_and_the_clock() -> None:
    """time-sync.target is passive: ordered after, never pulled in (a device that has no time
    service would wait for nothing, and one that waits would not start offline)."""
    d = directives()
    after = " ".join(d["After"]).split()
    assert {"network-online.target", "time-sync.target"} <= set(after)
    assert "time-sync.target" not in " ".join(d.get("Wants", []) + d.get("Requires", []))


def test_the_unit_runs_unprivileged_and_hardened() -> None:
    d = directives()
    assert d["User"] == ["iotunnel"]
    assert d["StateDirectory"] == ["iotunnel"]
    assert d["StateDirectoryMode"] == ["0700"]  # the kept tunnels hold tokens
    assert d["ConfigurationDirectory"] == ["iotunnel"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["AmbientCapabilities"] == [""]
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectHome",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "PrivateUsers",
    ):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert d["SystemCallFilter"][0] == "@system-service"


def test_the_key_is_a_credential_where_agent_ini_expects_it() -> None:
    """LoadCredential= reads the path that config/agent.ini names, the condition waits for it,
    and the agent finds the credential through its ``key`` variable."""
    d = directives()
    ini = (REPO / "config/agent.ini").read_text()
    match = re.search(r"(?m)^key = (\S+)$", ini)
    assert match is not None
    key_path = match.group(1)
    assert d["LoadCredential"] == [f"device.key:{key_path}"]
    assert d["ConditionPathExists"] == [key_path]
    [key] = [k for k in KEYS if k.name == "key"]
    assert d["Environment"] == [f"{key.variable}=%d/device.key"]


def test_the_system_user_is_the_units() -> None:
    sysusers = (REPO / "packaging/debian/iotunnel.sysusers").read_text()
    assert re.search(r"(?m)^u iotunnel - ", sysusers)
    postinst = (REPO / "packaging/debian/postinst").read_text()
    assert "--group" in postinst
    assert re.search(r"--quiet iotunnel$", postinst, re.MULTILINE)


def test_security_exposure_is_ok() -> None:
    """``systemd-analyze security --offline=yes`` rates the unit at most 2.0 ("OK")."""
    tool = systemd_analyze()
    done = run([tool, "security", "--offline=yes", "--no-pager", UNIT])
    match = re.search(
        r"Overall exposure level for iotunnel-agent.service: (\d+\.\d+) (\w+)", done.stdout
    )
    assert match is not None, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout
    assert match.group(2) == "OK"
    threshold = run(
        [tool, "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", UNIT]
    )
    assert threshold.returncode == 0, threshold.stdout


def test_systemd_analyze_verify(unpacked: dict[str, Path], tmp_path: Path) -> None:
    """``systemd-analyze verify`` of the packaged unit, with ExecStart= pointed at the packaged
    entry point (verify checks that the command exists on this machine)."""
    tool = systemd_analyze()
    root = unpacked["amd64"]
    unit = (root / "lib/systemd/system/iotunnel-agent.service").read_text()
    executable = root / "opt/iotunnel/bin/iotunnel-agent"
    assert "ExecStart=/usr/bin/iotunnel-agent\n" in unit
    copy = tmp_path / "iotunnel-agent.service"
    copy.write_text(unit.replace("ExecStart=/usr/bin/", f"ExecStart={executable.parent}/"))
    done = run([tool, "verify", "--man=no", copy])
    assert done.returncode == 0, done.stderr
    assert done.stdout == done.stderr == "", done.stdout + done.stderr
