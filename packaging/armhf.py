#!/usr/bin/env python3
"""armhf (32-bit Raspberry Pi OS): what PyPI lacks, made on this x86-64 machine.

    .venv/bin/python packaging/armhf.py awscrt --out DIR    # awscrt's armv7l wheel, cross-built
    .venv/bin/python packaging/armhf.py sysroot DIR         # Debian 12 armhf python3.11, for qemu

PyPI has no armv7l wheel of awscrt. ``awscrt`` builds one from the sdist pinned in
packaging/requirements.lock with Debian's cross compiler (gcc-arm-linux-gnueabihf) and cmake,
against Debian 12's armhf Python headers (libpython3.11-dev:armhf, fetched with apt into a
private directory: this machine's dpkg and apt settings are not touched). About a minute and a
half on two cores; ``make deb-armhf`` then builds the package with it (``--wheelhouse``).

``sysroot`` unpacks Debian 12's armhf python3.11 and the libraries it needs into DIR, so that
``qemu-arm -L DIR DIR/usr/bin/python3.11`` runs the armhf package's code here (the package
tests do).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lock

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iotunnel" / "armhf"
TRIPLET = "arm-linux-gnueabihf"
#: Debian 12 armhf packages that python3.11 needs to run (the sysroot).
SYSROOT_PACKAGES = (
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libexpat1",
    "zlib1g",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libcrypt1",
    "libtinfo6",
    "libncursesw6",
    "libreadline8",
    "libsqlite3-0",
    "libnsl2",
    "libtirpc3",
    "libdb5.3",
)


class ArmhfError(Exception):
    """A step failed; the message says which and why."""


def _run(argv: Sequence[str], **kwargs: object) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise ArmhfError(f"{' '.join(argv[:4])} ... failed:\n{tail}")
    return str(done.stdout)


def apt_download(packages: Sequence[str], dest: Path) -> list[Path]:
    """Debian 12 armhf .deb files of ``packages``, fetched by apt with a private state
    directory (this machine's sources, its own package lists)."""
    state = CACHE / "apt"
    for sub in ("lists/partial", "archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    options = [
        f"-oDir::State={state}",
        f"-oDir::State::status={state / 'status'}",
        f"-oDir::Cache={state}",
        "-oAPT::Architecture=armhf",
        "-oAPT::Architectures::=armhf",
        "-oDebug::NoLocking=1",
        "-oAPT::Sandbox::User=root",
    ]
    if not list((state / "lists").glob("*_Packages*")):
        subprocess.run(["apt-get", *options, "-qq", "update"], capture_output=True, check=False)
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", *options, "-qq", "download", *packages], cwd=dest)
    files = [next(dest.glob(f"{name}_*_armhf.deb"), None) for name in packages]
    missing = [name for name, path in zip(packages, files, strict=True) if path is None]
    if missing:
        raise ArmhfError(f"apt did not download {', '.join(missing)}")
    return [path for path in files if path is not None]


def _unpack(debs: Sequence[Path], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg-deb", "--extract", str(deb), str(root)])


def sysroot(root: Path) -> Path:
    """Debian 12's armhf python3.11 and its libraries, unpacked in ``root``."""
    if (root / "usr/bin/python3.11").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        _unpack(apt_download(SYSROOT_PACKAGES, Path(tmp)), root)
    return root


def _need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise ArmhfError(
            f"missing {', '.join(missing)}: apt-get install gcc-{TRIPLET} cmake (as root)"
        )


def build_awscrt(out: Path) -> Path:
    """awscrt's armv7l wheel (cp311-abi3), cross-built from the pinned sdist, in ``out``."""
    [pin] = [p for p in lock.read_lock() if p.name == "awscrt"]
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"awscrt-{pin.version}-*-linux_armv7l.whl"))
    if existing:
        return existing[0]
    _need(f"{TRIPLET}-gcc", "cmake", "apt-get", "dpkg-deb")
    work = Path(tempfile.mkdtemp(prefix="awscrt-armhf-"))
    try:
        headers = work / "headers"
        _unpack(apt_download(["libpython3.11-dev"], work / "debs"), headers)
        toolchain = work / "toolchain.cmake"
        toolchain.write_text(
            "set(CMAKE_SYSTEM_NAME Linux)\n"
            "set(CMAKE_SYSTEM_PROCESSOR armv7l)\n"
            f"set(CMAKE_C_COMPILER {TRIPLET}-gcc)\n"
            "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)\n"
        )
        # setuptools adds the building interpreter's library directory to the link: drop it,
        # or the cross linker picks up this machine's libgcc_s.
        host_dirs = {sysconfig.get_config_var("LIBDIR"), "/usr/lib", "/usr/lib/x86_64-linux-gnu"}
        linker = work / "ld-armhf"
        cases = "|".join(f"-L{d}" for d in sorted(filter(None, host_dirs)))
        linker.write_text(
            "#!/bin/sh\nset -eu\n"
            'for arg in "$@"; do\n    shift\n'
            f'    case "$arg" in\n        {cases}) ;;\n        *) set -- "$@" "$arg" ;;\n    esac\n'
            f'done\nexec {TRIPLET}-gcc "$@"\n'
        )
        linker.chmod(0o755)
        include = headers / "usr/include"
        env = {
            **os.environ,
            "CMAKE_TOOLCHAIN_FILE": str(toolchain),
            "CC": f"{TRIPLET}-gcc",
            "LDSHARED": f"{linker} -shared",
            # armhf Python headers first (the build interpreter's own come later).
            "CFLAGS": f"-I{include / 'python3.11'} -I{include}",
            "_PYTHON_HOST_PLATFORM": "linux-armv7l",
            "AWS_CRT_BUILD_USE_SYSTEM_LIBCRYPTO": "0",
        }
        sdist = work / "sdist"
        # The lock holds wheel hashes only: the sdist is pinned by version.
        pip = [sys.executable, "-m", "pip"]
        download = [*pip, "download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(sdist)]
        _run([*download, f"awscrt=={pin.version}"])
        [source] = sdist.iterdir()
        print(f"armhf: cross-building {source.name} (a minute or two)", file=sys.stderr)
        _run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)], env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    [wheel] = out.glob(f"awscrt-{pin.version}-*-linux_armv7l.whl")
    return wheel


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    awscrt = commands.add_parser("awscrt", help="cross-build awscrt's armv7l wheel")
    awscrt.add_argument("--out", type=Path, default=CACHE / "wheels")
    root = commands.add_parser("sysroot", help="Debian 12 armhf python3.11 for qemu-arm -L")
    root.add_argument("directory", type=Path, nargs="?", default=CACHE / "sysroot")
    args = parser.parse_args(argv)
    try:
        if args.command == "awscrt":
            print(build_awscrt(args.out))
        else:
            print(sysroot(args.directory))
    except ArmhfError as exc:
        print(f"armhf: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
