"""A Debian 12 guest under qemu, booted with systemd as PID 1, for the device test.

::

    base = base_image(arch="amd64")           # cached in /var/cache/iotunnel-device/<key>/
    payload = payload_image(directory, out)   # one run's files: mounted at /mnt/payload
    report = boot(base, payload, workdir)     # until the guest powers off; its RESULT lines

The root file system is made from Debian's packages with ``debootstrap`` (no mounting: the
image is populated with ``mkfs.ext4 -d``), plus, installed from PyPI with this machine's pip
(``pip install --target``), what the guest's test driver needs and the device package does not
bring: the tunnel service's and the AWS CLI's Python packages, at this virtualenv's versions.
It is cached outside the checkout under a key that hashes the package lists and
:data:`BUILDER_VERSION`, and rebuilt when missing. The guest never has a network (``-nic
none``). It boots ``/opt/iotunnel-device/run`` from the payload disk through
``iotunnel-device-test.service`` after ``multi-user.target``, and powers off when it ends. The
driver writes its report to the second serial port (``/dev/ttyS1``); the first one is the
console (kernel and systemd), kept for diagnosis.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Bump when what the builder puts into the image changes.
BUILDER_VERSION = 1
REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("IOTUNNEL_DEVICE_CACHE") or "/var/cache/iotunnel-device")
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
#: Debian packages of the guest: systemd as init, the kernel, what iotunnel depends on
#: (python3, adduser, libc6, libstdc++6), and the device's other parts (broker, sshd, ssh, curl).
PACKAGES = (
    "systemd-sysv",
    "dbus",
    "linux-image-cloud-amd64",
    "python3",
    "python3-venv",
    "adduser",
    "libstdc++6",
    "mosquitto",
    "openssh-server",
    "openssh-client",
    "curl",
    "procps",
    "iproute2",
)
#: Python distributions the guest's driver uses (the service, testbed, the AWS CLI), pinned to
#: what this virtualenv has.
PYPI = (
    "awscli",
    "boto3",
    "botocore",
    "h11",
    "awsiotsdk",
    "awscrt",
    "websockets",
    "protobuf",
    "cryptography",
)
KERNEL_ARCH = {"amd64": "qemu-system-x86_64"}
#: Where the payload disk is mounted in the guest, and the script the test unit runs.
PAYLOAD_MOUNT = "/opt/iotunnel-device"
GUEST_LIB = "/opt/iotunnel-device-lib"
REPORT_PREFIX = "RESULT "

_TEST_UNIT = f"""\
[Unit]
Description=iotunnel device test (payload disk)
After=multi-user.target
ConditionPathExists={PAYLOAD_MOUNT}/run
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart={PAYLOAD_MOUNT}/run
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""


class GuestError(RuntimeError):
    """The image could not be built or the guest did not run."""


@dataclass(frozen=True)
class BaseImage:
    """A cached root file system image and the kernel and initrd from it."""

    directory: Path
    image: Path
    kernel: Path
    initrd: Path


def missing_tools() -> list[str]:
    """What building and booting needs that this machine lacks (Debian package names)."""
    missing = []
    for tool, package in (
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            missing.append(package)
    return missing


def pinned_requirements() -> list[str]:
    """:data:`PYPI` at the versions this interpreter has (``name==version``)."""
    pins = []
    for name in PYPI:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise GuestError(f"{name} is not installed here (make venv)") from None
    return pins


def cache_key(pins: Sequence[str]) -> str:
    text = json.dumps([BUILDER_VERSION, SUITE, sorted(PACKAGES), sorted(pins), _TEST_UNIT])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run(argv: Sequence[str | Path], *, timeout: float) -> str:
    done = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise GuestError(f"{Path(str(argv[0])).name} failed ({done.returncode}):\n{tail}")
    return done.stdout


def base_image(*, cache: Path = CACHE, log: Path | None = None) -> BaseImage:
    """The cached amd64 root file system image, built first when missing (a few minutes)."""
    pins = pinned_requirements()
    directory = cache / cache_key(pins)
    result = BaseImage(
        directory, directory / "root.ext4", directory / "vmlinuz", directory / "initrd.img"
    )
    if (directory / "complete").exists():
        return result
    missing = missing_tools()
    if missing:
        raise GuestError(f"missing Debian packages: {', '.join(missing)}")
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    root = directory / "root"
    started = time.monotonic()
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            root,
            MIRROR,
        ],
        timeout=3600,
    )
    _configure(root)
    # This interpreter is CPython 3.11 on x86-64 like Debian 12's python3 in the guest, so pip
    # resolves the same wheels; it never runs anything inside the image.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-compile",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--target",
            root / GUEST_LIB.lstrip("/"),
            *pins,
        ],
        timeout=1800,
    )
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise GuestError(f"no kernel or initrd in {root / 'boot'}")
    config = (root / "boot" / kernels[-1].name.replace("vmlinuz", "config")).read_text()
    if "CONFIG_VIRTIO_BLK=y" not in config:
        initrd = f"/boot/{initrds[-1].name}"
        modules = _run(["chroot", root, "lsinitramfs", initrd], timeout=300)
        if "virtio_blk" not in modules:
            raise GuestError("the guest's initramfs has no virtio_blk")
    shutil.copy2(kernels[-1], result.kernel)
    shutil.copy2(initrds[-1], result.initrd)
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "iotunnel-root", "-d", root, result.image, "3G"],
        timeout=1800,
    )
    shutil.rmtree(root)
    seconds = time.monotonic() - started
    (directory / "complete").write_text(f"built in {seconds:.0f} s\n")
    if log is not None:
        log.write_text(f"rootfs built in {seconds:.0f} s\n")
    return result


