"""Degradations on real (synthetic photo-like) images: each does what its name says, by the amount asked."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from aidetect.data.degrade import Augmentation, Perturbation, blur, downscale, jpeg, parse_perturbations
from aidetect.data.synth import render
from aidetect.errors import UserError


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return render(np.random.default_rng(0), "real", 128, 160)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def detail(pixels: np.ndarray) -> float:
    """High-frequency energy: mean squared difference between horizontally and vertically adjacent pixels."""
    image = pixels.astype(np.float64)
    return float((np.diff(image, axis=0) ** 2).mean() + (np.diff(image, axis=1) ** 2).mean())


def test_jpeg_changes_the_pixels_more_at_lower_quality(photo: np.ndarray) -> None:
    high, low = jpeg(photo, 95), jpeg(photo, 30)
    assert high.shape == low.shape == photo.shape and low.dtype == np.uint8
    assert 0 < difference(photo, high) < difference(photo, low)
    assert low.flags.writeable  # the loader hands it to torch.from_numpy


def test_blur_removes_more_detail_the_larger_its_sigma(photo: np.ndarray) -> None:
    energies = [detail(blur(photo, sigma)) for sigma in (0, 0.5, 1, 2, 3)]
    assert energies[0] == detail(photo)  # sigma 0: the image itself
    assert all(a > b for a, b in pairwise(energies))


def test_downscale_keeps_the_shape_and_loses_detail(photo: np.ndarray) -> None:
    half, quarter = downscale(photo, 0.5), downscale(photo, 0.25)
    assert half.shape == quarter.shape == photo.shape and half.dtype == np.uint8
    assert detail(photo) > detail(half) > detail(quarter)


def test_augmentation_is_off_at_probability_zero_and_seeded_otherwise(photo: np.ndarray) -> None:
    off = Augmentation(0.0, (0.0, 3.0), 0.0, (30, 100))
    assert not off.enabled and np.array_equal(off(photo, np.random.default_rng(1)), photo)
    always = Augmentation(1.0, (0.5, 3.0), 1.0, (30, 100))

    def augmented(seed: int) -> np.ndarray:
        return always(photo, np.random.default_rng(seed))

    assert always.enabled and np.array_equal(augmented(1), augmented(1))
    assert not np.array_equal(augmented(1), augmented(2))
    assert difference(photo, augmented(1)) > 0 and augmented(1).shape == photo.shape


def test_parse_perturbations_gives_one_per_strength(photo: np.ndarray) -> None:
    found = parse_perturbations(["jpeg:95,75", "blur:1", "downscale:0.5", "none"])
    assert [p.name for p in found] == ["jpeg:95", "jpeg:75", "blur:1", "downscale:0.5", "none"]
    assert found[0] == Perturbation("jpeg", 95) and np.array_equal(found[1](photo), jpeg(photo, 75))
    assert found[-1](photo) is photo


@pytest.mark.parametrize("spec", ["jpeg:101", "jpeg:7.5", "blur:0", "downscale:2", "gauss:1", "none:3", "jpeg"])
def test_a_bad_perturbation_is_one_line_naming_it(spec: str) -> None:
    with pytest.raises(UserError) as raised:
        parse_perturbations(["none", spec])
    message = str(raised.value)
    assert spec in message and "\n" not in message
