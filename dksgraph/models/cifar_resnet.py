"""CIFAR ResNets of He et al. (2016), Sec. 4.2: 6n+2 layers, 16/32/64 channels, option-A shortcuts.

Example::

    >>> m = resnet32(num_classes=10)
    >>> sum(p.numel() for p in m.parameters())   # the paper's 0.46M
    464154
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18

__all__ = ["CifarBasicBlock", "CifarResNet", "resnet110", "resnet1202", "resnet32"]


class CifarBasicBlock(nn.Module):
    """Two 3x3 convolutions with a parameter-free shortcut (strided identity, zero-padded channels)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def spawn(self, in_channels: int, out_channels: int, stride: int) -> CifarBasicBlock:
        """A freshly initialised block of this kind with other channels and stride."""
        return type(self)(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1:
            shortcut = shortcut[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra > 0:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """conv3x3(16) -> layer1 (16) -> layer2 (32, /2) -> layer3 (64, /2) -> pool -> fc."""

    def __init__(self, depth: int = 32, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        channels = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(CifarBasicBlock(channels, width, 2 if (i > 0 and j == 0) else 1))
                channels = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The network's initialisation (dksgraph re-runs it over fresh branches)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, num_classes)


def resnet1202(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(1202, num_classes)


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (a 3x3 stride-1 convolution, no max-pool), the network
    of BYOT's CIFAR-100 results (Zhang et al. 2019): 4 stages at 32, 16, 8, 4 pixels for a 32x32 input."""
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
