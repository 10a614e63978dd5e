#!/usr/bin/env python3
"""Pin the Python distributions that the .deb packages vendor: ``packaging/requirements.lock``.

The vendored set is what ``pip install iotunnel[agent,speed]`` needs on the device: the core
dependencies and the ``agent`` and ``speed`` extras of ``pyproject.toml``, and what those need in
turn. Each is pinned to the version this virtualenv resolved, with the sha256 of every file
the package build may use: the wheel for each target architecture. Every distribution must
have a wheel for x86_64 and aarch64 (amd64 and arm64 packages); for armv7l (armhf) the lock
notes which have none (awscrt: see packaging/README.md).

    .venv/bin/python packaging/lock.py            # regenerate (downloads from PyPI)
    .venv/bin/python packaging/lock.py --check    # the lock still matches pyproject (offline)

Run it after changing a dependency in ``pyproject.toml`` (and ``pip install -e '.[test]'``
so the virtualenv has resolved the new versions).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = Path(__file__).resolve().parent / "requirements.lock"
#: The extras of pyproject.toml whose dependencies are vendored.
EXTRAS = ("agent", "speed")
#: The interpreter the packages target: Debian 12's python3 (abi3 wheels also run on newer).
PYTHON_VERSION = "3.11"
#: Wheel architectures the lock holds hashes for (the .deb architectures amd64, arm64, armhf).
WHEEL_ARCHES = ("x86_64", "aarch64", "armv7l")
#: Those every distribution must have a wheel for.
REQUIRED_ARCHES = ("x86_64", "aarch64")
#: Debian 12 has glibc 2.36: every manylinux wheel up to manylinux_2_36 runs there.
GLIBC = (2, 36)


@dataclass(frozen=True)
class Pin:
    """One locked distribution: its canonical name, version and allowed file hashes."""

    name: str
    version: str
    hashes: tuple[str, ...]

    def line(self) -> str:
        parts = [f"{self.name}=={self.version}", *(f"--hash=sha256:{h}" for h in self.hashes)]
        return " \\\n    ".join(parts)


def pip_platform_args(wheel_arch: str) -> list[str]:
    """pip options that select wheels for Debian 12's CPython on ``wheel_arch``."""
    platforms = [f"manylinux_{GLIBC[0]}_{minor}_{wheel_arch}" for minor in range(GLIBC[1], 16, -1)]
    platforms += [f"manylinux2014_{wheel_arch}"]
    # linux_*: wheels built on (or for) a device, as --wheelhouse takes them; PyPI has none.
    platforms += [f"linux_{wheel_arch}"]
    if wheel_arch == "x86_64":
        platforms += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    args = [f"--platform={p}" for p in platforms]
    args += [f"--python-version={PYTHON_VERSION}", "--implementation=cp"]
    abi = "cp" + PYTHON_VERSION.replace(".", "")
    args += [f"--abi={abi}", "--abi=abi3", "--abi=none"]
    return args


def _target_environment(extra: str = "") -> dict[str, str]:
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update(
        python_version=PYTHON_VERSION,
        python_full_version=PYTHON_VERSION + ".2",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        extra=extra,
    )
    return env


def _applies(requirement: Requirement, extra: str = "") -> bool:
    marker = requirement.marker
    return marker is None or marker.evaluate(_target_environment(extra))


def top_level_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The core dependencies and those of :data:`EXTRAS`, as written in pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    texts: list[str] = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in EXTRAS:
        texts += optional.get(extra, [])
    return [r for r in map(Requirement, texts) if _applies(r)]


def resolve_from_venv(requirements: Iterable[Requirement]) -> dict[str, str]:
    """Name -> version of the requirements and their dependencies, as installed here."""
    resolved: dict[str, str] = {}
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in resolved:
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(
                f"lock: {requirement} is not installed in this virtualenv: "
                "run pip install -e '.[agent,speed,test]' first"
            ) from None
        if not requirement.specifier.contains(version, prereleases=True):
            raise SystemExit(f"lock: installed {name} {version} does not satisfy {requirement}")
        resolved[name] = version
        for text in importlib.metadata.requires(name) or []:
            dependency = Requirement(text)
            if _applies(dependency):
                todo.append(dependency)
    return dict(sorted(resolved.items()))


