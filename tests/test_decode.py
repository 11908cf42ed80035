from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from aidetect.checkpoint import Checkpoint, RunState, save_checkpoint
from aidetect.config import Config, ModelConfig
from aidetect.data.decode import UnreadableImage, decode_image, pixel_array
from aidetect.data.pack import PackSettings
from aidetect.data.synth import encode_jpeg, encode_png, png_with_claimed_size, render
from aidetect.inference import predict
from aidetect.models import build_model

PILLOWS_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # Image.MAX_IMAGE_PIXELS as Pillow sets it: refuses over twice that


@pytest.fixture()
def scene() -> np.ndarray:
    pixels = render(np.random.default_rng(0), "real", 480, 640)
    pixels[:48] = 0  # black content at the top: must never be taken for a hole
    pixels[200:230, 100:300] = 128  # and neither must mid-grey content
    return pixels


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_truncated_jpeg_inpaints_only_the_missing_bottom(tmp_path: Path, scene: np.ndarray) -> None:
    data = encode_jpeg(scene, 92)
    decoded = decode_image(write(tmp_path / "t.jpg", data[: int(len(data) * 0.6)]))
    intact = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert decoded.repair and decoded.repair.startswith("truncated JPEG: inpainted the missing")
    missing = float(decoded.repair.split()[-1].rstrip("%")) / 100
    assert 0.2 < missing < 0.6
    rows_intact = int(480 * (1 - missing)) - 16  # above the partly decoded MCU row
    # Everything the file held is kept as decoded, black and grey content included ...
    assert np.abs(decoded.pixels[:rows_intact].astype(int) - intact[:rows_intact]).max() <= 2
    assert decoded.pixels[:40].max() <= 8 and np.abs(decoded.pixels[205:225, 110:290].astype(int) - 128).max() <= 8
    # ... and the hole is filled from its surroundings, not left as the decoder's flat grey.
    bottom = decoded.pixels[-40:].reshape(-1, 3)
    assert (np.abs(bottom.astype(int) - 128).max(axis=1) > 3).mean() > 0.5


def test_truncated_jpeg_is_skipped_when_repair_is_off(tmp_path: Path, scene: np.ndarray) -> None:
    data = encode_jpeg(scene, 92)
    with pytest.raises(UnreadableImage, match="truncated JPEG"):
        decode_image(write(tmp_path / "t.jpg", data[: int(len(data) * 0.6)]), repair_truncated=False)


def test_truncated_progressive_jpeg_is_kept_without_inpainting(tmp_path: Path, scene: np.ndarray) -> None:
    data = encode_jpeg(scene, 92, progressive=True)
    decoded = decode_image(write(tmp_path / "p.jpg", data[: int(len(data) * 0.6)]))
    assert decoded.repair == "truncated progressive JPEG: decoded at lower detail"
    assert np.abs(decoded.pixels.astype(int) - scene.astype(int)).mean() < 12


def test_modes_become_rgb_faithfully(tmp_path: Path, scene: np.ndarray) -> None:
    deep = (scene.mean(axis=2) * 257).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    gray = decode_image(tmp_path / "deep.png").pixels
    assert gray.shape == (480, 640, 3) and np.abs(gray[..., 0].astype(int) - scene.mean(axis=2)).max() <= 1.5

    Image.fromarray(scene).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(decode_image(tmp_path / "cmyk.jpg").pixels.astype(int) - scene).mean() < 6

    rgba = np.dstack([scene, np.zeros(scene.shape[:2], np.uint8)])  # fully transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert decode_image(tmp_path / "rgba.png").pixels.min() == 255  # composited on white, not black


