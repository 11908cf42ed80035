"""Checks of the plots a command writes."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def assert_png(path: Path) -> None:
    """``path`` is a whole, readable PNG file."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
