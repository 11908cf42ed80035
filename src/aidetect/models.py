"""Models by name: the original project's two CNNs, layer by layer, torchvision backbones, and any timm
backbone as ``timm:ARCH`` (``aidetect.backbones``, with ``model.tune``).

Every model maps N x 3 x S x S images to N logits (one per image, positive = AI-generated), to be
trained with ``BCEWithLogitsLoss``, which is stable under autocast unlike Sigmoid + BCELoss.
Pretrained weights come from local files only (``aidetect.weights``): nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from aidetect import weights
from aidetect.backbones import PREFIX, Preprocess, TimmBinary, Tuning, apply_tuning, check_arch, parse_tune
from aidetect.backbones import preprocess_of as timm_preprocess
from aidetect.data.integrity import sha256_file
from aidetect.data.transforms import IMAGENET_MEAN, IMAGENET_STD
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


def build_model(name: str, image_size: int, pretrained: str | None = None, tuning: Tuning | None = None) -> nn.Module:
    """``name`` is one of ``MODELS`` or ``timm:ARCH`` (``aidetect.backbones``: ``image_size`` is then the input
    side of fixed-size backbones, ``preprocess_of``'s). ``pretrained``: ``model.pretrained``, loaded into a
    timm backbone before ``tuning`` is applied (None: all of it trains); the weights' path and sha256 are
    kept as ``model.weights`` (None without)."""
    check_model(name, tuning.tune if tuning else "full")
    if name.startswith(PREFIX):
        model = TimmBinary(name.removeprefix(PREFIX), image_size)
        model.weights = weights.load_backbone_weights(model.backbone, pretrained) if pretrained else None
        if tuning:
            apply_tuning(model, tuning)
        return model
    model = MODELS[name](image_size)
    model.weights = load_pretrained(model, pretrained) if pretrained else None
    return model


def check_model(name: str, tune: str) -> None:
    """One line for a name that is neither in ``MODELS`` nor a timm model, a bad ``model.tune``, or a tune
    other than full of a model that is not a timm backbone."""
    parse_tune(tune)
    if name.startswith(PREFIX):
        check_arch(name.removeprefix(PREFIX))
        return
    if name not in MODELS:
        raise UserError(f"config key model.name {name!r} is unknown; choose one of {', '.join(MODELS)} or timm:ARCH")
    if tune != "full":
        raise UserError(f"model.tune {tune} needs a timm backbone (model.name timm:ARCH); {name} trains in full")


def preprocess_of(name: str, input_size: int | None) -> Preprocess:
    """How model ``name``'s inputs are made: a timm backbone's mean, std and (fixed-size ones) side, with
    ``input_size`` (``model.input_size``) as that side when set; ImageNet's mean and std at any side for
    the others."""
    if name.startswith(PREFIX):
        return timm_preprocess(name.removeprefix(PREFIX), input_size)
    return Preprocess(IMAGENET_MEAN, IMAGENET_STD)


def load_pretrained(model: nn.Module, spec: str) -> weights.LoadedWeights:
    """Load local weights (e.g. torchvision's ImageNet file), keeping our own 1-logit head."""
    path = weights.resolve(spec)
    state = weights.read_state(path)
    target = model.net if isinstance(model, TorchvisionBinary) else model
    own = target.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not compatible:
        raise UserError(f"{path}: none of its tensors fit this model; is it for another architecture?")
    target.load_state_dict(compatible, strict=False)
    return weights.LoadedWeights(path, sha256_file(path), len(compatible), len(own))


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), count_parameters(model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
