"""The .deb on a real booted Debian 12: systemd as PID 1, journald, the watchdog, upgrade, purge.

The host builds the package twice (the second time with a higher version), makes the PKI, and
puts both, the checkout's code and ``guest_check.py`` on a payload disk; the guest (qemu, no
network, root file system from ``testbed.guest``) runs the driver after ``multi-user.target``
and powers off. Its report comes back over the second serial port, one ``RESULT`` line per
check; this test asserts on every one of them. README.md, "Device test", has what it needs and
how long each phase takes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from testbed import guest
from testbed.pki import PKI

REPO = guest.REPO
VERSION_SUFFIX = "+devicetest1"
#: Every check the guest reports; each must be there and ok.
CHECKS = (
    "install",
    "system-user",
    "enabled-not-started",
    "skipped-without-key",
    "conffiles",
    "agent-check",
    "started",
    "tunnel-destination",
    "process-tree",
    "http-and-ssh",
    "status-line",
    "journal-priorities",
    "journal-tags",
    "hardening-runtime",
    "credential",
    "systemd-analyze-verify",
    "systemd-analyze-security",
    "watchdog",
    "tunnel-after-watchdog",
    "restart-after-crash",
    "upgrade",
    "upgrade-keeps-settings",
    "upgrade-restarts",
    "tunnel-after-upgrade",
    "journal-no-token",
    "purge",
    "purge-keeps-user",
)
_RUN = f"""#!/bin/sh
# Run by iotunnel-device-test.service in the guest.
export PYTHONPATH={guest.PAYLOAD_MOUNT}/src:{guest.GUEST_LIB}
exec python3 {guest.PAYLOAD_MOUNT}/src/guest_check.py {guest.PAYLOAD_MOUNT} /dev/ttyS1
"""


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "the device test boots an x86-64 guest on an x86-64 Linux machine"
    if os.geteuid() != 0:
        return "debootstrap needs root"
    missing = guest.missing_tools()
    if missing:
        return f"missing Debian packages: {', '.join(missing)} (make system-deps)"
    return None


pytestmark = [
    pytest.mark.device,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]


def make_payload(directory: Path) -> None:
    """The guest's second disk: both packages, the PKI, the code the driver uses."""
    debs = directory / "debs"
    first = guest.build_deb(debs, directory.parent / "work", "amd64")
    version = first.name.split("_")[1]
    second = guest.build_deb(debs, directory.parent / "work", "amd64", version + VERSION_SUFFIX)
    (debs / "versions.json").write_text(json.dumps([first.name, second.name]))
    pki = PKI.create(directory / "pki")
    pki.issue_client("thing-1")
    pki.issue_client("iotunnel-service")
    src = directory / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("iotunnel", "proxy", "service", "agent", "testbed"):
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    shutil.copy2(Path(__file__).with_name("guest_check.py"), src / "guest_check.py")
    run = directory / "run"
    run.write_text(_RUN)
    run.chmod(0o755)


def test_device(tmp_path: Path) -> None:
    phases: dict[str, float] = {}
    started = time.monotonic()
    base = guest.base_image()
    phases["rootfs"] = time.monotonic() - started

    started = time.monotonic()
    payload_dir = tmp_path / "payload"
    make_payload(payload_dir)
    payload = guest.payload_image(payload_dir, tmp_path / "payload.ext4")
    phases["packages+payload"] = time.monotonic() - started

    # TCG unless told: under this machine's nested KVM the guest hangs in early boot
    # (README.md, "Device test").
    run = guest.boot(base, payload, tmp_path, accel=os.environ.get("IOTUNNEL_DEVICE_ACCEL", "tcg"))
    phases["guest"] = run.seconds
    start, end = run.uptime("start"), run.uptime("end")
    if start is not None:
        phases["guest boot"] = start
        if end is not None:
            phases["guest checks"] = end - start
    results = run.results()
    summary = (
        f"phases (s): {json.dumps({k: round(v) for k, v in phases.items()})}, "
        f"accel {run.accel}, qemu exit {run.returncode}\n"
        + "\n".join(run.report)
        + "\n--- console (last lines) ---\n"
        + "\n".join(run.console.splitlines()[-60:])
    )
    (tmp_path / "summary.txt").write_text(summary)
    print(summary)
    assert run.returncode == 0, summary
    assert any(line.startswith("DONE ") for line in run.report), summary
    failed = sorted(name for name, (ok, _) in results.items() if not ok)
    missing = [name for name in CHECKS if name not in results]
    assert (failed, missing) == ([], []), f"failed: {failed}, missing: {missing}\n{summary}"
