"""Image degradations: what happens to images on the way to a detector (re-compression, blur, downscaling).

Used three ways, with the same functions: ``pack --parity`` (every image through one JPEG codec),
training augmentation (``Augmentation``: blur and JPEG at random strengths, CNNDetection's recipe) and
``evaluate --perturb`` (``Perturbation``: one fixed degradation of both classes, for robustness sweeps).
All work on H x W x 3 uint8 RGB arrays and are deterministic given their parameters.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from aidetect.errors import UserError

PERTURBATION_KINDS = ("none", "jpeg", "blur", "downscale")


def jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Encoded as JPEG at ``quality`` (libjpeg's default 4:2:0 chroma, as most cameras and web images) and
    decoded again."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as image:
        return np.array(image.convert("RGB"))  # writable: the loader hands it to torch


def blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` px (kernel to 3 sigma each side, edges reflected)."""
    if sigma <= 0:
        return pixels
    return cv2.GaussianBlur(pixels, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)


def downscale(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Downscaled by ``factor`` (area averaging) and brought back to its size (bilinear): the detail a
    low-resolution copy lost, at the size the model expects."""
    height, width = pixels.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    small = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class Perturbation:
    """One fixed degradation, named as on the command line: ``none``, ``jpeg:Q``, ``blur:SIGMA``,
    ``downscale:FACTOR``."""

    kind: str
    strength: float = 0.0

    @property
    def name(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.strength:g}"

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """``pixels`` degraded; ``rng`` is not used (a fixed degradation), accepted as the loader passes one."""
        if self.kind == "jpeg":
            return jpeg(pixels, int(self.strength))
        if self.kind == "blur":
            return blur(pixels, self.strength)
        if self.kind == "downscale":
            return downscale(pixels, self.strength)
        return pixels


def parse_perturbations(specs: list[str]) -> list[Perturbation]:
    """``["jpeg:95,75", "blur:1", "none"]`` -> one ``Perturbation`` per strength; ``UserError`` naming the bad
    part otherwise."""
    found = []
    for spec in specs:
        kind, _, values = spec.partition(":")
        if kind not in PERTURBATION_KINDS or (kind == "none") != (values == ""):
            raise UserError(f"--perturb {spec}: expected none, jpeg:Q[,Q..], blur:SIGMA[,..] or downscale:F[,..]")
        for value in values.split(",") if values else []:
            found.append(Perturbation(kind, check_strength(spec, kind, value)))
        if kind == "none":
            found.append(Perturbation("none"))
    return found


STRENGTHS = {  # kind -> (valid strength?, what a valid one is)
    "jpeg": (lambda v: 1 <= v <= 100 and v == int(v), "an integer quality 1-100"),
    "blur": (lambda v: v > 0, "a sigma > 0 px"),
    "downscale": (lambda v: 0 < v < 1, "a factor in (0, 1)"),
}


def check_strength(spec: str, kind: str, value: str) -> float:
    strength = read_strength(kind, value)
    if strength is None:
        raise UserError(f"--perturb {spec}: {value!r} is not {STRENGTHS[kind][1]}")
    return strength


def read_strength(kind: str, value: str) -> float | None:
    """``value`` (the text after ``KIND:``) as a valid strength of ``kind``, None when it is none: the one
    reading of ``jpeg:Q``, ``blur:SIGMA`` and ``downscale:FACTOR``, for ``--perturb`` and ``--parity``."""
    try:
        strength = float(value)
    except ValueError:
        return None
    return strength if STRENGTHS[kind][0](strength) else None  # nan fails every rule


def parity_quality(parity: str) -> int | None:
    """The JPEG quality of a ``pack --parity`` value ("jpeg:Q"), None for "none"; ``UserError`` otherwise."""
    if parity == "none":
        return None
    kind, _, value = parity.partition(":")
    quality = read_strength("jpeg", value) if kind == "jpeg" else None
    if quality is None:
        raise UserError(f"--parity {parity}: expected none or jpeg:Q with a quality Q from 1 to 100, e.g. jpeg:95")
    return int(quality)


def apply_parity(pixels: np.ndarray, parity: str) -> np.ndarray:
    """Decoded pixels through the parity codec (``jpeg``), so that both classes carry the same codec's
    traces and the original codec and quality can no longer tell them apart (Dual-Data-Alignment's
    protocol)."""
    quality = parity_quality(parity)
    return pixels if quality is None else jpeg(pixels, quality)


@dataclass(frozen=True)
class Augmentation:
    """Training degradations, each drawn per sample from a seeded generator: with ``blur_prob`` a Gaussian
    blur of sigma uniform in ``blur_sigma``, then with ``jpeg_prob`` JPEG at a quality uniform in
    ``jpeg_quality`` (integers, both ends included). Off when both probabilities are 0. The defaults are
    the ``data`` section's (``aidetect.config.DataConfig``)."""

    blur_prob: float
    blur_sigma: tuple[float, float]
    jpeg_prob: float
    jpeg_quality: tuple[int, int]

    @property
    def enabled(self) -> bool:
        return self.blur_prob > 0 or self.jpeg_prob > 0

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Every draw is made whether or not it is used, so one sample's choices never shift another's.
        do_blur, sigma = rng.random() < self.blur_prob, rng.uniform(*self.blur_sigma)
        low, high = self.jpeg_quality
        do_jpeg, quality = rng.random() < self.jpeg_prob, int(rng.integers(low, high + 1))
        if do_blur:
            pixels = blur(pixels, sigma)
        if do_jpeg:
            pixels = jpeg(pixels, quality)
        return pixels
