"""Helpers of the package tests: building the .deb packages, reading them, and throw-away dpkg
roots to install them in without touching this machine.

A throw-away root is a directory with a dpkg database (``var/lib/dpkg``) that lists stub
entries for the packages iotunnel depends on, at Debian 12's versions; packages go in with
``dpkg --root=DIR --force-script-chrootless``, which runs the maintainer scripts on this machine
with ``DPKG_ROOT=DIR``. The installed entry points are run in a private mount namespace where
the root's ``/opt/iotunnel`` is mounted at ``/opt/iotunnel``: the absolute ``/usr/bin`` links
then resolve as on a device, and this machine's ``/opt`` is left as it is.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "build_deb.py"
LOCK = REPO / "packaging" / "requirements.lock"
SANDBOX = REPO / "packaging" / "unit_sandbox.py"
UNIT = REPO / "systemd" / "iotunnel-agent.service"
ARCHES = ("amd64", "arm64")
#: ELF e_machine of each architecture's native code.
ELF_MACHINES = {"amd64": 62, "arm64": 183}
WHEEL_ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}
#: What iotunnel depends on, as Debian 12 has it: the stubs of a throw-away root.
STUBS = (
    ("python3", "3.11.2-1+b1", True),
    ("adduser", "3.134", False),
    ("libc6", "2.36-9+deb12u10", True),
    ("libstdc++6", "12.2.0-14", True),
)
SYSTEM_PYTHON = Path("/usr/bin/python3")


def project_version() -> str:
    text = (REPO / "iotunnel" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    assert match is not None
    return match.group(1)


def missing_build_tools() -> list[str]:
    """Tools the build needs that this machine lacks."""
    missing = [tool for tool in ("dpkg-deb", "readelf") if shutil.which(tool) is None]
    for triplet in ("x86_64-linux-gnu", "aarch64-linux-gnu"):
        if not (shutil.which(f"{triplet}-strip") or shutil.which("llvm-strip")):
            missing.append(f"{triplet}-strip (binutils-{triplet})")
    return missing


def build(out: Path, work: Path, *, timeout: float = 900) -> dict[str, Path]:
    """Build the amd64 and arm64 packages into ``out``; their paths by architecture."""
    done = subprocess.run(
        [sys.executable, str(BUILD), "--out", str(out), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, f"build_deb.py failed:\n{done.stdout}\n{done.stderr}"
    version = project_version()
    debs = {arch: out / f"iotunnel_{version}_{arch}.deb" for arch in ARCHES}
    assert done.stdout.split() == [str(p) for p in debs.values()]
    return debs


def run(argv: Sequence[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, no input, output captured as text."""
    options: dict[str, object] = {
        "capture_output": True,
        "text": True,
        "stdin": subprocess.DEVNULL,
        "timeout": 300,
        "check": False,
    }
    options.update(kwargs)
    return subprocess.run([str(a) for a in argv], **options)  # type: ignore[call-overload, no-any-return]


def field(deb: Path, name: str) -> str:
    return run(["dpkg-deb", "--field", deb, name]).stdout.strip()


def control_file(deb: Path, name: str) -> str:
    """A file of the control archive (conffiles, postinst, md5sums...), or '' if absent."""
    done = run(["dpkg-deb", "--ctrl-tarfile", deb], text=False)
    with tarfile.open(fileobj=__import__("io").BytesIO(done.stdout)) as tar:
        for member in tar.getmembers():
            if member.name.lstrip("./") == name:
                extracted = tar.extractfile(member)
                assert extracted is not None
                return extracted.read().decode()
    return ""


@dataclass(frozen=True)
class Entry:
    """One line of ``dpkg-deb --contents``."""

    path: str  # without the leading "./"; directories end with "/"
    mode: str
    owner: str
    target: str | None  # of a symlink


def contents(deb: Path) -> dict[str, Entry]:
    entries = {}
    for line in run(["dpkg-deb", "--contents", deb]).stdout.splitlines():
        mode, owner, _size, _date, _time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        entry = Entry(path.removeprefix("./"), mode, owner, target or None)
        entries[entry.path] = entry
    return entries


