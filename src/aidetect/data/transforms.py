"""Image transforms: the preprocessing recorded in a pack, and the loader's augmentation and normalisation.

Preprocessing (pack time and ``predict``) and augmentation (loader workers) work on H x W x 3 uint8
numpy arrays: that is the layout the JPEG decoder writes, so no sample is ever transposed, and the
N x H x W x 3 batch becomes an NCHW view in channels_last memory format, the layout convolutions run
fastest in. Normalisation to float happens once per batch, on the device.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

PREPROCESS_MODES = ("resize", "crop")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(pixels: np.ndarray, mode: str, size: int) -> np.ndarray:
    """Apply a pack's preprocessing mode to an RGB image."""
    if mode == "resize":
        return pad_square_resize(pixels, size)
    if mode == "crop":
        return center_crop(pixels, size)
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


def crop_flip_batch(images: list[torch.Tensor], windows: list[tuple[int, int, bool]], side: int) -> torch.Tensor:
    """N x side x side x 3 uint8 batch on the images' device from 3 x H x W images, each cut at its
    (top, left, flip) window: what ``crop_flip_into`` writes, for images decoded on a device."""
    batch = torch.empty((len(images), side, side, 3), dtype=torch.uint8, device=images[0].device)
    for row, (image, (top, left, flip)) in enumerate(zip(images, windows, strict=True)):
        window = image[:, top : top + side, left : left + side]
        batch[row] = (window.flip(2) if flip else window).permute(1, 2, 0)
    return batch


def normalize_batch(images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 NHWC batch to a normalised float32 NCHW view (channels_last), on the batch's device.

    ``noise`` (NCHW, on the [0, 1] scale) is added before normalising, as the original project did;
    callers pass it for training batches only (the original also noised test images, which biased
    its numbers).
    """
    x = images.permute(0, 3, 1, 2).float().div_(255)
    if noise is not None:
        x.add_(noise)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)
