"""Allocator settings for a process that relays large messages (the proxy and the service).

glibc returns the top of its heap to the kernel as soon as more than 128 KiB of it is free, and
serves allocations over 128 KiB with fresh ``mmap`` pages. A relay allocates and frees a 64 KiB
frame, a 128 KiB WebSocket message and a 256 KiB socket read many thousand times a second, so
with the defaults nearly every one of them faults in pages the kernel must zero: in bench
scenario 2 that was 300,000 page faults and about 0.7 CPU seconds per GB in each process.
Keeping a few MiB of free heap removes them (bench/RESULTS.md).
"""

from __future__ import annotations

import logging
import os

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
        import ctypes

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
