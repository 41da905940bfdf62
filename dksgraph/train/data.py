"""Datasets and loaders: cifar10, cifar100, imagenet, imagefolder and synthetic, with the paper's pipelines.

CIFAR: pad 4, random crop 32, horizontal flip, per-channel normalisation. ImageNet: resize 256,
random crop 224, flip; evaluation uses the centre crop. ``synthetic`` is deterministic random
images with a class-dependent pattern, for smoke runs and benchmarks.

Data order is a pure function of (seed, epoch): the training sampler permutes with
``seed + epoch`` and shards that permutation across ranks, so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from dksgraph.errors import DksError

STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def transforms_for(augmentation: str, dataset: str, input_size: tuple[int, int, int], train: bool):
    from torchvision import transforms as T

    mean, std = STATS.get(dataset, STATS["imagenet" if augmentation == "imagenet" else "cifar10"])
    size = input_size[1]
    steps = []
    if augmentation == "imagenet":
        steps += [T.Resize(256 * size // 224), T.RandomCrop(size) if train else T.CenterCrop(size)]
        if train:
            steps.append(T.RandomHorizontalFlip())
    elif augmentation == "cifar":
        if train:
            steps += [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
    else:
        steps.append(T.Resize((size, input_size[2])))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class SyntheticImages(Dataset):
    """Deterministic random images: noise over a fixed, smooth per-class pattern, so a CNN can learn them.

    The pattern is a 4x4 random image per class, upsampled to the input size (coarse colour blobs
    survive a CNN's global pooling); the noise has twice its standard deviation.
    """

    def __init__(self, size: int, num_classes: int, input_size: tuple[int, int, int], seed: int = 0) -> None:
        self.size, self.num_classes, self.input_size, self.seed = size, num_classes, tuple(input_size), seed
        gen = torch.Generator().manual_seed(10_007)  # the same classes for train and test
        coarse = torch.randn((num_classes, self.input_size[0], 4, 4), generator=gen)
        self.patterns = torch.nn.functional.interpolate(coarse, size=self.input_size[1:], mode="nearest")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        return (self.patterns[label] + 2.0 * torch.randn(self.input_size, generator=gen)) / 5 ** 0.5, label


@dataclass
class Data:
    train: Dataset
    test: Dataset
    num_classes: int


def build_datasets(name: str, data_dir: str, augmentation: str, input_size, num_classes: int,
                   train_subset: int | None = None, seed: int = 0, test_subset: int | None = None) -> Data:
    """The train and test datasets a run uses.

    ``train_subset`` keeps a random subset drawn with the run's seed; ``test_subset`` keeps one drawn
    with seed 0 whatever the run's seed, so that every run of a comparison is scored on the same images.
    """
    if name == "synthetic":
        data = Data(SyntheticImages(1024, num_classes, input_size, seed),
                    SyntheticImages(256, num_classes, input_size, seed + 1), num_classes)
    elif name in ("cifar10", "cifar100"):
        data = _cifar(name, data_dir, augmentation, input_size)
    else:
        data = _folders(name, data_dir, augmentation, input_size)
    if data.num_classes > num_classes:
        raise DksError(
            f"the {name} data has {data.num_classes} classes but the model outputs {num_classes}; pass "
            f"`--num-classes {data.num_classes}` (or set backbone.kwargs.num_classes in the spec)."
        )
    if train_subset is not None and train_subset < len(data.train):
        keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:train_subset]
        data.train = Subset(data.train, sorted(keep.tolist()))
    if test_subset is not None and test_subset < len(data.test):
        keep = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))[:test_subset]
        data.test = Subset(data.test, sorted(keep.tolist()))
    return data


def _cifar(name: str, data_dir: str, augmentation: str, input_size) -> Data:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    made = []
    for train in (True, False):
        tf = transforms_for(augmentation, name, input_size, train)
        try:
            made.append(cls(data_dir, train=train, transform=tf, download=False))
        except RuntimeError:
            try:
                made.append(cls(data_dir, train=train, transform=tf, download=True))
            except Exception as exc:
                raise DksError(
                    f"{name} is not in `{data_dir}` and downloading it failed ({type(exc).__name__}). Pass "
                    f"`--data-dir` with the extracted `cifar-{name[5:]}-python` release, or use `--dataset "
                    "imagefolder --data-dir DIR` with DIR/train and DIR/test class folders (../shared/data "
                    "holds CIFAR-10 as JPEG in that layout)."
                ) from None
    return Data(made[0], made[1], 10 if name == "cifar10" else 100)


def _folders(name: str, data_dir: str, augmentation: str, input_size) -> Data:
    from torchvision import datasets

    root = Path(data_dir)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DksError(
            f"`{root}` must contain `train/` and `val/` (or `test/`) folders with one sub-folder per class for "
            f"--dataset {name}; check `--data-dir`."
        )
    stats_name = "imagenet" if name == "imagenet" else "cifar10"
    train = datasets.ImageFolder(str(train_dir), transforms_for(augmentation, stats_name, input_size, True))
    test = datasets.ImageFolder(str(test_dir), transforms_for(augmentation, stats_name, input_size, False))
    if train.classes != test.classes:
        raise DksError(f"`{train_dir}` and `{test_dir}` hold different class folders; they must match.")
    return Data(train, test, len(train.classes))


class ShardSampler(Sampler[int]):
    """This rank's share of a (seed + epoch)-seeded permutation (training) or of a fixed one (evaluation).

    Training shards are padded to equal length (every rank takes the same number of steps);
    evaluation shards are not, so every test image is counted exactly once.
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 pad: bool = True) -> None:
        self.size, self.rank, self.world, self.shuffle, self.seed, self.pad = size, rank, world, shuffle, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        # evaluation uses one fixed permutation, so that a limited evaluation (--limit-eval-batches) still
        # samples every class of a dataset stored class by class
        seed = self.seed + self.epoch if self.shuffle else 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed)).tolist()
        if self.pad:
            total = math.ceil(self.size / self.world) * self.world
            order += order[: total - self.size]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices()) if not self.pad else math.ceil(self.size / self.world)


def make_loader(dataset: Dataset, batch_size: int, sampler: ShardSampler, workers: int, pin_memory: bool,
                drop_last: bool, seed: int) -> DataLoader:
    """A loader whose worker seeds derive from (seed, epoch) through the sampler's epoch."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=drop_last, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed * 7919 + sampler.epoch))
