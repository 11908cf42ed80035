"""The source layouts ``pack`` reads, and which one a source is: every file it lists, as a sample of a class
and a source (a generator, a photo site), or as skipped with the reason.

- ``imagefolder``: ``SRC/real/`` and ``SRC/fake/``; a file in a sub-folder of a class folder has that
  sub-folder's name as its source (``fake/sdxl/x.png``: sdxl), one directly in it the class name.
- ``kaggle``: ``SRC/train/`` and ``SRC/test/``, each an ImageFolder; ``test/`` is the pack's test split.
- ``genimage``: ``SRC/GENERATOR/{train,val}/{ai,nature}/`` (GenImage): ``ai`` images are fakes of source
  GENERATOR, ``nature`` images reals of source ``nature``; ``val/`` is the pack's test split, ``train/``
  goes to the folds.
- ``synthbuster``: one real folder (``SRC/RAISE/`` or ``SRC/real/``, source: its name) beside one folder
  per generator (``SRC/GENERATOR/``, its files at any depth fakes of source GENERATOR), and no ``fake/``.
- ``csv``: a list ``LIST.csv`` with a header of ``CSV_COLUMNS``: ``path`` (relative to the list's folder, or
  absolute), ``label`` (real/fake or 0/1), and optionally ``source`` (default: the class name), ``split``
  (test: the pack's test split; train or empty: the folds) and ``date`` (the source's release, YYYY-MM-DD or
  YYYY-MM). A listed file that is missing is skipped with the line that lists it; a bad row is a one-line
  ``UserError`` naming its line.

``detect_layout`` tells them apart (one of them, or a one-line ``UserError``); ``scan_source`` reads one.
Release dates (``read_source_dates``) order the fake sources for the chronological protocol.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from aidetect.data.decode import SYSTEM_FILES
from aidetect.data.packformat import CLASSES
from aidetect.errors import UserError, first_line

LAYOUTS = ("imagefolder", "kaggle", "genimage", "synthbuster", "csv")
AUTO = "auto"
CSV_COLUMNS = ("path", "label", "source", "split", "date")
CSV_REQUIRED = ("path", "label")
CSV_SPLITS = {"": False, "train": False, "test": True}  # split column -> in the pack's test split
LABELS = {name: name for name in CLASSES} | {str(value): name for name, value in CLASSES.items()}
GENIMAGE_SPLITS = {"train": False, "val": True}
GENIMAGE_CLASSES = {"nature": "real", "ai": "fake"}
REAL_FOLDERS = ("RAISE", "real")  # the real folder of a synthbuster layout
DATE_FORMATS = {r"\d{4}-\d{2}-\d{2}": "%Y-%m-%d", r"\d{4}-\d{2}": "%Y-%m"}
WHAT = {  # what each layout expects, for messages
    "imagefolder": "SRC/real/ and SRC/fake/",
    "kaggle": "SRC/train/ and SRC/test/ holding real/ and fake/",
    "genimage": "SRC/GENERATOR/{train,val}/{ai,nature}/",
    "synthbuster": "SRC/RAISE/ or SRC/real/ beside SRC/GENERATOR/ folders",
    "csv": f"a LIST.csv file with columns {','.join(CSV_COLUMNS)}",
}

Place = tuple[str, bool, str]  # class name, in the source's own test split, source


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute
    relpath: str  # relative to SRC (a list's folder), posix separators: the identity of a sample everywhere
    class_name: str
    source_test: bool  # lies in the source's own test split (Kaggle test/, GenImage val/, a list's test rows)
    source: str  # a generator, a photo site; see the module docstring for each layout

    @property
    def key(self) -> str:
        # WebDataset splits names at the first dot, so keys are hex digests of the path.
        return hashlib.sha1(self.relpath.encode("utf-8", "surrogateescape")).hexdigest()[:20]


class Scan(NamedTuple):
    """What ``scan_source`` found: the image candidates, the files skipped before decoding (path, reason),
    the layout, the folder the paths are relative to, and the release date of each source that has one."""

    candidates: list[SourceFile]
    skipped: list[dict]
    layout: str
    root: Path
    dates: dict[str, str]


# ----------------------------------------------------------------------------------------------------
# Which layout


def detect_layout(src: Path) -> str:
    """The one layout ``src`` matches; ``UserError`` naming the folder and the layouts pack reads when it
    matches none or several."""
    if src.is_file():
        if src.suffix.lower() == ".csv":
            return "csv"
        raise UserError(f"{src}: is a file, not a source folder; a list to pack must be a .csv file")
    if not src.is_dir():
        raise UserError(f"{src}: source folder not found; pass a folder holding real/ and fake/ subfolders")
    found = [name for name, matches in FOLDER_LAYOUTS.items() if matches(src)]
    if len(found) == 1:
        return found[0]
    readable = "; ".join(f"{name}: {WHAT[name]}" for name in LAYOUTS)
    if found:
        raise UserError(f"{src}: matches several layouts ({', '.join(found)}); choose one with --layout ({readable})")
    seen = ", ".join(folders(src)) or "none"
    raise UserError(
        f"{src}: matches no layout pack reads: imagefolder needs both real/ and fake/ class folders, or {readable}; "
        f"found folders: {seen}"
    )


def folders(src: Path) -> list[str]:
    """The sub-folders of ``src`` a layout may use (hidden ones never are), sorted."""
    return sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_kaggle(src: Path) -> bool:
    return (src / "train").is_dir() and any((src / "train" / c).is_dir() for c in CLASSES)


def is_imagefolder(src: Path) -> bool:
    """``fake/``, or ``real/`` alone (so that pack says the other class folder is missing); not Kaggle's."""
    names = folders(src)
    return not is_kaggle(src) and ("fake" in names or names == ["real"])


