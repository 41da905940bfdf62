"""SGD and the learning-rate schedule of the paper's recipes, stepped once per optimiser step.

:class:`RecipeLR` is an ordinary PyTorch scheduler (``scheduler.step()`` after
``optimizer.step()``) whose rate is a pure function of the position in training:
a linear warm-up over ``warmup_epochs`` (per step), times the decay: ``multistep`` and ``step``
decay at epoch boundaries as in the paper, ``cosine`` decays per step to zero at the last epoch.

Example::

    >>> from dksgraph.spec import TrainSpec
    >>> opt, sched = build(TrainSpec(), [torch.nn.Parameter(torch.zeros(1))], epochs=200, steps_per_epoch=10)
    >>> sched.seek(60)                                   # after the first milestone (0.1 x 0.2)
    >>> round(opt.param_groups[0]["lr"], 6)
    0.02
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from dksgraph.errors import DksError

__all__ = ["RecipeLR", "build"]


class RecipeLR(LRScheduler):
    """The recipe's learning rate at every optimiser step: linear warm-up times the decay.

    ``last_epoch`` (PyTorch's name) counts optimiser steps. :meth:`seek` puts the schedule at an
    (epoch, step) position, which is how a resumed run continues, even with another number of
    steps per epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule, epochs: int, steps_per_epoch: int) -> None:
        if schedule.name == "step" and schedule.step_size is None:
            raise DksError("schedule `step` needs `step_size` (epochs between decays); set train.schedule.step_size.")
        self.schedule, self.epochs, self.steps_per_epoch = schedule, epochs, max(1, steps_per_epoch)
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        """The multiplier of the base rate for optimiser step ``step`` (0-based, over the whole run)."""
        s, spe = self.schedule, self.steps_per_epoch
        epoch, within = divmod(step, spe)
        warm = s.warmup_epochs * spe
        warmup = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if s.name == "multistep":
            decay = s.gamma ** sum(epoch >= m for m in s.milestones)
        elif s.name == "step":
            decay = s.gamma ** (epoch // s.step_size)
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch + within / spe) / self.epochs)))
        return warmup * decay

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def seek(self, epoch: int, step: int = 0) -> None:
        """Set the rates for step ``step`` of epoch ``epoch`` (0-based)."""
        self.last_epoch = epoch * self.steps_per_epoch + step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = int(state_dict["last_epoch"])


def build(train, params, epochs: int, steps_per_epoch: int):
    """The optimiser and per-step scheduler a TrainSpec describes."""
    o = train.optimizer
    if o.nesterov and o.momentum == 0:
        raise DksError("Nesterov momentum needs `momentum` > 0; set train.optimizer.momentum (e.g. 0.9).")
    optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    return optimizer, RecipeLR(optimizer, train.schedule, epochs, steps_per_epoch)
