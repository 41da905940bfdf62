"""CIFAR DenseNets of Huang et al. (2017): three dense blocks of growth k, 32x32 inputs.

``densenet40`` and ``densenet100`` are the plain (non-BC) nets with k=12; ``densenet_bc100`` has
bottleneck layers and 0.5 compression. Every dense layer returns ``cat([x, new])`` so each layer
output is a block boundary that ``dksgraph inspect`` can list.

Example::

    >>> m = densenet40(num_classes=10)
    >>> round(sum(p.numel() for p in m.parameters()) / 1e6, 2)   # the paper's 1.0M
    1.02
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CifarDenseNet", "DenseLayer", "Transition", "dense_block", "densenet100", "densenet40", "densenet_bc100"]


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 (with a BN-ReLU-conv1x1 bottleneck to 4k when ``bottleneck``), concatenated."""

    def __init__(self, in_channels: int, growth: int, bottleneck: bool = False) -> None:
        super().__init__()
        self.in_channels, self.growth, self.bottleneck = in_channels, growth, bottleneck
        layers: list[nn.Module] = []
        channels = in_channels
        if bottleneck:
            layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, 4 * growth, 1, bias=False)]
            channels = 4 * growth
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, growth, 3, 1, 1, bias=False)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.body(x)], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2: halves the resolution, compresses the channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.norm(x))))


def dense_block(in_channels: int, layers: int, growth: int, bottleneck: bool) -> nn.Sequential:
    block = nn.Sequential()
    for i in range(layers):
        block.add_module(f"denselayer{i + 1}", DenseLayer(in_channels + i * growth, growth, bottleneck))
    return block


class CifarDenseNet(nn.Module):
    """features = conv0, denseblock1, transition1, denseblock2, transition2, denseblock3, norm5, relu5."""

    def __init__(
        self, depth: int = 40, growth: int = 12, bottleneck: bool = False, compression: float = 1.0, num_classes: int = 10
    ) -> None:
        super().__init__()
        per_block = (depth - 4) // 3 // (2 if bottleneck else 1)
        channels = 2 * growth if bottleneck else 16
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, channels, 3, 1, 1, bias=False))
        for i in range(3):
            self.features.add_module(f"denseblock{i + 1}", dense_block(channels, per_block, growth, bottleneck))
            channels += per_block * growth
            if i < 2:
                out = int(channels * compression)
                self.features.add_module(f"transition{i + 1}", Transition(channels, out))
                channels = out
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.features.add_module("relu5", nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The network's initialisation (dksgraph re-runs it over fresh branches)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def densenet40(num_classes: int = 10) -> CifarDenseNet:
    return CifarDenseNet(40, 12, False, 1.0, num_classes)


def densenet100(num_classes: int = 10) -> CifarDenseNet:
    return CifarDenseNet(100, 12, False, 1.0, num_classes)


def densenet_bc100(num_classes: int = 10) -> CifarDenseNet:
    return CifarDenseNet(100, 12, True, 0.5, num_classes)
