"""``aidetect pack``: decode every image once, preprocess it, and write WebDataset shards with fixed splits.

Work is resumable at shard granularity: each shard is written under a temporary name and renamed
when complete, and its record (which files it holds, what was skipped and why, its sha256) goes to
``OUT/.pack-state/``. A re-run after an interruption keeps every complete shard and redoes the rest,
and because encoding and tar headers are deterministic the result is byte-identical. The manifest is
written last, atomically, and lists every file under SRC (or in its list) as packed, repaired or skipped,
and every shard's size and sha256. A re-run on a finished pack checks each shard against them and rewrites,
byte-identically, any shard damaged since (e.g. by a truncated copy).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from aidetect.data.decode import (
    MAX_PIXELS,
    DecodedImage,
    UnreadableImage,
    bomb_guard,
    decode_image,
)
from aidetect.data.degrade import apply_parity, parity_quality
from aidetect.data.integrity import file_problem, manifest_problems, sha256_file
from aidetect.data.layouts import AUTO, LAYOUTS, Scan, SourceFile, add_date, read_source_dates, scan_source
from aidetect.data.packformat import AUDIT_FILES, CLASSES, FORMAT, MANIFEST
from aidetect.data.shardfile import write_members
from aidetect.data.splits import assign_splits, hash_order_key, split_names
from aidetect.data.transforms import PREPROCESS_MODES, padding_fraction, preprocess
from aidetect.errors import UserError, first_line
from aidetect.fileio import atomic_write_json
from aidetect.jobmemory import Memory, job_memory
from aidetect.options import flag
from aidetect.parallel import parallel_imap
from aidetect.preemption import Stopped, StopRequest

STATE_DIR = ".pack-state"
# Settings that choose no shard's bytes: a finished pack run again with other values keeps its shards and
# records the new values (e.g. the sources' release dates) in its manifest.
RECORD_ONLY = ("layout", "source_dates")

# What one pack worker may hold: one image decoded within --max-pixels, at this many bytes per pixel,
# and a fixed margin. Measured as the rise of a forked worker's peak resident set while it decodes and
# preprocesses one 24 MP file: 10 bytes per pixel for RGB JPEGs and PNGs (Pillow's 4, numpy's 3 and the
# copy its conversion makes), 11 for palette PNGs, 14.0-14.2 for RGBA, 16-bit and CMYK files. Repairing
# a truncated JPEG peaks at 30 (two decodes compared), which a file as large as the budget rarely is.
# The margin: a worker's own memory beyond what it shares with pack's process, 16-18 MB measured.
BYTES_PER_PIXEL = 15
WORKER_MARGIN = 64 << 20


@dataclass(frozen=True)
class PackSettings:
    """How ``pack`` makes shards; each field is also ``aidetect pack``'s option of that name."""

    CODECS = ("jpeg", "png")
    ON_TRUNCATED = ("repair", "skip")

    mode: str = field(
        default="resize",
        metadata=flag(
            "resize: pad to square + resize; crop: native crop; native: the whole image, scaled down only when its "
            "longer side is over --max-side",
            choices=PREPROCESS_MODES,
        ),
    )
    size: int = field(default=256, metadata=flag("output side in px (resize and crop modes)"))
    max_side: int | None = field(
        default=None,
        metadata=flag("native mode: the longest side stored, longer images scaled down to it (default: no bound)"),
    )
    codec: str = field(default="jpeg", metadata=flag("png is lossless", choices=CODECS))
    quality: int = field(default=95, metadata=flag("JPEG quality"))
    seed: int = field(default=0, metadata=flag("seed of the split assignment"))
    test_fraction: float = field(default=0.1, metadata=flag("share held out as test"))
    folds: int = field(default=5, metadata=flag("cross-validation folds of the rest"))
    shard_size: int = field(default=1000, metadata=flag("samples per shard"))
    max_pixels: int = field(default=MAX_PIXELS, metadata=flag("pixel budget of one decoded image"))
    min_side: int = field(default=32, metadata=flag("skip images with a shorter side"))
    on_truncated: str = field(
        default="repair", metadata=flag("repair: inpaint the missing part of a truncated image", choices=ON_TRUNCATED)
    )
    parity: str = field(
        default="none",
        metadata=flag(
            "jpeg:Q re-encodes every image of both classes as JPEG at quality Q before preprocessing, so codec "
            "and quality cannot carry the label"
        ),
    )
    layout: str = field(
        default=AUTO,
        metadata=flag(
            "how SRC is laid out (a .csv file: a list path,label[,source][,split][,date]); auto: found out",
            choices=(AUTO, *LAYOUTS),
        ),
    )
    source_dates: str | None = field(
        default=None,
        metadata=flag("the sources' release dates, YYYY-MM-DD or YYYY-MM: a YAML source: date, or a CSV source,date"),
    )

    def validate(self) -> None:
        parity_quality(self.parity)
        checks = [
            (self.mode in PREPROCESS_MODES, f"--mode must be one of {', '.join(PREPROCESS_MODES)}"),
            (self.codec in self.CODECS, f"--codec must be {' or '.join(self.CODECS)}"),
            (1 <= self.quality <= 100, "--quality must be between 1 and 100"),
            (self.size >= 16, "--size must be at least 16"),
            (self.max_side is None or self.mode == "native", "--max-side is for --mode native"),
            (self.max_side is None or self.max_side >= self.min_side, "--max-side must be at least --min-side"),
            (0 <= self.test_fraction < 1, "--test-fraction must be in [0, 1)"),
            (self.folds >= 1, "--folds must be at least 1"),
            (self.shard_size >= 1, "--shard-size must be at least 1"),
            (self.on_truncated in self.ON_TRUNCATED, f"--on-truncated must be {' or '.join(self.ON_TRUNCATED)}"),
            (self.layout in (AUTO, *LAYOUTS), f"--layout must be one of {', '.join((AUTO, *LAYOUTS))}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class ShardPlan:
    name: str
    split: str
    files: list[SourceFile]


# ----------------------------------------------------------------------------------------------------
# Source scanning and planning


def plan_shards(candidates: list[SourceFile], settings: PackSettings) -> list[ShardPlan]:
    """Assign splits (stratified by class and source), then cut each split (in hash order) into shards of
    ``shard_size`` files."""
    by_group: dict[tuple[str, str], list[str]] = {}
    for f in candidates:
        by_group.setdefault((f.class_name, f.source), []).append(f.relpath)
    source_test = {f.relpath for f in candidates if f.source_test}
    assignment = assign_splits(
        by_group,
        seed=settings.seed,
        test_fraction=settings.test_fraction,
        folds=settings.folds,
        fixed_test=source_test if source_test else None,
    )
    plans = []
    for split in split_names(settings.folds):
        files = sorted(
            (f for f in candidates if assignment[f.relpath] == split),
            key=lambda f: hash_order_key(settings.seed, f.relpath),
        )
        for index, start in enumerate(range(0, max(len(files), 1), settings.shard_size)):
            plans.append(ShardPlan(f"{split}-{index:06d}", split, files[start : start + settings.shard_size]))
    return plans


# ----------------------------------------------------------------------------------------------------
# Per-file work (runs in worker processes)


def decode_and_preprocess(
    path: str | os.PathLike, settings: PackSettings, perturb: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[DecodedImage, np.ndarray]:
    """One raw file as a pack with ``settings`` stores it (before encoding); ``predict`` uses it too, with
    ``perturb`` (``predict --perturb``) applied to the decoded pixels before the parity codec. Pillow's
    bomb guard is set for the pack's budget throughout (``bomb_guard``): the parity codec reopens images
    of up to that size. ``ValueError`` when the image is smaller than a crop pack's side, or a native pack's
    scaling to ``max_side`` leaves its shorter side under ``min_side`` (every image a native pack stores has
    ``min_side`` px at least on each side)."""
    with bomb_guard(settings.max_pixels):
        decoded = decode_image(
            path,
            long_side=settings.size if settings.mode == "resize" else None,
            min_side=settings.min_side,
            max_pixels=settings.max_pixels,
            repair_truncated=settings.on_truncated == "repair",
        )
        pixels = apply_parity(perturb(decoded.pixels) if perturb else decoded.pixels, settings.parity)
    stored = preprocess(pixels, settings.mode, settings.max_side if settings.mode == "native" else settings.size)
    if settings.mode == "native" and min(stored.shape[:2]) < settings.min_side:
        height, width = stored.shape[:2]
        raise ValueError(f"too small once scaled to --max-side: {width}x{height} px, under --min-side")
    return decoded, stored


def pack_one(file: SourceFile, settings: PackSettings) -> dict[str, Any]:
    """Decode, preprocess and encode one file; never raises, returns a record with status and reason."""
    record: dict[str, Any] = {"path": file.relpath, "key": file.key, "class": file.class_name, "source": file.source}
    try:
        decoded, pixels = decode_and_preprocess(file.path, settings)
    except UnreadableImage as exc:
        return record | {"status": "skipped", "reason": str(exc)}
    except ValueError as exc:  # e.g. smaller than the crop
        return record | {"status": "skipped", "reason": first_line(exc)}
    except Exception as exc:  # a library failing on a malformed file must not end the run
        return record | {"status": "skipped", "reason": f"cannot decode: {type(exc).__name__}: {first_line(exc)}"}
    height, width = decoded.pixels.shape[:2]
    record["file"] = decoded.file | {"padding": padding_fraction(height, width, settings.mode, settings.size)}
    if settings.mode == "native":  # stored as decoded unless scaled down to --max-side
        record["file"]["stored"] = list(pixels.shape[:2])
    record["data"] = encode(pixels, settings.codec, settings.quality)
    if decoded.repair:
        return record | {"status": "repaired", "reason": decoded.repair}
    return record | {"status": "packed"}


def encode(pixels: np.ndarray, codec: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if codec == "png":
        Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    else:
        # 4:4:4 chroma: subsampling would blur exactly the fine colour traces a detector looks for.
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------
# Shard writing, resume and the manifest


def pack(
    src: str | os.PathLike,
    out: str | os.PathLike,
    settings: PackSettings = PackSettings(),
    workers: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Pack ``src`` into shards under ``out``; returns the manifest (with a ``run`` entry of timings).
    ``workers`` processes (default: one per core), fewer when the job's memory holds fewer (``workers_within``).

    On a finished pack, only shards that no longer match the manifest are rewritten (``run`` lists them as
    ``restored``); when every shard matches, no shard is written and the manifest comes back without ``run``
    (rewritten only when ``RECORD_ONLY`` settings changed, see ``record_settings``).
    """
    started = time.perf_counter()
    settings.validate()
    src, out = Path(src).resolve(), Path(out).resolve()
    workers = workers_within(workers or os.cpu_count() or 1, settings.max_pixels, job_memory())
    scan = scan_source(src, settings.layout)
    if settings.layout == AUTO:
        print(f"[aidetect] pack: {src} is a {scan.layout} layout", flush=True)
    candidates, pre_skipped = scan.candidates, scan.skipped
    dates = known_dates(scan, settings.source_dates)
    check_out_dir(scan.root, out, settings)
    plans = plan_shards(candidates, settings)
    for stale in out.glob("*.tar.tmp"):  # what a run killed mid-write leaves
        stale.unlink()
    run: dict[str, Any] = {}
    if (out / MANIFEST).exists():  # finished earlier with the same settings and files
        manifest = record_settings(out, finished_manifest(out, candidates, pre_skipped), settings, dates)
        todo = restore_damaged(out, manifest, plans, settings, workers, progress)
        if not todo:
            return manifest
        run["restored"] = [f"{p.name}.tar" for p in todo]
    else:
        state = out / STATE_DIR
        state.mkdir(parents=True, exist_ok=True)
        todo = [p for p in plans if not shard_is_complete(out, p, settings)]
        pack_shards(todo, settings, workers, progress, partial(write_shard, out, settings=settings))
        manifest = build_manifest(src, out, plans, pre_skipped, scan.layout, settings) | {"source_dates": dates}
        atomic_write_json(out / MANIFEST, manifest)
        shutil.rmtree(state)
    run |= {"processed": sum(len(p.files) for p in todo), "seconds": time.perf_counter() - started, "workers": workers}
    return manifest | {"run": run}


def shard_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that choose a shard's bytes: all but ``RECORD_ONLY``."""
    return {key: value for key, value in settings.items() if key not in RECORD_ONLY}


def record_settings(out: Path, manifest: dict[str, Any], settings: PackSettings, dates: dict[str, str]) -> dict:
    """The finished pack's ``manifest`` with ``settings`` and the sources' ``dates`` as given now, rewritten
    (atomically) when they differ: a re-run with other ``RECORD_ONLY`` settings updates what the pack records
    and keeps every shard."""
    updated = manifest | {"settings": asdict(settings), "source_dates": dates}
    if updated != manifest:
        atomic_write_json(out / MANIFEST, updated)
    return updated


def known_dates(scan: Scan, dates_file: str | None) -> dict[str, str]:
    """The release date of each source of the pack that has one: a list's date column and ``dates_file``
    (``--source-dates``) together; ``UserError`` when they disagree."""
    dates = dict(scan.dates)
    for source, date in (read_source_dates(dates_file) if dates_file else {}).items():
        add_date(dates, source, date, f"{dates_file}: {source}")
    sources = {f.source for f in scan.candidates}
    return {source: date for source, date in sorted(dates.items()) if source in sources}


def affordable_workers(workers: int, max_pixels: int, memory: int) -> int:
    """How many of ``workers`` pack processes fit in ``memory`` bytes, each holding one image decoded within
    ``max_pixels`` (``worker_bytes``): ``workers`` or fewer; 0 when not even one fits."""
    return max(0, min(workers, memory // worker_bytes(max_pixels)))


def worker_bytes(max_pixels: int) -> int:
    """The most memory one pack worker holds with images decoded within ``max_pixels``."""
    return max_pixels * BYTES_PER_PIXEL + WORKER_MARGIN


def pixels_fitting(workers: int, memory: int) -> int:
    """The largest --max-pixels at which ``workers`` pack processes fit in ``memory`` bytes (0: none)."""
    return max(0, (memory // workers - WORKER_MARGIN) // BYTES_PER_PIXEL)


def workers_within(workers: int, max_pixels: int, memory: Memory | None) -> int:
    """``workers``, or as many as ``memory`` holds (``affordable_workers``), saying so in one line; all of
    them when the memory is unknown. ``UserError`` when not even one fits."""
    if memory is None:
        return workers
    fit = affordable_workers(workers, max_pixels, memory.bytes)
    why = (
        f"each may hold an image decoded at --max-pixels {max_pixels} ({worker_bytes(max_pixels) / 2**30:.1f} GB) "
        f"and the job has {memory.bytes / 2**30:.1f} GB ({memory.source})"
    )
    if fit == 0:
        lower = pixels_fitting(1, memory.bytes)
        remedy = f"lower --max-pixels to {lower} or give" if lower else "give"
        raise UserError(f"pack: not even one worker fits in memory: {why}; {remedy} the job more memory")
    if fit < workers:
        lower = pixels_fitting(workers, memory.bytes)
        remedy = f"--max-pixels {lower} would let {workers} run, as would" if lower else f"{workers} need"
        print(f"[aidetect] pack: {fit} workers instead of {workers}: {why}; {remedy} more memory", flush=True)
    return fit


def pack_shards(
    todo: list[ShardPlan],
    settings: PackSettings,
    workers: int,
    progress: bool | None,
    keep: Callable[[ShardPlan, list[dict]], None],
) -> None:
    """Pack the files of the ``todo`` shards in ``workers`` processes; ``keep(plan, records)`` writes each shard.
    A stop signal (see ``aidetect.preemption``) ends it after the image in hand with ``Stopped``: every
    shard written so far is complete and kept, and the same command continues from there."""
    files = [f for p in todo for f in p.files]
    records = parallel_imap(partial(pack_one, settings=settings), files, workers)
    bar = tqdm(total=len(files), desc="pack", unit="img", disable=None if progress is None else not progress)
    try:
        with StopRequest() as stop, stop.deferred():  # the loop checks for a stop after each image
            for plan in todo:
                shard = []
                for _ in plan.files:
                    shard.append(next(records))
                    if stop.requested:
                        raise Stopped("every complete shard is kept; run the same command again to continue")
                keep(plan, shard)
                bar.update(len(plan.files))
    finally:
        bar.close()
        records.close()  # cancels the images not yet started and lets the workers end


def finished_manifest(out: Path, candidates: list[SourceFile], pre_skipped: list[dict]) -> dict[str, Any]:
    """The manifest of the finished pack in ``out``; ``UserError`` unless it accounts for exactly these files."""
    manifest = json.loads((out / MANIFEST).read_text())
    accounted = {p for s in manifest["shards"] for p in s["paths"]} | {r["path"] for r in manifest["skipped"]}
    if accounted != {f.relpath for f in candidates} | {r["path"] for r in pre_skipped}:
        raise UserError(f"{out}: holds a pack of different files; pack into a new folder or delete this one")
    return manifest


def restore_damaged(
    out: Path,
    manifest: dict[str, Any],
    plans: list[ShardPlan],
    settings: PackSettings,
    workers: int,
    progress: bool | None,
) -> list[ShardPlan]:
    """Re-pack the shards of a finished pack that are missing or differ from the manifest in size or sha256
    (reads every shard once); returns their plans, empty when the pack is intact."""
    damaged = {Path(problem.path).name for problem in manifest_problems(out, manifest["shards"], workers)}
    todo = [p for p in plans if f"{p.name}.tar" in damaged]
    entries = {s["name"]: s for s in manifest["shards"]}
    pack_shards(todo, settings, workers, progress, partial(restore_shard, out, entries, settings=settings))
    return todo


def restore_shard(
    out: Path, entries: dict[str, dict], plan: ShardPlan, records: list[dict], settings: PackSettings
) -> None:
    """Rewrite one shard of a finished pack. Packing is deterministic, so the rewrite is byte-identical to
    the manifest's entry; that is checked before it replaces the damaged file."""
    tmp, final = out / f"{plan.name}.tar.tmp", out / f"{plan.name}.tar"
    write_tar(tmp, plan, records, settings)
    entry = entries[final.name]
    if file_problem(tmp, entry["bytes"], entry["sha256"]):
        tmp.unlink()
        raise UserError(
            f"{final}: is damaged, and packing its source files again gives other bytes than the manifest "
            "records (the files changed since they were packed); pack into a new folder"
        )
    os.replace(tmp, final)


def check_out_dir(src: Path, out: Path, settings: PackSettings) -> None:
    if out == src or src in out.parents or out in src.parents:
        raise UserError(f"{out}: output folder must lie outside the source folder {src} (and not contain it)")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose a new output folder")
    ours = {MANIFEST, STATE_DIR, *AUDIT_FILES}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith((".tar", ".tar.tmp")))
    has_state = (out / STATE_DIR).is_dir() or (out / MANIFEST).is_file()
    if foreign or (any(out.glob("*.tar")) and not has_state):
        example = foreign[0] if foreign else next(out.glob("*.tar")).name
        raise UserError(f"{out}: holds other data (e.g. {example}); choose an empty or new output folder")
    recorded = recorded_settings(out)
    wanted = shard_settings(asdict(settings))
    if recorded is not None and shard_settings(recorded) != wanted:
        changed = sorted(k for k in wanted if recorded[k] != wanted[k])
        raise UserError(
            f"{out}: was packed with other settings ({', '.join(changed)}); "
            "re-run with the same options to resume, or choose a new output folder"
        )


def recorded_settings(out: Path) -> dict | None:
    """The settings ``out`` was packed with, completed with the defaults of settings added since."""
    if (out / MANIFEST).is_file():
        recorded = json.loads((out / MANIFEST).read_text())["settings"]
    else:
        sidecar = next((out / STATE_DIR).glob("*.json"), None) if (out / STATE_DIR).is_dir() else None
        recorded = json.loads(sidecar.read_text())["settings"] if sidecar else None
    return asdict(PackSettings(**recorded)) if recorded is not None else None


def shard_is_complete(out: Path, plan: ShardPlan, settings: PackSettings) -> bool:
    sidecar_path, tar_path = out / STATE_DIR / f"{plan.name}.json", out / f"{plan.name}.tar"
    if not (sidecar_path.is_file() and tar_path.is_file()):
        return False
    sidecar = json.loads(sidecar_path.read_text())
    return (
        shard_settings(sidecar["settings"]) == shard_settings(asdict(settings))
        and sidecar["planned"] == [f.relpath for f in plan.files]
        and sidecar["sha256"] == sha256_file(tar_path)
    )


def write_shard(out: Path, plan: ShardPlan, records: list[dict], settings: PackSettings) -> None:
    """Write the shard's tar under a temporary name, rename it, then record it in the state folder."""
    tmp, final = out / f"{plan.name}.tar.tmp", out / f"{plan.name}.tar"
    write_tar(tmp, plan, records, settings)
    os.replace(tmp, final)
    sidecar = {
        "name": plan.name,
        "split": plan.split,
        "settings": asdict(settings),
        "planned": [f.relpath for f in plan.files],
        "sha256": sha256_file(final),
        "bytes": final.stat().st_size,
        "records": [{k: r[k] for k in ("path", "class", "source", "status", "reason") if k in r} for r in records],
    }
    atomic_write_json(out / STATE_DIR / f"{plan.name}.json", sidecar)


def write_tar(path: Path, plan: ShardPlan, records: list[dict], settings: PackSettings) -> None:
    """The shard's tar of the packed (not skipped) ``records``, written to ``path`` and synced to disk."""
    extension = "png" if settings.codec == "png" else "jpg"
    kept = [r for r in records if r["status"] != "skipped"]
    with open(path, "wb") as stream:
        write_members(stream, (member for r in kept for member in sample_members(r, extension, plan.split)))
        stream.flush()
        os.fsync(stream.fileno())


def sample_members(record: dict[str, Any], extension: str, split: str) -> list[tuple[str, bytes]]:
    """The tar members of one packed sample: its stored image, class label and record, named KEY.EXTENSION,
    in sorted order of the extensions (as WebDataset's TarWriter wrote them)."""
    meta = {k: record[k] for k in ("path", "class", "source", "file", "status")}
    meta |= {"label": CLASSES[record["class"]], "split": split}
    members = {
        extension: record["data"],
        "cls": str(CLASSES[record["class"]]).encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return [(f"{record['key']}.{name}", members[name]) for name in sorted(members)]


def build_manifest(
    src: Path, out: Path, plans: list[ShardPlan], pre_skipped: list[dict], layout: str, settings: PackSettings
) -> dict[str, Any]:
    shards, skipped, repaired = [], list(pre_skipped), []
    splits = {s: dict.fromkeys(CLASSES, 0) for s in split_names(settings.folds)}
    sources: dict[str, dict[str, dict[str, int]]] = {c: {} for c in CLASSES}  # class -> source -> split -> n
    for plan in plans:
        sidecar = json.loads((out / STATE_DIR / f"{plan.name}.json").read_text())
        kept = [r for r in sidecar["records"] if r["status"] != "skipped"]
        for r in sidecar["records"]:
            if r["status"] == "skipped":
                skipped.append({"path": r["path"], "reason": r["reason"]})
            else:
                splits[plan.split][r["class"]] += 1
                counts = sources[r["class"]].setdefault(r["source"], dict.fromkeys(split_names(settings.folds), 0))
                counts[plan.split] += 1
            if r["status"] == "repaired":
                repaired.append({"path": r["path"], "reason": r["reason"]})
        shards.append(
            {
                "name": f"{plan.name}.tar",
                "split": plan.split,
                "count": len(kept),
                "sha256": sidecar["sha256"],
                "bytes": sidecar["bytes"],
                "paths": [r["path"] for r in kept],
            }
        )
    for counts in [*splits.values(), *(c for by_source in sources.values() for c in by_source.values())]:
        counts["total"] = sum(counts.values())
    return {
        "format": FORMAT,
        "classes": CLASSES,
        "samples": sum(s["count"] for s in shards),
        "files": len(pre_skipped) + sum(len(p.files) for p in plans),
        "splits": splits,
        "sources": {c: dict(sorted(by_source.items())) for c, by_source in sources.items()},
        "shards": shards,
        "settings": asdict(settings),
        "seed": settings.seed,
        "source": {"path": str(src), "layout": layout},
        "skipped": sorted(skipped, key=lambda r: r["path"]),
        "repaired": sorted(repaired, key=lambda r: r["path"]),
    }
