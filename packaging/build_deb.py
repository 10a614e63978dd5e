#!/usr/bin/env python3
"""Build the iotunnel .deb packages: ``make deb``, or ``.venv/bin/python packaging/build_deb.py``.

For each architecture (amd64 and arm64 by default) this stages a root tree and packs it with
``dpkg-deb --build --root-owner-group``:

    /opt/iotunnel/lib/             iotunnel, agent, proxy and their pinned dependencies, installed
                                   from wheels for that architecture (packaging/requirements.lock)
    /opt/iotunnel/bin/NAME         the entry points: #!/usr/bin/python3 -I, lib/ first on sys.path
    /usr/bin/NAME                  -> /opt/iotunnel/bin/NAME
    /usr/share/man/man1/NAME.1.gz  from NAME --help
    /lib/systemd/system/iotunnel-agent.service
    /usr/lib/sysusers.d/iotunnel.conf
    /etc/iotunnel/agent.ini, destination.d/SSHDestination.ini (conffiles), certs/
    /usr/share/doc/iotunnel/       README.md, copyright, changelog.gz, examples/

It runs on any architecture: wheels for another one are only unpacked, never run. Downloads
(PyPI through pip) are cached in ~/.cache/iotunnel/deb-wheels and checked against the lock's
sha256 sums, so a second build needs no network. armhf (``--arch armhf``) needs a locally built
awscrt wheel (``--wheelhouse DIR``): PyPI has no armv7l wheel of it (packaging/README.md).
Every ELF file in the tree must be for the package's architecture, and is stripped as dh_strip
would (binutils for that architecture, e.g. binutils-aarch64-linux-gnu, or llvm-strip).
"""

from __future__ import annotations

import argparse
import base64
import csv
import email.parser
import gzip
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template

import lock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEBIAN = HERE / "debian"
PACKAGE = "iotunnel"
PREFIX = Path("opt/iotunnel")
#: The console scripts of pyproject.toml that the device package puts in /usr/bin.
#: (iotunnel-service is not vendored: its management API needs botocore; pip installs it.)
ENTRY_POINTS = ("iotunnel-agent", "iotunnel-proxy")
#: Vendored distributions that a package may go without (the ``speed`` extra).
OPTIONAL = frozenset({"uvloop"})
#: Packages of the iotunnel wheel that stay out of the device package.
PRUNED = ("service",)
#: NAME lines of the manual pages.
SUMMARIES = {
    "iotunnel-agent": "device agent of AWS IoT Secure Tunneling (the iotunnel-agent service)",
    "iotunnel-proxy": "local proxy of AWS IoT Secure Tunneling (compatible with localproxy)",
}
UNIT = "iotunnel-agent.service"
DEPENDS = "python3 (>= 3.11), adduser"
#: The PKCS#11 modules the agent's pkcs11_lib setting is meant for: a TPM 2.0, or SoftHSM.
SUGGESTS = "libtpm2-pkcs11-1 | softhsm2"
#: The Debian package of each shared library the vendored extensions may link against.
LIBRARY_PACKAGES = {
    "libc.so.6": "libc6",
    "libm.so.6": "libc6",
    "librt.so.1": "libc6",
    "libpthread.so.0": "libc6",
    "libdl.so.2": "libc6",
    "ld-linux-x86-64.so.2": "libc6",
    "ld-linux-aarch64.so.1": "libc6",
    "ld-linux-armhf.so.3": "libc6",
    "libstdc++.so.6": "libstdc++6",
    "libgcc_s.so.1": "libgcc-s1",
}
DEFAULT_MAINTAINER = "iotunnel maintainers <maintainers@iotunnel.invalid>"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / PACKAGE


@dataclass(frozen=True)
class Target:
    """A Debian architecture and what its wheels and ELF files are called."""

    deb: str
    wheel: str
    triplet: str
    elf_machine: int
    elf_class: int  # 1: 32-bit, 2: 64-bit


