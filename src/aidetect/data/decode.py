"""Decode any image file a scraped dataset may hold into an RGB array, once, as cheaply as possible.

Large JPEGs are decoded reduced (libjpeg DCT scaling via PIL's draft mode) when the caller only needs
a smaller image, so a 100 MP photo does not cost a full decode. A truncated JPEG is repaired by
inpainting only the region the decoder never reached; anything else that cannot be decoded raises
``UnreadableImage`` with a reason for the pack report.

No file is decoded to more than the pixel budget (``max_pixels``): Pillow's decompression-bomb guard
stays on in the whole process at Pillow's limit, and is set to the budget only around each decode
here (``bomb_guard``), so a huge JPEG that decodes within it at a reduced scale still can.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from aidetect.data.fileinfo import file_facts
from aidetect.errors import first_line

SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini"}
MAX_MISSING_FRACTION = 0.5
MAX_REDUCTION = 8  # libjpeg's DCT scaling decodes a JPEG at 1/2, 1/4 or 1/8 of its size
MAX_PIXELS = 250_000_000  # the default pixel budget of one decoded image (pack --max-pixels)


class UnreadableImage(Exception):
    """The file cannot be turned into a usable image; the message is the reason recorded in the manifest."""


@dataclass
class DecodedImage:
    pixels: np.ndarray  # H x W x 3, uint8, RGB, EXIF orientation applied
    file: dict[str, Any]  # what the file says about itself (aidetect.data.fileinfo.file_facts)
    repair: str | None = None  # what was done to a truncated file, for the manifest (None = intact)

    @property
    def original_size(self) -> tuple[int, int]:
        """(width, height) as stored in the file."""
        return self.file["width"], self.file["height"]


def decode_image(
    path: str | os.PathLike,
    *,
    long_side: int | None = None,
    min_side: int = 32,
    max_pixels: int = MAX_PIXELS,
    repair_truncated: bool = True,
) -> DecodedImage:
    """Decode ``path`` to RGB. With ``long_side``, JPEGs may be decoded reduced to no less than that.

    Never decodes more than ``max_pixels`` pixels: a file over that budget, even at 1/8 scale for a
    JPEG, raises ``UnreadableImage`` before any pixel is decoded (Pillow refuses to open one over 64 x
    the budget, see ``bomb_guard``; the exact check is ``reduced_decode_scale``)."""
    if os.path.getsize(path) == 0:
        raise UnreadableImage("empty file (0 bytes)")
    with bomb_guard(max_pixels):
        with open_image(path, max_pixels) as image:
            width, height = image.size
            facts = file_facts(image, path)
            if min(width, height) < min_side:
                raise UnreadableImage(f"too small: {width}x{height} px, shorter side under {min_side} px")
            scale = reduced_decode_scale(image, long_side, max_pixels)
            draft(image, scale)
            if load_intact(image, repair_truncated):
                ImageOps.exif_transpose(image, in_place=True)  # a copy would be one more decoded image in memory
                return DecodedImage(to_rgb(image), facts)
        pixels, repair = repair_truncated_jpeg(Path(path).read_bytes(), scale)
    return DecodedImage(pixels, facts, repair=repair)


@contextmanager
def bomb_guard(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb guard, for the calls inside, at the most stored pixels a budget of
    ``max_pixels`` can take (a JPEG decoded at 1/8 scale: 64 x as many), its warning made an error:
    Pillow then refuses to open a larger file. Pillow's own limit is back on exit, so nothing else in
    the process (predict's other work, plots, user code) runs without it."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_REDUCTION**2 * max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only, no pixels), with every refusal as ``UnreadableImage``."""
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise UnreadableImage("not an image: content is no image format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(
            f"over the pixel budget: more than {MAX_REDUCTION**2} x {max_pixels / 1e6:g} MP, over it even at "
            f"1/{MAX_REDUCTION} scale; Pillow takes it for a decompression bomb (raise --max-pixels to keep it)"
        ) from None
    except OSError as exc:
        raise UnreadableImage(f"cannot open: {first_line(exc)}") from None


def draft(image: Image.Image, scale: int) -> None:
    """Have a JPEG decoded at 1/``scale`` (1: as stored). Pillow picks the largest scale that leaves at
    least the size asked for, so the size asked is rounded down: rounded up, a side that ``scale`` does
    not divide would get half the scale, and 4 x the pixels."""
    if scale > 1:
        width, height = image.size
        image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))


