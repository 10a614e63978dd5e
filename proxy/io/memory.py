"""Allocator tuning: glibc's ``mallopt`` and ``malloc_trim`` for the processes that relay data.

This is about when freed memory goes back to the kernel, not about bounding what is buffered
(that is the backpressure of the scheduler and the local connections). The proxy and the
service call :func:`tune_allocator` once at start; the service also runs a :class:`HeapTrimmer`.
On another C library :func:`tune_allocator` does nothing and the trimmer only collects garbage.

glibc returns the top of its heap to the kernel as soon as more than 128 KiB of it is free, and
serves allocations over 128 KiB with fresh ``mmap`` pages. A relay allocates and frees a 64 KiB
frame, a 128 KiB WebSocket message and a 256 KiB socket read many thousand times a second, so
with the defaults nearly every one of them faults in pages the kernel must zero: in bench
scenario 2 that was 300,000 page faults and about 0.7 CPU seconds per GB in each process.
Keeping a few MiB of free heap removes them (bench/RESULTS.md).

Free heap that is not at its top is never returned by that rule, whatever the threshold: a
long-running service that opens and closes many TLS connections ends up with holes of freed
buffers (15 MiB of free heap after 1,000 tunnels in bench's soak). And a closed connection is
not freed at once: websockets' and asyncio's TLS objects refer to each other, so each closed
connection, with its 256 KiB TLS read buffer, waits for the cyclic garbage collector's full
collection, which runs less and less often as the number of live objects grows.
:class:`HeapTrimmer` collects that garbage and returns the free pages with ``malloc_trim`` a
moment after connections end, at most once every few seconds, so that a busy relay does not
fault its buffers back in after every close.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: Allocations below this come from the heap, not from fresh mmap pages.
MMAP_THRESHOLD = 1 << 20
#: Free heap kept before glibc returns its top to the kernel.
TRIM_THRESHOLD = 4 << 20
#: Extra heap obtained whenever the heap grows.
TOP_PAD = 1 << 20

_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")


def tune_allocator() -> bool:
    """Apply the settings above on glibc; True if they were applied.

    Does nothing on another C library, or when the environment already tunes glibc's malloc
    (``MALLOC_*_`` variables or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``): the operator's
    choice wins.
    """
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_TOP_PAD, TOP_PAD),
        )
    )
    log.debug("allocator settings %s", "applied" if applied else "refused")
    return applied


#: Seconds after a request before :class:`HeapTrimmer` trims: what a closing connection frees
#: (its TLS and WebSocket buffers) is freed by then.
TRIM_DELAY = 1.0
#: Seconds between two trims at least.
TRIM_INTERVAL = 5.0


def trim_heap() -> bool:
    """Return the free pages of the heap to the kernel (glibc's ``malloc_trim(0)``).

    True if some memory was released; False if none was, or not on glibc.
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


class HeapTrimmer:
    """Collects cyclic garbage and trims the heap ``delay`` seconds after :meth:`request`, at
    most once every ``interval``.

    Requests made while a trim is pending join it. Call :meth:`request` from the event loop's
    thread (when a connection ends, say); :meth:`close` cancels a pending trim.
    """

    def __init__(
        self,
        *,
        delay: float = TRIM_DELAY,
        interval: float = TRIM_INTERVAL,
        trim: Callable[[], bool] = trim_heap,
    ) -> None:
        self.delay = delay
        self.interval = interval
        self._trim = trim
        self._pending: asyncio.TimerHandle | None = None
        self._last: float | None = None
        #: how many trims have run (a statistic)
        self.trims = 0

    def request(self) -> None:
        """Trim soon (see the class)."""
        if self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + self.delay
        if self._last is not None:
            when = max(when, self._last + self.interval)
        self._pending = loop.call_at(when, self._run, loop)

    def close(self) -> None:
        """Cancel a pending trim."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = None
        self.trims += 1
        collected = gc.collect()
        released = self._trim()
        self._last = loop.time()  # the interval runs from the end of this one
        log.debug(
            "heap trimmed: %d garbage object(s) collected, %s",
            collected,
            "memory released" if released else "nothing to release",
        )
