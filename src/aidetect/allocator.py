"""Keep freed memory in the process instead of handing it back to the kernel every step.

glibc's ``malloc`` serves every buffer above its mmap threshold (128 KiB, raised dynamically only up
to 32 MiB) with a fresh ``mmap`` and ``munmap``s it on ``free``; it also trims the heap's free top
above 128 KiB. A CPU training step allocates and frees activations of hundreds of MiB, so every
step faults them in again page by page, a large share of its CPU time spent in the kernel (figures:
README, "CPU training"). :func:`keep_freed_memory` tells
glibc to keep what it frees (the process then stays at its peak footprint, which is what it
needs on the next step anyway). Forked children (DataLoader and pack workers) inherit the setting.

Written by hand with ``ctypes`` because the fix is two ``mallopt`` calls: a drop-in allocator
(jemalloc, tcmalloc) would have to be preloaded before the interpreter starts, which a library
cannot do for its user. A user who sets glibc's own ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_MAX_`` keeps their choice: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 1 << 30  # buffers up to 1 GiB come from (and return to) the heap
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> str:
    """Configure glibc's allocator to keep freed memory; call once where a command starts.

    Returns what was done, for logs: ``"kept"``, ``"kept (mmap off)"`` on a glibc that refuses a
    1 GiB mmap threshold (older releases cap it at 32 MiB, too low for activations), ``"user"``
    when the user's ``MALLOC_*`` variables decide, or ``"not glibc"`` (musl, macOS: unchanged).
    """
    if any(name in os.environ for name in USER_SETTINGS):
        return "user"
    mallopt = glibc_mallopt()
    if mallopt is None:
        return "not glibc"
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest int: never trim
    if mallopt(M_MMAP_THRESHOLD, KEEP_BELOW):
        return "kept"
    mallopt(M_MMAP_MAX, 0)
    return "kept (mmap off)"


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc.mallopt