TARGETS = {
    "amd64": Target("amd64", "x86_64", "x86_64-linux-gnu", 62, 2),  # EM_X86_64
    "arm64": Target("arm64", "aarch64", "aarch64-linux-gnu", 183, 2),  # EM_AARCH64
    "armhf": Target("armhf", "armv7l", "arm-linux-gnueabihf", 40, 1),  # EM_ARM
}


class BuildError(Exception):
    """The build cannot go on; the message says why."""


def log(message: str) -> None:
    print(f"build_deb: {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), text=True, capture_output=True, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise BuildError(f"{' '.join(map(str, argv))} failed:\n{done.stdout}{done.stderr}")
    return done  # type: ignore[no-any-return]


def project_version() -> str:
    text = (ROOT / "iotunnel" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise BuildError("no __version__ in iotunnel/__init__.py")
    return match.group(1)


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, else the last commit's time, else now: every mtime in the package."""
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(done.stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return int(time.time())


# --------------------------------------------------------------------------- wheels


def _dist_of(filename: str) -> tuple[str, str]:
    """(canonical name, version) of a wheel's file name."""
    name, version = filename.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def _cached(pin: lock.Pin, directory: Path) -> Path | None:
    """A file in ``directory`` for ``pin`` whose sha256 the lock allows."""
    if not directory.is_dir():
        return None
    for path in sorted(directory.iterdir()):
        if _dist_of(path.name) == (pin.name, pin.version) and lock.sha256(path) in pin.hashes:
            return path
    return None


def _pip_download(pins: Sequence[lock.Pin], target: Target, directory: Path) -> bool:
    """Download the locked wheels of ``pins`` for ``target``; False if pip could not."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as requirements:
        requirements.write("".join(pin.line() + "\n" for pin in pins))
        requirements.flush()
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--only-binary=:all:", "--require-hashes", "--dest", str(directory)]
        command += [*lock.pip_platform_args(target.wheel), "-r", requirements.name]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    return done.returncode == 0


def _from_wheelhouse(pin: lock.Pin, target: Target, wheelhouse: Path | None) -> Path | None:
    """A wheel of ``pin`` for ``target`` that was built locally (not hash-checked)."""
    if wheelhouse is None:
        return None
    for path in sorted(wheelhouse.glob("*.whl")):
        platform = path.name.removesuffix(".whl").rsplit("-", 1)[-1]
        if _dist_of(path.name) == (pin.name, pin.version) and (
            platform == "any" or platform.endswith(target.wheel)
        ):
            return path
    return None


def fetch(
    pins: Sequence[lock.Pin], target: Target, cache: Path, wheelhouse: Path | None = None
) -> list[Path]:
    """The locked wheel of every pin for ``target``, from the cache or downloaded into it; for a
    distribution with no wheel for ``target`` on PyPI, one from ``wheelhouse``; an optional one
    (:data:`OPTIONAL`) is left out."""
    directory = cache / target.wheel
    missing = [pin for pin in pins if _cached(pin, directory) is None]
    if missing:
        directory.mkdir(parents=True, exist_ok=True)
        log(f"downloading for {target.wheel}: {', '.join(p.name for p in missing)}")
        if not _pip_download(missing, target, directory):
            for pin in missing:  # one by one: which have no wheel for this architecture?
                _pip_download([pin], target, directory)
    files = []
    for pin in pins:
        found = _cached(pin, directory) or _from_wheelhouse(pin, target, wheelhouse)
        if found is not None:
            if found.parent == wheelhouse:
                log(
                    f"{target.deb}: {found.name} from {wheelhouse} (built locally, not in the lock)"
                )
            files.append(found)
        elif pin.name in OPTIONAL:
            log(f"{target.deb}: no {target.wheel} wheel of {pin.name}: left out (optional)")
        else:
            raise BuildError(
                f"{pin.name}=={pin.version}: no {target.wheel} wheel on PyPI (or no network); "
                "build one and pass its directory with --wheelhouse (for armhf: make deb-armhf, "
                "packaging/README.md)"
            )
    return files


#: What the iotunnel wheel is not built from (a copy of the tree, so that the build leaves
#: nothing behind in it and cannot race another build).
_NOT_SOURCES = (".git", ".venv", "build", "dist", "tests", "*.egg-info", "__pycache__", ".*cache")


def _setuptools_here() -> bool:
    """Whether this interpreter has the setuptools pyproject.toml asks for (then no download)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return int(version.split(".")[0]) >= 68


def build_project_wheel(directory: Path, when: int) -> Path:
    """iotunnel's own wheel, built from a copy of this tree."""
    log("building the iotunnel wheel")
    source = directory / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCES), symlinks=True)
    isolation = ["--no-build-isolation"] if _setuptools_here() else []
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(when)}
    run([*pip_wheel, "-w", str(directory), str(source)], env=env)
    [wheel] = directory.glob("iotunnel-*.whl")
    return wheel


