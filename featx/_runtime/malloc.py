"""The C allocator's thresholds for CPU inference: keep activation buffers instead of returning them to the OS.

A CPU forward pass allocates and frees its activations (megabytes each) for
every batch. glibc's ``malloc`` serves a block above its *mmap threshold*
with a fresh ``mmap`` and returns it with ``munmap`` when freed, and memory
freed at the top of the heap beyond its *trim threshold* goes back to the OS
too. Either way each batch's activations are new pages that the kernel
zero-fills on first touch, one page fault per 4 KiB, slow on virtual
machines above all; and glibc adjusts both thresholds by itself once a large
block is freed, so speed depended on what the process happened to do before.

:func:`keep_cpu_buffers` sets them with ``mallopt`` (glibc's documented
interface), once per process, before featx's first CPU forward pass (through
:func:`featx._runtime.process.prepare`): the mmap threshold at glibc's largest
(:data:`MMAP_THRESHOLD`), the trim threshold at :data:`TRIM_THRESHOLD`, and
the top pad at :data:`TOP_PAD` (address space taken each time the heap
grows, touched only when used), so that grouped decoding does not grow the
heap in small steps. The cost: memory a forward pass needed at its peak
stays with the process between batches. Nothing is changed where the user
chose already (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
``MALLOC_TOP_PAD_`` in the environment), with another C library or
allocator (musl, macOS, Windows; jemalloc or tcmalloc preloaded take the
call as a no-op), or with ``FEATX_KEEP_CPU_BUFFERS=0``. What it changes, as
measured (``benchmarks/bench_allocator.py``): the Performance page of the docs (``docs/performance.md``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

__all__ = ["keep_cpu_buffers", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "TOP_PAD"]

#: glibc's largest dynamic mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Freed memory at the top of the heap kept for the next batch (glibc's own would be 64 MiB at most).
TRIM_THRESHOLD = 1024 * 1024 * 1024
#: Extra address space the heap takes each time it grows (glibc's default: 128 KiB); pages are touched only when used.
TOP_PAD = 256 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # from glibc's malloc.h
_USER_SET = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_LOCK = threading.Lock()
_DONE: list[bool] = []  # the outcome, once decided for this process


def _glibc():
    """The running glibc's ``mallopt``, or None with another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_cpu_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are featx's now.

    Called when a CPU runner is built (in ``fit``). Idempotent and thread-safe;
    a refusal by ``mallopt`` (it returns 0) leaves the process as it was.
    """
    with _LOCK:
        if not _DONE:
            _DONE.append(_apply())
        return _DONE[0]


def _apply() -> bool:
    if os.environ.get("FEATX_KEEP_CPU_BUFFERS", "1") == "0" or any(v in os.environ for v in _USER_SET):
        return False
    mallopt = _glibc()
    if mallopt is None:
        return False
    # the trim threshold first: a refused mmap threshold then leaves glibc's dynamic adjustment on
    return (bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
            and bool(mallopt(_M_TOP_PAD, TOP_PAD)))
