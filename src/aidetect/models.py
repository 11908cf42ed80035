"""Models by name: the original project's two CNNs, layer by layer, and torchvision backbones.

Every model maps N x 3 x S x S images to N logits (one per image, positive = AI-generated), to be
trained with ``BCEWithLogitsLoss``, which is stable under autocast unlike Sigmoid + BCELoss.
Pretrained weights come from a local file only: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from aidetect.backbones import PREFIX, TimmBinary
from aidetect.errors import UserError
from aidetect.npr import npr_resnet50, npr_small


class SeedCNN1(nn.Module):
    """The original project's first model: three conv3x3 + ReLU + MaxPool2 blocks, then two linear layers.

    At 128 px the flatten has 128 x 16 x 16 = 32768 features and the model ~4.29 M parameters.
    """

    def __init__(self, image_size: int = 128) -> None:
        super().__init__()
        if image_size % 8:
            raise UserError(f"seed_cnn1 needs an image size divisible by 8, got {image_size}")
        layers, channels = [], 3
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * (image_size // 8) ** 2, 128), nn.ReLU(inplace=True), nn.Linear(128, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).squeeze(1)


def conv_bn_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SeedCNN2(nn.Module):
    """The original project's second model: five conv + BN + ReLU + MaxPool blocks (32..512 channels), a
    skip from block 2 (64 ch) through a 1x1 conv to 512 ch, resized to block 5 and added; global average
    pooling and a 512-256-128-1 head (~1.77 M parameters)."""

    def __init__(self, image_size: int = 128) -> None:
        super().__init__()
        widths = (32, 64, 128, 256, 512)
        self.blocks = nn.ModuleList(conv_bn_block(a, b) for a, b in zip((3, *widths[:-1]), widths, strict=True))
        self.skip = nn.Conv2d(64, 512, 1)
        self.head = nn.Sequential(
            nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, 128), nn.ReLU(inplace=True), nn.Linear(128, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = None
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == 1:
                skip = self.skip(x)
        x = x + F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)).squeeze(1)


class TorchvisionBinary(nn.Module):
    """A torchvision classifier with its last linear layer replaced by a 1-logit one."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.net = getattr(torchvision.models, name)(weights=None)
        parent, attribute, last = last_linear(self.net)
        setattr(parent, attribute, nn.Linear(last.in_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def last_linear(net: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute name, layer) of the last nn.Linear: ``fc`` or the end of ``classifier``."""
    named = [(name, module) for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    name, layer = named[-1]
    parent_name, _, attribute = name.rpartition(".")
    return net.get_submodule(parent_name) if parent_name else net, attribute, layer


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "seed_cnn1": SeedCNN1,
    "seed_cnn2": SeedCNN2,
    "npr_resnet50": npr_resnet50,
    "npr_small": npr_small,
    **{
        name: (lambda size, name=name: TorchvisionBinary(name))
        for name in ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny")
    },
}


def build_model(name: str, image_size: int, pretrained: str | None = None) -> nn.Module:
    """``name`` is one of ``MODELS`` or ``timm:ARCH`` (``aidetect.backbones``)."""
    if name.startswith(PREFIX):
        return TimmBinary(name.removeprefix(PREFIX), image_size)
    if name not in MODELS:
        raise UserError(f"model.name {name!r} is unknown; choose one of {', '.join(MODELS)}")
    model = MODELS[name](image_size)
    if pretrained:
        load_pretrained(model, Path(pretrained))
    return model


def load_pretrained(model: nn.Module, path: Path) -> None:
    """Load local weights (e.g. torchvision's ImageNet file), keeping our own 1-logit head."""
    if not path.is_file():
        raise UserError(f"{path}: pretrained weights not found (model.pretrained takes a local file path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a loadable weights file ({type(exc).__name__}); pass a state_dict .pth") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    target = model.net if isinstance(model, TorchvisionBinary) else model
    own = target.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not compatible:
        raise UserError(f"{path}: none of its tensors fit this model; is it for another architecture?")
    target.load_state_dict(compatible, strict=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