def test_exif_orientation_is_applied(tmp_path: Path, scene: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(write(tmp_path / "r.jpg", encode_jpeg(scene, 95, exif=exif)))
    assert decoded.pixels.shape == (640, 480, 3)
    assert decoded.original_size == (640, 480)
    assert decoded.pixels[:, -40:].max() <= 8  # the black top band is now on the right


def test_large_jpeg_is_decoded_reduced_and_the_budget_holds(tmp_path: Path, scene: np.ndarray) -> None:
    path = write(tmp_path / "big.jpg", encode_jpeg(np.tile(scene, (4, 4, 1)), 90))  # 2560 x 1920
    assert decode_image(path, long_side=256).pixels.shape == (240, 320, 3)  # 1/8 scale, still >= 256
    assert decode_image(path).pixels.shape == (1920, 2560, 3)
    assert decode_image(path, max_pixels=1_300_000).pixels.shape == (960, 1280, 3)  # 1/2 scale fits
    with pytest.raises(UnreadableImage, match="over the pixel budget"):
        decode_image(path, max_pixels=50_000)  # even 1/8 scale is 76,800 px
    bomb = write(tmp_path / "bomb.png", png_with_claimed_size(_tiny_png(), 40000, 30000))
    with pytest.raises(UnreadableImage, match="only JPEGs can be decoded reduced"):
        decode_image(bomb)


@pytest.fixture(scope="module")
def over_pillows_limit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 13403 x 13403 JPEG (180 MP, over twice Pillow's limit: it refuses to open it); a side 8 does not divide."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.new("L", (13_403, 13_403), 128).save(path, quality=10)
    return path


def test_a_jpeg_over_pillows_limit_is_decoded_reduced_within_the_budget_exactly(over_pillows_limit: Path) -> None:
    assert decode_image(over_pillows_limit, long_side=256).pixels.shape == (1676, 1676, 3)  # 1/8 scale, not 1/4
    assert decode_image(over_pillows_limit, max_pixels=1676 * 1676).pixels.shape == (1676, 1676, 3)
    with pytest.raises(UnreadableImage, match=r"over the pixel budget: 13403x13403 = 180 MP > 3 MP even at 1/8 scale"):
        decode_image(over_pillows_limit, max_pixels=1676 * 1676 - 1)  # libjpeg rounds each side up
    # Over 64 x the budget, Pillow's own guard refuses the file before anything else reads it.
    with pytest.raises(UnreadableImage, match=r"over the pixel budget: more than 64 x 2 MP, .* decompression bomb"):
        decode_image(over_pillows_limit, max_pixels=2_000_000)
    assert Image.MAX_IMAGE_PIXELS == PILLOWS_LIMIT  # set around each decode only


def test_pillows_bomb_guard_stays_on_in_the_process(tmp_path: Path) -> None:
    """Importing pack, predict or the decoder, and decoding, leave Pillow refusing bombs everywhere else."""
    bomb = write(tmp_path / "bomb.png", png_with_claimed_size(_tiny_png(), 40000, 30000))
    with pytest.raises(UnreadableImage, match="over the pixel budget"):
        decode_image(bomb)
    assert Image.MAX_IMAGE_PIXELS == PILLOWS_LIMIT
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)


def test_predict_refuses_a_decompression_bomb_in_its_row(tmp_path: Path, scene: np.ndarray) -> None:
    """A PNG claiming 20 gigapixels (over 64 x the 250 MP budget) is one error row; the other file is scored."""
    checkpoint = tmp_path / "best.pt"
    state = Checkpoint(  # predict reads the model, its name and the preprocessing; no training parts
        model=build_model("seed_cnn1", 32).state_dict(),
        optimizer={},
        scheduler={},
        scaler={},
        state=RunState(),
        rng=[],
        config=Config(model=ModelConfig(name="seed_cnn1")),
        preprocess=asdict(PackSettings(mode="crop", size=32)) | {"crop": None},
        wandb_id=None,
    )
    save_checkpoint(checkpoint, state)
    bomb = write(tmp_path / "bomb.png", png_with_claimed_size(_tiny_png(), 200_000, 100_000))
    photo = write(tmp_path / "photo.jpg", encode_jpeg(scene, 90))
    assert predict(str(checkpoint), [str(bomb), str(photo)], str(tmp_path / "p.csv")) == {"files": 2, "errors": 1}
    rows = {row["path"]: row for row in csv.DictReader((tmp_path / "p.csv").open())}
    assert rows[str(bomb)]["error"].startswith("over the pixel budget: more than 64 x 250 MP")
    assert "decompression bomb" in rows[str(bomb)]["error"] and rows[str(bomb)]["prob_fake"] == ""
    assert rows[str(photo)]["error"] == "" and rows[str(photo)]["label"] in ("real", "fake")


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"<html><body>not found</body></html>", "not an image"),
        (b"\xff\xd8\xff\xe0" + bytes(40), "not an image"),
        (encode_jpeg(np.zeros((300, 400, 3), np.uint8), 90)[:700], "of the image is missing, too much to inpaint"),
    ],
)
def test_unreadable_files_raise_with_a_reason(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(UnreadableImage, match=reason):
        decode_image(write(tmp_path / "x.jpg", data))


@pytest.mark.parametrize("quality", [30, 75, 90, 97])
def test_file_facts_read_jpeg_quality_subsampling_and_exif_from_the_file(
    tmp_path: Path, scene: np.ndarray, quality: int
) -> None:
    exif = Image.Exif()
    exif[0x0110] = "camera model"
    pillow = write(tmp_path / "pillow.jpg", encode_jpeg(scene, quality, subsampling=1, exif=exif))
    _, opencv = cv2.imencode(".jpg", scene[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    opencv = write(tmp_path / "opencv.jpg", opencv.tobytes())
    assert decode_image(pillow).file == {
        "format": "JPEG",
        "bytes": pillow.stat().st_size,
        "width": 640,
        "height": 480,
        "jpeg_quality": quality,
        "subsampling": "4:2:2",
        "exif": True,
        "mode": "RGB",
        "bits": 8,
    }
    facts = decode_image(opencv).file  # another encoder, the same standard tables
    assert (facts["jpeg_quality"], facts["subsampling"], facts["exif"]) == (quality, "4:2:0", False)


def test_file_facts_of_other_formats_have_no_jpeg_settings(tmp_path: Path, scene: np.ndarray) -> None:
    rgba = np.dstack([scene, np.full(scene.shape[:2], 200, np.uint8)])
    png = write(tmp_path / "a.png", encode_png(rgba))
    deep = write(tmp_path / "deep.png", encode_png(Image.fromarray(scene[:, :, 0].astype(np.uint16) * 257)))
    facts = decode_image(png).file
    assert (facts["format"], facts["mode"], facts["bits"], facts["jpeg_quality"], facts["subsampling"]) == (
        "PNG",
        "RGBA",
        8,
        None,
        None,
    )
    assert decode_image(deep).file["bits"] == 16


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_pixel_array_is_numpys_view_of_the_image(mode: str) -> None:
    from PIL import ImageFile

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 517, 4), np.uint8), "RGBA").convert(mode)
    block = ImageFile.MAXBLOCK
    assert np.array_equal(pixel_array(image).squeeze(), np.asarray(image))
    assert block == ImageFile.MAXBLOCK  # Pillow's setting is back as it was
