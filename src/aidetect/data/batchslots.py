"""Reused shared-memory batch buffers that DataLoader worker processes fill and the training process reads.

PyTorch's DataLoader collates every batch into a fresh shared-memory segment, and the allocation plus
the first touch of its pages cost about as much per image as a tenth of its decode (measured, README
"Data benchmark"). Here each worker owns a small ring of ``AHEAD + 1`` batch buffers, allocated once for
the loader's life: it writes each sample straight into its row of a buffer and sends the training
process only which buffer it filled (worker, slot) with the labels and keys.

A worker may overwrite a buffer only once the training process has released the batch it held last.
The DataLoader already keeps each worker at most ``AHEAD`` batches (its ``prefetch_factor``) ahead of the
one in use, so ``AHEAD + 1`` buffers suffice and the wait in ``claim`` never happens in practice; it is
there so that no DataLoader version can make a worker overwrite a batch still being read.
"""

from __future__ import annotations

import time

import numpy as np
import torch

AHEAD = 2  # batches a worker may have ready beyond the one in use: the DataLoader's prefetch_factor


class BatchSlots:
    """``workers`` rings of ``AHEAD + 1`` buffers of ``batch_size`` x ``side`` x ``side`` x 3 uint8 images.

    Contract: the training process calls ``start`` before each iteration, ``release(w)`` once it is done
    with worker w's oldest unreleased batch, and ``end`` when it stops reading; worker w (0 when there
    are no worker processes) writes its ``made``-th batch of the iteration into ``claim(w, made,
    iteration)``, a buffer whose previous batch was released, or that no one reads any more.
    """

    def __init__(self, workers: int, batch_size: int, side: int) -> None:
        shape = (workers, AHEAD + 1, batch_size, side, side, 3)
        self.images = torch.empty(shape, dtype=torch.uint8).share_memory_()
        self.released = torch.zeros(workers, dtype=torch.int64).share_memory_()  # this iteration's, per worker
        self.iteration = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def depth(self) -> int:
        return self.images.shape[1]

    def start(self) -> int:
        """Begin a new iteration (the training process, before the workers hear of it); returns its number."""
        self.iteration += 1  # first: a worker still making a stale batch stops waiting for releases
        self.released.zero_()
        return int(self.iteration)

    def end(self, iteration: int) -> None:
        """End ``iteration`` (the training process, done with it), unless a newer one has begun."""
        if int(self.iteration) == iteration:
            self.iteration += 1

    def claim(self, worker: int, made: int, iteration: int) -> np.ndarray:
        """The buffer for ``worker``'s ``made``-th batch of ``iteration``, as a writable numpy view, once the
        batch ``depth`` before it is released (or ``iteration`` is over: its batches are discarded)."""
        while made - int(self.released[worker]) >= self.depth and int(self.iteration) == iteration:
            time.sleep(0.0005)
        return self.images[worker, made % self.depth].numpy()

    def batch(self, worker: int, made: int, count: int) -> torch.Tensor:
        """The first ``count`` images of ``worker``'s ``made``-th batch (a view, valid until released)."""
        return self.images[worker, made % self.depth, :count]

    def release(self, worker: int) -> None:
        self.released[worker] += 1
