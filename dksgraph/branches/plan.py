"""Branches: the paper's downsampling-count rule turned into auxiliary classifier modules, plan first.

:func:`plan_branch` is the one place that decides a branch: a branch at tap t has one stage per
downsampling between t and the final feature map f (d(f) - d(t) stages, the backbone stages that
``Traced.branch_stages`` names); stage i reproduces the backbone stage at count d(t)+i+1 with the
same building-block type, first block strided, ``depth[i]`` blocks and ``width[i]`` x channels. The
plan says which family builds each stage and every stage's shape; the summary, the render and
:func:`build_branch` read it. The built branch ends with a fresh copy of the backbone's head resized
to the branch's channels.

Block families with a builder honour ``width``, and so do segment branches (every convolution of a copied
stage widened, see :func:`~dksgraph.branches.segments.widen`); ``branch_copy: blocks`` copies of blocks
without a builder keep the backbone's width.

Example::

    >>> from dksgraph.fx.graph import trace
    >>> from dksgraph.models.cifar_resnet import resnet32
    >>> t = trace(resnet32(), (3, 32, 32))
    >>> plan = plan_branch(t, "c2", t.resolve("layer2"), depth=[5], width=[2.0])
    >>> plan.describe(), plan.out_shape
    ('CifarBasicBlock x5 @128', (128, 8, 8))
    >>> plan.stages[0].copied, [s.out_shape for s in plan.stages]
    (False, [(128, 8, 8)])
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dksgraph.branches.families import default_depth, family_blocks, family_of
from dksgraph.branches.segments import Unit, segment_units, spans, widened, with_depth
from dksgraph.errors import GraphError
from dksgraph.formatting import fmt_shape
from dksgraph.fx.blocks import Stage
from dksgraph.fx.graph import Traced

__all__ = ["BranchPlan", "StagePlan", "plan_branch"]


@dataclass(frozen=True)
class StagePlan:
    """One branch stage: which backbone stage it copies, who builds it, and its size."""

    downsamplings: int
    source: str
    family: str | None  # the builder family; None: fresh copies of the backbone's own blocks
    block: str
    depth: int
    width: float
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def copied(self) -> bool:
        """Whether the stage is a copy of the backbone's own blocks or graph (no block-family builder)."""
        return self.family is None

    @property
    def out_channels(self) -> int:
        """Channels of a C x H x W map, the width D of an L x D token sequence."""
        return self.out_shape[-1] if len(self.out_shape) == 2 else self.out_shape[0]


