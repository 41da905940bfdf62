"""Datasets and loaders: cifar10, cifar100, imagenet, imagefolder and synthetic, with the paper's pipelines.

Pipelines (``train.augmentation``), training / evaluation:

* ``cifar``: pad 4, random 32 crop, horizontal flip / the image as it is;
* ``imagenet`` (the paper's ResNet-18/50, Sec. 4.2): resize to 256x256, random 224x224 crop, flip /
  the centre 224x224 crop of the 256x256 resize;
* ``imagenet_inception`` (the paper's ResNet-152, "as in GoogLeNet"): random-resized 224 crop (scale
  and aspect ratio), flip / as ``imagenet``;
* ``none``: resize to the input size.

Sizes scale with the spec's input size (256/224 of it). Images leave the loader as uint8 tensors and
are normalised on the training device (:class:`LoaderBatches`): a quarter of float32's bytes cross
to the GPU. The data order and every image's augmentation are pure functions of (seed, epoch)
(:mod:`dksgraph.train.seeds`), so a resumed run sees the same batches whatever the number of loader
workers or ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from dksgraph.errors import DksError, first_line
from dksgraph.spec import TrainSpec
from dksgraph.train import distributed
from dksgraph.train.seeds import epoch_order

__all__ = ["STATS", "BadImage", "LoaderBatches", "Normalizer", "SeededDataset", "ShardSampler", "SyntheticImages",
           "bad_image_error", "collate_readable", "default_workers", "load_split", "read_item", "stats_for",
           "transforms_for"]

STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def stats_for(train: TrainSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std the inputs are normalised with."""
    if train.dataset in STATS:
        return STATS[train.dataset]
    return STATS["imagenet" if train.augmentation.startswith("imagenet") else "cifar10"]


