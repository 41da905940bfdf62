"""Build a planned branch: its stages (by a block family, as fresh copies of the backbone's blocks, or as a
copied segment of the backbone's graph), then a fresh copy of the backbone's head, initialised like the
backbone and checked against the plan's shapes.

Example::

    >>> from dksgraph.branches.plan import plan_branch
    >>> from dksgraph.fx.graph import trace
    >>> from dksgraph.models.cifar_resnet import resnet32
    >>> t = trace(resnet32(), (3, 32, 32))
    >>> branch, how = build_branch(t, plan_branch(t, "c2", t.resolve("layer2"), depth=[5], width=[2.0]))
    >>> how
    "the backbone's own init_weights()"
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dksgraph.branches.families import FAMILIES
from dksgraph.branches.head import build_head, fresh_copy
from dksgraph.branches.init import initialise
from dksgraph.branches.plan import BranchPlan
from dksgraph.branches.segments import build_segment
from dksgraph.errors import GraphError
from dksgraph.formatting import fmt_shape
from dksgraph.fx.blocks import Stage
from dksgraph.fx.graph import Traced

__all__ = ["Branch", "build_branch"]


class Branch(nn.Module):
    """Auxiliary classifier: ``stages`` (Sequential of Sequentials of blocks) then ``head``; an ``adapter``
    (``nn.Linear``) is added by the augmented model where the objective has feature hints."""

    def __init__(self, stages: nn.Sequential, head: nn.Module) -> None:
        super().__init__()
        self.stages = stages
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(x))[0]

    def classify(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The logits and the feature that enters the head's final Linear (None where it has none)."""
        return self.head(self.stages(x))


def _build_copies(stage: Stage, depth: int) -> list[nn.Module]:
    blocks = [fresh_copy(b.module) for b in stage.blocks[:depth]]
    return blocks + [fresh_copy(stage.blocks[-1].module) for _ in range(depth - len(stage.blocks))]


def build_branch(traced: Traced, plan: BranchPlan, init: str = "backbone") -> tuple[Branch, str]:
    """The modules of a planned branch, fresh parameters initialised like the backbone's (``init``, see
    :mod:`dksgraph.branches.init`), checked against the plan's shapes; and how they were initialised."""
    if plan.segment:
        body = nn.Sequential(*build_segment(traced, plan.units, plan.label))
    else:
        body = nn.Sequential(*[nn.Sequential(*(
            _build_copies(traced.stage_at(sp.downsamplings), sp.depth) if sp.family is None
            else FAMILIES[sp.family].build(traced.stage_at(sp.downsamplings), sp.in_shape[0], sp.depth, sp.width)))
            for sp in plan.stages])
    with torch.no_grad():
        was = body.training
        body.eval()
        out_shape = tuple(body(torch.zeros((1, *plan.in_shape))).shape[1:])
        body.train(was)
    if out_shape != plan.out_shape:
        raise GraphError(
            f"tap `{plan.label}`: the built branch ends at {fmt_shape(out_shape)}, not at the planned "
            f"{fmt_shape(plan.out_shape)}. This is a dksgraph bug for this block family; please report it with the "
            "spec."
        )
    branch = Branch(body, build_head(traced, out_shape))
    return branch, initialise(branch, traced.model, init, head=branch.head)
