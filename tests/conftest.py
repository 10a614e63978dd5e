"""Fixtures shared by every test directory.

``MS`` is one millisecond of test timeout, in seconds, scaled by ``IOTUNNEL_TEST_TIMEOUT_FACTOR``
(default 1) for slow machines: write a timeout as ``5000 * MS``. Tests never assert on timing;
timeouts only stop a hung test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# pytest puts this directory on sys.path (this conftest has no package), where tests/proxy and
# tests/service would pass for packages named ``proxy`` and ``service``; and the repository root
# is not on sys.path under the ``pytest`` script. Put the root first, so that the real packages
# win and ``testbed``, ``demo`` and ``bench`` (used from the checkout, never installed) are found.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT in sys.path:
    sys.path.remove(_ROOT)
sys.path.insert(0, _ROOT)

from testbed.harness import Stack  # noqa: E402
from testbed.pki import PKI  # noqa: E402

#: One millisecond of timeout, in seconds, scaled for slow machines.
MS = 0.001 * float(os.environ.get("IOTUNNEL_TEST_TIMEOUT_FACTOR", "1"))


@pytest.fixture(scope="session")
def ms() -> float:
    """:data:`MS`, for tests that cannot import this module."""
    return MS


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A test CA with a loopback server certificate and a client certificate."""
    directory: Path = tmp_path_factory.mktemp("pki")
    return PKI.create(directory)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Processes for one test; every one is stopped when the test ends."""
    with Stack(tmp_path / "run") as s:
        yield s


@pytest.fixture(scope="session")
def www(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTTP server's document root."""
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_text("<h1>hello from the device</h1>\n")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 256)  # 64 KiB
    return root
