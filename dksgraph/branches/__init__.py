"""Auxiliary branches, planned then built: :mod:`~dksgraph.branches.plan` decides each branch by the
paper's downsampling-count rule (which stages, which family, every shape); :mod:`~dksgraph.branches.families`
rebuilds known block families at any width; :mod:`~dksgraph.branches.segments` copies the backbone's own
graph where no family applies; :mod:`~dksgraph.branches.head` gives every branch a copy of the backbone's
head; :mod:`~dksgraph.branches.init` initialises it like the backbone; :mod:`~dksgraph.branches.build`
puts it together and checks it against the plan."""

from dksgraph.branches.build import Branch, build_branch
from dksgraph.branches.plan import BranchPlan, StagePlan, plan_branch

__all__ = ["Branch", "BranchPlan", "StagePlan", "build_branch", "plan_branch"]
