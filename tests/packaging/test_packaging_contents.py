"""The .deb packages as files: control fields, conffiles, the file list, the vendored native
code's architecture, the maintainer scripts, and lintian."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deb_harness import (
    ARCHES,
    ELF_MACHINES,
    LOCK,
    REPO,
    UNIT,
    WHEEL_ARCHES,
    contents,
    control_file,
    elf_machine,
    field,
    project_version,
    run,
)

ENTRY_POINTS = ("iotunnel-agent", "iotunnel-proxy")
CONFFILES = ["/etc/iotunnel/agent.ini", "/etc/iotunnel/destination.d/SSHDestination.ini"]
LIB = "opt/iotunnel/lib/"


def locked() -> dict[str, str]:
    """name -> version of packaging/requirements.lock."""
    text = LOCK.read_text()
    return dict(re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)", text))


def test_the_wheel_holds_the_three_parts_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pip install .`` (and the .deb, built from the same wheel) gets the shared ``iotunnel``
    package, proxy, service and agent: testbed/, demo/, bench/ and tests/ are used from the
    checkout only."""
    monkeypatch.syspath_prepend(str(REPO / "packaging"))
    build_deb = importlib.import_module("build_deb")
    wheel = build_deb.build_project_wheel(tmp_path, 315532800)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        parts = ["agent", "iotunnel", "proxy", "service"]
        assert archive.read(top_level).decode().split() == parts
    packages = {name.split("/")[0] for name in names if not name.startswith("iotunnel-")}
    assert packages == set(parts)


def test_the_lock_matches_pyproject() -> None:
    done = run([sys.executable, REPO / "packaging/lock.py", "--check"])
    assert done.returncode == 0, done.stderr
    assert {"awscrt", "awsiotsdk", "protobuf", "websockets"} <= set(locked())


@pytest.mark.parametrize("arch", ARCHES)
def test_control_fields(debs: dict[str, Path], arch: str) -> None:
    deb = debs[arch]
    assert deb.name == f"iotunnel_{project_version()}_{arch}.deb"
    assert field(deb, "Package") == "iotunnel"
    assert field(deb, "Version") == project_version()
    assert field(deb, "Architecture") == arch
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    assert depends[:2] == ["python3 (>= 3.11)", "adduser"]
    libc = [d for d in depends if d.startswith("libc6 ")]
    assert libc, depends
    assert re.fullmatch(r"libc6 \(>= 2\.(\d+)\)", libc[0])
    # Debian 12 has glibc 2.36: the vendored extensions must not need a newer one.
    assert int(libc[0].split(".")[1].rstrip(")")) <= 36
    # PKCS#11 modules for a device key in a TPM or in SoftHSM (the agent's pkcs11_lib).
    assert field(deb, "Suggests") == "libtpm2-pkcs11-1 | softhsm2"
    assert int(field(deb, "Installed-Size")) > 1000
    assert "<" in field(deb, "Maintainer")
    for name, version in locked().items():
        assert f"{name} {version}" in " ".join(field(deb, "Description").split())


@pytest.mark.parametrize("arch", ARCHES)
def test_conffiles_are_all_of_etc(debs: dict[str, Path], arch: str) -> None:
    conffiles = control_file(debs[arch], "conffiles").split()
    assert conffiles == CONFFILES
    etc_files = ["/" + e.path for e in contents(debs[arch]).values() if e.path.startswith("etc/")]
    assert sorted(p for p in etc_files if not p.endswith("/")) == CONFFILES


@pytest.mark.parametrize("arch", ARCHES)
def test_file_list(debs: dict[str, Path], arch: str) -> None:
    entries = contents(debs[arch])
    assert {e.owner for e in entries.values()} == {"root/root"}
    for name in ENTRY_POINTS:
        link = entries[f"usr/bin/{name}"]
        assert link.mode.startswith("l")
        assert link.target == f"/opt/iotunnel/bin/{name}"
        assert entries[f"opt/iotunnel/bin/{name}"].mode == "-rwxr-xr-x"
        assert f"usr/share/man/man1/{name}.1.gz" in entries
    assert entries["lib/systemd/system/iotunnel-agent.service"].mode == "-rw-r--r--"
    assert "usr/lib/sysusers.d/iotunnel.conf" in entries
    assert "etc/iotunnel/certs/" in entries
    for doc in ("copyright", "changelog.gz", "README.md", "README.systemd.md"):
        assert f"usr/share/doc/iotunnel/{doc}" in entries
    assert "usr/share/lintian/overrides/iotunnel" in entries
    paths = list(entries)
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]
    not_on_devices = ("testbed/", "demo/", "bench/", "tests/", "service/", "bin/")
    assert not [p for p in paths if p.startswith(tuple(LIB + d for d in not_on_devices))]
    vendored = ("awscrt/", "awsiot/", "websockets/")
    for package in ("iotunnel/", "agent/", "proxy/", "proxy/protocol/_pb/", *vendored):
        assert LIB + package in entries
    for name, version in locked().items():
        assert f"{LIB}{name}-{version}.dist-info/" in entries
    # Everything in lib/ is data for python3: nothing there is executable.
    executables = [e.path for e in entries.values() if e.mode[3] == "x" and e.mode[0] == "-"]
    assert sorted(executables) == [f"opt/iotunnel/bin/{n}" for n in ENTRY_POINTS]


