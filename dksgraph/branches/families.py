"""Block families dksgraph can rebuild at any width and depth: the zoo's blocks that spawn siblings,
torchvision's ResNet blocks, inverted residuals, and both DenseNets.

A family says which blocks it matches, the output channels of a branch stage of ``depth`` blocks at
``width`` and how to build that stage; :func:`family_of` picks a stage's family by majority of its blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision.models.densenet import _DenseBlock, _Transition
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from dksgraph.fx.blocks import Stage
from dksgraph.models.densenet import DenseLayer, Transition

__all__ = ["FAMILIES", "Family", "default_depth", "family_blocks", "family_of"]


@dataclass(frozen=True)
class Family:
    """A block family dksgraph can rebuild at any width: which blocks, the output channels of a stage
    of ``depth`` blocks at ``width``, and the builder (which must give exactly those channels)."""

    name: str
    matches: Callable[[nn.Module], bool]
    channels: Callable[[Stage, int, int, float], int]
    build: Callable[[Stage, int, int, float], list[nn.Module]]
    count: Callable[[Stage], int] | None = None


def family_blocks(stage: Stage, family: Family) -> list[nn.Module]:
    """The blocks of ``stage`` that belong to ``family``."""
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
    return [b for b in stage.blocks if type(b.module) is InvertedResidual]


def _ir_channels(stage: Stage, in_ch: int, depth: int, width: float) -> int:
    return max(1, round(_inverted_residuals(stage)[-1].module.out_channels * width))


def _build_inverted_residual(stage: Stage, in_ch: int, depth: int, width: float) -> list[nn.Module]:
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
    transition = next(b.module for b in stage.blocks if isinstance(b.module, Transition))
    layer = next(b.module for b in stage.blocks if isinstance(b.module, DenseLayer))
    return int(in_ch * transition.out_channels / transition.in_channels), max(1, round(layer.growth * width)), layer


def _zoo_dense_channels(stage: Stage, in_ch: int, depth: int, width: float) -> int:
    trans_out, growth, _ = _zoo_dense_geometry(stage, in_ch, width)
    return trans_out + depth * growth


def _build_zoo_densenet(stage: Stage, in_ch: int, depth: int, width: float) -> list[nn.Module]:
    trans_out, growth, layer = _zoo_dense_geometry(stage, in_ch, width)
    return [Transition(in_ch, trans_out)] + [DenseLayer(trans_out + i * growth, growth, layer.bottleneck)
                                             for i in range(depth)]


def _tv_dense_geometry(stage: Stage, in_ch: int, width: float) -> tuple[int, int, nn.Module]:
    transition = next(b.module for b in stage.blocks if isinstance(b.module, _Transition))
    layer = next(iter(next(b.module for b in stage.blocks if isinstance(b.module, _DenseBlock)).values()))
    trans_out = int(in_ch * transition.conv.out_channels / transition.conv.in_channels)
    return trans_out, max(1, round(layer.conv2.out_channels * width)), layer


def _tv_dense_channels(stage: Stage, in_ch: int, depth: int, width: float) -> int:
    trans_out, growth, _ = _tv_dense_geometry(stage, in_ch, width)
    return trans_out + depth * growth


def _build_torchvision_densenet(stage: Stage, in_ch: int, depth: int, width: float) -> list[nn.Module]:
    trans_out, growth, layer = _tv_dense_geometry(stage, in_ch, width)
    bn_size = layer.conv1.out_channels // layer.conv2.out_channels
    block = _DenseBlock(depth, trans_out, bn_size, growth, float(layer.drop_rate), layer.memory_efficient)
    return [_Transition(in_ch, trans_out), block]


def _is_tv_resnet(m: nn.Module) -> bool:
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
        n = len(family_blocks(stage, family))
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
    return len(family_blocks(stage, family))