# --------------------------------------------------------------------------- staging


def install_wheels(wheels: Sequence[Path], target: Target, lib: Path) -> None:
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--only-binary=:all:",
            "--target",
            str(lib),
            *lock.pip_platform_args(target.wheel),
            *map(str, wheels),
        ]
    )
    shutil.rmtree(lib / "bin", ignore_errors=True)  # pip's console scripts: ours are in bin/
    for name in PRUNED:
        shutil.rmtree(lib / name)
    for cache in lib.rglob("__pycache__"):
        shutil.rmtree(cache)


def tidy_dist_info(lib: Path) -> None:
    """Make each RECORD list the files as packaged (pruned, stripped), without pip's notes of
    where a wheel came from (direct_url.json holds a build path) and whether it was asked for."""
    for dist_info in sorted(lib.glob("*.dist-info")):
        for note in ("direct_url.json", "REQUESTED"):
            (dist_info / note).unlink(missing_ok=True)
        record = dist_info / "RECORD"
        rows = []
        for row in csv.reader(record.read_text().splitlines()):
            path = lib / row[0]
            if row[0] == str(record.relative_to(lib)):
                rows.append([row[0], "", ""])
            elif path.is_file() and "__pycache__" not in path.parts:
                data = path.read_bytes()
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                rows.append([row[0], "sha256=" + digest.decode(), str(len(data))])
        with record.open("w", newline="") as file:
            csv.writer(file, lineterminator="\n").writerows(rows)


