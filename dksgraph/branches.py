"""Branches: the paper's downsampling-count rule turned into auxiliary classifier modules, plan first.

:func:`plan_branch` is the one place that decides a branch: a branch at tap t has one stage per
downsampling between t and the final feature map f (d(f) - d(t) stages, the backbone stages that
``Traced.branch_stages`` names); stage i reproduces the backbone stage at count d(t)+i+1 with the
same building-block type, first block strided, ``depth[i]`` blocks and ``width[i]`` x channels. The
plan says which family builds each stage and every stage's shape; the summary, the render and
:func:`build_branch` read it. The built branch ends with a fresh copy of the backbone's head resized
to the branch's channels.

Block families with a builder honour ``width``; any other family falls back to fresh copies of
the backbone's own blocks (re-initialised), where ``width`` must stay 1.0.

Example::

    >>> from dksgraph.graph import trace
    >>> from dksgraph.models.cifar_resnet import resnet32
    >>> t = trace(resnet32(), (3, 32, 32))
    >>> plan = plan_branch(t, "c2", t.resolve("layer2"), depth=[5], width=[2.0])
    >>> plan.describe(), plan.out_shape
    ('CifarBasicBlock x5 @128', (128, 8, 8))
    >>> branch, how = build_branch(t, plan)
    >>> how
    "the backbone's own init_weights()"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dksgraph.errors import GraphError
from dksgraph.formatting import fmt_shape
from dksgraph.blocks import Stage
from dksgraph.branch_init import initialise
from dksgraph.graph import Traced
from dksgraph.head import build_head, fresh_copy
from dksgraph.segments import Unit, build_segment, segment_units, spans, with_depth


@dataclass(frozen=True)
class StagePlan:
    """One branch stage: which backbone stage it copies, who builds it, and its size."""

    d: int
    source: str
    family: str | None  # the builder family; None: fresh copies of the backbone's own blocks
    block: str
    depth: int
    width: float
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def generic(self) -> bool:
        return self.family is None

    @property
    def out_channels(self) -> int:
        """Channels of a C x H x W map, the width D of an L x D token sequence."""
        return self.out_shape[-1] if len(self.out_shape) == 2 else self.out_shape[0]


@dataclass(frozen=True)
class BranchPlan:
    """Everything about one auxiliary classifier, decided before anything is built."""

    label: str
    node: str
    tap: str
    d: int
    alpha: float
    reason: str
    stages: tuple[StagePlan, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    units: tuple[Unit, ...] = ()  # a segment branch's pieces of the backbone's graph; empty for built stages

    @property
    def segment(self) -> bool:
        return bool(self.units)

    def describe(self) -> str:
        if not self.stages:
            return "head only"
        if self.segment:  # copied graph: the map it ends at (token sequences and channels-last maps included)
            return "segment: " + ", ".join(f"{s.block} x{s.depth} -> {fmt_shape(s.out_shape)}" for s in self.stages)
        return ", ".join(f"{s.block} x{s.depth} @{s.out_channels}" for s in self.stages)


class Branch(nn.Module):
    """Auxiliary classifier: ``stages`` (Sequential of Sequentials of blocks) then ``head``."""

    def __init__(self, stages: nn.Sequential, head: nn.Module) -> None:
        super().__init__()
        self.stages = stages
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(x))


# ---------------------------------------------------------------- block families with a builder


@dataclass(frozen=True)
class Family:
    """A block family dksgraph can rebuild at any width: which blocks, the output channels of a stage
    of ``depth`` blocks at ``width``, and the builder (which must give exactly those channels)."""

    name: str
    matches: Callable[[nn.Module], bool]
    channels: Callable[[Stage, int, int, float], int]
    build: Callable[[Stage, int, int, float], list[nn.Module]]
    count: Callable[[Stage], int] | None = None


def _family_blocks(stage: Stage, family: Family) -> list[nn.Module]:
    return [b.module for b in stage.blocks if family.matches(b.module)]


def _spawners(stage: Stage) -> list[nn.Module]:
    return [b.module for b in stage.blocks if hasattr(b.module, "spawn")]


def _spawn_channels(stage: Stage, in_ch: int, depth: int, width: float) -> int:
    return max(1, round(_spawners(stage)[-1].out_channels * width))


def _build_spawn(stage: Stage, in_ch: int, depth: int, width: float) -> list[nn.Module]:
    """zoo blocks (CifarBasicBlock, PreActBlock, DepthwiseSeparable) know how to spawn a sibling."""
    own = _spawners(stage)
    out = _spawn_channels(stage, in_ch, depth, width)
    return [own[0].spawn(in_ch, out, own[0].stride)] + [own[-1].spawn(out, out, 1) for _ in range(depth - 1)]


def _tv_resnet_geometry(stage: Stage, width: float) -> tuple[type, int, dict]:
    from torchvision.models.resnet import Bottleneck

    template = [b.module for b in stage.blocks if _is_tv_resnet(b.module)][-1]
    cls = type(template)
    if cls is Bottleneck:
        planes = template.conv3.out_channels // cls.expansion
        groups = template.conv2.groups
        extra = {"groups": groups, "base_width": template.conv2.in_channels * 64 // (planes * groups)}
    else:
        planes, extra = template.conv2.out_channels, {}
    return cls, max(1, round(planes * width)), extra


def _tv_resnet_channels(stage: Stage, in_ch: int, depth: int, width: float) -> int:
    cls, planes, _ = _tv_resnet_geometry(stage, width)
    return planes * cls.expansion


def _build_torchvision_resnet(stage: Stage, in_ch: int, depth: int, width: float) -> list[nn.Module]:
    cls, planes, extra = _tv_resnet_geometry(stage, width)
    out = planes * cls.expansion
    stride = next(b.module for b in stage.blocks if _is_tv_resnet(b.module)).stride
    downsample = None
    if stride != 1 or in_ch != out:
        downsample = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    return [cls(in_ch, planes, stride, downsample, **extra)] + [cls(out, planes, **extra) for _ in range(depth - 1)]


def _inverted_residuals(stage: Stage) -> list:
    from torchvision.models.mobilenetv2 import InvertedResidual

    return [b for b in stage.blocks if type(b.module) is InvertedResidual]


def _ir_channels(stage: Stage, in_ch: int, depth: int, width: float) -> int:
    return max(1, round(_inverted_residuals(stage)[-1].module.out_channels * width))


def _build_inverted_residual(stage: Stage, in_ch: int, depth: int, width: float) -> list[nn.Module]:
    from torchvision.models.mobilenetv2 import InvertedResidual

    own = _inverted_residuals(stage)
    out = _ir_channels(stage, in_ch, depth, width)
    ratio = _expand_ratio(own[-1].module, own[-1].in_shape[0])
    first = InvertedResidual(in_ch, out, own[0].module.stride, _expand_ratio(own[0].module, own[0].in_shape[0]))
    return [first] + [InvertedResidual(out, out, 1, ratio) for _ in range(depth - 1)]


def _expand_ratio(block: nn.Module, in_ch: int) -> float:
    first = block.conv[0]
    hidden = first[0].out_channels if isinstance(first, nn.Sequential) and first[0].kernel_size == (1, 1) else in_ch
    if hidden == in_ch and first[0].groups == in_ch:
        return 1
    return hidden / in_ch


def _zoo_dense_geometry(stage: Stage, in_ch: int, width: float) -> tuple[int, int, nn.Module]:
    from dksgraph.models.densenet import DenseLayer, Transition

    transition = next(b.module for b in stage.blocks if isinstance(b.module, Transition))
    layer = next(b.module for b in stage.blocks if isinstance(b.module, DenseLayer))
    return int(in_ch * transition.out_channels / transition.in_channels), max(1, round(layer.growth * width)), layer


def _zoo_dense_channels(stage: Stage, in_ch: int, depth: int, width: float) -> int:
    trans_out, growth, _ = _zoo_dense_geometry(stage, in_ch, width)
    return trans_out + depth * growth


def _build_zoo_densenet(stage: Stage, in_ch: int, depth: int, width: float) -> list[nn.Module]:
    from dksgraph.models.densenet import DenseLayer, Transition

    trans_out, growth, layer = _zoo_dense_geometry(stage, in_ch, width)
    return [Transition(in_ch, trans_out)] + [DenseLayer(trans_out + i * growth, growth, layer.bottleneck)
                                             for i in range(depth)]


def _tv_dense_geometry(stage: Stage, in_ch: int, width: float) -> tuple[int, int, nn.Module]:
    from torchvision.models.densenet import _DenseBlock, _Transition

    transition = next(b.module for b in stage.blocks if isinstance(b.module, _Transition))
    layer = next(iter(next(b.module for b in stage.blocks if isinstance(b.module, _DenseBlock)).values()))
    trans_out = int(in_ch * transition.conv.out_channels / transition.conv.in_channels)
    return trans_out, max(1, round(layer.conv2.out_channels * width)), layer


def _tv_dense_channels(stage: Stage, in_ch: int, depth: int, width: float) -> int:
    trans_out, growth, _ = _tv_dense_geometry(stage, in_ch, width)
    return trans_out + depth * growth


def _build_torchvision_densenet(stage: Stage, in_ch: int, depth: int, width: float) -> list[nn.Module]:
    from torchvision.models.densenet import _DenseBlock, _Transition

    trans_out, growth, layer = _tv_dense_geometry(stage, in_ch, width)
    bn_size = layer.conv1.out_channels // layer.conv2.out_channels
    block = _DenseBlock(depth, trans_out, bn_size, growth, float(layer.drop_rate), layer.memory_efficient)
    return [_Transition(in_ch, trans_out), block]


def _is_tv_resnet(m: nn.Module) -> bool:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return type(m) in (BasicBlock, Bottleneck)


def _is_type(module_path: str, name: str) -> Callable[[nn.Module], bool]:
    def check(m: nn.Module) -> bool:
        cls = type(m)
        return cls.__module__ == module_path and cls.__name__ == name

    return check


_is_tv_dense = _is_type("torchvision.models.densenet", "_DenseBlock")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("zoo", lambda m: hasattr(m, "spawn") and hasattr(m, "out_channels"), _spawn_channels, _build_spawn),
    Family("torchvision resnet", _is_tv_resnet, _tv_resnet_channels, _build_torchvision_resnet),
    Family("inverted residual", _is_type("torchvision.models.mobilenetv2", "InvertedResidual"), _ir_channels,
           _build_inverted_residual),
    Family("densenet", _is_type("dksgraph.models.densenet", "DenseLayer"), _zoo_dense_channels,
           _build_zoo_densenet),
    Family("torchvision densenet", _is_tv_dense, _tv_dense_channels, _build_torchvision_densenet,
           count=lambda s: sum(len(b.module) for b in s.blocks if _is_tv_dense(b.module))),
]}


def family_of(stage: Stage) -> Family | None:
    """The builder family of a stage: the family of most of its blocks, if any."""
    best, votes = None, 0
    for family in FAMILIES.values():
        n = len(_family_blocks(stage, family))
        if n > votes:
            best, votes = family, n
    return best


def default_depth(stage: Stage) -> int:
    """Blocks per branch stage when the spec gives no ``depth``: the backbone's own count."""
    family = family_of(stage)
    if family is None:
        return len(stage.blocks)
    if family.count is not None:
        return family.count(stage)
    return len(_family_blocks(stage, family))