def is_synthbuster(src: Path) -> bool:
    names = folders(src)
    reals = [name for name in names if name in REAL_FOLDERS]
    return "fake" not in names and len(reals) == 1 and len(names) > 1


def is_genimage(src: Path) -> bool:
    return any(
        (src / name / split / kind).is_dir()
        for name in folders(src)
        for split in GENIMAGE_SPLITS
        for kind in GENIMAGE_CLASSES
    )


FOLDER_LAYOUTS: dict[str, Callable[[Path], bool]] = {
    "imagefolder": is_imagefolder,
    "kaggle": is_kaggle,
    "genimage": is_genimage,
    "synthbuster": is_synthbuster,
}


# ----------------------------------------------------------------------------------------------------
# Reading one


def scan_source(src: Path, layout: str = AUTO) -> Scan:
    """Every file of ``src`` in ``layout`` (``auto``: ``detect_layout``): image candidates by class and
    source, the files skipped before decoding, and the release dates a list gives. ``UserError`` when
    ``src`` is not of that layout."""
    src = Path(src)
    chosen = detect_layout(src) if layout == AUTO else layout
    if chosen == "csv":
        if not src.is_file():
            raise UserError(f"{src}: --layout csv needs a .csv file ({WHAT['csv']})")
        return scan_csv(src)
    if not src.is_dir():
        raise UserError(f"{src}: source folder not found; pass a folder holding real/ and fake/ subfolders")
    if layout != AUTO and not FOLDER_LAYOUTS[chosen](src):
        raise UserError(f"{src}: is no {chosen} layout ({WHAT[chosen]}); found folders: {', '.join(folders(src))}")
    return scan_tree(src, chosen, TREE_PLACES[chosen](src))


def scan_tree(src: Path, layout: str, place: Callable[[list[str]], Place | None]) -> Scan:
    """Every file under ``src``, placed by ``place`` (its path's parts -> class, source test, source; None:
    outside every class folder); system files are skipped."""
    candidates, skipped = [], []
    for relpath in sorted(walk_files(src)):
        parts = relpath.split("/")
        where = place(parts)
        if parts[-1].lower() in SYSTEM_FILES or parts[-1].startswith("._"):
            skipped.append({"path": relpath, "reason": "system file, not an image"})
        elif where is None:
            skipped.append({"path": relpath, "reason": f"not inside a class folder ({CLASS_FOLDERS[layout]})"})
        else:
            candidates.append(SourceFile(str(src / relpath), relpath, *where))
    if not candidates and not skipped:
        raise UserError(f"{src}: source folder holds no files; put images under {WHAT[layout]}")
    return Scan(candidates, skipped, layout, src, {})