def _configure(root: Path, disks: tuple[str, str] = ("/dev/vda", "/dev/vdb")) -> None:
    """Settings of the guest: fstab (root and payload disks), hostname, the test unit; nothing
    that waits on a network."""
    (root / "etc/hostname").write_text("iotunnel-device\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 iotunnel-device\n")
    (root / "etc/fstab").write_text(
        f"{disks[0]} / ext4 rw,errors=remount-ro 0 1\n"
        f"{disks[1]} {PAYLOAD_MOUNT} ext4 rw,nofail 0 0\n"
    )
    (root / PAYLOAD_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    units = root / "etc/systemd/system"
    (units / "iotunnel-device-test.service").write_text(_TEST_UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "iotunnel-device-test.service"
    if not link.is_symlink():
        link.symlink_to("/etc/systemd/system/iotunnel-device-test.service")
    # The guest's own broker and sshd stay off: the test starts its own, on free ports.
    for unit in ("mosquitto.service", "ssh.service", "getty@tty1.service"):
        masked = units / unit
        if masked.exists() or masked.is_symlink():
            masked.unlink()
        masked.symlink_to("/dev/null")
    # journald keeps the journal in memory (/run): the guest is thrown away after each run.
    (root / "etc/systemd/journald.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/journald.conf.d/volatile.conf").write_text("[Journal]\nStorage=volatile\n")


def build_deb(out: Path, work: Path, arch: str, version: str | None = None) -> Path:
    """``packaging/build_deb.py`` for one architecture (and ``version``); the package's path."""
    argv = [sys.executable, str(REPO / "packaging/build_deb.py"), "--arch", arch]
    argv += ["--out", str(out), "--work", str(work)]
    if version is not None:
        argv += ["--version", version]
    return Path(_run(argv, timeout=900).split()[-1])


def payload_image(directory: Path, image: Path, *, size_mb: int = 512) -> Path:
    """An ext4 image of ``directory`` (mounted at :data:`PAYLOAD_MOUNT` in the guest)."""
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "payload", "-d", directory, image, f"{size_mb}M"],
        timeout=600,
    )
    return image