def test_the_packaged_unit_is_the_repository_unit(unpacked: dict[str, Path]) -> None:
    for arch in ARCHES:
        packaged = unpacked[arch] / "lib/systemd/system/iotunnel-agent.service"
        assert packaged.read_bytes() == UNIT.read_bytes()


@pytest.mark.parametrize("arch", ARCHES)
def test_vendored_native_code_is_for_the_architecture(unpacked: dict[str, Path], arch: str) -> None:
    """Every ELF file has the architecture's machine; every wheel is for it or pure Python."""
    lib = unpacked[arch] / LIB
    machines = {
        str(path.relative_to(lib)): elf_machine(path)
        for path in lib.rglob("*")
        if path.is_file() and not path.is_symlink()
    }
    elf = {path: machine for path, machine in machines.items() if machine is not None}
    assert set(elf.values()) == {ELF_MACHINES[arch]}, elf
    for expected in ("_awscrt.abi3.so", "google/_upb/_message.abi3.so"):
        assert expected in elf
    assert all(path.endswith(".so") for path in elf)
    for wheel_file in lib.glob("*.dist-info/WHEEL"):
        tags = re.findall(r"(?m)^Tag: (\S+)$", wheel_file.read_text())
        assert tags, wheel_file
        for tag in tags:
            platform = tag.rsplit("-", 1)[-1]
            assert platform == "any" or platform.endswith(WHEEL_ARCHES[arch]), (wheel_file, tag)
    if shutil.which("readelf") is None:
        return
    # Stripped, as dh_strip would: no symbol table left.
    sections = run(["readelf", "--wide", "--sections", lib / "_awscrt.abi3.so"]).stdout
    assert ".symtab" not in sections
    assert ".dynsym" in sections
    # What MemoryDenyWriteExecute=yes needs of a library: no text relocations (they need
    # mprotect(PROT_EXEC) after writing) and no executable stack.
    for path in elf:
        dynamic = run(["readelf", "--wide", "--dynamic", lib / path]).stdout
        assert "TEXTREL" not in dynamic, path
        segments = run(["readelf", "--wide", "--segments", lib / path]).stdout
        [stack] = [line.split() for line in segments.splitlines() if "GNU_STACK" in line]
        assert "E" not in stack[6], (path, stack)


def test_entry_points_keep_the_environment_out(unpacked: dict[str, Path]) -> None:
    for name in ENTRY_POINTS:
        script = (unpacked["amd64"] / "opt/iotunnel/bin" / name).read_text()
        assert script.startswith("#!/usr/bin/python3 -I\n")
        assert 'sys.path.insert(0, os.path.join(PREFIX, "lib"))' in script


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_scripts(debs: dict[str, Path], script: str) -> None:
    text = control_file(debs["amd64"], script)
    assert text == control_file(debs["arm64"], script)
    assert text.startswith("#!/bin/sh\n")
    assert "\nset -e\n" in text
    assert "DPKG_ROOT" in text
    done = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    if shutil.which("checkbashisms"):
        done = subprocess.run(
            ["checkbashisms", "-"], input=text, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_md5sums_list_every_file(debs: dict[str, Path], unpacked: dict[str, Path]) -> None:
    for arch in ARCHES:
        listed = {
            line.split("  ", 1)[1] for line in control_file(debs[arch], "md5sums").splitlines()
        }
        files = {
            str(p.relative_to(unpacked[arch]))
            for p in unpacked[arch].rglob("*")
            if p.is_file() and not p.is_symlink()
        }
        assert listed == files


def test_lintian_finds_no_error_or_warning(debs: dict[str, Path]) -> None:
    """Errors fail; so do warnings (none is expected: overrides carry their reasons in
    packaging/debian/lintian-overrides). Informational tags are about the upstream wheels'
    binaries (hardening flags, spelling in strings) and are allowed."""
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (Debian package lintian)")

    def lint(deb: Path) -> subprocess.CompletedProcess[str]:
        return run(["lintian", "--fail-on", "error,warning", deb], timeout=600)

    with ThreadPoolExecutor(len(ARCHES)) as pool:
        results = list(pool.map(lint, [debs[arch] for arch in ARCHES]))
    for done in results:
        tags = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:")]
        assert not tags, done.stdout
        assert done.returncode == 0, done.stdout + done.stderr


def test_armhf_says_what_it_takes(tmp_path: Path) -> None:
    """PyPI has no armv7l wheel of awscrt: the armhf build stops and says what to do."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    argv = [sys.executable, REPO / "packaging/build_deb.py", "--arch", "armhf"]
    done = run([*argv, "--out", tmp_path / "out", "--work", tmp_path / "work"])
    assert done.returncode == 1
    assert "awscrt==" in done.stderr
    assert "no armv7l wheel on PyPI" in done.stderr
    assert "--wheelhouse" in done.stderr
    assert not list(tmp_path.rglob("*.deb"))