def read_lock(path: Path = LOCK) -> list[Pin]:
    """The pins of a lock file written by :func:`write_lock`."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        name, _, version = spec.partition("==")
        hashes = tuple(o.removeprefix("--hash=sha256:") for o in options)
        if not version or any(o == h for o, h in zip(options, hashes, strict=True)):
            raise SystemExit(f"{path}: not 'name==version --hash=sha256:...': {raw!r}")
        pins.append(Pin(canonicalize_name(name), version, hashes))
    return pins


def write_lock(pins: Sequence[Pin], missing: Sequence[str] = (), path: Path = LOCK) -> None:
    header = (
        "# Python distributions vendored into /opt/iotunnel/lib of the iotunnel .deb packages.\n"
        "# Generated by packaging/lock.py from what the virtualenv resolves for the core\n"
        f"# dependencies and the extras {', '.join(EXTRAS)} of pyproject.toml: do not edit;\n"
        "# regenerate with: .venv/bin/python packaging/lock.py\n"
        f"# Hashes: the wheels for CPython {PYTHON_VERSION} on {', '.join(WHEEL_ARCHES)}.\n"
    )
    header += "".join(f"# No wheel on PyPI: {note}\n" for note in missing)
    path.write_text(header + "".join(pin.line() + "\n" for pin in pins))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, version: str, wheel_arch: str, dest: Path) -> Path | None:
    """Fetch the wheel pip picks for ``name==version`` on ``wheel_arch``; None if it has none."""
    before = set(dest.iterdir())
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest)]
    command += ["--only-binary=:all:", *pip_platform_args(wheel_arch), f"{name}=={version}"]
    if subprocess.run(command, capture_output=True, check=False).returncode != 0:
        if wheel_arch in REQUIRED_ARCHES:
            raise SystemExit(f"lock: {name}=={version} has no {wheel_arch} wheel")
        return None
    new = set(dest.iterdir()) - before
    if len(new) != 1:
        raise SystemExit(f"lock: expected one file for {name}=={version}, got {sorted(new)}")
    return new.pop()


def lock() -> tuple[list[Pin], list[str]]:
    """The pins, and which architectures lack a wheel of which distribution."""
    resolved = resolve_from_venv(top_level_requirements())
    pins = []
    missing: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, version in resolved.items():
            hashes: list[str] = []
            for wheel_arch in WHEEL_ARCHES:
                dest = Path(tmp) / wheel_arch / name
                dest.mkdir(parents=True)
                wheel = download(name, version, wheel_arch, dest)
                if wheel is None:
                    missing.setdefault(wheel_arch, []).append(name)
                elif (digest := sha256(wheel)) not in hashes:
                    hashes.append(digest)
            pins.append(Pin(name, version, tuple(hashes)))
    return pins, [f"{arch}: {', '.join(names)}" for arch, names in missing.items()]


def _installed_requirements(pin: Pin) -> list[Requirement] | None:
    """What ``pin`` needs, from this virtualenv's metadata if it has that very version."""
    try:
        if importlib.metadata.version(pin.name) != pin.version:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    texts = importlib.metadata.requires(pin.name) or []
    return [r for r in map(Requirement, texts) if _applies(r)]


def check(pins: Sequence[Pin]) -> list[str]:
    """Problems with the lock, found offline: a dependency of pyproject.toml (core and
    :data:`EXTRAS`) or of a pinned distribution that is missing or pinned outside its range, a
    pin nothing needs, a pin without hashes. Dependencies of a pin are read from this
    virtualenv when it has that version installed (else they are not checked)."""
    problems = []
    locked = {pin.name: pin for pin in pins}
    needed: list[tuple[Requirement, str]] = [
        (r, "pyproject.toml") for r in top_level_requirements()
    ]
    reached: set[str] = set()
    complete = True
    while needed:
        requirement, by = needed.pop(0)
        name = canonicalize_name(requirement.name)
        pin = locked.get(name)
        if pin is None:
            problems.append(f"{name} (needed by {by}) is not in the lock")
            continue
        if not requirement.specifier.contains(Version(pin.version), prereleases=True):
            problems.append(f"{name}=={pin.version} is outside {by}'s {requirement}")
        if name in reached:
            continue
        reached.add(name)
        dependencies = _installed_requirements(pin)
        if dependencies is None:
            complete = False
        else:
            needed += [(d, f"{name} {pin.version}") for d in dependencies]
    if complete:
        problems += [
            f"{n} is in the lock but nothing needs it" for n in sorted(set(locked) - reached)
        ]
    problems += [f"{pin.name} has no hash" for pin in pins if not pin.hashes]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check the lock, offline; no writes")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(read_lock())
        for problem in problems:
            print(f"{LOCK.relative_to(ROOT)}: {problem}", file=sys.stderr)
        if problems:
            print("regenerate it: .venv/bin/python packaging/lock.py", file=sys.stderr)
            return 1
        print(f"{LOCK.relative_to(ROOT)}: OK")
        return 0
    pins, missing = lock()
    write_lock(pins, missing)
    print(f"wrote {LOCK.relative_to(ROOT)}: " + ", ".join(f"{p.name} {p.version}" for p in pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