def kvm_usable() -> bool:
    """Whether /dev/kvm can be opened (whether a guest then runs is checked by booting)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass
class Boot:
    """One guest run: its report lines, its console, and how it was run."""

    report: list[str]
    console: str
    accel: str
    seconds: float
    returncode: int

    def uptime(self, mark: str) -> float | None:
        """The guest's uptime at ``UPTIME <mark>`` (start: the driver started, after
        ``multi-user.target``; end: it finished)."""
        for line in self.report:
            if line.startswith(f"UPTIME {mark} "):
                return float(line.split()[2])
        return None

    def results(self) -> dict[str, tuple[bool, str]]:
        """``RESULT name ok|fail detail`` lines, by name (ok, detail)."""
        found: dict[str, tuple[bool, str]] = {}
        for line in self.report:
            if not line.startswith(REPORT_PREFIX):
                continue
            name, _, rest = line[len(REPORT_PREFIX) :].partition(" ")
            status, _, detail = rest.partition(" ")
            found[name] = (status == "ok", detail)
        return found


def boot(
    base: BaseImage,
    payload: Path,
    workdir: Path,
    *,
    accel: str = "tcg",
    memory_mb: int = 1536,
    timeout: float = 1200.0,
) -> Boot:
    """Boot the guest with ``payload`` as its second disk until it powers off.

    The root image is opened read-only (``-snapshot``: the guest's writes go to a temporary
    file), so the cached image stays as built.
    """
    console, report = workdir / "console.log", workdir / "report.log"
    argv = [
        "qemu-system-x86_64",
        "-machine",
        f"q35,accel={accel}",
        "-cpu",
        "max" if accel == "tcg" else "host",
        "-smp",
        "2",
        "-m",
        str(memory_mb),
        "-nographic",
        "-no-reboot",
        "-snapshot",
        "-nic",
        "none",
        "-kernel",
        str(base.kernel),
        "-initrd",
        str(base.initrd),
        "-append",
        "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=1 net.ifnames=0",
        "-drive",
        f"file={base.image},format=raw,if=virtio",
        "-drive",
        f"file={payload},format=raw,if=virtio",
        "-serial",
        f"file:{console}",
        "-serial",
        f"file:{report}",
        "-monitor",
        "none",
    ]
    started = time.monotonic()
    with (workdir / "qemu.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
    seconds = time.monotonic() - started
    return Boot(_read(report).splitlines(), _read(console), accel, seconds, code)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# ------------------------------------------------------------------------------ arm64 (slow)

#: The arm64 guest: enough for the package and its agent with a broker (no tunnel service).
ARM64_PACKAGES = (
    "systemd-sysv",
    "dbus",
    "linux-image-cloud-arm64",
    "python3",
    "adduser",
    "libstdc++6",
    "mosquitto",
    "procps",
)
#: Debian's arm64 cloud kernel has NVMe built in but virtio as modules: the root disk is an
#: NVMe drive, so the kernel needs no initramfs; the payload disk is virtio (loaded by udev).
_ARM64_DISKS = ("/dev/nvme0n1", "/dev/vda")
_STAGE2 = """#!/bin/sh
# debootstrap's second stage, run by the arm64 kernel as init under emulation, once.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/debootstrap/debootstrap --second-stage && echo IOTUNNEL-STAGE2-OK
mount -t proc proc /proc 2>/dev/null
sync
echo o > /proc/sysrq-trigger
"""


def base_image_arm64(*, cache: Path = CACHE) -> BaseImage:
    """The cached arm64 root file system image (no initrd): debootstrap's first stage here, the
    second in the guest under qemu-system-aarch64 (this machine's binfmt_misc is left alone)."""
    key = hashlib.sha256(
        json.dumps([BUILDER_VERSION, "arm64", sorted(ARM64_PACKAGES), _TEST_UNIT, _STAGE2]).encode()
    ).hexdigest()[:16]
    directory = cache / f"arm64-{key}"
    result = BaseImage(directory, directory / "root.ext4", directory / "vmlinuz", Path())
    if (directory / "complete").exists():
        return result
    if shutil.which("qemu-system-aarch64") is None:
        raise GuestError("missing Debian package: qemu-system-arm")
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    root = directory / "root"
    started = time.monotonic()
    _run(
        [
            "debootstrap",
            "--foreign",
            "--arch=arm64",
            "--variant=minbase",
            f"--include={','.join(ARM64_PACKAGES)}",
            SUITE,
            root,
            MIRROR,
        ],
        timeout=3600,
    )
    debs = sorted((root / "var/cache/apt/archives").glob("linux-image-*-cloud-arm64_*.deb"))
    if not debs:
        raise GuestError("debootstrap fetched no arm64 kernel")
    unpacked = directory / "kernel"
    _run(["dpkg-deb", "--extract", debs[-1], unpacked], timeout=600)
    shutil.copy2(sorted((unpacked / "boot").glob("vmlinuz-*"))[-1], result.kernel)
    shutil.rmtree(unpacked)
    _configure(root, _ARM64_DISKS)
    (root / "stage2").write_text(_STAGE2)
    (root / "stage2").chmod(0o755)
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "iotunnel-root", "-d", root, result.image, "3G"],
        timeout=1800,
    )
    shutil.rmtree(root)
    console = directory / "stage2.log"
    code = _qemu_arm64(result, None, console, "init=/stage2", snapshot=False, timeout=5400)
    if "IOTUNNEL-STAGE2-OK" not in _read(console):
        tail = "\n".join(_read(console).splitlines()[-30:])
        raise GuestError(f"debootstrap --second-stage failed in the guest (qemu {code}):\n{tail}")
    seconds = time.monotonic() - started
    (directory / "complete").write_text(f"built in {seconds:.0f} s\n")
    return result


def _qemu_arm64(
    base: BaseImage,
    payload: Path | None,
    console: Path,
    append: str,
    *,
    snapshot: bool,
    timeout: float,
) -> int:
    argv = [
        "qemu-system-aarch64",
        "-machine",
        "virt",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2048",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(base.kernel),
        "-append",
        f"root={_ARM64_DISKS[0]} rw console=ttyAMA0 panic=-1 {append}".strip(),
        "-drive",
        f"file={base.image},format=raw,if=none,id=root",
        "-device",
        "nvme,drive=root,serial=root",
        "-serial",
        f"file:{console}",
        "-monitor",
        "none",
    ]
    if snapshot:
        argv.append("-snapshot")
    if payload is not None:
        argv += ["-drive", f"file={payload},format=raw,if=virtio"]
    with console.with_suffix(".qemu.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9


def boot_arm64(base: BaseImage, payload: Path, workdir: Path, *, timeout: float = 1800) -> Boot:
    """Boot the arm64 guest (TCG) until it powers off; its report is on the console (the
    ``virt`` machine has one UART), in lines of their own."""
    console = workdir / "console.log"
    started = time.monotonic()
    code = _qemu_arm64(base, payload, console, "", snapshot=True, timeout=timeout)
    text = _read(console)
    lines = [
        line[line.index(mark) :].rstrip("\r")
        for line in text.splitlines()
        for mark in (REPORT_PREFIX, "UPTIME ", "DONE ")
        if mark in line
    ]
    return Boot(lines, text, "tcg", time.monotonic() - started, code)
