"""timm backbones as 1-logit detectors: any ``timm:NAME`` model (ViTs, CLIP/EVA/DINOv2 image towers, CNNs).

Contract every ``TimmBinary`` keeps (the feature cache and the probe rely on it):
``model.backbone(images)`` maps N x 3 x S x S normalised images to N x D pooled features (timm's
``num_classes=0`` model), ``model.head`` is ``nn.Linear(D, 1)``, and ``model(images) ==
model.head(model.backbone(images)).squeeze(1)``. ``model.preprocess`` is the backbone's input side, mean
and std, from timm's pretrained config (``preprocess_of``): the loader normalises with these.

How much of it trains (``model.tune``, ``tune``): ``full``; ``probe``, the head on a frozen backbone
(UnivFD); ``last:N``, the last N blocks of timm's grouping (ViT ``blocks``, CNN stages), the final norm
and the head; ``lora``, peft LoRA adapters and the head: on the attention projections of a ViT, or on
the dense convolutions and linear layers of a CNN's last stage (ConvNeXt's pointwise MLPs; depthwise
convolutions are left out). Frozen modules stay in eval mode when the model is put in training mode:
their BatchNorm statistics and dropout are frozen too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import timm
import torch
from timm.models._manipulate import group_parameters
from torch import nn

from aidetect.errors import UserError

PREFIX = "timm:"
TUNES = "full, probe, last:N (N >= 1) or lora"
ATTENTION = re.compile(r"(.*\.)?attn\.(qkv|q_proj|k_proj|v_proj|proj)")


@dataclass(frozen=True)
class Preprocess:
    """How a model's input is made: ``side`` x ``side`` pixels (None: any side), scaled to [0, 1], then
    ``(x - mean) / std`` per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    side: int | None = None


@dataclass(frozen=True)
class Tuning:
    """What trains: ``tune`` (``model.tune``) and, for ``lora``, the adapters' rank and alpha."""

    tune: str
    lora_rank: int
    lora_alpha: float


class TimmBinary(nn.Module):
    """A timm backbone (``num_classes=0``: pooled features) and a 1-logit linear head."""

    def __init__(self, arch: str, image_size: int | None = None) -> None:
        super().__init__()
        self.backbone = create_backbone(arch, image_size)
        self.head = nn.Linear(self.backbone.num_features, 1)
        self.preprocess = preprocess_of(arch, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(1)

    def train(self, mode: bool = True) -> TimmBinary:
        """Training mode for what trains; every module whose parameters are all frozen stays in eval mode."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                parameters = list(module.parameters())
                if parameters and not any(p.requires_grad for p in parameters):
                    module.eval()
        return self


def check_arch(arch: str) -> None:
    """``UserError`` unless timm knows ``arch`` (with or without a pretrained tag such as ``.openai``)."""
    if arch not in timm.list_models(pretrained=True) and arch not in timm.list_models():
        raise UserError(f"model.name timm:{arch}: timm has no such model; see timm.list_models('*vit*')")


def preprocess_of(arch: str, image_size: int | None) -> Preprocess:
    """timm's mean and std for ``arch``; its side for fixed-size backbones (``image_size``, else timm's)."""
    check_arch(arch)
    config = timm.models.get_pretrained_cfg(arch)
    if config is None:  # an architecture without pretrained configs: timm's defaults
        return Preprocess(timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
    side = (image_size or config.input_size[-1]) if config.fixed_input_size else None
    return Preprocess(tuple(config.mean), tuple(config.std), side)


def create_backbone(arch: str, image_size: int | None) -> nn.Module:
    """timm's ``arch`` without its classifier and without weights (loaded apart, from a local file);
    ``image_size`` sets the input side of models with a fixed one (ViTs: their position embeddings)."""
    check_arch(arch)
    fixed = timm.models.get_pretrained_cfg(arch)
    size = {"img_size": image_size} if image_size and fixed and fixed.fixed_input_size else {}
    return timm.create_model(arch, pretrained=False, num_classes=0, **size)


def parse_tune(tune: str) -> int | None:
    """N of ``last:N``; None for ``full``, ``probe`` and ``lora``; a one-line ``UserError`` otherwise."""
    kind, colon, count = tune.partition(":")
    if kind in ("full", "probe", "lora") and not colon:
        return None
    if kind == "last" and count.isdigit() and int(count) >= 1:
        return int(count)
    raise UserError(f"config key model.tune must be {TUNES}, got {tune!r}")


def apply_tuning(model: TimmBinary, tuning: Tuning) -> None:
    """Freeze what ``tuning.tune`` does not train (see the module's docstring); ``lora`` adds the adapters."""
    count = parse_tune(tuning.tune)
    if tuning.tune == "full":
        return
    model.backbone.requires_grad_(False)
    if count is not None:
        for name in last_blocks(model.backbone, count):
            model.backbone.get_parameter(name).requires_grad_(True)
    if tuning.tune == "lora":
        add_lora(model.backbone, tuning.lora_rank, tuning.lora_alpha)


def last_blocks(backbone: nn.Module, count: int) -> list[str]:
    """The parameter names of the last ``count`` blocks of timm's coarse grouping and everything after them
    (the final norm); a one-line ``UserError`` for a model without blocks or with fewer than ``count``."""
    matcher = backbone.group_matcher(coarse=True) if hasattr(backbone, "group_matcher") else None
    if not isinstance(matcher, dict) or "blocks" not in matcher:
        raise UserError(f"model.tune last:{count}: this timm model names no blocks; use full, probe or lora")
    rules = matcher["blocks"] if isinstance(matcher["blocks"], list) else [(matcher["blocks"], None)]
    numbered = [re.compile(pattern) for pattern, ordinal in rules if ordinal is None]
    groups = list(group_parameters(backbone, matcher).values())
    blocks = [i for i, names in enumerate(groups) if any(p.match(n) for p in numbered for n in names)]
    if len(blocks) < count:
        raise UserError(f"model.tune last:{count}: this timm model has {len(blocks)} blocks; use at most that")
    return [name for names in groups[blocks[-count] :] for name in names]


def lora_targets(backbone: nn.Module) -> list[str]:
    """The modules LoRA adapts: a ViT's attention projections; else the last block's dense convolutions and
    linear layers (CNNs: their last stage)."""
    attention = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and ATTENTION.fullmatch(n)]
    if attention:
        return attention
    last = set(last_blocks(backbone, 1))
    return [
        name
        for name, module in backbone.named_modules()
        if (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1))
        and f"{name}.weight" in last
    ]


def add_lora(backbone: nn.Module, rank: int, alpha: float) -> None:
    """peft LoRA adapters (the only trainable part of ``backbone`` after this) on ``lora_targets``."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(backbone)
    if not targets:
        raise UserError("model.tune lora: this timm model has no attention projections or convolutions to adapt")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), backbone)
