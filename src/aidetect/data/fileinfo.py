"""What an image file says about itself before any decoding choice: the metadata a detector must not
learn instead of pixels (``aidetect audit`` fits classifiers on exactly these facts).

A scraped dataset's classes often differ in container, size and codec settings more reliably than in
generator traces: a metadata-only classifier that separates them shows a shortcut the model can take.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin

# The JPEG standard's example quantisation tables (ITU T.81, Annex K), in natural (row-major) order:
# libjpeg, Pillow, OpenCV and most cameras' software scale them by the IJG quality formula.
STANDARD_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
STANDARD_CHROMINANCE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    *([99] * 32),
)  # fmt: skip
SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # Pillow's get_sampling codes
BITS_PER_CHANNEL = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}  # every other mode: 8


def file_facts(image: Image.Image, path: str | os.PathLike) -> dict[str, Any]:
    """Facts of an opened (not yet loaded) image file: container format, file bytes, stored width and
    height, JPEG quality estimated from its quantisation tables and chroma subsampling (None for other
    formats), whether it carries EXIF, its mode and bits per channel."""
    is_jpeg = isinstance(image, JpegImagePlugin.JpegImageFile)  # MPO (camera multi-picture) files too
    sampling = JpegImagePlugin.get_sampling(image) if is_jpeg else -1
    return {
        "format": image.format or "unknown",
        "bytes": os.path.getsize(path),
        "width": image.size[0],
        "height": image.size[1],
        "jpeg_quality": estimate_jpeg_quality(image.quantization) if is_jpeg else None,
        "subsampling": SUBSAMPLING.get(sampling),
        "exif": bool(image.info.get("exif")),
        "mode": image.mode,
        "bits": BITS_PER_CHANNEL.get(image.mode, 8),
    }


def scaled_table(base: tuple[int, ...], quality: int) -> list[int]:
    """``base`` scaled to ``quality`` by the IJG formula (libjpeg's jpeg_quality_scaling)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((value * scale + 50) // 100, 1), 255) for value in base]


# Row q - 1: the luminance then the chrominance table at IJG quality q (computed once: 0.1 ms per file).
QUALITY_TABLES = np.array(
    [scaled_table(STANDARD_LUMINANCE, q) + scaled_table(STANDARD_CHROMINANCE, q) for q in range(1, 101)]
)


def estimate_jpeg_quality(tables: dict[int, list[int]] | None) -> int | None:
    """The IJG quality (1-100) whose standard tables come closest to ``tables`` (exact for files written
    by libjpeg-based encoders; the nearest match for custom tables, e.g. some cameras'); None without
    tables. A grey JPEG has only the luminance table; tables past the second are not compared."""
    if not tables:
        return None
    stored = np.concatenate([np.asarray(tables[index][:64]) for index in sorted(tables)[:2]])
    distance = np.abs(QUALITY_TABLES[:, : len(stored)] - stored).sum(axis=1)
    return int(np.argmin(distance)) + 1