@dataclass(frozen=True)
class BranchPlan:
    """Everything about one auxiliary classifier, decided before anything is built."""

    label: str  # the classifier's name: its branch's key in the model, its column in every table (c2, c3, ...)
    node: str  # the traced node the branch reads (a qualified name of the FX graph)
    tap: str  # the tap point as the spec wrote it (`at:`), or the node's alias for `taps: auto`
    downsamplings: int
    reason: str
    stages: tuple[StagePlan, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    units: tuple[Unit, ...] = ()  # a segment branch's pieces of the backbone's graph; empty for built stages

    @staticmethod
    def header(traced: Traced, label: str, node: str, tap: str | None, reason: str) -> dict:
        """The fields every planner fills the same way, from the tap alone."""
        return {"label": label, "node": node, "tap": tap or traced.alias(node),
                "downsamplings": traced.downsamplings[node], "reason": reason,
                "in_shape": traced.shapes[node]}

    @property
    def segment(self) -> bool:
        return bool(self.units)

    def describe(self) -> str:
        if not self.stages:
            return "head only"
        if self.segment:  # copied graph: the map it ends at (token sequences and channels-last maps included)
            return "segment: " + ", ".join(f"{s.block} x{s.depth} -> {fmt_shape(s.out_shape)}" for s in self.stages)
        return ", ".join(f"{s.block} x{s.depth} @{s.out_channels}" for s in self.stages)


def _plan_copies(stage: Stage, in_shape: tuple[int, ...], depth: int, width: float, label: str) -> tuple[str, tuple]:
    """Block names and output shape of a stage made of fresh copies of the backbone's own blocks."""
    names = sorted({b.type_name for b in stage.blocks})
    if width != 1.0:
        raise GraphError(
            f"tap `{label}`: width {width} asks for a resized copy of stage `{stage.name}` ({', '.join(names)}), "
            "but dksgraph has no builder for that block family, and `branch_copy: blocks` copies its blocks as they "
            "are. Use width 1.0 (or omit `width`) for this tap, or `branch_copy: segment` (the default), which "
            "widens copied stages."
        )
    first, last = stage.blocks[0], stage.blocks[-1]
    if first.in_shape[0] != in_shape[0]:
        raise GraphError(
            f"tap `{label}` gives {in_shape[0]} channels but stage `{stage.name}` ({', '.join(names)}) starts from "
            f"{first.in_shape[0]}: the backbone changes the channel count between them outside any block "
            "dksgraph recognises, and blocks without a builder are copied as they are. Tap at another stage "
            "end (`dksgraph inspect` marks them; with `taps: auto`, list the taps by hand)."
        )
    if depth > len(stage.blocks) and last.in_shape != last.out_shape:
        raise GraphError(
            f"tap `{label}`: depth {depth} exceeds the {len(stage.blocks)} blocks of stage `{stage.name}`, and "
            "its last block changes shape, so it cannot be repeated. Use a depth of at most "
            f"{len(stage.blocks)} for this stage."
        )
    used = list(stage.blocks[:depth]) + [last] * max(0, depth - len(stage.blocks))
    return "/".join(dict.fromkeys(b.type_name for b in used)), used[-1].out_shape


def plan_branch(traced: Traced, label: str, node: str, depth: list[int] | None = None,
                width: list[float] | None = None, tap: str | None = None,
                reason: str = "", branch_copy: str = "segment") -> BranchPlan:
    """Decide the branch for a tap at ``node`` (builds nothing).

    One stage per downsampling between the tap and f. When every one of them is a backbone stage with
    a block-family builder, the stages are built by the family (``depth`` and ``width`` honoured,
    :func:`_plan_stages`); otherwise the branch is a segment: a fresh copy of the backbone's own graph
    from the tap to f (``depth`` may shorten or repeat identical blocks, ``width`` widens every convolution
    of a copied stage, :func:`_plan_segment`). A tap at the last downsampling count gets the head alone. ``branch_copy="blocks"``
    (``branch_copy: blocks``, the layout of checkpoints written before segments existed) makes a stage
    without a builder from fresh copies of its whole blocks instead.

    Args:
        traced: the backbone's analysis (:func:`dksgraph.fx.graph.trace`).
        label: the classifier's name (the branch's key in the model and in every table).
        node: the traced node the branch reads (the tap's resolved qualified name).
        depth: blocks per branch stage, one per downsampling between the tap and f (default: the backbone's).
        width: channel multiplier per branch stage (default 1.0).
        tap: the spec's name for the tap point (default: the node's alias).
        reason: why this tap was chosen (``taps: auto``), shown by ``inspect`` and ``augment``.
        branch_copy: the spec's ``branch_copy``: ``"segment"`` or ``"blocks"``, for stages without a family builder.

    Returns:
        The BranchPlan: every stage's source, builder, depth, width and shapes.

    Raises:
        GraphError: ``depth``/``width`` of the wrong length, a width for stages that can only be copied, or
            stages that do not reproduce the backbone's downsampling.
    """
    downsamplings = traced.downsamplings[traced.final] - traced.downsamplings[node]
    try:
        stages = traced.branch_stages(node, tap or label)
        families = [family_of(s) for s in stages]
    except GraphError:
        stages, families = [], [None] * downsamplings
    by_family = downsamplings == 0 or all(families) or (branch_copy == "blocks" and len(stages) == downsamplings)
    planner = _plan_stages if by_family else _plan_segment
    return planner(traced, label, node, stages, families, depth, width,
                   BranchPlan.header(traced, label, node, tap, reason))


def _check_lengths(label: str, traced: Traced, node: str, depth, width, own_depths: list[int]) -> None:
    """``depth`` and ``width`` give one value per downsampling between the tap and f (DKS, Sec. 3.2)."""
    tap_count, final_count = traced.downsamplings[node], traced.downsamplings[traced.final]
    n = final_count - tap_count
    for key, given in (("depth", depth), ("width", width)):
        if given is not None and len(given) != n:
            raise GraphError(
                f"tap `{label}`: `{key}` has {len(given)} entr{'y' if len(given) == 1 else 'ies'} but this branch has "
                f"{n} stage{'s' if n != 1 else ''}: the tap sits at downsampling count {tap_count} and the final "
                f"feature map at {final_count}, and every classifier must see the same number of downsamplings "
                f"(DKS, Sec. 3.2). Give {n} value{'s' if n != 1 else ''}"
                + (f" (the backbone's own depths are {own_depths})." if n else ", i.e. omit it.")
            )


def _plan_segment(traced: Traced, label: str, node: str, stages: list[Stage], families: list, depth, width,
                  header: dict) -> BranchPlan:
    """A branch copied from the backbone's own graph between the tap and f, grouped by downsampling."""
    units = segment_units(traced, node)
    groups = spans(traced, node, units)
    _check_lengths(label, traced, node, depth, width, [sum(u.block for u in group) for _, group in groups])
    if depth is not None:
        groups = [(count, with_depth(group, blocks, label, group[0].name))
                  for (count, group), blocks in zip(groups, depth)]
    if width is not None:
        channels, resized = traced.shapes[node][0], []
        for (count, group), w in zip(groups, width):
            group = widened(traced, group, w, label, channels) if group else group
            channels = group[-1].out_shape[0] if group else channels
            resized.append((count, group))
        groups = resized
    plans = tuple(StagePlan(count, f"{group[0].name}..{group[-1].name}" if len(group) > 1 else group[0].name,
                            None, "/".join(dict.fromkeys(u.kind for u in group if u.block)) or "ops",
                            sum(u.repeat for u in group if u.block), group[0].width, group[0].in_shape,
                            group[-1].out_shape)
                  for count, group in groups if group)
    plans = tuple(_chain(plans, traced.shapes[node]))
    units = tuple(u for _, group in groups for u in group)
    return BranchPlan(**header, stages=plans, out_shape=plans[-1].out_shape if plans else traced.shapes[traced.final],
                      units=units)


def _chain(plans: tuple[StagePlan, ...], shape: tuple[int, ...]) -> list[StagePlan]:
    """Segment stage plans with each input the previous output (widened stages change the channels that follow)."""
    out = []
    for sp in plans:
        sp = replace(sp, in_shape=shape)
        out.append(sp)
        shape = sp.out_shape
    return out


def _plan_stages(traced: Traced, label: str, node: str, stages: list[Stage], families: list, depth, width,
                 header: dict) -> BranchPlan:
    """A branch of new stages, each built by its block family (or copied block by block, ``branch_copy="blocks"``)."""
    _check_lengths(label, traced, node, depth, width, [default_depth(s) for s in stages])
    depth = depth or [default_depth(s) for s in stages]
    width = width or [1.0] * len(stages)
    shape = traced.shapes[node]
    plans: list[StagePlan] = []
    for stage, family, blocks, w in zip(stages, families, depth, width):
        if family is None:
            block, out_shape = _plan_copies(stage, shape, blocks, w, label)
        else:
            block = type(family_blocks(stage, family)[-1]).__name__
            out_shape = (family.channels(stage, shape[0], blocks, w), *stage.end.out_shape[1:])
        plans.append(StagePlan(stage.downsamplings, stage.name, family.name if family else None, block, blocks, w,
                               shape, out_shape))
        shape = out_shape
    final_shape = traced.shapes[traced.final]
    if shape[1:] != final_shape[1:]:
        raise GraphError(
            f"tap `{label}`: the branch would end at {fmt_shape(shape)} but the backbone's final feature map is "
            f"{fmt_shape(final_shape)}; its stages do not reproduce the backbone's downsampling. Tap at a stage end "
            "(`dksgraph inspect` lists them)."
        )
    return BranchPlan(**header, stages=tuple(plans), out_shape=shape)