# ---------------------------------------------------------------- `branch_copy: blocks`: copies of whole blocks


def _plan_copies(stage: Stage, in_shape: tuple[int, ...], depth: int, width: float, label: str) -> tuple[str, tuple]:
    """Block names and output shape of a stage made of fresh copies of the backbone's own blocks."""
    names = sorted({b.type_name for b in stage.blocks})
    if width != 1.0:
        raise GraphError(
            f"tap `{label}`: width {width} asks for a resized copy of stage `{stage.name}` ({', '.join(names)}), "
            "but dksgraph has no builder for that block family and can only copy its blocks as they are. "
            "Use width 1.0 (or omit `width`) for this tap."
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


def _build_copies(stage: Stage, depth: int) -> list[nn.Module]:
    blocks = [fresh_copy(b.module) for b in stage.blocks[:depth]]
    return blocks + [fresh_copy(stage.blocks[-1].module) for _ in range(depth - len(stage.blocks))]


# ---------------------------------------------------------------- plan, then build


def plan_branch(traced: Traced, label: str, node: str, depth: list[int] | None = None,
                width: list[float] | None = None, alpha: float = 1.0, tap: str | None = None,
                reason: str = "", copy: str = "segment") -> BranchPlan:
    """Decide the branch for a tap at ``node`` (builds nothing).

    One stage per downsampling between the tap and f. When every one of them is a backbone stage with
    a block-family builder, the stages are built by the family (``depth`` and ``width`` honoured);
    otherwise the branch is a segment: a fresh copy of the backbone's own graph from the tap to f
    (``depth`` may shorten or repeat identical blocks, ``width`` must stay 1). A tap at the last
    downsampling count gets the head alone. ``copy="blocks"`` (``branch_copy: blocks``, the layout of
    checkpoints written before segments existed) makes a stage without a builder from fresh copies of
    its whole blocks instead.
    """
    name = tap or label
    d_tap, d_final = traced.d[node], traced.d[traced.final]
    n = d_final - d_tap
    try:
        stages = traced.branch_stages(node, name)
        families = [family_of(s) for s in stages]
    except GraphError:
        stages, families = [], [None] * n
    built = n == 0 or all(families) or (copy == "blocks" and len(stages) == n)
    units = [] if built else segment_units(traced, node)
    groups = [] if built else spans(traced, node, units)
    for key, given in (("depth", depth), ("width", width)):
        if given is not None and len(given) != n:
            own = ([default_depth(s) for s in stages] if built else
                   [sum(u.block for u in group) for _, group in groups])
            raise GraphError(
                f"tap `{label}`: `{key}` has {len(given)} entr{'y' if len(given) == 1 else 'ies'} but this branch has "
                f"{n} stage{'s' if n != 1 else ''}: the tap sits at downsampling count {d_tap} and the final feature "
                f"map at {d_final}, and every classifier must see the same number of downsamplings "
                f"(DKS, Sec. 3.2). Give {n} value{'s' if n != 1 else ''}"
                + (f" (the backbone's own depths are {own})." if n else ", i.e. omit it.")
            )
    in_shape = traced.shapes[node]
    if not built:
        if width is not None and any(w != 1.0 for w in width):
            missing = [s.name for s, f in zip(stages, families) if f is None] or ["between the tap and the final map"]
            raise GraphError(
                f"tap `{label}`: width {width} asks for resized branch stages, but dksgraph has no block-family "
                f"builder for the backbone's stage(s) {', '.join(missing)}; it copies them from the backbone's own "
                "graph as they are. Use width 1.0 (or omit `width`) for this tap."
            )
        if depth is not None:
            groups = [(k, with_depth(group, dep, label, group[0].name)) for (k, group), dep in zip(groups, depth)]
        plans = tuple(StagePlan(k, f"{group[0].name}..{group[-1].name}" if len(group) > 1 else group[0].name, None,
                                "/".join(dict.fromkeys(u.kind for u in group if u.block)) or "ops",
                                sum(u.repeat for u in group if u.block), 1.0, group[0].in_shape, group[-1].out_shape)
                      for k, group in groups if group)
        units = tuple(u for _, group in groups for u in group)
        return BranchPlan(label, node, tap or traced.alias(node), d_tap, alpha, reason, plans, in_shape,
                          traced.shapes[traced.final], units)
    depth = depth or [default_depth(s) for s in stages]
    width = width or [1.0] * n
    shape = in_shape
    plans: list[StagePlan] = []
    for stage, family, k, w in zip(stages, families, depth, width):
        if family is None:
            block, out_shape = _plan_copies(stage, shape, k, w, label)
        else:
            block = type(_family_blocks(stage, family)[-1]).__name__
            out_shape = (family.channels(stage, shape[0], k, w), *stage.end.out_shape[1:])
        plans.append(StagePlan(stage.d, stage.name, family.name if family else None, block, k, w, shape, out_shape))
        shape = out_shape
    final_shape = traced.shapes[traced.final]
    if shape[1:] != final_shape[1:]:
        raise GraphError(
            f"tap `{label}`: the branch would end at {fmt_shape(shape)} but the backbone's final feature map is "
            f"{fmt_shape(final_shape)}; its stages do not reproduce the backbone's downsampling. Tap at a stage end "
            "(`dksgraph inspect` lists them)."
        )
    return BranchPlan(label, node, tap or traced.alias(node), d_tap, alpha, reason, tuple(plans), in_shape, shape)


def build_branch(traced: Traced, plan: BranchPlan, init: str = "backbone") -> tuple[Branch, str]:
    """The modules of a planned branch, fresh parameters initialised like the backbone's (``init``, see
    :mod:`dksgraph.branch_init`), checked against the plan's shapes; and how they were initialised."""
    if plan.segment:
        body = nn.Sequential(*build_segment(traced, plan.units))
    else:
        body = nn.Sequential(*[nn.Sequential(*(
            _build_copies(traced.stage_at(sp.d), sp.depth) if sp.family is None
            else FAMILIES[sp.family].build(traced.stage_at(sp.d), sp.in_shape[0], sp.depth, sp.width)))
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
