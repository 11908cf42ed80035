"""Data: synthetic sets, packing into WebDataset shards, and the distributed loader over them."""

from aidetect.data.shards import Batch, build_loader, fold_splits, read_manifest, verify_shards

__all__ = ["Batch", "build_loader", "fold_splits", "read_manifest", "verify_shards"]
