"""The per-epoch plan of the loader: pure functions of (shards, seed, epoch, rank, world, worker, workers).

Each epoch the chosen shards are put in an order seeded by (seed, epoch), the samples within each
shard are permuted (training only), and the result is read as one virtual sequence of N positions
whose length the manifest gives exactly. Then:

- training: global batch t is positions [t x G, (t + 1) x G) with G = world x batch, and rank r takes
  its r-th slice. Every rank gets N // G full batches (fewer than G samples are dropped, a different
  remainder each epoch), so no rank waits at an all-reduce that another never reaches; and a global
  batch holds the same samples however many ranks share it, so 2 ranks x batch 4 train like 1 x 8;
- evaluation: rank r takes the r-th contiguous 1/world of the sequence, so every sample is seen
  exactly once across all ranks.

A rank's batches go round-robin to its DataLoader workers, the order in which the DataLoader returns
them: what a rank yields depends on nothing but (seed, epoch, rank, world, batch size), not on the
number of workers.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from aidetect.data.shardfile import Shard


def seeded(*parts: object) -> int:
    """A 64-bit number drawn from ``parts`` alone (the same in every process and Python version)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def epoch_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(seeded("shards", seed, epoch)).shuffle(order)
    return order


def sample_permutation(shard: Shard, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Order in which a shard's samples enter the epoch's sequence (shards are read whole: any order is cheap)."""
    indices = list(range(shard.count))
    if shuffle:
        random.Random(seeded("samples", seed, epoch, Path(shard.path).name)).shuffle(indices)
    return indices


def rank_batches(total: int, rank: int, world: int, batch_size: int, train: bool, group: int = 1) -> list[range]:
    """The positions of each of a rank's batches in the epoch's sequence, in the order it yields them.
    Training yields a multiple of ``group`` batches (gradient accumulation steps: no partial step)."""
    if train:
        stride, first = world * batch_size, rank * batch_size
        count = total // (stride * group) * group
        return [range(t * stride + first, t * stride + first + batch_size) for t in range(count)]
    start, stop = total * rank // world, total * (rank + 1) // world
    return [range(lo, min(lo + batch_size, stop)) for lo in range(start, stop, batch_size)]


def worker_batches(batches: list[range], worker: int, workers: int) -> list[range]:
    """Round-robin, the order in which the DataLoader collects them: worker w makes batches w, w + workers, ..."""
    return batches[worker::workers]