def entry_points(lib: Path) -> dict[str, tuple[str, str]]:
    """name -> (module, function) of iotunnel's console scripts."""
    [dist_info] = lib.glob("iotunnel-*.dist-info")
    found: dict[str, tuple[str, str]] = {}
    section = ""
    for line in (dist_info / "entry_points.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "console_scripts":
            name, _, value = (part.strip() for part in line.partition("="))
            module, _, function = value.partition(":")
            found[name] = (module.strip(), function.strip())
    return found


ENTRY_POINT = Template('''\
#!/usr/bin/python3 -I
"""$name $version: $module.$function() of the iotunnel package.

This file is /$prefix/bin/$name (/usr/bin/$name links to it). The vendored dependencies and
iotunnel itself are in ../lib; -I keeps PYTHONPATH, the user's site-packages and the working
directory out of sys.path.
"""

import os
import sys

PREFIX = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path.insert(0, os.path.join(PREFIX, "lib"))

from $module import $function  # noqa: E402

sys.exit($function())
''')


def write_entry_points(stage: Path, lib: Path, version: str) -> list[str]:
    scripts = entry_points(lib)
    missing = [name for name in ENTRY_POINTS if name not in scripts]
    if missing:
        raise BuildError(f"pyproject.toml [project.scripts] lacks {', '.join(missing)}")
    bin_dir = stage / PREFIX / "bin"
    usr_bin = stage / "usr/bin"
    bin_dir.mkdir(parents=True)
    usr_bin.mkdir(parents=True)
    for name in ENTRY_POINTS:
        module, function = scripts[name]
        script = bin_dir / name
        script.write_text(
            ENTRY_POINT.substitute(
                name=name, version=version, module=module, function=function, prefix=PREFIX
            )
        )
        script.chmod(0o755)
        # Debian policy 10.5: a link from one top-level directory into another is absolute.
        (usr_bin / name).symlink_to("/" + str(script.relative_to(stage)))
    return list(ENTRY_POINTS)


def _metadata(dist_info: Path) -> email.message.Message:
    return email.parser.Parser().parsestr((dist_info / "METADATA").read_text())


def _license_of(meta: email.message.Message) -> str:
    expression = meta.get("License-Expression")
    if expression:
        return str(expression)
    classifiers = [
        str(c).rsplit(" :: ", 1)[-1] for c in meta.get_all("Classifier") or [] if "License ::" in c
    ]
    text = str(meta.get("License") or "").strip()
    if text and len(text) < 60 and "\n" not in text:
        return text
    return ", ".join(classifiers) or "see the license files"


def copyright_text(lib: Path, when: int) -> str:
    lines = [
        "iotunnel: the device side of AWS IoT Secure Tunneling.",
        "",
        f"Copyright {time.gmtime(when).tm_year} the iotunnel authors",
        "License: Apache-2.0",
        " On Debian systems the full text of the Apache License 2.0 is in",
        " /usr/share/common-licenses/Apache-2.0.",
        "",
        f"Vendored Python distributions in /{PREFIX}/lib, installed unmodified from the wheels",
        "pinned in the iotunnel source tree (packaging/requirements.lock). The copyright and",
        "license texts of each are in its NAME-VERSION.dist-info directory there.",
        "",
    ]
    for dist_info in sorted(lib.glob("*.dist-info")):
        meta = _metadata(dist_info)
        if meta["Name"] == PACKAGE:
            continue
        author = str(meta.get("Author") or meta.get("Author-email") or "").strip()
        entry = f" {meta['Name']} {meta['Version']}: {_license_of(meta)}"
        lines.append(entry + (f"; {author}" if author else ""))
    return "\n".join(lines) + "\n"


def changelog(version: str, maintainer: str, when: int) -> bytes:
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(when))
    text = (
        f"{PACKAGE} ({version}) unstable; urgency=medium\n\n"
        f"  * iotunnel {version}, built by packaging/build_deb.py.\n\n"
        f" -- {maintainer}  {date}\n"
    )
    return _gzip(text.encode())


def stage_files(stage: Path, version: str, maintainer: str, when: int) -> None:
    """Everything but /opt: the unit, sysusers, settings and documentation."""
    unit_dir = stage / "lib/systemd/system"
    unit_dir.mkdir(parents=True)
    shutil.copyfile(ROOT / "systemd" / UNIT, unit_dir / UNIT)
    sysusers = stage / "usr/lib/sysusers.d"
    sysusers.mkdir(parents=True)
    shutil.copyfile(DEBIAN / "iotunnel.sysusers", sysusers / "iotunnel.conf")

    etc = stage / "etc/iotunnel"
    (etc / "destination.d").mkdir(parents=True)
    (etc / "certs").mkdir()
    shutil.copyfile(ROOT / "config/agent.ini", etc / "agent.ini")
    for mapping in sorted((ROOT / "config/destination.d").glob("*.ini")):
        shutil.copyfile(mapping, etc / "destination.d" / mapping.name)

    doc = stage / "usr/share/doc" / PACKAGE
    (doc / "examples/source.d").mkdir(parents=True)
    shutil.copyfile(ROOT / "README.md", doc / "README.md")
    shutil.copyfile(ROOT / "systemd/README.md", doc / "README.systemd.md")
    for example in sorted((ROOT / "config/source.d").glob("*.ini")):
        shutil.copyfile(example, doc / "examples/source.d" / example.name)
    (doc / "copyright").write_text(copyright_text(stage / PREFIX / "lib", when))
    (doc / "changelog.gz").write_bytes(changelog(version, maintainer, when))

    man = stage / "usr/share/man/man1"
    man.mkdir(parents=True)
    for name in ENTRY_POINTS:
        (man / f"{name}.1.gz").write_bytes(manual_page(name, version, when))

    overrides = stage / "usr/share/lintian/overrides"
    overrides.mkdir(parents=True)
    shutil.copyfile(DEBIAN / "lintian-overrides", overrides / PACKAGE)


