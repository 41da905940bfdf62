"""RunConfig: the runtime settings of a training run, apart from its recipe (the spec's ``train:``).

Runtime settings say how a run runs (device, precision, loader workers, compilation, limits) and
may change when it is resumed; the recipe says what it learns and may not. Light to import: the
command line reads the choices from here without loading PyTorch.

Example::

    >>> RunConfig.from_dict({"device": "cpu", "epochs": 3}).device    # unknown keys (old checkpoints) are ignored
    'cpu'
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

from dksgraph.train.progress import PRINT_EVERY

__all__ = ["AMP_MODES", "DEVICES", "RunConfig"]

AmpMode = Literal["none", "bf16", "fp16"]
AMP_MODES: tuple[str, ...] = get_args(AmpMode)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RunConfig:
    """How a run runs, never what it learns (that is the spec's ``train:`` recipe); may change on resume."""

    out: str = "runs/run"
    device: str = "auto"
    amp: AmpMode = "none"
    channels_last: bool = False
    compile: bool = False
    workers: int | None = None
    sync_bn: bool = False
    data_on_device: bool = False
    deterministic: bool = False
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    eval_every: int = 1  # score the test set every N epochs (and always after the last one)
    save_every: int | None = None  # also write last.pt every N optimiser steps inside an epoch
    skip_bad_images: bool = False
    collective_timeout: float = 600.0  # seconds a rank waits for the others before giving up
    log_every: int = 10  # steps between NaN checks, progress statistics and (distributed) stop agreements
    print_every: int = PRINT_EVERY  # steps between two progress lines when stderr is not a terminal

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
