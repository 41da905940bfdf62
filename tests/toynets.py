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


# ------------------------------------------------------------------ layouts of hand-written CIFAR models
# (the patterns of a popular public collection of CIFAR networks, written small here)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([self.conv(torch.relu(self.bn(x))), x], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return nn.functional.avg_pool2d(self.conv(torch.relu(self.bn(x))), 2)


class FlatDenseNet(nn.Module):
    """Dense stages and transitions as siblings at the top level; functional pooling in the head."""

    def __init__(self, num_classes: int = 10, growth: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        channels = 8
        for i in range(4):
            dense = nn.Sequential(*[DenseLayer(channels + j * growth, growth) for j in range(2)])
            channels += 2 * growth
            setattr(self, f"dense{i + 1}", dense)
            if i < 3:
                setattr(self, f"trans{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = self.dense4(out)
        out = nn.functional.avg_pool2d(torch.relu(self.bn(out)), 4)
        return self.linear(out.view(out.size(0), -1))


def flat_densenet(num_classes: int = 10) -> FlatDenseNet:
    return FlatDenseNet(num_classes)


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(cin, c1, 1), nn.BatchNorm2d(c1), nn.ReLU(True))
        self.b3 = nn.Sequential(nn.Conv2d(cin, c3, 3, padding=1), nn.BatchNorm2d(c3), nn.ReLU(True))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x)], 1)


class TwicePoolNet(nn.Module):
    """One MaxPool2d module called twice between inception stages, and a fixed-size AvgPool2d(8) head pool."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.pre_layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(True))
        self.a3, self.b3 = Inception(8, 4, 4), Inception(8, 4, 4)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.a4, self.b4 = Inception(8, 8, 8), Inception(16, 8, 8)
        self.a5, self.b5 = Inception(16, 8, 8), Inception(16, 16, 16)
        self.avgpool = nn.AvgPool2d(8, stride=1)
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = self.b3(self.a3(self.pre_layers(x)))
        out = self.maxpool(out)
        out = self.b4(self.a4(out))
        out = self.maxpool(out)
        out = self.b5(self.a5(out))
        out = self.avgpool(out)
        return self.linear(out.view(out.size(0), -1))


def twice_pool_net(num_classes: int = 10) -> TwicePoolNet:
    return TwicePoolNet(num_classes)


class Cell(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.sep = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                 nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.sep(x) + self.skip(x))


class ReductionCellNet(nn.Module):
    """Normal-cell stages with single reduction cells between them, all at the top level."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.layer1 = nn.Sequential(Cell(8, 8, 1), Cell(8, 8, 1))
        self.layer2 = Cell(8, 16, 2)
        self.layer3 = nn.Sequential(Cell(16, 16, 1), Cell(16, 16, 1))
        self.layer4 = Cell(16, 32, 2)
        self.layer5 = nn.Sequential(Cell(32, 32, 1), Cell(32, 32, 1))
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = torch.relu(self.conv1(x))
        out = self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(out)))))
        out = nn.functional.avg_pool2d(out, 8)
        return self.linear(out.view(out.size(0), -1))


def reduction_cell_net(num_classes: int = 10) -> ReductionCellNet:
    return ReductionCellNet(num_classes)


class FunctionalPoolNet(nn.Module):
    """Stride-1 stages with functional max-pooling between them in the top-level forward: no module performs
    a downsampling, so only a copy of the graph (a segment branch) can reproduce it."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.stage1 = nn.Sequential(OddBlock(8, 8, 1), OddBlock(8, 8, 1))
        self.stage2 = nn.Sequential(OddBlock(8, 16, 1), OddBlock(16, 16, 1), OddBlock(16, 16, 1))
        self.stage3 = nn.Sequential(OddBlock(16, 32, 1), OddBlock(32, 32, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.stage1(self.stem(x)), 2)
        x = nn.functional.max_pool2d(self.stage2(x), 2)
        return self.fc(self.stage3(x).mean((2, 3)))


def functional_pool_net(num_classes: int = 10) -> FunctionalPoolNet:
    return FunctionalPoolNet(num_classes)


class SizeCheck(nn.Module):
    """A block that asserts its input size, as timm's attention modules do."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x):
        torch._assert(x.shape[2] == self.size, f"feature map must be {self.size} pixels high")
        return x


def sized_net(num_classes: int = 10) -> OddNet:
    net = OddNet(num_classes)
    net.stage2[1] = nn.Sequential(OddBlock(16, 16, 1), SizeCheck(16))
    return net


class OwnInitNet(OddNet):
    """A backbone with a per-module init routine (timm's convention)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 0.5)


def own_init_net(num_classes: int = 10) -> OwnInitNet:
    return OwnInitNet(num_classes)


def pid_net(num_classes: int = 10) -> DropNet:
    """DropNet that writes its process id to $DKS_TEST_PIDS/rank$RANK.pid (for fault tests)."""
    folder = os.environ.get("DKS_TEST_PIDS")
    if folder:
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.pid"), "w") as f:
            f.write(str(os.getpid()))
    return DropNet(num_classes)
