from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.JpegImagePlugin import get_sampling

from aidetect.data.decode import bomb_guard, decode_image
from aidetect.data.degrade import jpeg
from aidetect.data.pack import PackSettings, pack
from aidetect.data.synth import DEFECT_OUTCOMES, pattern_strengths, periodic_trace, synth
from aidetect.data.transforms import center_crop
from aidetect.errors import UserError
from aidetect.metrics import format_per_source


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def images_by_folder(root: Path) -> dict[str, list[Path]]:
    folders: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("img_*")):
        folders.setdefault(path.parent.relative_to(root).as_posix(), []).append(path)
    return folders


def strengths(path: Path) -> np.ndarray:
    return pattern_strengths(center_crop(decode_image(path).pixels, 128))


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 2)):
        synth(tmp_path / name, n=6, seed=seed, defects=True, workers=workers, min_side=128, max_side=300)
    a, b, c = (files_of(tmp_path / name) for name in "abc")
    assert a == b  # deterministic, whatever the number of processes
    images_a = {v for k, v in a.items() if "/img_" in k}
    images_c = {v for k, v in c.items() if "/img_" in k}
    assert len(images_a) == len(images_c) == 6 and not images_a & images_c


def test_classes_share_size_format_and_shape_but_not_the_generator_trace(tmp_path: Path) -> None:
    synth(tmp_path / "s", n=80, seed=1, workers=2, min_side=256, max_side=480)
    stats = {}
    for cls in ("real", "fake"):
        paths = sorted((tmp_path / "s" / cls).iterdir())
        images = [Image.open(p) for p in paths]
        sizes = [image.size for image in images]
        stats[cls] = {
            "formats": Counter(p.suffix for p in paths),
            "modes": {image.mode for image in images},
            "exif": sum(bool(image.getexif()) for image in images),
            "sampling": {get_sampling(image) for image in images if image.format == "JPEG"},
            "non_square": np.mean([w != h for w, h in sizes]),
            "long_side": np.median([max(s) for s in sizes]),
            "portrait": np.mean([h > w for w, h in sizes]),
            "trace": [periodic_trace(center_crop(decode_image(p).pixels, 256)) for p in paths],
        }
    real, fake = stats["real"], stats["fake"]
    assert set(real["formats"]) == set(fake["formats"]) == {".jpg", ".png"}
    assert real["modes"] == fake["modes"] == {"RGB"} and real["sampling"] == fake["sampling"]
    assert real["exif"] == fake["exif"] == 0
    assert real["non_square"] > 0.6 and fake["non_square"] > 0.6
    assert 0.75 < real["long_side"] / fake["long_side"] < 1.33
    assert 0.1 < real["portrait"] < 0.9 and 0.1 < fake["portrait"] < 0.9
    # Learnable: a period-2 trace separates every fake from every real image, even after JPEG.
    assert max(real["trace"]) < 0.02 < min(fake["trace"])