def _elf_header(path: Path) -> tuple[int, int] | None:
    """(class, machine) of an ELF file, or None for anything else."""
    with path.open("rb") as file:
        head = file.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = head[18:20]
    return head[4], int.from_bytes(machine, "little" if head[5] == 1 else "big")


def check_elf(lib: Path, target: Target) -> list[Path]:
    """Every ELF file in the tree, which must all be for ``target``."""
    found = []
    for path in sorted(lib.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        header = _elf_header(path)
        if header is None:
            continue
        if header != (target.elf_class, target.elf_machine):
            raise BuildError(
                f"{path.relative_to(lib)}: ELF class/machine {header}, not {target.deb}'s "
                f"{(target.elf_class, target.elf_machine)}"
            )
        found.append(path)
    return found


def library_depends(elf_files: Sequence[Path]) -> list[str]:
    """Depends for the shared libraries the ELF files need, as dpkg-shlibdeps would put them:
    libc6 (>= the newest GLIBC_ symbol version needed), and the C++ runtime if used."""
    packages: set[str] = set()
    glibc = (2, 0)
    for path in elf_files:
        dynamic = run(["readelf", "--wide", "--dynamic", str(path)]).stdout
        for soname in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic):
            if soname not in LIBRARY_PACKAGES:
                raise BuildError(f"{path.name} needs {soname}: no Debian package known for it")
            packages.add(LIBRARY_PACKAGES[soname])
        versions = run(["readelf", "--wide", "--version-info", str(path)]).stdout
        for major, minor in re.findall(r"Name: GLIBC_(\d+)\.(\d+)", versions):
            glibc = max(glibc, (int(major), int(minor)))
    depends = []
    for package in sorted(packages):
        if package == "libc6":
            depends.append(f"libc6 (>= {glibc[0]}.{glibc[1]})")
        else:
            depends.append(package)
    return depends


def strip_tool(target: Target) -> list[str]:
    """The command that strips ``target``'s ELF files, as dh_strip does for shared objects."""
    for name in (f"{target.triplet}-strip", "llvm-strip"):
        if shutil.which(name):
            return [name, "--remove-section=.comment", "--remove-section=.note", "--strip-unneeded"]
    raise BuildError(
        f"no strip for {target.deb}: apt-get install binutils-{target.triplet.replace('_', '-')}"
    )


def strip(files: Sequence[Path], target: Target) -> None:
    if files:
        run([*strip_tool(target), *map(str, files)])


def _roff(text: str) -> str:
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def manual_page(name: str, version: str, when: int) -> bytes:
    """NAME.1 from ``NAME --help`` (run from this tree: the text is the same on every arch)."""
    module = {"iotunnel-agent": "agent", "iotunnel-proxy": "proxy"}[name]
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)}
    try:
        usage = run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env).stdout
    except BuildError as exc:
        raise BuildError(
            f"{exc}\n(run the build with the project's virtualenv: make deb, or "
            ".venv/bin/python packaging/build_deb.py)"
        ) from None
    date = time.strftime("%Y-%m-%d", time.gmtime(when))
    files = {
        "iotunnel-agent": (
            ".TP\n/etc/iotunnel/agent.ini\nsettings ([agent] section)\n"
            ".TP\n/etc/iotunnel/destination.d/\nservice-ID mapping files\n"
            ".TP\n/lib/systemd/system/iotunnel-agent.service\nthe systemd unit\n"
        ),
        "iotunnel-proxy": ".TP\n/etc/iotunnel/destination.d/\nthe device's mapping files\n",
    }[name]
    page = (
        f'.TH {name.upper()} 1 "{date}" "iotunnel {version}" "User Commands"\n'
        f".SH NAME\n{name} \\- {SUMMARIES[name]}\n"
        f".SH DESCRIPTION\nThe output of\n.B {name} --help\n:\n"
        f".PP\n.nf\n{_roff(usage)}\n.fi\n"
        f".SH FILES\n{files}"
        f".SH SEE ALSO\n/usr/share/doc/iotunnel/README.md\n"
    )
    return _gzip(page.encode())


