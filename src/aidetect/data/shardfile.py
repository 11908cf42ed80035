"""One shard file: the tar format pack writes and every reader of a shard parses.

A shard is a plain USTAR archive of WebDataset samples: members ``KEY.EXTENSION`` grouped by key, one
stored image (``jpg`` or ``png``), its class label (``cls``) and its record (``json``) per sample.
Pack writes them (``write_members``); readers walk the 512-byte headers at fixed offsets
(``walk_members``) and meet damage as one ``DamagedShard`` line naming the file, never an endless
loop or silent garbage. Nothing here imports torch.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from aidetect.data.integrity import DamagedShard, ShardProblem, bytes_problem, damaged, file_problem
from aidetect.data.packformat import CLASSES

if TYPE_CHECKING:
    from pathlib import Path

BLOCK = 512  # tar's block: every header is one, every member's bytes are padded to a multiple
ZERO_BLOCK = bytes(BLOCK)
CHECKSUM_AS_BLANKS = 8 * ord(" ")  # a header's checksum field counts as eight spaces in its own sum
OCTAL_FIELD = re.compile(rb" *([0-7]+)[ \0]*")  # a number as tar writes it: octal digits, then NULs or spaces
IMAGE_EXTENSIONS = ("jpg", "png")  # a sample's stored image: the first of these it holds


@dataclass(frozen=True)
class Shard:
    """A shard file as the manifest records it, and the samples of it a run selects."""

    path: str
    stored: int  # samples in the file, as the manifest records
    bytes: int  # size and sha256 as the manifest records them
    sha256: str
    keep: tuple[int, ...] | None = None  # the samples selected (indices in file order); None: all

    @property
    def count(self) -> int:
        """Samples this shard contributes."""
        return self.stored if self.keep is None else len(self.keep)


class StoredSample(NamedTuple):
    """A sample as a loader worker needs it: its label and source, and where its stored image lies."""

    key: str
    label: int
    source: str
    offset: int  # of the image's bytes in the shard file
    size: int


# ----------------------------------------------------------------------------------------------------
# Writing


def write_members(stream: BinaryIO, members: Iterable[tuple[str, bytes]]) -> None:
    """A shard of ``members`` ((name, bytes), in order) written to ``stream``: the archive WebDataset's
    ``TarWriter`` writes (the bytes of every pack so far), with a fixed mtime and owner, so that a shard
    packed again is byte-identical. The standard library's ``tarfile`` rather than ``TarWriter`` itself:
    importing webdataset loads torch, which pack's worker processes otherwise never need."""
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "aidetect"
            tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------------------------------
# The index a loader keeps of each shard


class ShardIndexes:
    """Each shard's samples, for one reader (a loader's dataset, in each process that holds a copy): a shard
    is read, hashed and parsed the first time it is asked for (persistent loader workers: once per run);
    after that only its size is checked, and only the images of the batches made are read. Keyed by
    (path, sha256): a pack written anew at the same path is read anew."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], list[StoredSample]] = {}

    def samples(self, shard: Shard) -> list[StoredSample]:
        """The selected samples of ``shard``, checked against its manifest entry: its size at every call (a
        stat) and, the first time, its sha256 and sample count. ``DamagedShard`` naming the shard when any
        differs or it is no shard of ours."""
        index = self.known.get((shard.path, shard.sha256))
        if index is None:
            index = self.known[shard.path, shard.sha256] = checked_index(shard)
        elif problem := file_problem(shard.path, shard.bytes):
            raise problem.error()
        return index if shard.keep is None else [index[i] for i in shard.keep]


def checked_index(shard: Shard) -> list[StoredSample]:
    """Every sample of ``shard``, read whole and checked against its manifest entry (size, sha256, count)."""
    with open(shard.path, "rb") as f:
        data = f.read()
    problem = bytes_problem(shard.path, data, shard.bytes, shard.sha256)
    if problem:
        raise problem.error()
    index = index_samples(shard.path, data)
    if len(index) != shard.stored:
        raise damaged(shard.path, f"{len(index)} samples where the manifest records {shard.stored}").error()
    return index


def index_samples(path: str, data: bytes) -> list[StoredSample]:
    """Every sample of a shard's bytes ``data``, in file order."""
    view = memoryview(data)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    for key, extension, offset, size in tar_members(path, view):
        members.setdefault(key, {})[extension] = (offset, size)
    return [stored_sample(path, view, key, found) for key, found in members.items()]


def stored_sample(path: str, view: memoryview, key: str, found: dict[str, tuple[int, int]]) -> StoredSample:
    image = next((found[e] for e in IMAGE_EXTENSIONS if e in found), None)
    label, record = found.get("cls"), found.get("json")
    if image is None or label is None:
        raise damaged(path, f"sample {key} holds no {'image' if image is None else 'class label'}").error()
    try:
        cls = int(bytes(view[label[0] : label[0] + label[1]]))
        meta = json.loads(bytes(view[record[0] : record[0] + record[1]])) if record else {}
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        cls, meta = None, None
    if cls not in CLASSES.values() or not isinstance(meta, dict):  # a label of 7 would train, silently wrong
        raise damaged(path, f"sample {key} holds an unreadable class label or record").error()
    # Packs made before sources were recorded: the class name.
    source = meta.get("source") or next(name for name, value in CLASSES.items() if value == cls)
    return StoredSample(key, cls, source, *image)


def read_image(file: BinaryIO, sample: StoredSample) -> bytes:
    """The stored image's bytes of ``sample``, read alone from its open shard ``file``."""
    data = os.pread(file.fileno(), sample.size, sample.offset)
    if len(data) != sample.size:
        raise damaged(file.name, f"it ends inside sample {sample.key}").error()
    return data


