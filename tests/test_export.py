"""``aidetect export``: the ONNX file under onnxruntime and the TorchScript file under torch.jit.load give the
logits PyTorch gives on packed images as the loader reads them, at another batch size than the traced one,
with the model's own normalisation in the graph; the sidecar says how to feed them."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from helpers.commands import run_cli
from helpers.training import train_args

from aidetect.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from aidetect.data.integrity import sha256_file
from aidetect.data.loader import build_loader
from aidetect.errors import UserError
from aidetect.export import export
from aidetect.inference import checkpoint_preprocess, model_from_checkpoint
from aidetect.train import build_trained_model

BATCH = 8  # the loader's batch: not the traced one


@pytest.fixture(scope="module")
def run(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch seed_cnn2 run (BatchNorm: eval mode shows) on the tiny pack (32 px): its folder."""
    out = tmp_path_factory.mktemp("export") / "run"
    result = run_cli(*train_args(tiny_pack, out, "--epochs", "1", "--model", "seed_cnn2"))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def packed_batch(pack: Path, checkpoint: Checkpoint) -> tuple[np.ndarray, torch.Tensor]:
    """The first evaluation batch of the pack's test split: its uint8 NHWC images, and the same images as the
    loader normalises them for the checkpoint's model."""
    preprocess = checkpoint_preprocess(checkpoint)

    def loader():
        crop = checkpoint.preprocess["crop"]
        normalisation = {"mean": preprocess.mean, "std": preprocess.std}
        return build_loader(pack, ["test"], batch_size=BATCH, train=False, crop=crop, num_workers=0, **normalisation)

    with loader() as raw:
        images = next(raw.uint8_batches())[0].numpy().copy()
    with loader() as normalised:
        return images, next(iter(normalised)).images


def exported_logits(path: Path, images: np.ndarray) -> np.ndarray:
    if path.suffix == ".onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images})[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation note
        return torch.jit.load(str(path))(torch.from_numpy(images)).numpy()


def check_export(checkpoint_path: Path, pack: Path, file_format: str, out: Path) -> dict:
    """Export from the command line and compare with PyTorch on a packed batch; returns the sidecar."""
    result = run_cli("export", str(checkpoint_path), "--format", file_format, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = load_checkpoint(checkpoint_path)
    images, normalised = packed_batch(pack, checkpoint)
    with torch.no_grad():
        expected = model_from_checkpoint(checkpoint, torch.device("cpu"))(normalised).numpy()
    logits = exported_logits(out, images)
    assert logits.shape == (BATCH,) and np.abs(logits - expected).max() < 1e-4
    return json.loads(out.with_name(out.name + ".json").read_text())


@pytest.mark.parametrize("file_format", ["onnx", "torchscript"])
def test_export_gives_pytorchs_logits(run: Path, tiny_pack: Path, tmp_path: Path, file_format: str) -> None:
    out = tmp_path / f"model.{'onnx' if file_format == 'onnx' else 'pt'}"
    sidecar = check_export(run / "best.pt", tiny_pack, file_format, out)
    checkpoint = load_checkpoint(run / "best.pt")
    assert sidecar["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": ["N", 32, 32, 3]} | {
        "channels": "RGB"
    }
    assert sidecar["output"]["shape"] == ["N"] and sidecar["check_max_abs_diff"] < 1e-4
    assert sidecar["checkpoint_sha256"] == sha256_file(run / "best.pt") and sidecar["model"] == "seed_cnn2"
    assert (sidecar["threshold"], sidecar["temperature"]) == (
        checkpoint.state.best["threshold"],
        checkpoint.temperature,
    )
    assert sidecar["preprocess"]["mode"] == "crop" and sidecar["preprocess"]["size"] == 32
    assert sidecar["opset"] == (18 if file_format == "onnx" else None)


def test_a_timm_vit_exports_with_its_own_normalisation(run: Path, tiny_pack: Path, tmp_path: Path) -> None:
    """A timm ViT (mean and std 0.5, not ImageNet's) at 32 px, with fresh weights in the run's checkpoint."""
    checkpoint = load_checkpoint(run / "best.pt")
    model = replace(checkpoint.config.model, name="timm:vit_tiny_patch16_224", input_size=32)
    weights = build_trained_model(model, 32, torch.device("cpu")).state_dict()
    vit = replace(checkpoint, model=weights, config=replace(checkpoint.config, model=model))
    save_checkpoint(tmp_path / "vit.pt", replace(vit, preprocess=checkpoint.preprocess | {"crop": 32}))
    sidecar = check_export(tmp_path / "vit.pt", tiny_pack, "onnx", tmp_path / "vit.onnx")
    assert sidecar["preprocess"]["mean"] == [0.5, 0.5, 0.5]


def test_bad_input_is_one_line(run: Path, tmp_path: Path) -> None:
    missing = run_cli("export", str(tmp_path / "none.pt"), "--format", "onnx")
    unknown = run_cli("export", str(run / "best.pt"), "--format", "tflite")
    for result, words in ((missing, "checkpoint not found"), (unknown, "tflite")):
        assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="tflite"):
        export(run / "best.pt", "tflite")