def walk_files(src: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .ipynb_checkpoints, ...
        rel_dir = Path(dirpath).relative_to(src)
        for name in filenames:
            yield (rel_dir / name).as_posix()


CLASS_FOLDERS = {
    "imagefolder": "real/ or fake/",
    "kaggle": "real/ or fake/",
    "genimage": "GENERATOR/{train,val}/{ai,nature}/",
    "synthbuster": "a real or generator folder",
}


def class_folder_places(src: Path) -> Callable[[list[str]], Place | None]:
    """ImageFolder and Kaggle: a file inside a class folder has that class, and as its source the first
    sub-folder below it (the class name when directly in it)."""
    roots = find_class_roots(src)

    def place(parts: list[str]) -> Place | None:
        root = next((r for r in roots if parts[: len(r[0])] == r[0]), None)
        if root is None:
            return None
        below = parts[len(root[0]) :]
        return root[1], root[2], below[0] if len(below) > 1 else root[1]

    return place


def find_class_roots(src: Path) -> list[tuple[list[str], str, bool]]:
    """Class folders as (path parts, class name, is source test split); ImageFolder or Kaggle layout."""
    if is_kaggle(src):
        roots = [([split, c], c, split == "test") for split in ("train", "test") for c in CLASSES]
        present = [r for r in roots if (src.joinpath(*r[0])).is_dir()]
    else:
        present = [([c], c, False) for c in CLASSES if (src / c).is_dir()]
    if {r[1] for r in present} != set(CLASSES):
        raise UserError(
            f"{src}: needs both real/ and fake/ class folders (or train/ and test/ holding them); "
            f"found folders: {', '.join(folders(src)) or 'none'}"
        )
    return present


def genimage_place(parts: list[str]) -> Place | None:
    """GenImage: GENERATOR/{train,val}/{ai,nature}/...: ai fakes of GENERATOR, nature reals; val is test."""
    if len(parts) < 4 or parts[1] not in GENIMAGE_SPLITS or parts[2] not in GENIMAGE_CLASSES:
        return None
    class_name = GENIMAGE_CLASSES[parts[2]]
    return class_name, GENIMAGE_SPLITS[parts[1]], parts[0] if class_name == "fake" else parts[2]


def synthbuster_place(parts: list[str]) -> Place | None:
    """Synthbuster: the real folder's files are reals of its name, every other folder's fakes of its name."""
    if len(parts) < 2:
        return None
    return ("real" if parts[0] in REAL_FOLDERS else "fake"), False, parts[0]


TREE_PLACES: dict[str, Callable[[Path], Callable[[list[str]], Place | None]]] = {
    "imagefolder": class_folder_places,
    "kaggle": class_folder_places,
    "genimage": lambda src: genimage_place,
    "synthbuster": lambda src: synthbuster_place,
}


# ----------------------------------------------------------------------------------------------------
# Lists and dates


def scan_csv(path: Path) -> Scan:
    """The files a list names (see the module docstring), relative to its folder."""
    root = path.resolve().parent
    candidates, skipped, dates, seen = [], [], {}, set()
    for line, row in csv_rows(path):
        where = f"{path}: line {line}"
        file, date = csv_row(root, row, where)
        if file.relpath in seen:
            raise UserError(f"{where}: lists {file.relpath} a second time")
        seen.add(file.relpath)
        if date:
            add_date(dates, file.source, date, where)
        if Path(file.path).is_file():
            candidates.append(file)
        else:
            skipped.append({"path": file.relpath, "reason": f"not found (listed on line {line} of {path.name})"})
    if not seen:
        raise UserError(f"{path}: lists no files; one row per image: {','.join(CSV_COLUMNS)}")
    return Scan(candidates, skipped, "csv", root, dates)


def csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, row) of each row of a list after its checked header; ``UserError`` naming the line where the
    file is no UTF-8 CSV."""
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        try:
            check_header(path, reader.fieldnames or [])
            for row in reader:
                yield reader.line_num, row
        except (UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"{path}: not a UTF-8 CSV, near line {reader.line_num + 1} ({first_line(exc)})") from None


def check_header(path: Path, header: list[str]) -> None:
    missing = [c for c in CSV_REQUIRED if c not in header]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if missing or unknown:
        wrong = f"lacks column {', '.join(missing)}" if missing else f"has unknown column {', '.join(unknown)}"
        raise UserError(f"{path}: line 1 {wrong}; the columns are {','.join(CSV_COLUMNS)} (path and label required)")


def csv_row(root: Path, row: dict[str, Any], where: str) -> tuple[SourceFile, str | None]:
    """One list row as a candidate file and its source's date (None: none given); ``UserError`` naming the line."""
    if None in row or any(row[c] is None for c in CSV_REQUIRED):
        raise UserError(f"{where}: has {'more' if None in row else 'fewer'} fields than the header")
    value = {column: (row.get(column) or "").strip() for column in CSV_COLUMNS}
    label = LABELS.get(value["label"].lower())
    if label is None:
        raise UserError(f"{where}: label {value['label']!r} is none of {', '.join(LABELS)}")
    if value["split"].lower() not in CSV_SPLITS:
        raise UserError(f"{where}: split {value['split']!r} is neither test nor train (or empty)")
    if not value["path"]:
        raise UserError(f"{where}: has no path")
    full = Path(os.path.normpath(root / value["path"]))
    relpath = full.relative_to(root).as_posix() if full.is_relative_to(root) else full.as_posix()
    file = SourceFile(str(full), relpath, label, CSV_SPLITS[value["split"].lower()], value["source"] or label)
    return file, parse_date(value["date"], where) if value["date"] else None


