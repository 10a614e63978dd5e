"""armhf: awscrt cross-built for armv7l (PyPI has no such wheel), the package built with it,
and the package's code run under qemu-arm with Debian 12's armhf python3.11, up to the agent's
MQTT session with mutual TLS (the cross-built awscrt) to mosquitto."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deb_harness import BUILD, REPO, elf_machine, extract, field, project_version, run

from testbed.harness import Stack, agent_ini
from testbed.mqtt import mosquitto_binary
from testbed.pki import PKI

ARMHF = REPO / "packaging" / "armhf.py"
EM_ARM = 40
TOOLS = ("arm-linux-gnueabihf-gcc", "arm-linux-gnueabihf-strip", "cmake", "apt-get", "readelf")


@pytest.fixture(scope="session")
def armhf_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The armhf package, with awscrt cross-built (cached in ~/.cache/iotunnel/armhf)."""
    missing = [tool for tool in (*TOOLS, "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"cannot cross-build for armhf, missing: {', '.join(missing)}")
    done = run([sys.executable, ARMHF, "awscrt"], timeout=1200)
    assert done.returncode == 0, done.stderr
    wheel = Path(done.stdout.strip())
    assert re.fullmatch(r"awscrt-[\d.]+-cp311-abi3-linux_armv7l\.whl", wheel.name)
    base = tmp_path_factory.mktemp("armhf")
    argv = [sys.executable, BUILD, "--arch", "armhf", "--wheelhouse", wheel.parent]
    done = run([*argv, "--out", base / "dist", "--work", base / "work"], timeout=600)
    assert done.returncode == 0, done.stderr
    deb = base / "dist" / f"iotunnel_{project_version()}_armhf.deb"
    assert done.stdout.split() == [str(deb)]
    return deb


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path / "run") as s:
        yield s


def test_armhf_package(armhf_deb: Path, tmp_path: Path) -> None:
    assert field(armhf_deb, "Architecture") == "armhf"
    depends = field(armhf_deb, "Depends")
    match = re.search(r"libc6 \(>= 2\.(\d+)\)", depends)
    assert match is not None
    assert int(match.group(1)) <= 36  # Debian 12 / Raspberry Pi OS bookworm
    lib = extract(armhf_deb, tmp_path / "root") / "opt/iotunnel/lib"
    elf = {p.relative_to(lib): elf_machine(p) for p in lib.rglob("*.so")}
    assert set(elf.values()) == {EM_ARM}, elf
    assert Path("_awscrt.abi3.so") in elf
    assert not (lib / "uvloop").exists()  # no armv7l wheel: optional, left out
    for path in elf:
        assert (lib / path).read_bytes()[4] == 1  # ELFCLASS32
    if shutil.which("lintian"):
        done = run(["lintian", "--fail-on", "error,warning", armhf_deb], timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr


def test_armhf_package_runs_under_qemu(
    armhf_deb: Path, tmp_path: Path, stack: Stack, pki: PKI
) -> None:
    if shutil.which("qemu-arm") is None:
        pytest.skip("qemu-arm is not installed (Debian package qemu-user)")
    done = run([sys.executable, ARMHF, "sysroot"], timeout=600)
    assert done.returncode == 0, done.stderr
    sysroot = Path(done.stdout.strip())
    root = extract(armhf_deb, tmp_path / "root")
    python = ["qemu-arm", "-L", str(sysroot), str(sysroot / "usr/bin/python3.11"), "-I"]
    bin_dir = root / "opt/iotunnel/bin"

    version = run([*python, bin_dir / "iotunnel-agent", "--version"])
    assert version.stdout == f"iotunnel-agent {project_version()}\n", version.stderr
    usage = run([*python, bin_dir / "iotunnel-proxy", "--help"])
    assert usage.stdout.startswith("usage: iotunnel-proxy "), usage.stderr

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")
    _, broker_port = stack.mosquitto(pki)
    device = pki.issue_client("armhf-thing")
    mappings = tmp_path / "destination.d"
    mappings.mkdir()
    (mappings / "SSHDestination.ini").write_text("SSH1 = 22\n")
    ini = agent_ini(
        tmp_path / "agent.ini",
        {
            "endpoint": "localhost",
            "port": broker_port,
            "client_id": "armhf-thing",
            "cert": device.cert,
            "key": device.key,
            "root_ca": pki.ca.cert,
            "mapping_dir": mappings,
            "log_level": "debug",
        },
    )
    agent = stack.start(
        "agent-armhf", [*python, str(bin_dir / "iotunnel-agent"), "--config", str(ini)]
    )
    agent.wait_for("ready: waiting for tunnel notifications", timeout=120)
    assert "subscribed to $aws/things/armhf-thing/tunnels/notify" in agent.output()
