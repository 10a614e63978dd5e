"""The arm64 .deb booted to a running agent in a Debian 12 arm64 guest (qemu-system-aarch64,
emulated: no KVM), systemd as PID 1. Slow (README.md, "Device test"): it runs only with
``IOTUNNEL_DEVICE_ARM64=1`` (``make device-test-arm64``)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from testbed import guest
from testbed.mqtt import mosquitto_config
from testbed.pki import PKI, CertPair

MQTT_PORT = 8883
CHECKS = (
    "install",
    "enabled-not-started",
    "broker",
    "agent-check",
    "agent-running",
    "awscrt-loaded",
)


def _skip_reason() -> str | None:
    if os.environ.get("IOTUNNEL_DEVICE_ARM64") != "1":
        return "slow (emulated arm64): make device-test-arm64 runs it"
    if os.geteuid() != 0:
        return "debootstrap needs root"
    missing = guest.missing_tools()
    if shutil.which("qemu-system-aarch64") is None:
        missing.append("qemu-system-arm")
    if missing:
        return f"missing Debian packages: {', '.join(missing)}"
    return None


pytestmark = [
    pytest.mark.device,
    pytest.mark.timeout(7200),
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]


def test_device_arm64(tmp_path: Path) -> None:
    phases: dict[str, float] = {}
    started = time.monotonic()
    base = guest.base_image_arm64()
    phases["rootfs"] = time.monotonic() - started

    started = time.monotonic()
    payload = tmp_path / "payload"
    deb = guest.build_deb(payload / "debs", tmp_path / "work", "arm64")
    pki = PKI.create(payload / "pki")
    pki.issue_client("thing-1")
    # mosquitto's settings, with the paths the PKI has in the guest
    inside = Path(guest.PAYLOAD_MOUNT) / "pki"
    pairs = [CertPair(inside / f"{n}.pem", inside / f"{n}.key") for n in ("ca", "server", "client")]
    mosquitto_config(payload, MQTT_PORT, PKI(inside, *pairs))
    (payload / "mqtt_port").write_text(f"{MQTT_PORT}\n")
    run = payload / "run"
    shutil.copy2(Path(__file__).with_name("guest_arm64.sh"), run)
    run.chmod(0o755)
    image = guest.payload_image(payload, tmp_path / "payload.ext4", size_mb=128)
    phases["package+payload"] = time.monotonic() - started

    boot = guest.boot_arm64(base, image, tmp_path)
    phases["guest"] = boot.seconds
    start, end = boot.uptime("start"), boot.uptime("end")
    if start is not None and end is not None:
        phases["guest boot"], phases["guest checks"] = start, end - start
    summary = (
        f"{deb.name}: phases (s): {json.dumps({k: round(v) for k, v in phases.items()})}, "
        f"qemu exit {boot.returncode}\n"
        + "\n".join(line for line in boot.report)
        + "\n--- console (last lines) ---\n"
        + "\n".join(boot.console.splitlines()[-40:])
    )
    (tmp_path / "summary.txt").write_text(summary)
    print(summary)
    assert any(line.startswith("DONE ") for line in boot.report), summary
    results = boot.results()
    failed = sorted(name for name, (ok, _) in results.items() if not ok)
    missing = [name for name in CHECKS if name not in results]
    assert (failed, missing) == ([], []), f"failed: {failed}, missing: {missing}\n{summary}"
