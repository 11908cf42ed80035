"""Decoding the images stored in shards: one at a time on the CPU (OpenCV), or a batch at a time on a
device (torchvision's decoder: nvJPEG on a CUDA GPU). Readers of a pack use it; pack itself never
imports it (nor torchvision)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from aidetect.errors import UserError, first_line


def decode_stored(data: bytes) -> np.ndarray:
    """Decode an image stored in a shard to H x W x 3 RGB: libjpeg-turbo (or libpng) via OpenCV, the
    fastest decoder measured here, writing the HWC layout the loader keeps; None when it is no image."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


def decode_stored_batch(stored: list[bytes], device: torch.device, keys: list[str]) -> list[torch.Tensor]:
    """Decode a batch of stored JPEGs (samples ``keys``) to 3 x H x W RGB tensors on ``device``, in one call
    of torchvision's decoder: nvJPEG on a CUDA device; on the CPU libjpeg-turbo, which decodes exactly as
    ``decode_stored`` does. ``UserError`` naming the batch's first key when one is no JPEG."""
    data = [torch.frombuffer(bytearray(image), dtype=torch.uint8) for image in stored]  # writable copies
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        raise UserError(
            f"a batch from sample {keys[0]} holds an image that decodes on no {device.type} JPEG decoder "
            f"({first_line(exc)}); decode on the CPU (data.decode cpu) to find its shard"
        ) from None
