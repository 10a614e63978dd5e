"""The allocator settings of relaying processes (proxy/io/memory.py).

Measured by what they are for: a process that reads, joins and frees large buffers again and
again (as a relay does with every message) stops faulting in fresh pages.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.libc_ver()[0] == "glibc"

_CHURN = """
import collections, os, resource, sys
from proxy.io.memory import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tuned" else False
r, w = os.pipe()
kept = collections.deque(maxlen=4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3000):
    os.write(w, b"x" * 60_000)
    data = os.read(r, 262_144)  # a 256 KiB read shrunk to what arrived, as asyncio reads
    kept.append(b"".join((data, data)))  # two frames joined into one message
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

def _churn(mode: str, **env: str) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    result = subprocess.run(
        [sys.executable, "-c", _CHURN, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**environ, **env},
        timeout=60,
    )
    applied, faults = result.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_tuned_allocator_stops_page_faults_on_buffer_churn() -> None:
    applied, tuned = _churn("tuned")
    assert applied
    _, default = _churn("default")
    assert default > 20_000  # with glibc's defaults: fresh pages for most messages
    assert tuned < default // 20


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    ],
)
def test_the_operators_malloc_environment_wins(env: dict[str, str]) -> None:
    applied, faults = _churn("tuned", **env)
    assert not applied
    assert faults > 20_000