def test_defects_are_written(tmp_path: Path) -> None:
    synth(tmp_path / "s", n=2, seed=0, defects=True, workers=1, min_side=128, max_side=200)
    written = {p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert set(DEFECT_OUTCOMES) <= written
    assert (tmp_path / "s" / "real" / "empty.jpg").stat().st_size == 0
    assert Image.open(tmp_path / "s" / "fake" / "cmyk.jpg").mode == "CMYK"
    assert Image.open(tmp_path / "s" / "fake" / "png_named.jpg").format == "PNG"
    with bomb_guard(PackSettings.max_pixels):  # Pillow refuses it elsewhere, as it should
        assert Image.open(tmp_path / "s" / "fake" / "huge_header.png").size == (40000, 30000)


def test_sources_are_subfolders_that_pack_records(tmp_path: Path) -> None:
    counts = synth(tmp_path / "s", n=24, seed=2, defects=True, workers=2, min_side=128, max_side=256, sources=3)
    expected = {"real/photo": 6, "real/art": 6, "fake/gen1": 4, "fake/gen2": 4, "fake/gen3": 4}
    assert counts == expected | {"defects": len(DEFECT_OUTCOMES)}
    assert {folder: len(paths) for folder, paths in images_by_folder(tmp_path / "s").items()} == expected
    manifest = pack(tmp_path / "s", tmp_path / "p", PackSettings(mode="crop", size=64), workers=2, progress=False)
    # the defects lie directly in the class folders: their source is the class name
    assert {c: set(by_source) for c, by_source in manifest["sources"].items()} == {
        "real": {"photo", "art", "real"},
        "fake": {"gen1", "gen2", "gen3", "fake"},
    }


def test_each_fake_source_leaves_its_own_trace_and_reals_none(tmp_path: Path) -> None:
    synth(tmp_path / "s", n=60, seed=4, workers=2, min_side=128, max_side=320, sources=3)
    folders = {
        folder: np.array([strengths(p) for p in paths]) for folder, paths in images_by_folder(tmp_path / "s").items()
    }
    dominant = {folder: set(s.argmax(axis=1).tolist()) for folder, s in folders.items() if folder.startswith("fake")}
    assert dominant == {"fake/gen1": {0}, "fake/gen2": {1}, "fake/gen3": {2}}  # one phase pattern each
    real_trace = max(s.max() for folder, s in folders.items() if folder.startswith("real"))
    fake_trace = min(s.max(axis=1).min() for folder, s in folders.items() if folder.startswith("fake"))
    assert real_trace < 0.01 and fake_trace > 0.03  # photo and art reals alike, every generator after JPEG


def test_shortcuts_make_fakes_square_pngs_and_reals_varied_jpegs(tmp_path: Path) -> None:
    synth(tmp_path / "s", n=48, seed=6, workers=2, min_side=128, max_side=480, sources=2, shortcuts=True)
    images = {folder: [Image.open(p) for p in paths] for folder, paths in images_by_folder(tmp_path / "s").items()}
    fakes = [image for folder, group in images.items() if folder.startswith("fake") for image in group]
    reals = [image for folder, group in images.items() if folder.startswith("real") for image in group]
    assert {image.format for image in fakes} == {"PNG"} and {image.format for image in reals} == {"JPEG"}
    assert {image.size for image in fakes} == {(128, 128), (304, 304), (480, 480)}
    assert len({image.size for image in reals}) == len(reals)
    assert np.mean([image.width != image.height for image in reals]) > 0.6
    assert 0 < sum(bool(image.getexif()) for image in reals) < len(reals)
    assert not any(image.getexif() for image in fakes)


def test_bad_sources_are_user_errors(tmp_path: Path) -> None:
    for kwargs in ({"sources": 0}, {"sources": 10}, {"sources": 3, "n": 5}):
        with pytest.raises(UserError, match="--"):
            synth(tmp_path / "s", **{"n": 24, **kwargs})
    assert not (tmp_path / "s").exists()


def test_per_source_table_is_aligned_with_dashes_where_a_metric_does_not_apply() -> None:
    table = format_per_source(
        {
            "sources": {
                "gen1": {"n": 20, "accuracy": 0.95, "fake_accuracy": 0.95, "auroc": 0.99, "ap": 0.98},
                "photo": {"n": 30, "accuracy": 1.0, "real_accuracy": 1.0},
            },
            "fake_accuracy_mean": 0.95,
            "fake_accuracy_min": 0.95,
        }
    ).splitlines()
    assert len({len(line) for line in table[:3]}) == 1
    assert table[0].split() == ["source", "n", "accuracy", "fake", "acc", "real", "acc", "AUROC"]
    assert table[1].split() == ["gen1*", "20", "0.9500", "0.9500", "-", "0.9900"]  # * under 30 images
    assert table[2].split() == ["photo", "30", "1.0000", "-", "1.0000", "-"]
    assert table[3].startswith("* fewer than 30 images")
    assert table[4] == "fake accuracy over fake sources: mean 0.9500, min 0.9500"


def test_fragile_traces_are_mostly_erased_by_jpeg_q50(tmp_path: Path) -> None:
    """--fragile: reals carry strong fine grain and fakes a faint period-2 trace; JPEG q50 smooths the grain
    away and weakens, but keeps, the trace."""
    synth(tmp_path / "s", n=24, seed=4, workers=2, min_side=128, max_side=160, fragile=True)

    def fine_grain(pixels: np.ndarray) -> float:  # mean absolute difference of horizontal neighbours
        return float(np.abs(np.diff(pixels.astype(np.float32), axis=1)).mean())

    stats: dict[str, dict[str, list[float]]] = {"real": {}, "fake": {}}
    for cls in stats:
        for path in sorted((tmp_path / "s" / cls).iterdir()):
            pixels = center_crop(decode_image(path).pixels, 128)
            compressed = jpeg(pixels, 50)
            for name, value in {
                "grain": fine_grain(pixels),
                "grain_q50": fine_grain(compressed),
                "trace": periodic_trace(pixels),
                "trace_q50": periodic_trace(compressed),
            }.items():
                stats[cls].setdefault(name, []).append(value)
    real, fake = ({k: np.median(v) for k, v in stats[c].items()} for c in ("real", "fake"))
    assert real["grain"] > 1.5 * fake["grain"] and real["grain_q50"] < 0.7 * real["grain"]
    assert 0.01 < fake["trace"] < 0.05 and real["trace"] < fake["trace_q50"] < fake["trace"]
