"""GPU-resident data for CIFAR-sized datasets (`dksgraph train --data-on-device`).

The whole split is decoded once into one uint8 tensor on the training device (150 MB for CIFAR's
50,000 images); every batch is then cut from it and augmented there with tensor ops: the
``cifar`` pipeline's random crop with 4 pixels of zero padding and horizontal flip, then the
normalisation, in channels-last when asked. No loader processes, no host-to-device copies.

It draws from the same distributions as the DataLoader path (torchvision's ``RandomCrop(padding=4)``
offsets uniform in 0..8 on each axis, flips with probability 1/2), from a generator seeded with
(seed, epoch, rank), over the same sharded (seed, epoch) order, so runs stay reproducible.

Example::

    >>> images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    >>> random_crop_flip(images, 4, torch.Generator().manual_seed(0)).shape
    torch.Size([4, 3, 32, 32])
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dksgraph.errors import DksError
from dksgraph.formatting import fmt_shape
from dksgraph.train.data import BadImage, Normalizer, bad_image_error, read_item
from dksgraph.train.seeds import DEVICE_AUGMENT, derive, epoch_order

__all__ = ["AUGMENTATIONS", "DeviceBatches", "decode", "random_crop_flip"]

AUGMENTATIONS = ("cifar", "none")  # the pipelines this path reproduces


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator,
                     offsets: torch.Tensor | None = None, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch (same size as the input) and random horizontal flip.

    ``offsets`` (2 x N: top, left in 0..2*padding) and ``flips`` (N bools) replace the random draws
    when given. The result is channels-last in memory.
    """
    n, _, h, w = images.shape
    device = images.device
    if offsets is None:
        offsets = torch.randint(0, 2 * padding + 1, (2, n), device=device, generator=generator)
    if flips is None:
        flips = torch.randint(0, 2, (n,), device=device, generator=generator).bool()
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=device)  # N x H
    cols = offsets[1, :, None] + torch.arange(w, device=device)  # N x W
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # N x H x W x C -> N C H W


class DeviceBatches:
    """Batches cut from a split held on the device; a training split is augmented per batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, normalize: Normalizer, *,
                 train: bool, augmentation: str, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.images, self.labels, self.batch_size, self.normalize = images, labels, batch_size, normalize
        self.train, self.augment = train, train and augmentation == "cifar"
        self.seed, self.rank, self.world, self.epoch, self.skip = seed, rank, world, 0, 0

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        """Order the next pass by (seed, epoch), starting after ``skip_steps`` batches (a mid-epoch resume)."""
        self.epoch, self.skip = epoch, skip_steps

    def _indices(self) -> torch.Tensor:
        size = len(self.labels)
        if self.train:
            order = epoch_order(size, self.seed, self.epoch)[0]
            total = math.ceil(size / self.world) * self.world
            order = list(order) + list(order[: total - size])
        else:
            order = list(epoch_order(size, 0, 0)[0])
        return torch.as_tensor(order[self.rank::self.world], device=self.images.device)

    def __len__(self) -> int:
        size = len(self.labels)
        if self.train:
            return math.ceil(size / self.world) // self.batch_size
        return math.ceil(len(range(self.rank, size, self.world)) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices()
        gen = torch.Generator(device=self.images.device)
        for b in range(self.skip, len(self)):
            idx = indices[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:  # each batch's draws from its own (seed, epoch, rank, batch) stream
                gen.manual_seed(derive(self.seed, self.epoch, DEVICE_AUGMENT, self.rank, b))
                x = random_crop_flip(x, 4, gen)
            yield self.normalize(x), self.labels[idx]


def decode(dataset: Dataset, input_size, device: torch.device, workers: int = 0,
           skip_bad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an untransformed split as one uint8 N x C x H x W tensor (and the labels) on ``device``;
    an image that cannot be read stops it, or is left out with ``skip_bad``."""
    want = tuple(input_size)
    images, labels = [], []
    for items in DataLoader(_Decoded(dataset), batch_size=500, num_workers=workers, collate_fn=_as_list):
        bad = [i for i in items if isinstance(i, BadImage)]
        if bad and not skip_bad:
            raise bad_image_error(bad, 0)
        for image, label in (i for i in items if not isinstance(i, BadImage)):
            if tuple(image.shape) != want:
                raise DksError(
                    f"`--data-on-device` keeps CIFAR-sized datasets on the device as they are, but an image of this "
                    f"dataset is {fmt_shape(image.shape)}, not the spec's input size "
                    f"{fmt_shape(want)}. Leave `--data-on-device` off for this dataset (the loader "
                    "path resizes), or set backbone.input_size to the images' size."
                )
            images.append(image)
            labels.append(label)
    return torch.stack(images).to(device), torch.tensor(labels).to(device)


def _as_list(items: list) -> list:
    return items


class _Decoded(Dataset):
    """A split's images as uint8 C x H x W tensors."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from torchvision.transforms.functional import pil_to_tensor

        item = read_item(self.dataset, i)
        if isinstance(item, BadImage):
            return item
        image, label = item
        return (image if isinstance(image, torch.Tensor) else pil_to_tensor(image.convert("RGB"))), label
