"""timm backbones as 1-logit detectors: any ``timm:NAME`` model (ViTs, CLIP/EVA/DINOv2 image towers, CNNs).

Contract every ``TimmBinary`` keeps (the feature cache and the probe rely on it):
``model.backbone(images)`` maps N x 3 x S x S normalised images to N x D pooled features (timm's
``num_classes=0`` model), ``model.head`` is ``nn.Linear(D, 1)``, and ``model(images) ==
model.head(model.backbone(images)).squeeze(1)``. ``model.preprocess`` is the backbone's input side, mean
and std, from timm's pretrained config: the loader normalises with these.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from aidetect.errors import UserError

PREFIX = "timm:"


@dataclass(frozen=True)
class Preprocess:
    """How a model's input is made: ``side`` x ``side`` pixels (None: any side), scaled to [0, 1], then
    ``(x - mean) / std`` per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    side: int | None = None


class TimmBinary(nn.Module):
    """A timm backbone (``num_classes=0``: pooled features) and a 1-logit linear head."""

    def __init__(self, arch: str, image_size: int | None = None) -> None:
        super().__init__()
        self.backbone = create_backbone(arch, image_size)
        self.head = nn.Linear(self.backbone.num_features, 1)
        config = self.backbone.pretrained_cfg
        side = image_size or config["input_size"][-1] if config.get("fixed_input_size") else None
        self.preprocess = Preprocess(tuple(config["mean"]), tuple(config["std"]), side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(1)


def create_backbone(arch: str, image_size: int | None) -> nn.Module:
    """timm's ``arch`` without its classifier and without weights (loaded apart, from a local file);
    ``image_size`` sets the input side of models with a fixed one (ViTs: their position embeddings)."""
    if arch not in timm.list_models(pretrained=True) and arch not in timm.list_models():
        raise UserError(f"model.name timm:{arch}: timm has no such model; see timm.list_models('*vit*')")
    fixed = timm.models.get_pretrained_cfg(arch)
    size = {"img_size": image_size} if image_size and fixed and fixed.fixed_input_size else {}
    return timm.create_model(arch, pretrained=False, num_classes=0, **size)
