"""NPR: a ResNet on the neighbouring-pixel residual, a detector built for up-samplers it was not trained on.

Tan et al., "Rethinking the Up-Sampling Operations in CNN-based Generative Network for Generalizable
Deepfake Detection" (CVPR 2024). A generator's up-sampling makes the pixels of each 2 x 2 block depend on
each other in a way that natural images do not; NPR shows the network only that, the residual
``x - up(down(x))`` with nearest 2x down- and up-sampling: each pixel minus the top-left pixel of its
2 x 2 block. Whatever survives nearest up-sampling (the image content at half resolution) is removed
before the first convolution.

``npr_resnet50`` follows the authors' code: the residual times 2/3 into a 3 x 3 stride-2 convolution (64
channels), batch norm, ReLU and a 3 x 3 stride-2 max pool, then ResNet-50's first two stages only
(bottleneck blocks, 3 and 4 of them, 256 and 512 channels), global average pooling and a 512 -> 1 linear
layer; Kaiming-normal (fan out) convolutions, no pretrained weights (~1.44 M parameters). ``npr_small``
is the same network with basic blocks, one per stage, 32, 64 and 128 channels (~0.3 M parameters), for CPUs.

The loader normalises images with per-channel mean and std. The residual is linear, so on a normalised
image it is the residual of the [0, 1] image divided by each channel's std (the mean cancels): a fixed
per-channel scale that the first convolution absorbs. The authors' code computes it on normalised images
too.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

NPR_SCALE = 2.0 / 3.0  # the authors' constant on the residual before the first convolution


def nearest_up_down(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N x C x H x W) down-sampled 2x by nearest neighbour (the top-left pixel of each 2 x 2 block)
    and brought back to H x W by nearest neighbour: each block filled with its top-left pixel. Odd sizes
    work: the last row or column is a block of its own."""
    height, width = x.shape[-2:]
    low = x[..., ::2, ::2]
    return low.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., :height, :width]


def neighbouring_pixel_residual(x: torch.Tensor) -> torch.Tensor:
    """``x - up(down(x))``: zero wherever ``x`` is constant on the 2 x 2 blocks of the even grid; for
    even sizes equal to the authors' ``x - interpolate(interpolate(x, 0.5), 2)`` (mode nearest)."""
    return x - nearest_up_down(x)


class NPRResNet(nn.Module):
    """The residual (times ``NPR_SCALE``) through a ResNet stem and the given stages; one logit per image.

    ``stages`` is ``(channels, blocks)`` per stage; every stage after the first halves the resolution,
    as ResNet's layer2 does. The block's ``expansion`` multiplies the channels (4 for bottlenecks)."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], stages: tuple[tuple[int, int], ...], stem: int = 64
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers, channels = [], stem
        for index, (planes, blocks) in enumerate(stages):
            stage, channels = make_stage(block, channels, planes, blocks, stride=1 if index == 0 else 2)
            layers.append(stage)
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(neighbouring_pixel_residual(x) * NPR_SCALE))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)).squeeze(1)


def make_stage(
    block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, blocks: int, stride: int
) -> tuple[nn.Sequential, int]:
    """A ResNet stage as torchvision builds it (1 x 1 projection on the shortcut where the shape changes);
    returns it and its output channels."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers), out


def npr_resnet50(image_size: int = 224) -> NPRResNet:
    """The authors' NPR network: ResNet-50's stem (3 x 3 stride-2 conv) and layer1-layer2 on the residual.
    Any image size of 2 px or more (``image_size`` is not needed: global pooling)."""
    return NPRResNet(Bottleneck, ((64, 3), (128, 4)))


def npr_small(image_size: int = 96) -> NPRResNet:
    """A narrow NPR network for CPUs: a 32-channel stem and one basic block per stage (32, 64, 128 channels)."""
    return NPRResNet(BasicBlock, ((32, 1), (64, 1), (128, 1)), stem=32)