def parse_date(text: str, where: str) -> str:
    """An ISO release date, YYYY-MM-DD or YYYY-MM, as given; ``UserError`` naming ``where`` otherwise."""
    for pattern, form in DATE_FORMATS.items():
        if re.fullmatch(pattern, text):
            try:
                datetime.datetime.strptime(text, form)
                return text
            except ValueError:
                break
    raise UserError(f"{where}: date {text!r} is not a date YYYY-MM-DD or YYYY-MM")


def add_date(dates: dict[str, str], source: str, date: str, where: str) -> None:
    """Record ``source``'s release ``date``; ``UserError`` when it already has another."""
    if dates.setdefault(source, date) != date:
        raise UserError(f"{where}: gives source {source} the date {date}, elsewhere {dates[source]}")


def read_source_dates(path: str | Path) -> dict[str, str]:
    """The release date of each source from a YAML mapping (``sdxl: 2023-07-26``) or a CSV with columns
    source,date; ``UserError`` for a missing file or a bad entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: source dates file not found (YAML source: date, or a CSV source,date)")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.reader(stream))
        if not rows or [c.strip() for c in rows[0]] != ["source", "date"]:
            raise UserError(f"{path}: line 1 must be the header source,date")
        entries = [(f"{path}: line {n}", row) for n, row in enumerate(rows[1:], start=2) if row]
    else:
        try:
            mapping = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(mapping, dict):
            raise UserError(f"{path}: must map each source to its release date (sdxl: 2023-07-26)")
        entries = [(f"{path}: {source}", [source, date]) for source, date in mapping.items()]
    dates: dict[str, str] = {}
    for where, entry in entries:
        if len(entry) != 2:
            raise UserError(f"{where}: expected source,date")
        add_date(dates, str(entry[0]).strip(), parse_date(str(entry[1]).strip(), where), where)
    return dates
