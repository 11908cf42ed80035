"""Process-parallel map used by synth, pack and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context


def parallel_imap(fn: Callable, items: Iterable, workers: int, chunksize: int = 2) -> Iterator:
    """Ordered map over ``workers`` processes; in-process for one worker (simple tracebacks, no fork)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # fork: workers inherit the parent's imports and read-only data without pickling them.
    with get_context("fork").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)
