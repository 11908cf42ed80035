"""``aidetect synth``: a learnable, deterministic real-vs-generated ImageFolder for demos and tests.

Both classes draw scenes from the same generator (1/f colour fields plus soft shapes) with the same
size, aspect, format and JPEG-quality distributions (and no EXIF), so none of those gives the class away.
What differs is how the pixels came to be, as with real generators:

- ``real``: the scene is rendered at full resolution and gets white sensor grain;
- ``fake``: the scene (and its grain) is rendered at half resolution and brought up by a stride-2
  transposed convolution whose output phases have unequal gains, as a learned upsampler does. That
  leaves a period-2 trace that survives JPEG, and that resizing destroys (``pack --mode crop``
  keeps it); ``periodic_trace`` measures it.

``--sources N`` (N >= 2) splits each class into sources, sub-folders that ``pack`` records as sources:
fakes into ``fake/gen1`` .. ``fake/genN``, each its own upsampler (kernel taps and which period-2 phase
pattern it leaves), and reals into 2 content styles, ``real/photo`` and ``real/art`` (posterised flat
colours, more and opaque shapes, little grain). Fakes draw both styles too, so content never gives the
class away. With N = 1 files lie directly in the class folders.

``--shortcuts`` makes the classes differ in file metadata as in the Kaggle set
tristanzhang32/ai-generated-images-vs-real-images: fakes are PNG at three fixed square sizes, reals
JPEG of varied sizes and aspects, some with camera EXIF; a metadata-only classifier then wins.

``--fragile`` makes the trace one that JPEG q50 all but destroys, as real detectors' easiest cues are:
strong fine sensor grain on reals (which JPEG smooths away, so compressed reals look like fakes) and a
faint period-2 trace (2-4 %) that compression weakens but keeps. A detector trained without JPEG
augmentation leans on the grain and fails under compression; one trained with it learns the faint
trace too (the README's robustness figures).

``--defects`` adds the broken files that scraped datasets contain, directly in the class folders (their
source is the class name); ``DEFECT_OUTCOMES`` says what ``pack`` must do with each.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, replace
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
EXIF_SHARE = 0.5  # of the reals, with --shortcuts
FRAGILE_GRAIN = (8.0, 12.0)  # --fragile: strong fine grain (std in 8-bit levels) ...
FAINT_GAIN = (0.02, 0.04)  # ... and a faint upsampler trace
CAMERAS = (("Canon", "Canon EOS 5D Mark IV"), ("NIKON CORPORATION", "NIKON D850"), ("SONY", "ILCE-7M3"))

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


@dataclass(frozen=True)
class Style:
    """How a scene looks: sensor grain (std in 8-bit levels, drawn per image), how many shapes are drawn
    and how opaque they are, and colour levels per channel (drawn per image; None: continuous tones)."""

    grain: tuple[float, float]
    shapes: tuple[int, int]
    opacity: float
    levels: tuple[int, int] | None = None


STYLES = {
    "photo": Style(grain=(1.5, 4.0), shapes=(2, 7), opacity=0.8),
    "art": Style(grain=(0.3, 1.0), shapes=(6, 14), opacity=1.0, levels=(3, 7)),
}


@dataclass(frozen=True)
class Upsampler:
    """A stride-2 transposed convolution: a separable kernel (its even and its odd taps each sum to 1, so
    alone it leaves no phase pattern), then output-phase gains ``1 +- g * pattern``, g uniform in ``gain``
    and the pattern one of ``PERIODIC_PATTERNS[i] for i in patterns``, drawn per image."""

    taps: tuple[float, ...]
    patterns: tuple[int, ...]
    gain: tuple[float, float] = (0.06, 0.15)


# Interpolation kernels of transposed convolutions: bilinear, nearest neighbour, Keys cubic (a = -0.5).
KERNELS = (
    (0.25, 0.75, 0.75, 0.25),
    (1.0, 1.0),
    (-0.0234375, -0.0703125, 0.2265625, 0.8671875, 0.8671875, 0.2265625, -0.0703125, -0.0234375),
)
MIXED = Upsampler(KERNELS[0], patterns=(0, 1, 2))  # the single source: any pattern
# Source k (0-based) pairs pattern k % 3 with kernel (k + k // 3) % 3: 9 distinct upsamplers.
GENERATORS = tuple(Upsampler(KERNELS[(k + k // 3) % 3], patterns=(k % 3,)) for k in range(9))


@dataclass(frozen=True)
class Source:
    """Where a sample is written (``folder`` under the output folder) and how it is made."""

    class_name: str
    folder: str
    style: Style
    upsampler: Upsampler  # fakes only


def synth(
    out: str | os.PathLike,
    n: int = 1000,
    seed: int = 0,
    defects: bool = False,
    workers: int | None = None,
    min_side: int = 320,
    max_side: int = 2048,
    sources: int = 1,
    shortcuts: bool = False,
    fragile: bool = False,
) -> dict[str, int]:
    """Write ``n`` images (half real, half fake) under ``out``; returns counts of files written per folder
    (``real``, ``fake``; with ``sources`` >= 2 ``real/photo``, ``fake/gen1`` ...) and of ``defects``."""
    if not 1 <= sources <= len(GENERATORS):
        raise UserError(f"--sources must be between 1 and {len(GENERATORS)}")
    if n < 2 * sources:
        raise UserError(f"--n must be at least {2 * sources} (one image per class and source)")
    if not 64 <= min_side <= max_side:
        raise UserError("--min-side must be at least 64 and no larger than --max-side")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new folder for synthetic data")
    reals_first = [*range(0, n, 2), *range(1, n, 2)]  # so counts list real folders, then fake ones
    counts = dict(Counter(sample_source(index, sources).folder for index in reals_first))
    for folder in counts:
        (out / folder).mkdir(parents=True, exist_ok=True)
    write = partial(
        write_sample,
        out=out,
        seed=seed,
        min_side=min_side,
        max_side=max_side,
        sources=sources,
        shortcuts=shortcuts,
        fragile=fragile,
    )
    for _ in parallel_imap(write, range(n), workers or os.cpu_count() or 1, chunksize=4):
        pass
    if defects:
        write_defects(out, np.random.default_rng([seed, n, 7]))
        counts["defects"] = len(DEFECT_OUTCOMES)
    return counts


def sample_source(index: int, sources: int) -> Source:
    """Class ``index % 2``. One source: photos in the class folder. More: each class's sources (real: the
    styles; fake: the generators) in turn, each generator drawing the styles in turn; from the index, so
    the same whatever the worker count."""
    class_name = CLASS_NAMES[index % 2]
    turn, styles = index // 2, tuple(STYLES)
    if sources == 1:
        return Source(class_name, class_name, STYLES["photo"], MIXED)
    if class_name == "real":
        style = styles[turn % len(styles)]
        return Source(class_name, f"real/{style}", STYLES[style], MIXED)
    style = styles[turn // sources % len(styles)]
    return Source(class_name, f"fake/gen{turn % sources + 1}", STYLES[style], GENERATORS[turn % sources])


def write_sample(
    index: int, out: Path, seed: int, min_side: int, max_side: int, sources: int, shortcuts: bool, fragile: bool
) -> None:
    rng = np.random.default_rng([seed, index])
    source = sample_source(index, sources)
    if fragile:
        style, upsampler = replace(source.style, grain=FRAGILE_GRAIN), replace(source.upsampler, gain=FAINT_GAIN)
        source = replace(source, style=style, upsampler=upsampler)
    as_generated = shortcuts and source.class_name == "fake"
    height, width = square_size(rng, min_side, max_side) if as_generated else draw_size(rng, min_side, max_side)
    pixels = render(rng, source.class_name, height, width, source.style, source.upsampler)
    data, ext = encode_sample(rng, pixels, source.class_name, shortcuts)
    atomic_write_bytes(out / source.folder / f"img_{index:06d}.{ext}", data)


def draw_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """Log-uniform long side, mostly non-square aspect, random orientation: the same for both classes."""
    long_side = int(math.exp(rng.uniform(math.log(min_side * 1.25), math.log(max_side))))
    ratio = 1.0 if rng.random() < 0.15 else rng.uniform(0.55, 0.95)
    short_side = max(min_side, int(long_side * ratio))
    return (long_side, short_side) if rng.random() < 0.4 else (short_side, long_side)


def square_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """One of three square sizes spread evenly over [min_side, max_side], as generators emit 512/768/1024."""
    side = min_side + (max_side - min_side) * int(rng.integers(3)) // 2
    return side, side


def encode_sample(rng: np.random.Generator, pixels: np.ndarray, class_name: str, shortcuts: bool) -> tuple[bytes, str]:
    """(file bytes, extension): PNG or JPEG of varied quality for both classes alike; with ``shortcuts``
    fakes are PNG and reals JPEG, some with camera EXIF."""
    png = class_name == "fake" if shortcuts else rng.random() < PNG_SHARE
    if png:
        return encode_png(pixels), "png"
    quality = int(rng.integers(*JPEG_QUALITY_RANGE, endpoint=True))
    # Only with shortcuts: an empty EXIF block would still change the bytes of every plain JPEG.
    options = {"exif": camera_exif(rng)} if shortcuts and rng.random() < EXIF_SHARE else {}
    return encode_jpeg(pixels, quality, **options), "jpg"


def camera_exif(rng: np.random.Generator) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = CAMERAS[int(rng.integers(len(CAMERAS)))]  # Make, Model
    return exif


def render(
    rng: np.random.Generator,
    class_name: str,
    height: int,
    width: int,
    style: Style = STYLES["photo"],
    upsampler: Upsampler = MIXED,
) -> np.ndarray:
    """An RGB uint8 image of the given class; ``upsampler`` brings a fake's half-resolution scene to size."""
    grain = rng.uniform(*style.grain)
    if class_name == "real":
        return to_uint8(scene(rng, height, width, style) + rng.normal(0, grain, (height, width, 3)))
    low_h, low_w = math.ceil(height / 2), math.ceil(width / 2)
    low = scene(rng, low_h, low_w, style) + rng.normal(0, grain, (low_h, low_w, 3))
    return to_uint8(transposed_conv_upsample(low, rng, upsampler)[:height, :width])


