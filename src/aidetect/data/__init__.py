"""Data: synthetic sets (``synth``), packing into WebDataset shards (``pack``), the manifest and what a
run reads of it (``manifest``), the shard file format (``shardfile``) and the distributed loader over
the shards (``loader``). Import the submodule you need: importing this package loads none of them."""