def extract(deb: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    done = run(["dpkg-deb", "--extract", deb, directory])
    assert done.returncode == 0, done.stderr
    return directory


def elf_machine(path: Path) -> int | None:
    """e_machine of an ELF file (little-endian ones: every target here), else None."""
    with path.open("rb") as file:
        head = file.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little")


# --------------------------------------------------------------------------- throw-away roots


@functools.cache
def host_arch() -> str:
    """This machine's Debian architecture: the package that is installed and run here."""
    done = run(["dpkg", "--print-architecture"]) if shutil.which("dpkg") else None
    return done.stdout.strip() if done is not None and done.returncode == 0 else ""


def can_install() -> str | None:
    """Why packages cannot be installed into a throw-away root here, or None."""
    if os.geteuid() != 0:
        return "dpkg --root needs root (files are owned by root)"
    if shutil.which("dpkg") is None:
        return "dpkg is not installed"
    if host_arch() not in ARCHES:
        return f"no package is built for this machine's architecture ({host_arch()})"
    return None


def new_root(directory: Path, arch: str) -> Path:
    """An empty system with a dpkg database that has the stub dependencies installed."""
    admin = directory / "var/lib/dpkg"
    for sub in ("info", "updates", "triggers"):
        (admin / sub).mkdir(parents=True, exist_ok=True)
    stanzas = []
    for name, version, arch_dependent in STUBS:
        multi_arch = "Multi-Arch: same\n" if name.startswith("lib") else ""
        stanzas.append(
            f"Package: {name}\nStatus: install ok installed\nPriority: optional\n"
            f"Section: misc\nMaintainer: stub <stub@localhost>\n"
            f"Architecture: {arch if arch_dependent else 'all'}\n{multi_arch}"
            f"Version: {version}\nDescription: stub of the Debian 12 package\n"
        )
        list_name = f"{name}:{arch}" if multi_arch else name
        (admin / "info" / f"{list_name}.list").write_text("")
    (admin / "status").write_text("\n".join(stanzas))
    return directory


def dpkg(root: Path, *args: str | Path, env: Mapping[str, str] | None = None) -> str:
    """Run dpkg on the throw-away root; its output. Fails the test if dpkg fails."""
    full_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
    done = run(
        ["dpkg", f"--root={root}", "--force-script-chrootless", *args], env=full_env, timeout=120
    )
    assert done.returncode == 0, f"dpkg {' '.join(map(str, args))}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def status(root: Path, package: str = "iotunnel") -> str:
    """'ii 0.1.0'-like: the dpkg status abbreviation and version, or '' when unknown."""
    done = run(["dpkg-query", f"--root={root}", "-W", "-f=${db:Status-Abbrev}${Version}", package])
    return done.stdout.strip() if done.returncode == 0 else ""


def repack(deb: Path, out: Path, version: str, *, edit_config: str | None = None) -> Path:
    """``deb`` again, as version ``version``; with a line added to the shipped agent.ini when
    ``edit_config`` is given (an upstream change of a conffile)."""
    tree = out.parent / f"tree-{version}"
    if tree.exists():
        shutil.rmtree(tree)
    assert run(["dpkg-deb", "--raw-extract", deb, tree]).returncode == 0
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    if edit_config is not None:
        ini = tree / "etc/iotunnel/agent.ini"
        ini.write_text(ini.read_text() + edit_config)
        sums = tree / "DEBIAN/md5sums"
        new_sum = run(["md5sum", "etc/iotunnel/agent.ini"], cwd=tree).stdout
        sums.write_text(
            "".join(
                new_sum if line.endswith("  etc/iotunnel/agent.ini\n") else line
                for line in sums.read_text().splitlines(keepends=True)
            )
        )
    done = run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", tree, out])
    assert done.returncode == 0, done.stderr
    return out


@functools.cache
def has_mount_namespaces() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    done = run(["unshare", "--mount", "--propagation", "private", "true"], timeout=30)
    return done.returncode == 0


_IN_ROOT = (
    "root=$1; shift; mount -t tmpfs tmpfs /opt && mkdir /opt/iotunnel && "
    'mount --bind "$root/opt/iotunnel" /opt/iotunnel && exec "$@"'
)


def installed_argv(root: Path, argv: Sequence[str | Path]) -> list[str]:
    """``argv`` as run on a device where ``root`` is installed: in a private mount namespace
    whose /opt/iotunnel is the root's (the process keeps its pid: unshare and sh exec)."""
    command = [str(a) for a in argv]
    if has_mount_namespaces():
        namespace = ["unshare", "--mount", "--propagation", "private"]
        return [*namespace, "sh", "-c", _IN_ROOT, "sh", str(root), *command]
    # No namespaces: call the installed scripts themselves (they find ../lib from their path).
    return [
        str(root / "opt/iotunnel/bin" / Path(c).name) if c.startswith("/usr/bin/iotunnel") else c
        for c in command
    ]


def entry_point(root: Path, name: str) -> str:
    """The path that runs installed entry point ``name`` under :func:`installed_argv`."""
    return str(root / "usr/bin" / name) if has_mount_namespaces() else f"/usr/bin/{name}"