def scene(rng: np.random.Generator, height: int, width: int, style: Style = STYLES["photo"]) -> np.ndarray:
    """Float RGB scene: two 1/f random fields mixed into colours, plus a few soft-edged shapes; posterised
    if the style has colour levels."""
    fields = [fractal_field(rng, height, width) for _ in range(2)]
    colours = rng.uniform(0, 255, (3, 3))
    image = colours[0] * (1 - fields[0][..., None]) + colours[1] * fields[0][..., None]
    image = image * (0.7 + 0.3 * fields[1][..., None]) + colours[2] * 0.3 * (1 - fields[1][..., None])
    layer = np.zeros_like(image)
    alpha = np.zeros((height, width), dtype=np.float32)
    for _ in range(int(rng.integers(*style.shapes))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (
            int(rng.integers(width // 20 + 1, width // 3 + 2)),
            int(rng.integers(height // 20 + 1, height // 3 + 2)),
        )
        colour = [float(c) for c in rng.uniform(0, 255, 3)]
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(layer, centre, axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        cv2.ellipse(alpha, centre, axes, angle, 0, 360, style.opacity, -1, cv2.LINE_AA)
    image = image * (1 - alpha[..., None]) + layer * alpha[..., None]
    if style.levels is None:
        return image
    step = 255 / (int(rng.integers(*style.levels)) - 1)
    return np.round(image / step) * step


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


# Period-2 phase patterns: column stripes, row stripes, checks.
PERIODIC_PATTERNS = (np.array([[1, -1], [1, -1]]), np.array([[1, 1], [-1, -1]]), np.array([[1, -1], [-1, 1]]))


def transposed_conv_upsample(low: np.ndarray, rng: np.random.Generator, upsampler: Upsampler = MIXED) -> np.ndarray:
    """Stride-2 transposed convolution (zero insertion, then the upsampler's kernel) whose four output phases
    have unequal gains, the checkerboard a learned upsampler leaves: stripes or checks of 6-15% intensity."""
    height, width = low.shape[:2]
    up = np.zeros((height * 2, width * 2, 3), dtype=np.float32)
    up[::2, ::2] = low
    taps = np.array(upsampler.taps, dtype=np.float32)
    image = cv2.filter2D(up, -1, np.outer(taps, taps), borderType=cv2.BORDER_REFLECT)
    pattern = PERIODIC_PATTERNS[upsampler.patterns[int(rng.integers(len(upsampler.patterns)))]]
    phase_gain = 1 + rng.choice([-1, 1]) * rng.uniform(*upsampler.gain) * pattern
    return image * np.tile(phase_gain, (height, width))[..., None].astype(np.float32)


def pattern_strengths(pixels: np.ndarray) -> np.ndarray:
    """Strength of each of ``PERIODIC_PATTERNS`` in an RGB image, relative to its mean intensity."""
    gray = pixels[: pixels.shape[0] // 2 * 2, : pixels.shape[1] // 2 * 2].astype(np.float32).mean(axis=2)
    height, width = gray.shape
    mean = gray.mean() + 1e-6
    return np.array(
        [abs(float((gray * np.tile(p, (height // 2, width // 2))).mean())) / mean for p in PERIODIC_PATTERNS]
    )


def periodic_trace(pixels: np.ndarray) -> float:
    """Strength of a period-2 pattern relative to intensity (about 0 for real images, >= 0.06 for fakes)."""
    return float(pattern_strengths(pixels).max())


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