def reduced_decode_scale(image: Image.Image, long_side: int | None, max_pixels: int) -> int:
    """1, 2, 4 or 8: how much libjpeg may scale down while decoding (enough for ``long_side``, or needed
    to stay within the pixel budget). Raises for files over the budget that cannot be decoded reduced."""
    width, height = image.size
    scale = 1
    if long_side is not None and image.format == "JPEG":
        scale = min(MAX_REDUCTION, 2 ** int(math.log2(max(1, max(width, height) // long_side))))
    while decoded_pixels(width, height, scale) > max_pixels and scale < MAX_REDUCTION:
        scale *= 2
    if decoded_pixels(width, height, scale) > max_pixels or (scale > 1 and image.format != "JPEG"):
        detail = "even at 1/8 scale" if image.format == "JPEG" else "and only JPEGs can be decoded reduced"
        raise UnreadableImage(
            f"over the pixel budget: {width}x{height} = {width * height / 1e6:.0f} MP > "
            f"{max_pixels / 1e6:.0f} MP {detail} (raise --max-pixels to keep it)"
        )
    return scale


def decoded_pixels(width: int, height: int, scale: int) -> int:
    """Pixels of a ``width`` x ``height`` JPEG decoded at 1/``scale``: libjpeg rounds each side up."""
    return -(-width // scale) * -(-height // scale)


def load_intact(image: Image.Image, repair_truncated: bool) -> bool:
    """Load the pixels; False for a truncated JPEG that should be repaired, UnreadableImage otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", "Palette images with transparency"
            image.load()
        return True
    except OSError as exc:
        if "truncated" not in str(exc) and "broken data stream" not in str(exc):
            raise UnreadableImage(f"cannot decode: {first_line(exc)}") from None
        if image.format != "JPEG":
            raise UnreadableImage(f"truncated {image.format} file: {first_line(exc)}") from None
        if not repair_truncated:
            raise UnreadableImage(f"truncated JPEG: {first_line(exc)}") from None
        return False
    except (ValueError, SyntaxError, EOFError) as exc:
        raise UnreadableImage(f"cannot decode: {first_line(exc)}") from None


def repair_truncated_jpeg(data: bytes, scale: int) -> tuple[np.ndarray, str]:
    """Decode what a truncated JPEG holds and inpaint only the blocks the decoder never received.

    The missing region is found by decoding twice: as stored, and with filler bytes appended. The
    decoder runs through the image in MCU order, so the first MCU where the two decodes differ is the
    first one the file did not hold; it and every MCU after it form the mask. Nothing else is marked:
    black or grey image content is never mistaken for a hole.
    """
    as_stored = decode_truncated(data, scale)
    if as_stored.info.get("progressive"):
        # Every block of a progressive JPEG arrives in the first scan: nothing is missing, only detail.
        return to_rgb(ImageOps.exif_transpose(as_stored)), "truncated progressive JPEG: decoded at lower detail"
    filler = bytes(np.random.default_rng(0).integers(0, 255, len(data) + 4096, dtype=np.uint8))
    with_filler = decode_truncated(data + filler, scale)
    mask = missing_region_mask(np.asarray(as_stored) != np.asarray(with_filler), mcu_size(as_stored, scale))
    fraction = float(mask.mean())
    if fraction > MAX_MISSING_FRACTION:
        raise UnreadableImage(f"truncated JPEG: {fraction:.0%} of the image is missing, too much to inpaint")
    pixels = to_rgb(as_stored)
    if fraction > 0:
        # Navier-Stokes inpainting with radius 3, as the original project; the mask is the missing region only.
        pixels = cv2.inpaint(pixels, mask.astype(np.uint8) * 255, 3, cv2.INPAINT_NS)
    repaired = Image.fromarray(pixels)
    repaired.info["exif"] = as_stored.info.get("exif", b"")  # keeps the orientation tag for the transpose
    return np.asarray(ImageOps.exif_transpose(repaired)), f"truncated JPEG: inpainted the missing {fraction:.1%}"


def decode_truncated(data: bytes, scale: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    draft(image, scale)
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        image.load()
    except OSError as exc:
        raise UnreadableImage(f"truncated JPEG, unrecoverable: {first_line(exc)}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    return image


def mcu_size(image: Image.Image, scale: int) -> int:
    """Side of one JPEG MCU in decoded pixels: 8 x the largest sampling factor, divided by the draft scale."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)]
    sampling = max(max(h, v) for _, h, v, _ in layers)
    return max(1, 8 * sampling // scale)


def missing_region_mask(differs: np.ndarray, mcu: int) -> np.ndarray:
    """From the first MCU (in decode order) where most pixels differ between the two decodes, to the end.

    "Most pixels": chroma upsampling smears a difference a pixel or two into neighbouring, intact MCUs.
    """
    height, width = differs.shape[:2]
    differs = differs.reshape(height, width, -1).any(axis=2)
    mask = np.zeros((height, width), dtype=bool)
    for top in range(0, height, mcu):
        band = differs[top : top + mcu]
        for left in range(0, width, mcu):
            if band[:, left : left + mcu].mean() > 0.5:
                mask[top : top + mcu, left:] = True
                mask[top + mcu :] = True
                return mask
    return mask


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, 16-bit scaled (not clipped) to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        deep = np.asarray(image, dtype=np.uint32)
        top = 65535 if image.mode != "I" or deep.max() > 255 else 255
        gray = (deep * 255 // top).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.asarray(image, dtype=np.float32).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba)  # its colour over white by its alpha, in place: no RGBA copies
        return pixel_array(white)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return pixel_array(image)


def pixel_array(image: Image.Image) -> np.ndarray:
    """``np.asarray(image)`` (read-only, the same pixels) in one pass over them instead of two.

    ``np.asarray`` takes Pillow's ``tobytes``, which packs the pixels into chunks of ``ImageFile.MAXBLOCK``
    bytes (64 KB) and joins them: a full-size camera image is copied twice, and held twice at the peak.
    With one chunk as large as the image, the join hands that chunk back as it is (``bytes.join`` of one
    bytes object returns it). Pack's workers are single-threaded; another thread saving an image meanwhile
    would only get a larger buffer."""
    saved = ImageFile.MAXBLOCK
    ImageFile.MAXBLOCK = max(saved, image.width * image.height * len(image.getbands()))
    try:
        data = image.tobytes()
    finally:
        ImageFile.MAXBLOCK = saved
    return np.frombuffer(data, dtype=np.uint8).reshape(image.height, image.width, len(image.getbands()))
