"""Batches made by decode threads in this process, written into a small ring of reused batch buffers.

PyTorch's DataLoader collates every batch into a fresh shared-memory segment (allocation plus first-touch
page faults: about 0.11 ms per 256 px image, measured), which it cannot reuse. Here each of ``threads``
threads owns ``DEPTH`` preallocated N x H x W x 3 uint8 buffers (pinned when batches go to a GPU) and
copies its samples straight into them. The decoders (OpenCV's libjpeg-turbo, Pillow's JPEG codec for
augmentation) release the GIL, so the threads decode in parallel.

The plan is the process loader's: thread w makes the rank's batches w, w + threads, ... through
``ShardDataset.samples``, and the batches are yielded round-robin, so what a rank yields is the same,
bit for bit, as with DataLoader workers, whatever the number of threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from aidetect.data.shards import ShardDataset

DEPTH = 2  # buffers per thread: one being filled while the consumer holds the other


class Slot(NamedTuple):
    images: torch.Tensor  # batch_size x H x W x 3 uint8, reused
    ready: torch.cuda.Event | None  # recorded once the consumer's copy of the last batch was enqueued


class ThreadBatches:
    """Iterable of (uint8 NHWC images, labels, keys, sources) batches for one rank of ``dataset``.

    The images tensor is a view of a reused buffer: it stays valid until the next batch is requested,
    and a non-blocking copy of it enqueued on the current CUDA stream before then completes before the
    buffer is written again. Starting a new iteration ends the previous one first.
    """

    def __init__(self, dataset: ShardDataset, *, threads: int, pin: bool) -> None:
        self.dataset, self.threads, self.pin = dataset, threads, pin
        self.buffers: list[list[torch.Tensor]] = [[] for _ in range(threads)]
        self.run: Run | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], list[str]]]:
        if self.run is not None:
            self.run.stop()
        plan = self.dataset.plan(self.threads)
        run = self.run = Run(self, plan, self.dataset.epoch)
        try:
            for index in range(sum(map(len, plan))):
                worker = index % self.threads
                item = run.ready[worker].get()
                if isinstance(item, BaseException):
                    raise item
                slot, count, labels, keys, sources = item
                yield slot.images[:count], labels, keys, sources
                run.release(worker, slot)
        finally:
            run.stop()

    def buffer(self, worker: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A new buffer of ``worker``'s ring (its first batches of the loader's life allocate them)."""
        images = torch.empty((self.dataset.batch_size, *shape), dtype=torch.uint8, pin_memory=self.pin)
        self.buffers[worker].append(images)
        return images


class Run:
    """One epoch's threads and queues: ``ready[w]`` holds thread w's finished batches (or the exception
    that ended it), ``free[w]`` the buffers it may fill again."""

    def __init__(self, owner: ThreadBatches, plan: list[list[range]], epoch: int) -> None:
        self.owner, self.epoch = owner, epoch
        self.stopping = threading.Event()
        self.ready: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in range(owner.threads)]
        self.free: list[queue.SimpleQueue[Slot | None]] = [queue.SimpleQueue() for _ in range(owner.threads)]
        for worker, buffers in enumerate(owner.buffers):
            for images in buffers:
                self.free[worker].put(Slot(images, None))
        self.workers = [threading.Thread(target=self.produce, args=item, daemon=True) for item in enumerate(plan)]
        for thread in self.workers:
            thread.start()

    def produce(self, worker: int, batches: list[range]) -> None:
        """Thread ``worker``: fill a free buffer with each of its batches, in order, until done or stopped."""
        try:
            samples = self.owner.dataset.samples(batches, self.epoch)
            for batch in batches:
                item = self.fill(worker, samples, len(batch))
                self.ready[worker].put(item or RuntimeError("this iteration was ended by a newer one of its loader"))
                if item is None:
                    return
        except BaseException as exc:  # handed to the consumer, which raises it when this batch is due
            self.ready[worker].put(exc)

    def fill(self, worker: int, samples: Iterator[tuple[torch.Tensor, int, str, str]], count: int) -> tuple | None:
        """The next ``count`` samples in a buffer: (slot, count, labels, keys, sources); None once stopped."""
        slot, labels, keys, sources = None, [], [], []
        for row in range(count):
            if self.stopping.is_set():
                return None
            image, label, key, source = next(samples)
            if slot is None:
                slot = self.free_slot(worker, tuple(image.shape))
                if slot is None:
                    return None
            np.copyto(slot.images[row].numpy(), image.numpy())  # numpy releases the GIL while copying
            labels.append(label)
            keys.append(key)
            sources.append(source)
        return slot, count, torch.tensor(labels), keys, sources

    def free_slot(self, worker: int, shape: tuple[int, ...]) -> Slot | None:
        """A buffer ``worker`` may overwrite: a new one while its ring is short, else the next one the
        consumer released (after the device copy from it completed). None once stopped."""
        if len(self.owner.buffers[worker]) < DEPTH:
            return Slot(self.owner.buffer(worker, shape), None)
        slot = self.free[worker].get()
        if slot is not None and slot.ready is not None:
            slot.ready.synchronize()
        return None if self.stopping.is_set() else slot

    def release(self, worker: int, slot: Slot) -> None:
        """The consumer is done with ``slot``: what it enqueued on the device so far must finish first."""
        ready = None
        if slot.images.is_pinned():
            ready = torch.cuda.Event()
            ready.record()
        self.free[worker].put(Slot(slot.images, ready))

    def stop(self) -> None:
        """End the threads (each within a sample's time) and wait for them: the buffers are free after."""
        self.stopping.set()
        for free in self.free:
            free.put(None)
        for thread in self.workers:
            thread.join()
