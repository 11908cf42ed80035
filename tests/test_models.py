from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aidetect.backbones import Preprocess
from aidetect.errors import UserError
from aidetect.metrics import Predictions, compute_metrics
from aidetect.models import MODELS, build_model, count_parameters, preprocess_of


def test_seed_models_are_the_original_architectures() -> None:
    assert count_parameters(build_model("seed_cnn1", 128)) == 4_287_809  # flatten 32768 at 128 px
    assert count_parameters(build_model("seed_cnn2", 128)) == 1_768_193
    assert build_model("seed_cnn1", 128).classifier[1].in_features == 32768


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_gives_one_logit_per_image(name: str) -> None:
    model = build_model(name, 64).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2,)


def test_pretrained_weights_load_from_a_local_file_and_keep_the_head(tmp_path: Path) -> None:
    import torchvision

    imagenet = torchvision.models.resnet18(weights=None)  # stands in for a downloaded ImageNet file
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("resnet18", 64, pretrained=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.net.conv1.weight, imagenet.conv1.weight)
    assert model.net.fc.out_features == 1
    with pytest.raises(UserError, match="pretrained weights not found"):
        build_model("resnet18", 64, pretrained=str(tmp_path / "missing.pth"))


def test_metrics_from_known_predictions() -> None:
    predictions = Predictions(probabilities=[0.9, 0.8, 0.3, 0.6, 0.1], labels=[1, 1, 1, 0, 0], loss_sum=2.5)
    metrics = compute_metrics(predictions)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (2, 1, 1, 1)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["auroc"] == pytest.approx(5 / 6)  # 5 of the 6 (fake, real) pairs are ordered right
    assert metrics["loss"] == pytest.approx(0.5)


def test_timm_backbones_give_one_logit_and_their_own_preprocessing() -> None:
    vit, cnn = build_model("timm:test_vit", 32).eval(), build_model("timm:test_resnet", 48).eval()
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 32, 32)).shape == (2,) and cnn(torch.randn(2, 3, 48, 48)).shape == (2,)
    assert vit.preprocess == preprocess_of("timm:test_vit", 32) == Preprocess((0.5,) * 3, (0.5,) * 3, 32)
    assert preprocess_of("timm:test_vit", None).side == 160  # timm's own side for fixed-size backbones
    assert cnn.preprocess.side is None and preprocess_of("resnet18", None).side is None
