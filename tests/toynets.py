"""Small backbones for tests: a block family without a dksgraph builder, and an untraceable net."""

import os

import torch
from torch import nn


class OddBlock(nn.Module):
    """A residual block dksgraph has no builder for (so it falls back to copying)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.skip(x))


class OddNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.stage1 = nn.Sequential(OddBlock(8, 8, 1), OddBlock(8, 8, 1))
        self.stage2 = nn.Sequential(OddBlock(8, 16, 2), OddBlock(16, 16, 1))
        self.stage3 = nn.Sequential(OddBlock(16, 32, 2), OddBlock(32, 32, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class Gate(nn.Module):
    """Data-dependent control flow: FX cannot trace through it."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class GatedNet(OddNet):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.stage2[1] = nn.Sequential(OddBlock(16, 16, 1), Gate())

    def forward(self, x):
        return super().forward(x)


def odd_net(num_classes: int = 10) -> OddNet:
    return OddNet(num_classes)


def gated_net(num_classes: int = 10) -> GatedNet:
    return GatedNet(num_classes)


class DropNet(OddNet):
    """OddNet with dropout before the classifier: training consumes the RNG."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def drop_net(num_classes: int = 10) -> DropNet:
    return DropNet(num_classes)


class GlobalPool(nn.Module):
    """A composite, parameter-free global pool (like timm's SelectAdaptivePool2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(x)


class TreeNet(nn.Module):
    """DLA's layout: Sequential stem levels, then downsampling levels that are the network's own
    children (no stage container), and a head that pools in a composite module and reads a parameter
    directly (a learned temperature)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.level0 = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.level1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.level2 = OddBlock(16, 32, 2)
        self.level3 = OddBlock(32, 48, 2)
        self.level4 = OddBlock(48, 64, 2)
        self.global_pool = GlobalPool()
        self.scale = nn.Parameter(torch.full((1,), 2.0))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.level4(self.level3(self.level2(self.level1(self.level0(x)))))
        return self.fc(self.global_pool(x).flatten(1) * self.scale)


def tree_net(num_classes: int = 10) -> TreeNet:
    return TreeNet(num_classes)


class RecordingDropout(nn.Dropout):
    """Dropout that appends each training mask (as 0/1 string) to $DKS_TEST_RECORD/rank$RANK.txt."""

    def forward(self, x):
        out = super().forward(x)
        folder = os.environ.get("DKS_TEST_RECORD")
        if self.training and folder:
            mask = "".join("0" if v == 0 else "1" for v in out.flatten()[:64].tolist())
            with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.txt"), "a") as f:
                f.write(mask + "\n")
        return out


def recording_drop_net(num_classes: int = 10) -> DropNet:
    net = DropNet(num_classes)
    net.drop = RecordingDropout(0.5)
    return net


class CountingBatchNorm(nn.BatchNorm2d):
    """A user's replacement module that counts its calls."""

    calls = 0

    def forward(self, x):
        CountingBatchNorm.calls += 1
        return super().forward(x)


class UpNet(nn.Module):
    """An encoder-decoder classifier: the resolution goes down, then up again before the head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.down1 = nn.Sequential(OddBlock(8, 16, 2), OddBlock(16, 16, 1))
        self.down2 = nn.Sequential(OddBlock(16, 32, 2), OddBlock(32, 32, 1))
        self.up = nn.Sequential(UpBlock(32, 16), OddBlock(16, 16, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.up(self.down2(self.down1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 2, 2)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def up_net(num_classes: int = 10) -> UpNet:
    return UpNet(num_classes)
