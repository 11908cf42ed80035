from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from aidetect.data.decode import decode_image
from aidetect.data.synth import DEFECT_OUTCOMES, periodic_trace, synth
from aidetect.data.transforms import center_crop


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
        sizes = [Image.open(p).size for p in paths]
        stats[cls] = {
            "formats": Counter(p.suffix for p in paths),
            "non_square": np.mean([w != h for w, h in sizes]),
            "long_side": np.median([max(s) for s in sizes]),
            "portrait": np.mean([h > w for w, h in sizes]),
            "trace": [periodic_trace(center_crop(decode_image(p).pixels, 256)) for p in paths],
        }
    real, fake = stats["real"], stats["fake"]
    assert set(real["formats"]) == set(fake["formats"]) == {".jpg", ".png"}
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
    assert Image.open(tmp_path / "s" / "fake" / "huge_header.png").size == (40000, 30000)
