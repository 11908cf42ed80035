"""Image transforms: the preprocessing recorded in a pack, and the loader workers' crops and flips.

Preprocessing (pack time and ``predict``) and augmentation (loader workers) work on H x W x 3 uint8
numpy arrays: that is the layout the JPEG decoder writes, so no sample is ever transposed, and the
N x H x W x 3 batch becomes an NCHW view in channels_last memory format, the layout convolutions run
fastest in. Normalisation to float happens once per batch, on the device (``aidetect.data.loader``).
Nothing here imports torch: pack's worker processes use it.
"""

from __future__ import annotations

import cv2
import numpy as np

PREPROCESS_MODES = ("resize", "crop", "native")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(pixels: np.ndarray, mode: str, size: int | None) -> np.ndarray:
    """Apply a pack's preprocessing mode to an RGB image: ``size`` is the stored side (resize, crop), or the
    bound on the longer side (native: ``fit_within``; None, no bound)."""
    if mode == "resize":
        return pad_square_resize(pixels, size)
    if mode == "crop":
        return center_crop(pixels, size)
    if mode == "native":
        return fit_within(pixels, size)
    raise ValueError(f"unknown preprocessing mode {mode!r}; choose one of {PREPROCESS_MODES}")


def pad_square_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """The original project's preprocessing: zero-pad to a centred square, resized to size x size.

    Resizing first and padding after gives the same picture for less work (no padded pixels are
    resampled). Note: when only one class is non-square (real camera photos), the black bars are a
    shortcut a model can learn instead of generator traces; ``crop`` mode avoids that.
    """
    height, width = pixels.shape[:2]
    new_h, new_w = resized_shape(height, width, size)
    interpolation = cv2.INTER_AREA if max(height, width) > size else cv2.INTER_CUBIC
    resized = cv2.resize(pixels, (new_w, new_h), interpolation=interpolation)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    return cv2.copyMakeBorder(resized, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, value=0)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) of an image once its longer side is scaled to ``size``."""
    side = max(height, width)
    return max(1, round(height * size / side)), max(1, round(width * size / side))


def fit_within(pixels: np.ndarray, size: int | None) -> np.ndarray:
    """The image as it is, or, when its longer side is over ``size``, scaled down to ``size`` on that side
    (area interpolation): native resolution up to a bound on what one image costs to store and read.
    ``size`` None: no bound, the image as it is."""
    height, width = pixels.shape[:2]
    if size is None or max(height, width) <= size:
        return pixels
    new_h, new_w = resized_shape(height, width, size)
    return cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_AREA)


def tile_windows(height: int, width: int, side: int, crops: int) -> list[tuple[int, int]]:
    """(top, left) of ``crops`` side x side windows tiled over a height x width image: a grid of
    floor(sqrt(crops)) rows and as many columns as it takes, spread from edge to edge (one row or column:
    centred), taken row by row. One crop is the centre crop."""
    rows = max(1, int(np.sqrt(crops)))
    cols = -(-crops // rows)

    def offsets(count: int, span: int) -> list[int]:
        return [span // 2] if count == 1 else [round(span * i / (count - 1)) for i in range(count)]

    grid = [(top, left) for top in offsets(rows, height - side) for left in offsets(cols, width - side)]
    return grid[:crops]


def tiles(pixels: np.ndarray, side: int, crops: int) -> np.ndarray:
    """The ``crops`` side x side windows of ``pixels`` (H x W x 3) that ``tile_windows`` places, in its order:
    crops x side x side x 3 (one: the centre crop). ``ValueError`` when the image is smaller than ``side``."""
    height, width = pixels.shape[:2]
    if min(height, width) < side:
        raise ValueError(f"{width}x{height} px is smaller than the {side} px crop")
    return np.stack(
        [pixels[top : top + side, left : left + side] for top, left in tile_windows(height, width, side, crops)]
    )


def padding_fraction(height: int, width: int, mode: str, size: int) -> float:
    """The share of the stored size x size image that ``preprocess`` fills with padding (0 for crop)."""
    if mode != "resize":
        return 0.0
    new_h, new_w = resized_shape(height, width, size)
    return 1 - new_h * new_w / (size * size)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """A native-resolution size x size crop from the centre: no resampling, generator traces survive."""
    height, width = pixels.shape[:2]
    if min(height, width) < size:
        raise ValueError(f"{width}x{height} px is smaller than the {size} px crop")
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def crop_flip_draws(height: int, width: int, side: int, draw: int) -> tuple[int, int, bool]:
    """Training augmentation's choices for a height x width image: the top and left of a random ``side`` px
    crop and whether to mirror it, read as mixed-radix digits of ``draw``, a uniform 64-bit number (one
    hash per sample; the bias of the modulo is below 2^-40 for any image a pack stores)."""
    rows, cols = height - side + 1, width - side + 1
    top, draw = draw % rows, draw // rows
    left, draw = draw % cols, draw // cols
    return top, left, bool(draw % 2)


def crop_flip_into(out: np.ndarray, pixels: np.ndarray, top: int, left: int, flip: bool) -> None:
    """Write ``pixels``' window of ``out``'s size at (top, left), mirrored left-right when ``flip``, into
    ``out`` (a row of a batch buffer): crop, flip and batching are one pass over the pixels."""
    window = pixels[top : top + out.shape[0], left : left + out.shape[1]]
    if flip:
        cv2.flip(window, 1, dst=out)
    else:
        np.copyto(out, window)
