"""``aidetect synth``: a learnable, deterministic real-vs-generated ImageFolder for demos and tests.

Both classes draw scenes from the same generator (1/f colour fields plus soft shapes) with the same
size, aspect, format and JPEG-quality distributions, so none of those gives the class away. What
differs is how the pixels came to be, as with real generators:

- ``real``: the scene is rendered at full resolution and gets white sensor grain;
- ``fake``: the scene (and its grain) is rendered at half resolution and brought up by a stride-2
  transposed convolution whose output phases have unequal gains, as a learned upsampler does. That
  leaves a period-2 trace that survives JPEG, and that resizing destroys (``pack --mode crop``
  keeps it); ``periodic_trace`` measures it.

``--defects`` adds the broken files that scraped datasets contain; ``DEFECT_OUTCOMES`` says what
``pack`` must do with each.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from aidetect.errors import UserError
from aidetect.fileio import atomic_write_bytes
from aidetect.parallel import parallel_imap

CLASS_NAMES = ("real", "fake")
PNG_SHARE = 0.15
JPEG_QUALITY_RANGE = (70, 98)

# relative path -> what ``aidetect pack`` (default settings) must record for it
DEFECT_OUTCOMES = {
    "fake/truncated.jpg": "repaired",
    "real/empty.jpg": "skipped",
    "fake/page_saved_as.jpg": "skipped",
    "real/grayscale.jpg": "packed",
    "fake/cmyk.jpg": "packed",
    "real/rgba.png": "packed",
    "fake/palette_transparent.png": "packed",
    "real/deep16.png": "packed",
    "real/exif_rotated.jpg": "packed",
    "fake/png_named.jpg": "packed",
    "fake/animated.gif": "packed",
    "real/tiny.jpg": "skipped",
    "fake/huge_header.png": "skipped",
    "real/фото_été_日本.jpg": "packed",
    "fake/生成画像_ü.jpg": "packed",
    ".DS_Store": "skipped",
    "real/.DS_Store": "skipped",
    "fake/Thumbs.db": "skipped",
}


def synth(
    out: str | os.PathLike,
    n: int = 1000,
    seed: int = 0,
    defects: bool = False,
    workers: int | None = None,
    min_side: int = 320,
    max_side: int = 2048,
) -> dict[str, int]:
    """Write ``n`` images (half real, half fake) under ``out``; returns counts of files written."""
    if n < 2:
        raise UserError("--n must be at least 2 (one image per class)")
    if not 64 <= min_side <= max_side:
        raise UserError("--min-side must be at least 64 and no larger than --max-side")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new folder for synthetic data")
    for name in CLASS_NAMES:
        (out / name).mkdir(parents=True, exist_ok=True)
    write = partial(write_sample, out=out, seed=seed, min_side=min_side, max_side=max_side)
    for _ in parallel_imap(write, range(n), workers or os.cpu_count() or 1, chunksize=4):
        pass
    counts = {name: len(range(i, n, 2)) for i, name in enumerate(CLASS_NAMES)}
    if defects:
        write_defects(out, np.random.default_rng([seed, n, 7]))
        counts["defects"] = len(DEFECT_OUTCOMES)
    return counts


def write_sample(index: int, out: Path, seed: int, min_side: int, max_side: int) -> None:
    rng = np.random.default_rng([seed, index])
    class_name = CLASS_NAMES[index % 2]
    height, width = draw_size(rng, min_side, max_side)
    pixels = render(rng, class_name, height, width)
    if rng.random() < PNG_SHARE:
        data, ext = encode_png(pixels), "png"
    else:
        data, ext = encode_jpeg(pixels, int(rng.integers(*JPEG_QUALITY_RANGE, endpoint=True))), "jpg"
    atomic_write_bytes(out / class_name / f"img_{index:06d}.{ext}", data)


def draw_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """Log-uniform long side, mostly non-square aspect, random orientation: the same for both classes."""
    long_side = int(math.exp(rng.uniform(math.log(min_side * 1.25), math.log(max_side))))
    ratio = 1.0 if rng.random() < 0.15 else rng.uniform(0.55, 0.95)
    short_side = max(min_side, int(long_side * ratio))
    return (long_side, short_side) if rng.random() < 0.4 else (short_side, long_side)


def render(rng: np.random.Generator, class_name: str, height: int, width: int) -> np.ndarray:
    """An RGB uint8 image of the given class."""
    grain = rng.uniform(1.5, 4.0)
    if class_name == "real":
        return to_uint8(scene(rng, height, width) + rng.normal(0, grain, (height, width, 3)))
    low_h, low_w = math.ceil(height / 2), math.ceil(width / 2)
    low = scene(rng, low_h, low_w) + rng.normal(0, grain, (low_h, low_w, 3))
    return to_uint8(transposed_conv_upsample(low, rng)[:height, :width])


def scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float RGB scene: two 1/f random fields mixed into colours, plus a few soft-edged shapes."""
    fields = [fractal_field(rng, height, width) for _ in range(2)]
    colours = rng.uniform(0, 255, (3, 3))
    image = colours[0] * (1 - fields[0][..., None]) + colours[1] * fields[0][..., None]
    image = image * (0.7 + 0.3 * fields[1][..., None]) + colours[2] * 0.3 * (1 - fields[1][..., None])
    layer = np.zeros_like(image)
    alpha = np.zeros((height, width), dtype=np.float32)
    for _ in range(int(rng.integers(2, 7))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (
            int(rng.integers(width // 20 + 1, width // 3 + 2)),
            int(rng.integers(height // 20 + 1, height // 3 + 2)),
        )
        colour = [float(c) for c in rng.uniform(0, 255, 3)]
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(layer, centre, axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        cv2.ellipse(alpha, centre, axes, angle, 0, 360, 0.8, -1, cv2.LINE_AA)
    return image * (1 - alpha[..., None]) + layer * alpha[..., None]


def fractal_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A field in [0, 1] with a natural-image 1/f^a amplitude spectrum (no resampling involved)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    radius[0, 0] = 1.0
    amplitude = radius ** -rng.uniform(0.9, 1.4)
    amplitude[0, 0] = 0.0
    spectrum = amplitude * (rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape))
    field = np.fft.irfft2(spectrum, s=(height, width))
    low, high = np.percentile(field, [1, 99])
    return np.clip((field - low) / (high - low + 1e-9), 0, 1).astype(np.float32)


PERIODIC_PATTERNS = (np.array([[1, -1], [1, -1]]), np.array([[1, 1], [-1, -1]]), np.array([[1, -1], [-1, 1]]))


def transposed_conv_upsample(low: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stride-2 transposed convolution (zero insertion, then a 4x4 kernel) whose four output phases have
    unequal gains, the checkerboard a learned upsampler leaves: stripes or checks of 6-15% intensity."""
    height, width = low.shape[:2]
    up = np.zeros((height * 2, width * 2, 3), dtype=np.float32)
    up[::2, ::2] = low
    taps = np.array([0.25, 0.75, 0.75, 0.25], dtype=np.float32)
    image = cv2.filter2D(up, -1, np.outer(taps, taps), borderType=cv2.BORDER_REFLECT)
    pattern = PERIODIC_PATTERNS[int(rng.integers(len(PERIODIC_PATTERNS)))]
    phase_gain = 1 + rng.choice([-1, 1]) * rng.uniform(0.06, 0.15) * pattern
    return image * np.tile(phase_gain, (height, width))[..., None].astype(np.float32)


def periodic_trace(pixels: np.ndarray) -> float:
    """Strength of a period-2 pattern relative to intensity (about 0 for real images, >= 0.06 for fakes)."""
    gray = pixels[: pixels.shape[0] // 2 * 2, : pixels.shape[1] // 2 * 2].astype(np.float32).mean(axis=2)
    height, width = gray.shape
    mean = gray.mean() + 1e-6
    return max(abs(float((gray * np.tile(p, (height // 2, width // 2))).mean())) / mean for p in PERIODIC_PATTERNS)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def encode_image(image: np.ndarray | Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, image_format, **options)
    return buffer.getvalue()


def encode_jpeg(image: np.ndarray | Image.Image, quality: int, **options) -> bytes:
    return encode_image(image, "JPEG", quality=quality, **options)


def encode_png(image: np.ndarray | Image.Image, **options) -> bytes:
    return encode_image(image, "PNG", **options)


# ----------------------------------------------------------------------------------------------------
# Defects


def write_defects(out: Path, rng: np.random.Generator) -> None:
    def sample(class_name: str, height: int = 360, width: int = 480) -> np.ndarray:
        return render(rng, class_name, height, width)

    files: dict[str, bytes] = {}
    intact = encode_jpeg(sample("fake"), 90)
    files["fake/truncated.jpg"] = intact[: int(len(intact) * 0.7)]
    files["real/empty.jpg"] = b""
    files["fake/page_saved_as.jpg"] = b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head></html>\n"
    files["real/grayscale.jpg"] = encode_jpeg(Image.fromarray(sample("real")).convert("L"), 90)
    files["fake/cmyk.jpg"] = encode_jpeg(Image.fromarray(sample("fake")).convert("CMYK"), 90)
    rgba = np.dstack([sample("real"), np.linspace(0, 255, 480, dtype=np.uint8)[None, :].repeat(360, 0)])
    files["real/rgba.png"] = encode_png(rgba)
    palette = Image.fromarray(sample("fake")).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    files["fake/palette_transparent.png"] = encode_png(palette, transparency=0)
    deep = (sample("real").mean(axis=2) * 257).astype(np.uint16)
    files["real/deep16.png"] = encode_png(Image.fromarray(deep))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    files["real/exif_rotated.jpg"] = encode_jpeg(sample("real", 480, 360), 90, exif=exif)
    files["fake/png_named.jpg"] = encode_png(sample("fake"))
    frames = [Image.fromarray(sample("fake", 240, 320)) for _ in range(3)]
    files["fake/animated.gif"] = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:])
    files["real/tiny.jpg"] = encode_jpeg(sample("real", 12, 16), 90)
    files["fake/huge_header.png"] = png_with_claimed_size(encode_png(sample("fake", 64, 64)), 40000, 30000)
    files["real/фото_été_日本.jpg"] = encode_jpeg(sample("real"), 88)
    files["fake/生成画像_ü.jpg"] = encode_jpeg(sample("fake"), 88)
    files[".DS_Store"] = b"\x00\x00\x00\x01Bud1" + bytes(64)
    files["real/.DS_Store"] = b"\x00\x00\x00\x01Bud1" + bytes(64)
    files["fake/Thumbs.db"] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64)
    assert files.keys() == DEFECT_OUTCOMES.keys()
    for relpath, data in files.items():
        atomic_write_bytes(out / relpath, data)


def png_with_claimed_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: a decompression bomb's signature, cheap to store."""
    ihdr_start = 8 + 8  # signature, then chunk length and type
    data = struct.pack(">II", width, height) + png[ihdr_start + 8 : ihdr_start + 13]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + data) & 0xFFFFFFFF)
    return png[:ihdr_start] + data + crc + png[ihdr_start + 17 :]
