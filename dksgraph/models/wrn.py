"""Wide ResNets of Zagoruyko & Komodakis (2016): pre-activation blocks, widths 16k/32k/64k.

Example::

    >>> m = wrn28_10(num_classes=10)
    >>> round(sum(p.numel() for p in m.parameters()) / 1e6, 1)   # the paper's 36.5M
    36.5
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PreActBlock", "WideResNet", "wrn28_10", "wrn28_4"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 with a 1x1 projection shortcut when shapes change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride, self.dropout_p = in_channels, out_channels, stride, dropout
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)

    def spawn(self, in_channels: int, out_channels: int, stride: int) -> PreActBlock:
        """A freshly initialised block of this kind with other channels and stride."""
        return type(self)(in_channels, out_channels, stride, self.dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(o)))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """conv3x3(16) -> block1 (16k) -> block2 (32k, /2) -> block3 (64k, /2) -> BN-ReLU -> pool -> fc."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        channels = 16
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(channels, width, 2 if (i > 0 and j == 0) else 1, dropout))
                channels = width
            self.add_module(f"block{i + 1}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The network's initialisation (dksgraph re-runs it over fresh branches)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.avgpool(x).flatten(1))


def wrn28_4(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    return WideResNet(28, 4, num_classes, dropout)


def wrn28_10(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    return WideResNet(28, 10, num_classes, dropout)
