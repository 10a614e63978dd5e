"""The allocator settings of relaying processes (proxy/io/memory.py).

Measured by what they are for: a process that reads, joins and frees large buffers again and
again (as a relay does with every message) stops faulting in fresh pages.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import subprocess
import sys
import weakref

import pytest

from proxy.io.memory import HeapTrimmer

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



_HOLES = """
from proxy.io.memory import trim_heap
kept, freed = [], []
for i in range(4000):
    (kept if i % 2 else freed).append(bytearray(16_000))
freed.clear()  # holes between kept blocks: below the top of the heap, never trimmed by itself
print(trim_heap())
"""


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trim_heap_returns_holes_in_the_heap() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _HOLES], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["True"]


def test_heap_trimmer_joins_requests_and_spaces_trims() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        calls: list[float] = []
        ran = [asyncio.Event(), asyncio.Event()]

        def trim() -> bool:
            calls.append(loop.time())
            ran[len(calls) - 1].set()
            return True

        trimmer = HeapTrimmer(delay=0.0, interval=0.2, trim=trim)
        trimmer.request()
        trimmer.request()  # joins the pending one
        async with asyncio.timeout(30):
            await ran[0].wait()
        assert (len(calls), trimmer.trims) == (1, 1)
        trimmer.request()
        trimmer.request()
        async with asyncio.timeout(30):
            await ran[1].wait()
        assert (len(calls), trimmer.trims) == (2, 2)
        trimmer.request()
        trimmer.close()  # cancels the pending one
        return calls

    first, second = asyncio.run(scenario())
    # asyncio may run a timer up to its clock resolution early
    assert second - first >= 0.2 - 0.01


class _Cyclic:
    """An object in a reference cycle, as closed connections are (websockets, asyncio TLS)."""

    def __init__(self) -> None:
        self.me = self


def test_heap_trimmer_frees_garbage_in_reference_cycles_first() -> None:
    """The buffers of a closed connection are freed only when the garbage collector finds its
    cycle: the trimmer collects before it trims (with automatic collection off, so that only
    the trimmer can free it)."""

    async def scenario() -> None:
        trimmed = asyncio.Event()
        alive_at_trim: list[bool] = []
        garbage = _Cyclic()
        ref = weakref.ref(garbage)
        del garbage

        def trim() -> bool:
            alive_at_trim.append(ref() is not None)
            trimmed.set()
            return True

        trimmer = HeapTrimmer(delay=0.0, trim=trim)
        trimmer.request()
        async with asyncio.timeout(30):
            await trimmed.wait()
        assert alive_at_trim == [False]

    enabled = gc.isenabled()
    gc.disable()
    try:
        asyncio.run(scenario())
    finally:
        if enabled:
            gc.enable()
