"""Fixtures of the package tests: the .deb packages (built once per session) and a throw-away
root with the amd64 package installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from deb_harness import (
    ARCHES,
    build,
    can_install,
    dpkg,
    extract,
    host_arch,
    missing_build_tools,
    new_root,
)


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``make deb`` once: the amd64 and arm64 packages, by architecture."""
    missing = missing_build_tools()
    if missing:
        pytest.skip(f"cannot build .deb packages here, missing: {', '.join(missing)}")
    base = tmp_path_factory.mktemp("deb")
    return build(base / "dist", base / "work")


@pytest.fixture(scope="session")
def unpacked(debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each package's files (``dpkg-deb --extract``), by architecture."""
    base = tmp_path_factory.mktemp("unpacked")
    return {arch: extract(debs[arch], base / arch) for arch in ARCHES}


@pytest.fixture(scope="session")
def installed(debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away root with this machine's package (amd64 here) installed (do not change it
    in a test)."""
    reason = can_install()
    if reason:
        pytest.skip(reason)
    root = new_root(tmp_path_factory.mktemp("installed-root"), host_arch())
    dpkg(root, "--install", debs[host_arch()])
    return root
