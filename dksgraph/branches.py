"""Branch builders: the paper's downsampling-count rule turned into auxiliary classifier modules.

A branch at tap t has one stage per downsampling between t and the final feature map f
(d(f) - d(t) stages). Branch stage i reproduces the backbone stage at count d(t)+i+1 with the
same building-block type, first block strided, ``depth[i]`` blocks and ``width[i]`` x channels,
then ends with a fresh copy of the backbone's head resized to the branch's channels.

Block families with a builder honour ``width``; any other family falls back to fresh copies of
the backbone's own blocks (re-initialised), where ``width`` must stay 1.0.

Example::

    >>> from dksgraph.graph import trace
    >>> from dksgraph.models.cifar_resnet import resnet32
    >>> t = trace(resnet32(), (3, 32, 32))
    >>> plan, branch = make_branch(t, "c2", t.resolve("layer2"), depth=[5], width=[2.0])
    >>> plan.describe()
    'CifarBasicBlock x5 @128'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dksgraph.errors import GraphError
from dksgraph.graph import Stage, Traced
from dksgraph.head import build_head, fresh_copy


@dataclass(frozen=True)
class StagePlan:
    """One branch stage: which backbone stage it copies and how big it is."""

    d: int
    source: str
    block: str
    depth: int
    width: float
    in_channels: int
    out_channels: int
    generic: bool


@dataclass(frozen=True)
class BranchPlan:
    """Everything about one auxiliary classifier that the summary, render and strip need."""

    label: str
    node: str
    tap: str
    d: int
    alpha: float
    stages: tuple[StagePlan, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def describe(self) -> str:
        if not self.stages:
            return "head only"
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
    """A block family dksgraph can rebuild at any width: which blocks, their default depth, the builder."""

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[Stage, int, int, float], tuple[list[nn.Module], int]]
    count: Callable[[Stage], int] | None = None


def _family_blocks(stage: Stage, family: Family) -> list[nn.Module]:
    return [b.module for b in stage.blocks if family.matches(b.module)]


def _build_spawn(stage: Stage, in_ch: int, depth: int, width: float) -> tuple[list[nn.Module], int]:
    """zoo blocks (CifarBasicBlock, PreActBlock, DepthwiseSeparable) know how to spawn a sibling."""
    own = [b.module for b in stage.blocks if hasattr(b.module, "spawn")]
    out = max(1, round(own[-1].out_channels * width))
    blocks = [own[0].spawn(in_ch, out, own[0].stride)]
    blocks += [own[-1].spawn(out, out, 1) for _ in range(depth - 1)]
    return blocks, out


def _build_torchvision_resnet(stage: Stage, in_ch: int, depth: int, width: float) -> tuple[list[nn.Module], int]:
    from torchvision.models.resnet import Bottleneck

    own = [b.module for b in stage.blocks if _is_tv_resnet(b.module)]
    cls = type(own[-1])
    template = own[-1]
    if cls is Bottleneck:
        planes = template.conv3.out_channels // cls.expansion
        groups = template.conv2.groups
        base_width = template.conv2.in_channels * 64 // (planes * groups)
        extra = {"groups": groups, "base_width": base_width}
    else:
        planes = template.conv2.out_channels
        extra = {}
    planes = max(1, round(planes * width))
    out = planes * cls.expansion
    stride = own[0].stride
    downsample = None
    if stride != 1 or in_ch != out:
        downsample = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    blocks = [cls(in_ch, planes, stride, downsample, **extra)]
    blocks += [cls(out, planes, **extra) for _ in range(depth - 1)]
    return blocks, out


def _build_inverted_residual(stage: Stage, in_ch: int, depth: int, width: float) -> tuple[list[nn.Module], int]:
    from torchvision.models.mobilenetv2 import InvertedResidual

    own = [b for b in stage.blocks if type(b.module) is InvertedResidual]
    template = own[-1]
    ratio = _expand_ratio(template.module, template.in_shape[0])
    out = max(1, round(template.module.out_channels * width))
    blocks = [InvertedResidual(in_ch, out, own[0].module.stride, _expand_ratio(own[0].module, own[0].in_shape[0]))]
    blocks += [InvertedResidual(out, out, 1, ratio) for _ in range(depth - 1)]
    return blocks, out


def _expand_ratio(block: nn.Module, in_ch: int) -> float:
    first = block.conv[0]
    hidden = first[0].out_channels if isinstance(first, nn.Sequential) and first[0].kernel_size == (1, 1) else in_ch
    if hidden == in_ch and first[0].groups == in_ch:
        return 1
    return hidden / in_ch


def _build_zoo_densenet(stage: Stage, in_ch: int, depth: int, width: float) -> tuple[list[nn.Module], int]:
    from dksgraph.models.densenet import DenseLayer, Transition

    transition = next(b.module for b in stage.blocks if isinstance(b.module, Transition))
    layer = next(b.module for b in stage.blocks if isinstance(b.module, DenseLayer))
    trans_out = int(in_ch * transition.out_channels / transition.in_channels)
    growth = max(1, round(layer.growth * width))
    blocks: list[nn.Module] = [Transition(in_ch, trans_out)]
    blocks += [DenseLayer(trans_out + i * growth, growth, layer.bottleneck) for i in range(depth)]
    return blocks, trans_out + depth * growth


def _build_torchvision_densenet(stage: Stage, in_ch: int, depth: int, width: float) -> tuple[list[nn.Module], int]:
    from torchvision.models.densenet import _DenseBlock, _Transition

    transition = next(b.module for b in stage.blocks if isinstance(b.module, _Transition))
    dense = next(b.module for b in stage.blocks if isinstance(b.module, _DenseBlock))
    layer = next(iter(dense.values()))
    growth = layer.conv2.out_channels
    bn_size = layer.conv1.out_channels // growth
    trans_out = int(in_ch * transition.conv.out_channels / transition.conv.in_channels)
    new_growth = max(1, round(growth * width))
    block = _DenseBlock(depth, trans_out, bn_size, new_growth, float(layer.drop_rate), layer.memory_efficient)
    return [_Transition(in_ch, trans_out), block], trans_out + depth * new_growth


def _is_tv_resnet(m: nn.Module) -> bool:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return type(m) in (BasicBlock, Bottleneck)


def _is_type(module_path: str, name: str) -> Callable[[nn.Module], bool]:
    def check(m: nn.Module) -> bool:
        cls = type(m)
        return cls.__module__ == module_path and cls.__name__ == name

    return check


def _is_zoo_dense(m: nn.Module) -> bool:
    return _is_type("dksgraph.models.densenet", "DenseLayer")(m)


def _is_tv_dense(m: nn.Module) -> bool:
    return _is_type("torchvision.models.densenet", "_DenseBlock")(m)


FAMILIES: list[Family] = [
    Family("zoo", lambda m: hasattr(m, "spawn") and hasattr(m, "out_channels"), _build_spawn),
    Family("torchvision resnet", _is_tv_resnet, _build_torchvision_resnet),
    Family("inverted residual", _is_type("torchvision.models.mobilenetv2", "InvertedResidual"), _build_inverted_residual),
    Family("densenet", _is_zoo_dense, _build_zoo_densenet),
    Family("torchvision densenet", _is_tv_dense, _build_torchvision_densenet,
           count=lambda s: sum(len(b.module) for b in s.blocks if _is_tv_dense(b.module))),
]


def family_of(stage: Stage) -> Family | None:
    """The builder family of a stage: the family of most of its blocks, if any."""
    best, votes = None, 0
    for family in FAMILIES:
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


# ---------------------------------------------------------------- generic fallback


def _build_generic(stage: Stage, in_ch: int, depth: int, width: float, label: str) -> tuple[list[nn.Module], int]:
    names = sorted({b.type_name for b in stage.blocks})
    if width != 1.0:
        raise GraphError(
            f"tap `{label}`: width {width} asks for a resized copy of stage `{stage.name}` ({', '.join(names)}), "
            "but dksgraph has no builder for that block family and can only copy its blocks as they are. "
            "Use width 1.0 (or omit `width`) for this tap."
        )
    first = stage.blocks[0]
    if first.in_shape[0] != in_ch:
        raise GraphError(
            f"tap `{label}` gives {in_ch} channels but stage `{stage.name}` ({', '.join(names)}) starts from "
            f"{first.in_shape[0]}: the backbone changes the channel count between them outside any block "
            "dksgraph recognises, and blocks without a builder are copied as they are. Tap at another stage "
            "end (`dksgraph inspect` marks them; with `taps: auto`, list the taps by hand)."
        )
    blocks = [fresh_copy(b.module) for b in stage.blocks[:depth]]
    last = stage.blocks[-1]
    if depth > len(stage.blocks):
        if last.in_shape != last.out_shape:
            raise GraphError(
                f"tap `{label}`: depth {depth} exceeds the {len(stage.blocks)} blocks of stage `{stage.name}`, and "
                "its last block changes shape, so it cannot be repeated. Use a depth of at most "
                f"{len(stage.blocks)} for this stage."
            )
        blocks += [fresh_copy(last.module) for _ in range(depth - len(stage.blocks))]
    out_block = stage.blocks[min(depth, len(stage.blocks)) - 1]
    return blocks, out_block.out_shape[0]


# ---------------------------------------------------------------- the branch


def make_branch(traced: Traced, label: str, node: str, depth: list[int] | None = None,
                width: list[float] | None = None, alpha: float = 1.0, tap: str | None = None) -> tuple[BranchPlan, Branch]:
    """Plan and build the branch for a tap at ``node`` (already checked with ``Traced.check_tap``)."""
    d_tap, d_final = traced.d[node], traced.d[traced.final]
    stages = [traced.stage_at(k) for k in range(d_tap + 1, d_final + 1)]
    n = len(stages)
    for key, given in (("depth", depth), ("width", width)):
        if given is not None and len(given) != n:
            raise GraphError(
                f"tap `{label}`: `{key}` has {len(given)} entr{'y' if len(given) == 1 else 'ies'} but this branch has "
                f"{n} stage{'s' if n != 1 else ''}: the tap sits at downsampling count {d_tap} and the final feature "
                f"map at {d_final}, and every classifier must see the same number of downsamplings "
                f"(DKS, Sec. 3.2). Give {n} value{'s' if n != 1 else ''}"
                + (f" (the backbone's own depths are {[default_depth(s) for s in stages]})." if n else
                   ", i.e. omit it.")
            )
    depth = depth or [default_depth(s) for s in stages]
    width = width or [1.0] * n
    in_shape = traced.shapes[node]
    channels = in_shape[0]
    modules: list[nn.Module] = []
    plans: list[StagePlan] = []
    for stage, k, w in zip(stages, depth, width):
        family = family_of(stage)
        if family is None:
            blocks, out = _build_generic(stage, channels, k, w, label)
            block = "/".join(dict.fromkeys(type(b).__name__ for b in blocks))
        else:
            blocks, out = family.build(stage, channels, k, w)
            block = type(blocks[-1]).__name__
        modules.append(nn.Sequential(*blocks))
        plans.append(StagePlan(stage.d, stage.name, block, k, w, channels, out, family is None))
        channels = out
    body = nn.Sequential(*modules)
    with torch.no_grad():
        was = body.training
        body.eval()
        probe = body(torch.zeros((1, *in_shape)))
        body.train(was)
    out_shape = tuple(probe.shape[1:])
    final_shape = traced.shapes[traced.final]
    if out_shape[1:] != final_shape[1:]:
        raise GraphError(
            f"tap `{label}`: the branch ends at {_fmt(out_shape)} but the backbone's final feature map is "
            f"{_fmt(final_shape)}; its stages do not reproduce the backbone's downsampling. Tap at a stage end "
            "(`dksgraph inspect` lists them)."
        )
    head = build_head(traced, out_shape)
    plan = BranchPlan(label, node, tap or traced.alias(node), d_tap, alpha, tuple(plans), in_shape, out_shape)
    return plan, Branch(body, head)


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)
