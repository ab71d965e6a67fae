"""Process-wide settings every entry point applies once: ServerApp, ClientApp, in-process runs, benches.

PyTorch on CPU allocates and frees the same large activation buffers on every batch. With glibc's
default malloc, blocks above its mmap threshold (dynamic, at most 32 MiB) are mapped and unmapped
each time, and the top of the heap is handed back to the kernel once more than twice that lies
free, so every batch page-faults its buffers in again. On the 2-core development box, evaluating
the CNN on 2000 Fashion-MNIST images at 10 rank levels (batches of 500) took 4.4 s, 3.3 s of it in
the kernel; keeping freed memory in the process brought it to 2.5 s with no kernel time.

Threads other than the main one allocate from arenas of their own, which these settings do not
reach once a thread has allocated. Flower runs the ServerApp in such a thread, where the same
evaluation took 3.1 s; one arena for all threads (``MALLOC_ARENA_MAX=1``, read at process start)
brings it back to 2.6 s. ``ALLOCATOR_ENV`` holds the settings as environment variables for the
processes the launchers start; ``keep_freed_memory()`` applies them to a running process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 64 << 20  # blocks above this are still mapped on their own
TRIM_THRESHOLD = 512 << 20  # free memory kept at the top of the heap before trimming
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
                 "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD), "MALLOC_ARENA_MAX": "1"}

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks instead of returning them to the kernel at once.

    Caps what a process keeps unused at about ``TRIM_THRESHOLD`` above its peak use. Idempotent;
    returns False (and changes nothing) where the C library is not glibc.
    """
    global _applied
    if _applied is None:
        _applied = (_mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                    and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                    and _mallopt(_M_ARENA_MAX, 1))  # for threads that have not allocated yet
        log.debug("malloc tuning %s", "applied" if _applied else "not available")
    return _applied


def _mallopt(param: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError, TypeError):  # no libc found, or not glibc (no mallopt)
        return False
