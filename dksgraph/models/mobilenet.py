"""MobileNet v1 (Howard et al., 2017) for 32x32 inputs, as Deep Mutual Learning used it on CIFAR-100.

The stem is not strided, so a 32x32 image reaches the last depthwise-separable block at 2x2.

Example::

    >>> m = mobilenet(num_classes=100)
    >>> round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
    3.3
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CONFIG", "ConvBNReLU", "DepthwiseSeparable", "MobileNetCifar", "mobilenet"]

# (output channels, stride) of the 13 depthwise-separable blocks; the stem is a plain 3x3 conv to 32.
CONFIG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.dw = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def spawn(self, in_channels: int, out_channels: int, stride: int) -> DepthwiseSeparable:
        """A freshly initialised block of this kind with other channels and stride."""
        return type(self)(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn2(self.pw(self.relu(self.bn1(self.dw(x))))))


class MobileNetCifar(nn.Module):
    def __init__(self, num_classes: int = 100, width: float = 1.0) -> None:
        super().__init__()
        channels = int(32 * width)
        blocks: list[nn.Module] = [ConvBNReLU(3, channels)]
        for out, stride in CONFIG:
            blocks.append(DepthwiseSeparable(channels, int(out * width), stride))
            channels = int(out * width)
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The network's initialisation (dksgraph re-runs it over fresh branches)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.features(x)).flatten(1))


def mobilenet(num_classes: int = 100, width: float = 1.0) -> MobileNetCifar:
    return MobileNetCifar(num_classes, width)
