"""The GPU-resident data path (`--data-on-device`), checked on CPU tensors."""

import json

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

from conftest import ROOT, write
from dksgraph.deploy import strip
from dksgraph.train.data import Normalizer
from dksgraph.train.device_data import DeviceBatches, random_crop_flip
from dksgraph.train.seeds import epoch_order
from test_train import TOY


def probe_images(n: int) -> torch.Tensor:
    """Images whose channel 0 is the row + 1 and channel 1 the column + 1 (0 is the padding)."""
    rows = torch.arange(1, 33, dtype=torch.uint8).view(32, 1).expand(32, 32)
    cols = torch.arange(1, 33, dtype=torch.uint8).view(1, 32).expand(32, 32)
    image = torch.stack([rows, cols, torch.zeros_like(rows)])
    return image.expand(n, 3, 32, 32).contiguous()


def crop_params(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flipped) of each crop of probe images (padding 4), read off two centre pixels."""
    top = out[:, 0, 16, 16].long() - 1 - 12
    flipped = out[:, 1, 16, 16] < out[:, 1, 16, 15]
    left = out[:, 1, 16, 16].long() - 1 - torch.where(flipped, 11, 12)
    return top, left, flipped


def test_a_crop_and_flip_equal_torchvisions_pad_crop_flip():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen)
    offsets = torch.tensor([[0, 8, 3, 5, 4, 1], [0, 8, 7, 2, 4, 6]])
    flips = torch.tensor([False, True, True, False, True, False])
    out = random_crop_flip(images, 4, gen, offsets, flips)
    for i in range(6):
        want = F.crop(F.pad(images[i], [4]), int(offsets[0, i]), int(offsets[1, i]), 32, 32)
        assert torch.equal(out[i], F.hflip(want) if flips[i] else want), i
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_the_crop_and_flip_distribution_is_torchvisions():
    n = 8000
    ours = crop_params(random_crop_flip(probe_images(n), 4, torch.Generator().manual_seed(1)))
    torch.manual_seed(2)
    pipeline = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    theirs = crop_params(torch.stack([pipeline(img) for img in probe_images(n)]))
    for a, b in zip(ours[:2], theirs[:2]):  # top and left: uniform over 0..8
        assert a.min() == b.min() == 0 and a.max() == b.max() == 8
        freq_a, freq_b = a.bincount(minlength=9) / n, b.bincount(minlength=9) / n
        assert (freq_a - 1 / 9).abs().max() < 0.02 and (freq_b - 1 / 9).abs().max() < 0.02
    assert abs(ours[2].float().mean() - 0.5) < 0.02 and abs(theirs[2].float().mean() - 0.5) < 0.02
    assert abs(torch.corrcoef(torch.stack([ours[0].float(), ours[1].float()]))[0, 1]) < 0.05  # independent axes


def batches(train, rank=0, world=1, epoch=0, n=50, batch=8):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    b = DeviceBatches(images, torch.arange(n), batch, Normalizer((0,) * 3, (1 / 255,) * 3, torch.device("cpu")),
                      train=train, augmentation="cifar", seed=3, rank=rank, world=world)
    b.set_epoch(epoch)
    return b


def test_training_batches_shard_the_epoch_order_and_drop_partial_batches():
    shards = [list(batches(True, r, 2)) for r in (0, 1)]
    assert [len(s) for s in shards] == [3, 3] and all(len(y) == 8 for s in shards for _, y in s)
    seen = [int(v) for s in zip(*shards) for _, y in s for v in y]
    order = epoch_order(50, 3, 0)[0].tolist()
    taken = [int(v) for pair in zip(*[[int(v) for _, y in s for v in y] for s in shards]) for v in pair]
    assert taken == order[:48] and len(set(seen)) == 48
    again = [y for _, y in batches(True, 0, 2)]
    assert all(torch.equal(a, b) for a, b in zip(again, [y for _, y in shards[0]]))  # (seed, epoch) decide it
    assert not torch.equal(again[0], next(iter(batches(True, 0, 2, epoch=1)))[1])


def test_evaluation_batches_cover_every_image_once_unaugmented():
    shards = [list(batches(False, r, 2)) for r in (0, 1)]
    labels = sorted(int(v) for s in shards for _, y in s for v in y)
    assert labels == list(range(50))
    for s in shards:
        for x, y in s:  # no crop, no flip: every pixel of image i is i
            assert torch.equal(x, y.view(-1, 1, 1, 1).float().expand_as(x))


def test_train_on_device_on_cpu_and_refuse_imagenet_pipelines(run, tmp_path):
    write(tmp_path / "toy.yaml", json.dumps({**TOY, "train": {**TOY["train"], "augmentation": "cifar"}}))
    result = run("train", "toy.yaml", "--data-on-device", "--epochs", 1, "--limit-train-batches", 3, "--out", "r")
    assert result.exit_code == 0, result.output
    assert "1024 train / 256 test images (on the device)" in result.output
    strip(tmp_path / "r" / "last.pt")
    refused = run("train", ROOT / "specs" / "resnet18.yaml", "--data-on-device", "--dataset", "synthetic",
                  "--out", "r18")
    assert refused.exit_code == 2 and "augmentation: imagenet" in refused.output
