"""``aidetect export``: a trained detector as one ONNX or TorchScript file, and a JSON sidecar.

The exported model takes what a decoder gives: uint8 images, N x S x S x 3 (NHWC, RGB, 0-255; S the side
the model was trained at, the checkpoint's crop or pack size, and any batch size N), made as ``pack``
and the evaluation loader make them (the pack's mode, size and codec, then a centre crop of S). The
loader's normalisation is in the graph (``data.loader.normalize_batch``: to [0, 1], then (x - mean) /
std per channel), so a consumer needs no constants; it returns N float32 logits, positive = fake,
p(fake) = sigmoid(logit / temperature) (temperature 1 without one).

ONNX: the TorchScript-based exporter (``dynamo=False``; the dynamo-based one, torch's default, needs
onnxscript), opset ``OPSET``, the batch axis dynamic. TorchScript: ``torch.jit.trace``. Both are run
once after writing on a batch of another size than the traced one and compared with PyTorch; the
largest difference is in the sidecar (``PATH.json``), with the preprocessing, the input and output, the
threshold, the temperature and the checkpoint's sha256 (``aidetect.scores.checkpoint_facts``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aidetect.backbones import Preprocess
from aidetect.checkpoint import Checkpoint, load_checkpoint
from aidetect.data.loader import normalize_batch
from aidetect.errors import UserError
from aidetect.fileio import atomic_write_json, replaced_atomically
from aidetect.inference import checkpoint_preprocess, model_from_checkpoint
from aidetect.scores import checkpoint_facts

FORMAT = "aidetect-export/1"
OPSET = 18
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT, OUTPUT = "images", "logits"
TRACED_BATCH, CHECKED_BATCH = 2, 3  # the check runs another batch size than the traced one: N is dynamic


class Deployed(nn.Module):
    """uint8 N x S x S x 3 RGB images -> N logits: the loader's normalisation with ``preprocess``'s mean and
    std, then ``model``. Keep it in eval mode: exporters put a module back in the mode it was in, and train
    mode reaches the model's BatchNorm."""

    def __init__(self, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, preprocess.mean, preprocess.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(normalize_batch(images, mean=self.mean, std=self.std))


def export(checkpoint_path: str | Path, file_format: str, out: str | Path | None = None) -> Path:
    """Write the model of the checkpoint at ``checkpoint_path`` (eval mode, its weights, on the CPU) in
    ``file_format`` (``SUFFIXES``) to ``out`` (default: the checkpoint's path with the format's suffix),
    and its sidecar OUT.json; returns OUT. One-line ``UserError`` for an unknown format or a missing or
    unreadable checkpoint."""
    if file_format not in SUFFIXES:
        raise UserError(f"export format {file_format!r} is unknown; choose one of {', '.join(SUFFIXES)}")
    checkpoint = load_checkpoint(checkpoint_path)
    path = Path(out) if out else Path(checkpoint_path).with_suffix(SUFFIXES[file_format])
    path.parent.mkdir(parents=True, exist_ok=True)
    model = Deployed(model_from_checkpoint(checkpoint, torch.device("cpu")), checkpoint_preprocess(checkpoint)).eval()
    side = input_side(checkpoint)
    with replaced_atomically(path) as tmp, quiet_tracing():
        WRITERS[file_format](model, torch.zeros((TRACED_BATCH, side, side, 3), dtype=torch.uint8), tmp)
    check = torch.randint(0, 256, (CHECKED_BATCH, side, side, 3), dtype=torch.uint8, generator=torch.Generator())
    with torch.no_grad():
        difference = float(np.abs(run_exported(path, check.numpy()) - model(check).numpy()).max())
    atomic_write_json(sidecar_path(path), sidecar(path, file_format, checkpoint_path, checkpoint, difference))
    return path


def input_side(checkpoint: Checkpoint) -> int:
    """The side S of the images the checkpoint's model takes: its crop, else its pack's size."""
    return checkpoint.preprocess["crop"] or checkpoint.preprocess["size"]


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Without the tracer's notes that torch prints for every export: the deprecation of the TorchScript
    paths and the mean and std that ``normalize_batch`` makes tensors of (constants of the graph, as meant)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="torch.tensor results are registered as constants")
        yield


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
    )


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.jit.save(torch.jit.trace(model, example), str(path))


WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], None]] = {
    "onnx": write_onnx,
    "torchscript": write_torchscript,
}


def run_exported(path: str | Path, images: np.ndarray) -> np.ndarray:
    """The logits an exported model (ONNX under onnxruntime on the CPU, else TorchScript) gives ``images``
    (uint8 N x S x S x 3)."""
    if str(path).endswith(SUFFIXES["onnx"]):
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT], {INPUT: images})[0]
    with torch.no_grad(), quiet_tracing():
        return torch.jit.load(str(path), map_location="cpu")(torch.from_numpy(images)).numpy()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def sidecar(
    path: Path, file_format: str, checkpoint_path: str | Path, checkpoint: Checkpoint, difference: float
) -> dict[str, Any]:
    """What a consumer of the exported file at ``path`` needs: how to make its input, what its output means,
    which checkpoint it is, and how far it was from PyTorch on the check batch."""
    side = input_side(checkpoint)
    return {
        "format": FORMAT,
        "file": path.name,
        "export_format": file_format,
        "opset": OPSET if file_format == "onnx" else None,
        "input": {"name": INPUT, "dtype": "uint8", "layout": "NHWC", "shape": ["N", side, side, 3], "channels": "RGB"},
        "normalisation": "in the graph: x / 255, then (x - mean) / std per channel (preprocess.mean, .std)",
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["N"], "meaning": "one logit per image, > 0: fake"},
        **checkpoint_facts(checkpoint_path, checkpoint),
        "check_max_abs_diff": difference,
    }