def transforms_for(augmentation: str, input_size, train: bool, pil: bool = True):
    """The geometric pipeline of ``augmentation`` (then PIL -> uint8 tensor when ``pil``)."""
    from torchvision import transforms as T

    h, w = input_size[1], input_size[2]
    resized = (256 * h // 224, 256 * w // 224)
    if augmentation in ("imagenet", "imagenet_inception"):
        if train and augmentation == "imagenet_inception":
            steps = [T.RandomResizedCrop((h, w)), T.RandomHorizontalFlip()]
        elif train:
            steps = [T.Resize(resized), T.RandomCrop((h, w)), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(resized), T.CenterCrop((h, w))]
    elif augmentation == "cifar":
        steps = [T.RandomCrop((h, w), padding=4), T.RandomHorizontalFlip()] if train else []
    else:
        steps = [T.Resize((h, w))]
    if pil:
        steps.append(T.PILToTensor())
    return T.Compose(steps)


class SyntheticImages(Dataset):
    """Deterministic random uint8 images: noise over a fixed, smooth per-class pattern, so a CNN can learn them.

    The pattern is a 4x4 random image per class, upsampled to the input size (coarse colour blobs
    survive a CNN's global pooling); the noise has twice its standard deviation.
    """

    def __init__(self, size: int, num_classes: int, input_size, seed: int = 0, transform=None) -> None:
        self.size, self.num_classes, self.input_size, self.seed = size, num_classes, tuple(input_size), seed
        self.transform = transform
        gen = torch.Generator().manual_seed(10_007)  # the same classes for train and test
        coarse = torch.randn((num_classes, self.input_size[0], 4, 4), generator=gen)
        self.patterns = torch.nn.functional.interpolate(coarse, size=self.input_size[1:], mode="nearest")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        x = (self.patterns[label] + 2.0 * torch.randn(self.input_size, generator=gen)) / 5 ** 0.5
        image = (128 + 50 * x).round().clamp(0, 255).to(torch.uint8)
        return (self.transform(image) if self.transform is not None else image), label


class SeededDataset(Dataset):
    """Takes ``(index, seed)`` keys: each image's random augmentation is drawn from its own seed.

    The process's RNG is restored afterwards, so loading in the training process (no workers)
    leaves the model's dropout stream alone.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return read_item(self.dataset, int(index))


@dataclass(frozen=True)
class BadImage:
    """An image that could not be read, in place of a sample: its file and why."""

    path: str
    reason: str


def read_item(dataset: Dataset, index: int):
    """``dataset[index]``, or a :class:`BadImage` when the image cannot be decoded (truncated, not an image)."""
    try:
        return dataset[index]
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: truncated, unidentified, broken headers
        return BadImage(_path_of(dataset, index), f"{type(exc).__name__}: {first_line(exc, 120)}")


def _path_of(dataset: Dataset, index: int) -> str:
    if isinstance(dataset, Subset):
        return _path_of(dataset.dataset, dataset.indices[index])
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None else f"item {index} of {type(dataset).__name__}"


def collate_readable(items: list):
    """The default collation of the readable samples, and the unreadable ones apart."""
    from torch.utils.data import default_collate

    bad = [i for i in items if isinstance(i, BadImage)]
    good = [i for i in items if not isinstance(i, BadImage)]
    return (default_collate(good) if good else None), bad


def bad_image_error(bad: list[BadImage], skipped: int) -> DksError:
    return DksError(
        f"cannot read the image `{bad[0].path}` ({bad[0].reason}){f' and {len(bad) - 1} more in this batch' if len(bad) > 1 else ''}. "
        "Replace or delete the file, or pass `--skip-bad-images` to train without the images that cannot be read "
        f"(the run counts them in its log){f'; {skipped} were skipped before it' if skipped else ''}."
    )


def load_split(train: TrainSpec, input_size, num_classes: int, split: str, data_dir: str | None = None,
               transform: bool = True, check_classes: bool = True) -> tuple[Dataset, int]:
    """One split (``train`` or ``test``) of the recipe's dataset, with its subset applied, and its class count.

    ``transform=False`` gives the images undecorated (uint8 tensors or PIL images), for the
    on-device data path. Only rank 0 downloads; the other ranks wait for it.
    """
    is_train = split == "train"
    name, root = train.dataset, data_dir or train.data_dir
    if name == "synthetic":
        tf = transforms_for(train.augmentation, input_size, is_train, pil=False) if transform else None
        data, classes = SyntheticImages(1024 if is_train else 256, num_classes, input_size,
                                        train.seed + (0 if is_train else 1), tf), num_classes
    elif name in ("cifar10", "cifar100"):
        tf = transforms_for(train.augmentation, input_size, is_train) if transform else None
        data, classes = _cifar(name, root, is_train, tf), (10 if name == "cifar10" else 100)
    else:
        tf = transforms_for(train.augmentation, input_size, is_train) if transform else None
        data = _folder(name, root, split, tf)
        classes = len(data.classes)
    if check_classes and classes > num_classes:
        raise DksError(
            f"the {name} data has {classes} classes but the model outputs {num_classes}; pass "
            f"`--num-classes {classes}` (or set backbone.kwargs.num_classes in the spec)."
        )
    subset = train.train_subset if is_train else train.test_subset
    if subset is not None and subset < len(data):
        # the training subset depends on the run's seed; the test subset is the same for every seed, so that
        # every run of a comparison is scored on the same images
        keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(train.seed if is_train else 0))
        data = Subset(data, sorted(keep[:subset].tolist()))
    return data, classes


def _cifar(name: str, data_dir: str, train: bool, transform):
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    with distributed.main_first() as first:
        try:
            return cls(data_dir, train=train, transform=transform, download=False)
        except RuntimeError:
            pass
        try:
            if not first:
                raise RuntimeError("rank 0 could not download it")
            return cls(data_dir, train=train, transform=transform, download=True)
        except Exception as exc:
            raise DksError(
                f"{name} is not in `{data_dir}` and downloading it failed ({type(exc).__name__}). Pass "
                f"`--data-dir` with the extracted `cifar-{name[5:]}-python` release, or use `--dataset "
                "imagefolder --data-dir DIR` with DIR/train and DIR/test class folders (../shared/data "
                "holds CIFAR-10 as JPEG in that layout)."
            ) from None


def _folder(name: str, data_dir: str, split: str, transform):
    from torchvision import datasets

    root = Path(data_dir)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DksError(
            f"`{root}` must contain `train/` and `val/` (or `test/`) folders with one sub-folder per class for "
            f"--dataset {name}; check `--data-dir`."
        )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if sorted(p.name for p in test_dir.iterdir() if p.is_dir()) != classes:
        raise DksError(f"`{train_dir}` and `{test_dir}` hold different class folders; they must match.")
    return datasets.ImageFolder(str(train_dir if split == "train" else test_dir), transform)


class ShardSampler(Sampler[tuple[int, int]]):
    """This rank's share of the epoch's order, as ``(index, seed)`` keys for :class:`SeededDataset`.

    Training: the (seed, epoch) permutation of :func:`~dksgraph.train.seeds.epoch_order`, padded so
    every rank gets the same number of images. Evaluation: a fixed order, not padded, so every test
    image is counted exactly once (a fixed shuffle, so that ``--limit-eval-batches`` still samples
    every class of a dataset stored class by class).
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0) -> None:
        self.size, self.rank, self.world, self.shuffle, self.seed = size, rank, world, shuffle, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The (seed, epoch) order, starting after this rank's first ``skip`` keys."""
        self.epoch, self.skip = epoch, skip

    def keys(self) -> list[tuple[int, int]]:
        if self.shuffle:
            order, seeds = epoch_order(self.size, self.seed, self.epoch)
            total = math.ceil(self.size / self.world) * self.world
            order, seeds = order.tolist(), seeds.tolist()
            order, seeds = order + order[: total - self.size], seeds + seeds[: total - self.size]
        else:
            order = epoch_order(self.size, 0, 0)[0].tolist()
            seeds = [0] * self.size
        return list(zip(order, seeds))[self.rank::self.world][self.skip:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys())

    def __len__(self) -> int:
        if self.shuffle:
            return max(0, math.ceil(self.size / self.world) - self.skip)
        return max(0, len(range(self.rank, self.size, self.world)) - self.skip)


