"""Run under torchrun: records what each rank's train and eval loaders yield, for test_loader.py.

Every training batch is followed by an all-reduce, as in DDP training: if one rank ran out of
batches before another, the run would hang and the test would time out.
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from aidetect.data.loader import build_loader
from aidetect.data.manifest import fold_splits


def main(shard_dir: str, out: str, batch_size: int, workers: int, eval_workers: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    splits = fold_splits(5, 0)
    record: dict = {"rank": rank, "world": dist.get_world_size(), "train": [], "eval": {}}
    train = build_loader(shard_dir, splits["train"], batch_size=batch_size, train=True, num_workers=workers)
    for epoch in range(2):
        train.set_epoch(epoch)
        keys = []
        for batch in train:
            count = torch.tensor([float(len(batch.keys))])
            dist.all_reduce(count)
            assert count.item() == batch_size * dist.get_world_size()
            assert batch.images.is_contiguous(memory_format=torch.channels_last)
            keys.append(batch.keys)
        record["train"].append({"batches": len(keys), "len": len(train), "keys": keys})
    for name, split in (("val", splits["val"]), ("test", splits["test"])):
        loader = build_loader(shard_dir, split, batch_size=batch_size, train=False, num_workers=eval_workers)
        keys, batches = [], 0
        for batch in loader:
            keys += batch.keys
            batches += 1
        record["eval"][name] = {"batches": batches, "len": len(loader), "keys": keys}
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
