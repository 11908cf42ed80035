"""Process-parallel map used by synth, pack and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from aidetect.preemption import ignore_stop_signals


def parallel_imap(fn: Callable, items: Iterable, workers: int, chunksize: int = 2) -> Iterator:
    """Ordered map over ``workers`` processes; in-process for one worker (simple tracebacks, no fork).

    The workers ignore stop signals (a SIGTERM to the whole process group reaches them too): the caller
    decides what to keep and closes this iterator, which cancels the work not yet started and lets the
    workers end. A worker that dies (e.g. killed for memory) raises BrokenProcessPool instead of hanging.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    # fork: workers inherit the parent's imports and read-only data without pickling them.
    executor = ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=ignore_stop_signals)
    try:
        yield from executor.map(fn, items, chunksize=chunksize)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