class Normalizer:
    """uint8 images -> normalised float32 on the device (channels-last when asked)."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False) -> None:
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, device=device).view(1, -1, 1, 1) / std_t
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, x.float(), self.scale)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class LoaderBatches:
    """Training or evaluation batches from a DataLoader, moved to the device and normalised there.

    The loader and its workers live as long as this object (``persistent_workers``); each epoch
    only changes the sampler's order. A training epoch drops its last partial batch (a batch of one
    breaks BatchNorm and makes ``--compile`` recompile); evaluation keeps every image.
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ShardSampler, normalize: Normalizer,
                 device: torch.device, workers: int, train: bool, seed: int = 0, skip_bad: bool = False) -> None:
        self.sampler, self.normalize, self.device = sampler, normalize, device
        self.dataset, self.batch_size, self.skip_bad = dataset, batch_size, skip_bad
        self.skipped = 0  # unreadable images left out so far (with `skip_bad`)
        self.loader = DataLoader(
            SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
            pin_memory=device.type == "cuda", drop_last=train, persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed), collate_fn=collate_readable)

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        """Order the next pass by (seed, epoch), starting after ``skip_steps`` batches (a mid-epoch resume)."""
        self.sampler.set_epoch(epoch, skip_steps * self.batch_size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch, bad in self.loader:
            if bad and not self.skip_bad:
                raise bad_image_error(bad, self.skipped)
            self.skipped += len(bad)
            if batch is None:
                continue
            x, y = batch
            yield (self.normalize(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True))


def default_workers(device: torch.device) -> int:
    """Loader processes: 0 on CPU (decoding competes with the model for the cores), else the cores
    per local process, at most 16 (torchvision's ImageNet default)."""
    if device.type != "cuda":
        return 0
    import os

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(16, (os.cpu_count() or 2) // local))
