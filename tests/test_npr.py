"""NPR: the network sees only the neighbouring-pixel residual, and trains through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.commands import run_cli
from helpers.training import weights
from torch.nn import functional as F

from aidetect.models import build_model, count_parameters
from aidetect.npr import nearest_up_down, neighbouring_pixel_residual


def test_npr_resnet50_is_the_authors_network_and_npr_small_is_small() -> None:
    large = build_model("npr_resnet50", 96)
    assert count_parameters(large) == 1_437_761  # ResNet-50's stem conv (3 x 3) and layer1-layer2, 512 -> 1
    assert large.fc.in_features == 512 and large.stem[0].kernel_size == (3, 3) and large.stem[0].stride == (2, 2)
    assert [len(stage) for stage in large.stages] == [3, 4]
    assert 100_000 <= count_parameters(build_model("npr_small", 96)) <= 500_000
    with torch.no_grad():
        assert build_model("npr_small", 96).eval()(torch.randn(2, 3, 95, 96)).shape == (2,)  # odd sizes too


def test_residual_is_the_authors_nearest_down_and_up_sampling() -> None:
    x = torch.randn(2, 3, 8, 10)
    once = F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True)
    twice = F.interpolate(once, scale_factor=2.0, mode="nearest", recompute_scale_factor=True)
    torch.testing.assert_close(neighbouring_pixel_residual(x), x - twice)
    assert neighbouring_pixel_residual(x)[..., ::2, ::2].abs().max() == 0  # each block's top-left pixel


@pytest.mark.parametrize("name", ["npr_small", "npr_resnet50"])
def test_output_ignores_whatever_survives_nearest_upsampling(name: str) -> None:
    """Adding any image that is constant on the 2 x 2 blocks (half-resolution content brought up by
    nearest neighbour) changes no logit; a change of one pixel within its block does."""
    torch.manual_seed(0)
    model = build_model(name, 32).eval()
    x = torch.randn(4, 3, 32, 32)
    blocks = nearest_up_down(10 * torch.randn(4, 3, 32, 32))
    other = x.clone()
    other[:, :, 5, 7] += 3.0  # pixel (5, 7) is not its block's top-left one
    with torch.no_grad():
        torch.testing.assert_close(model(x + blocks), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(blocks), model(torch.zeros_like(x)), rtol=1e-4, atol=1e-4)
        assert (model(other) - model(x)).abs().min() > 1e-6


def test_npr_small_trains_one_epoch_from_the_command_line(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--config", "npr_small", "--data", str(tiny_pack), "--out", str(out), "--epochs", "1"]
    result = run_cli("train", *args, "--set", "data.batch_size=16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert weights(out).keys() == build_model("npr_small", 32).state_dict().keys()
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["samples"] > 0 and 0.0 <= metrics["auroc"] <= 1.0
