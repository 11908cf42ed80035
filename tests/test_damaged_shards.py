"""Shards damaged by a copy (truncated, or flipped bytes): one clear line, never a traceback or silent
garbage; ``verify_shards`` finds them and re-running pack restores them byte-identically. Shards whose
manifest entry matches but whose tar headers or samples are malformed (hostile, or written by another
tool): the same one line from every reader, never an endless loop."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers.commands import run_cli

from aidetect.data.loader import ShardDataset
from aidetect.data.manifest import fold_splits, read_manifest, sample_records, select_shards, verify_shards
from aidetect.data.pack import encode
from aidetect.data.plan import epoch_order
from aidetect.data.shardfile import Shard, shard_records, tar_samples
from aidetect.errors import UserError

FIX = "copy it again, or restore it by re-running 'aidetect pack SRC "


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


def flip(path: Path) -> None:
    """Same size, 16 bytes inverted in the middle: only the sha256 can tell."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(data)


def copy_pack(tiny_pack: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_pack, tmp_path / "shards"))


def first_train_shard(pack: Path) -> Path:
    """The shard a one-process training run reads first (train's defaults: seed 0, validation fold 0)."""
    shards = select_shards(pack, fold_splits(read_manifest(pack)["settings"]["folds"], 0)["train"])
    return Path(epoch_order(shards, seed=0, epoch=0, shuffle=True)[0].path)


@pytest.mark.parametrize("workers", [1, 0])
@pytest.mark.parametrize(
    ("damage", "detail"),
    [(truncate, "5000 bytes where the manifest records"), (flip, "its sha256 differs from the manifest's")],
)
def test_training_on_a_damaged_shard_stops_with_one_line(
    tiny_pack: Path, tmp_path: Path, damage, detail, workers
) -> None:
    pack = copy_pack(tiny_pack, tmp_path)
    shard = first_train_shard(pack)
    damage(shard)
    run = tmp_path / "run"
    args = ["--model", "seed_cnn1", "--epochs", "1", "--batch-size", "8", "--precision", "fp32"]
    result = run_cli("train", "--data", str(pack), "--out", str(run), *args, "--set", f"data.workers={workers}")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # also when a worker process found it
    assert result.stderr.startswith(f"aidetect: error: {shard}: damaged shard, ")
    assert detail in result.stderr and FIX in result.stderr
    assert not (run / "last.pt").exists()  # stopped before an epoch was spent on it


def test_verify_finds_the_damaged_shards_and_pack_restores_them(tiny_pack: Path, tmp_path: Path) -> None:
    pack = copy_pack(tiny_pack, tmp_path)
    manifest = read_manifest(pack)
    assert verify_shards(pack) == []
    names = [s["name"] for s in manifest["shards"]]
    truncate(pack / names[1])
    flip(pack / names[-1])
    problems = verify_shards(pack)
    assert [p.path for p in problems] == [str(pack / names[1]), str(pack / names[-1])]
    assert "5000 bytes" in str(problems[0]) and "sha256" in str(problems[1]) and FIX in str(problems[0])

    settings = manifest["settings"]
    options = ["--mode", settings["mode"], "--size", str(settings["size"]), "--shard-size", str(settings["shard_size"])]
    untouched = {n: (pack / n).stat().st_mtime_ns for n in names[2:-1]}
    result = run_cli("pack", manifest["source"]["path"], str(pack), *options)
    assert result.returncode == 0, result.stderr
    for entry in manifest["shards"]:
        assert hashlib.sha256((pack / entry["name"]).read_bytes()).hexdigest() == entry["sha256"], entry["name"]
    assert {n: (pack / n).stat().st_mtime_ns for n in untouched} == untouched  # only the damaged ones rewritten
    assert read_manifest(pack) == manifest and not list(pack.glob("*.tmp"))