def sample_images(path: str) -> Iterator[tuple[StoredSample, bytes]]:
    """(sample, its stored image's bytes) of every sample of shard ``path``, in file order (the shard is
    read whole, once)."""
    with open(path, "rb") as f:
        data = f.read()
    for sample in index_samples(path, data):
        yield sample, data[sample.offset : sample.offset + sample.size]


# ----------------------------------------------------------------------------------------------------
# Walking the members


def tar_members(path: str, view: memoryview) -> Iterator[tuple[str, str, int, int]]:
    """(key, extension, offset of its bytes, size) of each member of one of our shards, whose bytes are
    ``view`` (see ``walk_members``).

    Our shards are plain USTAR archives that we wrote, so their 512-byte headers can be read at fixed
    offsets. Python's tarfile module spends ~0.2 ms per sample parsing the same headers, a third of
    a loader worker's time; this walk ~16 us, half of it checking each header's checksum (measured);
    plain ``webdataset`` still reads these files as they are.
    """
    return walk_members(path, len(view), lambda offset: bytes(view[offset : offset + BLOCK]))


def walk_members(path: str, length: int, block: Callable[[int], bytes]) -> Iterator[tuple[str, str, int, int]]:
    """(key, extension, offset of its bytes, size) of each member of shard ``path``, ``length`` bytes long,
    whose 512-byte block at an offset is ``block(offset)``. Raises ``DamagedShard`` (a ``UserError``)
    naming the shard when it is not such an archive, whole: a header that is not intact or not ours
    (``member_header``), a member running past the end, no end-of-archive marker. Every member moves
    the offset forward, so the walk always ends."""
    offset = 0
    while offset + BLOCK <= length and (header := block(offset)) != ZERO_BLOCK:
        key, extension, size = member_header(path, header, offset)
        start = offset + BLOCK
        if start + size > length:
            detail = f"member {key}.{extension} runs past the end of the file ({size} bytes, {length - start} left)"
            raise unreadable_tar(path, offset, detail)
        yield key, extension, start, size
        offset = start + -(-size // BLOCK) * BLOCK
    if offset + BLOCK > length:  # a whole archive ends with zero blocks: this one was cut short
        raise unreadable_tar(path, offset, "no end-of-archive marker")


def tar_samples(path: str, data: bytes | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one of our shards (``data``: its bytes, when already read): members grouped by key,
    WebDataset's convention, as {"__key__": key, extension: bytes, ...}."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    view = memoryview(data)
    sample: dict[str, Any] = {}
    for key, extension, offset, size in tar_members(path, view):
        if sample and key != sample["__key__"]:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[extension] = bytes(view[offset : offset + size])
    if sample:
        yield sample


def shard_records(path: str) -> list[dict[str, Any]]:
    """The ``.json`` records of one shard's samples, in file order (``keyed_records``)."""
    return list(keyed_records(path).values())


def keyed_records(path: str) -> dict[str, dict[str, Any]]:
    """Sample key -> ``.json`` record of one shard's samples, in file order, read without the image bytes:
    only member headers and records are read, so a pack of any size is described in about a second.
    ``DamagedShard`` naming the shard when it is not one of ours, whole (``walk_members``)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        members = walk_members(path, os.fstat(fd).st_size, lambda offset: os.pread(fd, BLOCK, offset))
        return {
            key: json_member(path, os.pread(fd, size, start), start - BLOCK)
            for key, ext, start, size in members
            if ext == "json"
        }


def tar_problem(path: Path) -> ShardProblem | None:
    """What makes file ``path`` no shard of ours, whole (``shard_records``); None when it is one."""
    try:
        shard_records(str(path))
    except DamagedShard as exc:
        return exc.problem
    return None


def json_member(path: str, data: bytes, offset: int) -> dict[str, Any]:
    """The sample record ``data`` of the member whose header is at ``offset``: a JSON object."""
    try:
        record = json.loads(data)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        record = None
    if not isinstance(record, dict):
        raise unreadable_tar(path, offset, "a sample record that is no JSON object")
    return record


def member_header(path: str, header: bytes, offset: int) -> tuple[str, str, int]:
    """Key, extension and size of the member whose 512-byte header ``header`` is at ``offset`` of shard
    ``path``; ``DamagedShard`` unless it is an intact USTAR header (its checksum matches, as tarfile
    checks) of a plain file named KEY.EXTENSION with a size in octal digits, as our shards hold: no sign,
    no base-256 encoding, so the size is never negative."""
    if octal(header[148:156]) != sum(header) - sum(header[148:156]) + CHECKSUM_AS_BLANKS:
        raise unreadable_tar(path, offset, "a corrupted member header (its checksum does not match)")
    name = header[:100].split(b"\0", 1)[0]
    key, dot, extension = name.partition(b".")
    if not (key and dot and extension and name.isascii()):
        raise unreadable_tar(path, offset, f"member name {name!r} is no KEY.EXTENSION")
    if header[156:157] not in (b"0", b"\0"):
        raise unreadable_tar(path, offset, f"member {name.decode()} is not a plain file")
    size = octal(header[124:136])
    if size is None:
        raise unreadable_tar(
            path, offset, f"member {name.decode()}'s size field {header[124:136]!r} is no octal number"
        )
    return key.decode(), extension.decode(), size


def octal(field: bytes) -> int | None:
    """The number in a tar header field written as our shards' are (octal digits, NUL- or space-ended);
    None for anything else: a sign, GNU's base-256 encoding, other characters."""
    match = OCTAL_FIELD.fullmatch(field)
    return int(match[1], 8) if match else None


def unreadable_tar(path: str, offset: int, detail: str) -> DamagedShard:
    return damaged(path, f"unreadable at byte {offset}: {detail}").error()
