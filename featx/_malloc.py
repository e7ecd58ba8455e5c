"""The C allocator's thresholds for CPU inference: keep activation buffers instead of returning them to the OS.

A CPU forward pass allocates and frees its activations (megabytes each) for
every batch. glibc's ``malloc`` serves a block above its *mmap threshold*
(128 KiB at the start of a process) with a fresh ``mmap`` and returns it with
``munmap`` when freed, and memory freed at the top of the heap beyond its
*trim threshold* goes back to the OS too. Either way each batch's activations
are new pages: the kernel zero-fills them on first touch, one page fault per
4 KiB, which is slow on virtual machines above all. glibc raises both
thresholds by itself once a large block is freed (to 32 MiB and 64 MiB at
most), so how fast a process ran depended on what it happened to do before,
and a forward pass whose heap peaks above 64 MiB (efficientnet_lite0 at
batch 4 does) was trimmed after every batch even then. Seen on the 2-core
AVX512_BF16 machine, efficientnet_lite0 fp32 at batch 4: 76-150 img/s in
processes that had run featx (up to 550000 page faults per 128 images) and
about 200 img/s with these thresholds (no page fault).

:func:`keep_cpu_buffers` sets them with ``mallopt`` (glibc's documented
interface), once per process, before featx's first CPU forward pass: the
mmap threshold at glibc's largest (:data:`MMAP_THRESHOLD`, 32 MiB; single
blocks above it are still mapped and unmapped each time, which larger
batches than the CPU default can meet) and the trim threshold at
:data:`TRIM_THRESHOLD` (1 GiB). The cost: memory a forward pass needed at its
peak stays with the process instead of going back to the OS between batches
(up to 1 GiB; at featx's CPU batch size, tens of MiB). And the top pad at
:data:`TOP_PAD` (256 MiB of address space each time the heap grows, touched
only when used): in a fresh process, decoding groups of images between
forward passes (:mod:`featx._loading`) kept growing the heap in small steps;
efficientnet_lite0 fp32 from JPEG ran at 141-161 img/s, call after call,
and at 192-198 with this pad (or after the heap had once grown large; 64 MiB
was not enough). Nothing is changed where the user chose already
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
``MALLOC_TOP_PAD_`` in the environment), with another C library or
allocator (musl, macOS, Windows; jemalloc or tcmalloc preloaded take the call
as a no-op), or with ``FEATX_KEEP_CPU_BUFFERS=0``.
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
