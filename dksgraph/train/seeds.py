"""Where every random number of a run comes from: a pure function of (seed, epoch, rank).

* The data order of an epoch and one seed per training image come from
  ``numpy.random.SeedSequence([seed, epoch, ...])``: unlike ``seed + epoch``, seed s at epoch e
  never equals seed s + 1 at epoch e - 1. Every rank computes the same order and takes its shard.
* Each image's augmentation is drawn from its own seed (see :class:`~dksgraph.train.data.SeededDataset`),
  so it does not depend on the number of ranks, of loader workers, or on where a run was resumed.
* The process RNGs (dropout, stochastic depth) are reseeded before every training step from
  (seed, epoch, step, rank): ranks draw different dropout masks, and a run resumed at any step
  continues with the numbers the uninterrupted run would have drawn.

Example::

    >>> order, seeds = epoch_order(5, seed=0, epoch=0)
    >>> sorted(order.tolist())
    [0, 1, 2, 3, 4]
    >>> epoch_order(8, seed=0, epoch=1)[0].tolist() == epoch_order(8, seed=1, epoch=0)[0].tolist()
    False
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["derive", "epoch_order", "rng_state", "seed_process", "set_rng_state"]

# distinct streams drawn from one (seed, epoch): the data order, the process RNGs, on-device augmentation
DATA, PROCESS, DEVICE_AUGMENT = 0, 1, 2


def derive(*key: int) -> int:
    """A 63-bit seed from a key of non-negative integers (SeedSequence's hashing of the whole key)."""
    words = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & (2**63 - 1)


def epoch_order(size: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The permutation of ``size`` training images for an epoch, and a seed per position."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, DATA]))
    return rng.permutation(size), rng.integers(0, 2**63 - 1, size=size, dtype=np.int64)


def seed_process(seed: int, epoch: int, rank: int, step: int = 0) -> int:
    """Seed torch (CPU and every GPU), ``random`` and numpy's global RNG for one rank's training step."""
    s = derive(seed, epoch, PROCESS, rank, step)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
    return s


def rng_state(device: torch.device) -> dict:
    """This process's RNG states: CPU, Python, and its own GPU only (never every visible GPU's)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`rng_state`'s output on any machine: a GPU state is restored only onto a GPU.

    Checkpoints of earlier releases hold a list with every visible GPU's state; this process's
    own entry is used when it exists.
    """
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)