def _gzip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buffer.getvalue()


def _walk(stage: Path) -> Iterator[Path]:
    for path in sorted(stage.rglob("*")):
        if path.relative_to(stage).parts[0] != "DEBIAN":
            yield path


def normalise(stage: Path, when: int) -> None:
    """0755 directories, entry points and maintainer scripts, 0644 everything else (shared
    objects included, as Debian wants them); one mtime for all."""
    executables = {stage / PREFIX / "bin" / name for name in ENTRY_POINTS}
    executables |= {stage / "DEBIAN" / name for name in ("postinst", "prerm", "postrm")}
    for path in [stage, *_walk(stage), *(stage / "DEBIAN").rglob("*")]:
        if path.is_symlink():
            os.utime(path, (when, when), follow_symlinks=False)
            continue
        path.chmod(0o755 if path.is_dir() or path in executables else 0o644)
        os.utime(path, (when, when))


def installed_size(stage: Path) -> int:
    """Installed-Size in KiB, as dpkg-gencontrol counts it."""
    total = 0
    for path in _walk(stage):
        if path.is_symlink() or path.is_dir():
            total += 1
        else:
            total += (path.stat().st_size + 1023) // 1024
    return total


def write_control(
    stage: Path,
    target: Target,
    version: str,
    maintainer: str,
    vendored: Sequence[str],
    depends: Sequence[str],
) -> None:
    control_dir = stage / "DEBIAN"
    control_dir.mkdir()
    description = (
        "AWS IoT Secure Tunneling device agent and local proxy\n"
        " iotunnel is the device side of AWS IoT Secure Tunneling. iotunnel-agent, a\n"
        " systemd service, receives the tunnel notifications of AWS IoT Core over MQTT\n"
        " and starts one destination-mode local proxy per tunnel. iotunnel-proxy is a\n"
        " drop-in replacement for the reference localproxy (source and destination\n"
        " modes, protocols V1 to V3, several services per tunnel).\n"
        " .\n"
        " The unit is enabled on installation and starts once the device's key is in\n"
        " /etc/iotunnel/certs/private.pem.key and /etc/iotunnel/agent.ini is set up.\n"
        " .\n"
        + textwrap.fill(
            "Vendored in /opt/iotunnel/lib as pinned wheels: " + ", ".join(vendored) + ".",
            width=79,
            initial_indent=" ",
            subsequent_indent=" ",
        )
    )
    fields = {
        "Package": PACKAGE,
        "Version": version,
        "Architecture": target.deb,
        "Maintainer": maintainer,
        "Installed-Size": str(installed_size(stage)),
        "Depends": ", ".join([DEPENDS, *depends]),
        "Suggests": SUGGESTS,
        "Section": "net",
        "Priority": "optional",
        "Homepage": "https://docs.aws.amazon.com/iot/latest/developerguide/secure-tunneling.html",
        "Description": description,
    }
    (control_dir / "control").write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    conffiles = sorted(
        "/" + str(p.relative_to(stage)) for p in (stage / "etc").rglob("*") if p.is_file()
    )
    (control_dir / "conffiles").write_text("".join(f"{c}\n" for c in conffiles))
    for script in ("postinst", "prerm", "postrm"):
        shutil.copyfile(DEBIAN / script, control_dir / script)
        (control_dir / script).chmod(0o755)
    sums = []
    for path in _walk(stage):
        if path.is_file() and not path.is_symlink():
            digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
            sums.append(f"{digest}  {path.relative_to(stage)}\n")
    (control_dir / "md5sums").write_text("".join(sums))


@dataclass(frozen=True)
class Built:
    path: Path
    target: Target
    elf_files: tuple[str, ...]


