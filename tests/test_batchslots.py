from __future__ import annotations

import threading

from aidetect.data.batchslots import BatchSlots


def claim_in_thread(slots: BatchSlots, made: int, iteration: int) -> threading.Event:
    claimed = threading.Event()
    threading.Thread(target=lambda: (slots.claim(0, made, iteration), claimed.set()), daemon=True).start()
    return claimed


def test_a_worker_waits_for_the_batch_it_would_overwrite_unless_its_iteration_ended() -> None:
    slots = BatchSlots(workers=1, batch_size=2, side=4)
    iteration = slots.start()
    buffers = [slots.claim(0, made, iteration) for made in range(slots.depth)]  # free: no wait
    assert len({buffer.ctypes.data for buffer in buffers}) == slots.depth
    claimed = claim_in_thread(slots, slots.depth, iteration)
    assert not claimed.wait(0.3)  # its buffer still holds batch 0, not released
    slots.release(0)
    assert claimed.wait(5)
    stale = claim_in_thread(slots, 5 * slots.depth, iteration)
    assert not stale.wait(0.3)
    slots.end(iteration)  # the reader stopped: a stale batch is discarded, nothing to wait for
    assert stale.wait(5)
    newer = slots.start()
    slots.end(iteration)  # ending an older iteration leaves the newer one alone
    assert int(slots.iteration) == newer
