"""SGD and the per-epoch learning-rate schedules of the paper's recipes (multistep, step, cosine).

Example::

    >>> from dksgraph.spec import TrainSpec
    >>> opt, sched = build(TrainSpec(), [torch.nn.Parameter(torch.zeros(1))], epochs=200)
    >>> type(sched).__name__
    'MultiStepLR'
"""

from __future__ import annotations

import torch

from dksgraph.errors import DksError


def build(train, params, epochs: int):
    """The optimiser and (per-epoch) scheduler a TrainSpec describes."""
    o = train.optimizer
    if o.nesterov and o.momentum == 0:
        raise DksError("Nesterov momentum needs `momentum` > 0; set train.optimizer.momentum (e.g. 0.9).")
    optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    s = train.schedule
    if s.name == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(s.milestones), gamma=s.gamma)
    elif s.name == "step":
        if s.step_size is None:
            raise DksError("schedule `step` needs `step_size` (epochs between decays); set train.schedule.step_size.")
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return optimizer, scheduler