def build_one(
    target: Target,
    *,
    version: str,
    pins: Sequence[lock.Pin],
    project_wheel: Path,
    cache: Path,
    wheelhouse: Path | None,
    work: Path,
    out: Path,
    maintainer: str,
    when: int,
) -> Built:
    stage = work / target.deb
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    wheels = fetch(pins, target, cache, wheelhouse)
    lib = stage / PREFIX / "lib"
    log(f"{target.deb}: installing {len(wheels) + 1} wheels into /{PREFIX}/lib")
    install_wheels([*wheels, project_wheel], target, lib)
    elf_files = check_elf(stage, target)
    strip(elf_files, target)
    check_elf(stage, target)
    elf_files = [path.relative_to(stage) for path in elf_files]
    tidy_dist_info(lib)
    write_entry_points(stage, lib, version)
    stage_files(stage, version, maintainer, when)
    vendored = [
        f"{meta['Name']} {meta['Version']}"
        for meta in map(_metadata, sorted(lib.glob("*.dist-info")))
        if meta["Name"] != PACKAGE
    ]
    normalise(stage, when)
    depends = library_depends([stage / path for path in elf_files])
    write_control(stage, target, version, maintainer, vendored, depends)
    normalise(stage, when)
    out.mkdir(parents=True, exist_ok=True)
    deb = out / f"{PACKAGE}_{version}_{target.deb}.deb"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(when)}
    run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(stage), str(deb)], env=env)
    log(f"built {deb} ({deb.stat().st_size // 1024} KiB)")
    return Built(deb, target, tuple(map(str, elf_files)))


def build(
    arches: Sequence[str],
    *,
    out: Path,
    work: Path,
    cache: Path,
    wheelhouse: Path | None = None,
    version: str | None = None,
    maintainer: str | None = None,
) -> list[Built]:
    if shutil.which("dpkg-deb") is None:
        raise BuildError("dpkg-deb is not installed (Debian package dpkg)")
    version = version or project_version()
    maintainer = maintainer or _maintainer()
    when = source_date_epoch()
    pins = lock.read_lock()
    problems = lock.check(pins)
    if problems:
        raise BuildError("packaging/requirements.lock is stale: " + "; ".join(problems))
    work.mkdir(parents=True, exist_ok=True)
    wheel_dir = Path(tempfile.mkdtemp(prefix="wheel-", dir=work))
    try:
        project_wheel = build_project_wheel(wheel_dir, when)
        return [
            build_one(
                TARGETS[arch],
                version=version,
                pins=pins,
                project_wheel=project_wheel,
                cache=cache,
                wheelhouse=wheelhouse,
                work=work,
                out=out,
                maintainer=maintainer,
                when=when,
            )
            for arch in arches
        ]
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)


def _maintainer() -> str:
    name, email_ = os.environ.get("DEBFULLNAME"), os.environ.get("DEBEMAIL")
    return f"{name} <{email_}>" if name and email_ else DEFAULT_MAINTAINER


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        action="append",
        choices=sorted(TARGETS),
        help="Debian architecture to build (repeatable; default: amd64 and arm64)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the .deb files go")
    parser.add_argument(
        "--work", type=Path, default=ROOT / "build/deb", help="staging directory (recreated)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("IOTUNNEL_DEB_CACHE") or DEFAULT_CACHE / "deb-wheels"),
        help="downloaded wheels (checked against the lock)",
    )
    parser.add_argument(
        "--wheelhouse",
        type=Path,
        help="locally built wheels for what PyPI has no wheel of (armhf: awscrt)",
    )
    parser.add_argument("--version", help="package version (default: iotunnel.__version__)")
    args = parser.parse_args(argv)
    try:
        built = build(
            args.arch or ["amd64", "arm64"],
            out=args.out,
            work=args.work,
            cache=args.cache,
            wheelhouse=args.wheelhouse,
            version=args.version,
        )
    except BuildError as exc:
        print(f"build_deb: error: {exc}", file=sys.stderr)
        return 1
    for item in built:
        print(item.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