def test_unreadable_tar_and_image_name_the_shard(tiny_pack: Path, tmp_path: Path) -> None:
    """What the size and hash checks normally catch first, as the parser and decoder meet it."""
    source = tiny_pack / read_manifest(tiny_pack)["shards"][1]["name"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(source.read_bytes()[:5000])
    with pytest.raises(UserError, match=rf"{re.escape(str(cut))}: damaged shard, unreadable at byte \d+: "):
        list(tar_samples(str(cut)))
    renamed = bytearray(source.read_bytes())
    renamed[0:2] = b"\xff\xfe"  # the first member's name, no longer UTF-8
    with pytest.raises(UserError, match="unreadable at byte 0: a corrupted member header"):
        list(tar_samples("renamed.tar", bytes(renamed)))

    garbage = tmp_path / "garbage.tar"
    write_tar(garbage, {"k1.jpg": b"\xff\xd8 not a jpeg", "k1.cls": b"1"})
    expected = rf"{re.escape(str(garbage))}: damaged shard, sample k1 holds no decodable image; {re.escape(FIX)}"
    with pytest.raises(UserError, match=expected):
        first_batch(garbage)


# ----------------------------------------------------------------------------------------------------
# Malformed headers in shards whose manifest entry matches them: only the parser can see the damage

SIZE, MTIME = 124, 136  # offsets of a USTAR header's size and mtime fields (12 bytes each)
HEADER_DAMAGE = {
    "negative size": (SIZE, b"-0000001750\0", True, r"size field b'-0000001750\\x00' is no octal number"),
    "base-256 size": (SIZE, b"\x80" + (1000).to_bytes(11, "big"), True, r"size field b'\\x80.*' is no octal number"),
    "non-octal size": (SIZE, b"00000001789\0", True, r"size field b'00000001789\\x00' is no octal number"),
    "size past the end": (
        SIZE,
        b"%011o\0" % 100_000,
        True,
        r"runs past the end of the file \(100000 bytes, \d+ left\)",
    ),
    "absurd size": (SIZE, b"77777777777\0", True, r"runs past the end of the file \(8589934591 bytes"),
    "bad checksum": (MTIME, b"00000000001\0", False, r"a corrupted member header \(its checksum does not match\)"),
}


def damage_first_header(pack: Path, shard: Path, offset: int, value: bytes, checksum: bool) -> None:
    """Write ``value`` at ``offset`` of the shard's first member header, its checksum recomputed (as tar
    would) when ``checksum``, and the shard's new size and sha256 into the manifest: the size and hash
    checks pass, only the tar parser can tell."""
    data = bytearray(shard.read_bytes())
    data[offset : offset + len(value)] = value
    if checksum:
        data[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(data[:512]))[0]
    shard.write_bytes(data)
    rehash(pack, shard)


def rehash(pack: Path, shard: Path) -> None:
    """Record ``shard``'s present size and sha256 in the manifest of ``pack``."""
    manifest = read_manifest(pack)
    entry = next(e for e in manifest["shards"] if e["name"] == shard.name)
    data = shard.read_bytes()
    entry |= {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (pack / "manifest.json").write_text(json.dumps(manifest))


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """A call still running after ``seconds`` raises TimeoutError: an endless loop fails the test, not hangs it."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_batch(shard: Path) -> None:
    """What a loader worker does first with ``shard``: check it against its bytes, index it, read a batch."""
    data = shard.read_bytes()
    one = Shard(str(shard), 1, len(data), hashlib.sha256(data).hexdigest())
    next(iter(ShardDataset([one], batch_size=1, train=False, side=16, seed=0, rank=0, world=1)))


@pytest.mark.parametrize("damage", HEADER_DAMAGE.values(), ids=HEADER_DAMAGE.keys())
def test_a_malformed_header_is_one_line_from_every_reader(tiny_pack: Path, tmp_path: Path, damage) -> None:
    offset, value, checksum, detail = damage
    pack = copy_pack(tiny_pack, tmp_path)
    shard = first_train_shard(pack)
    damage_first_header(pack, shard, offset, value, checksum)
    expected = rf"^{re.escape(str(shard))}: damaged shard, unreadable at byte 0: .*{detail}.*; {re.escape(FIX)}"
    readers = {
        "pack records": lambda: sample_records(pack),
        "shard records": lambda: shard_records(str(shard)),
        "samples": lambda: list(tar_samples(str(shard))),
        "loader index": lambda: first_batch(shard),
    }
    for name, read in readers.items():
        with deadline(10), pytest.raises(UserError, match=expected):
            read()
            pytest.fail(f"{name} read the damaged shard")
    with deadline(10):
        problems = verify_shards(pack)
    assert [p.path for p in problems] == [str(shard)] and re.match(expected, str(problems[0]))


def test_training_on_a_shard_claiming_a_negative_size_stops_with_one_line(tiny_pack: Path, tmp_path: Path) -> None:
    """A header claiming -1000 bytes once walked the same offset for ever, in the audit and in the workers."""
    pack = copy_pack(tiny_pack, tmp_path)
    shard = first_train_shard(pack)
    damage_first_header(pack, shard, *HEADER_DAMAGE["negative size"][:3])
    command = ["timeout", "-s", "KILL", "120", sys.executable, "-m", "aidetect.cli", "train", "--config", "smoke"]
    result = subprocess.run(
        [*command, "--data", str(pack), "--out", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"aidetect: error: {shard}: damaged shard, unreadable at byte 0: ")
    assert "is no octal number" in result.stderr and FIX in result.stderr

    doctor = run_cli("doctor", "--data", str(pack), "--out", str(tmp_path / "run"))
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    count = len(read_manifest(pack)["shards"])
    assert f"FAIL data: 1 of {count} shards damaged: {shard}: damaged shard, unreadable at byte 0: " in doctor.stdout


def test_a_class_label_or_record_of_another_shape_is_one_line(tmp_path: Path) -> None:
    """Well-formed headers around sample content pack never writes: a label other than 0 or 1 (which
    would train, silently wrong), a record that is JSON but no object."""
    label = tmp_path / "label.tar"
    write_tar(label, {"k1.jpg": encode(np.zeros((16, 16, 3), np.uint8), "jpeg", 90), "k1.cls": b"7", "k1.json": b"{}"})
    with pytest.raises(UserError, match=rf"{re.escape(str(label))}: damaged shard, sample k1 holds an unreadable"):
        first_batch(label)
    record = tmp_path / "record.tar"
    write_tar(record, {"k1.jpg": b"\xff\xd8", "k1.cls": b"1", "k1.json": b"[1]"})
    with pytest.raises(UserError, match=r"unreadable at byte 2048: a sample record that is no JSON object"):
        shard_records(str(record))


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
