"""Segment branches: a fresh copy of the backbone's own graph from a tap to the final feature map.

The general form of the downsampling rule: for a tap t the branch is every node on a path from t
to the final feature map f, with new modules (fresh copies, re-initialised), including whatever
downsampling modules lie in between, wherever they sit in the module tree. It has the backbone's
downsampling count by construction and needs no knowledge of the block family.

The segment is cut at block boundaries into **units** (a whole block, or the ops between two
blocks); each unit is a :class:`Piece` holding fresh copies of the modules it calls (at their
backbone paths) and one FX program per train/eval mode, as the backbone's own code does. ``depth``
may shorten or repeat the longest run of identical consecutive blocks (same class, same input and
output shape) between two downsamplings; ``width`` widens a stage: every convolution (and Linear) in it
gets ``width`` x its output channels, and every module reading a widened map is rebuilt for its new input
(the stage's first input stays the tap's); a block that cannot be widened (a parameter tied to the
channel count, a concatenation that does not add up) is refused with the node and the reason.

Example::

    >>> from dksgraph.fx.graph import trace
    >>> from dksgraph.models.cifar_resnet import resnet32
    >>> t = trace(resnet32(), (3, 32, 32))
    >>> [u.name for u in segment_units(t, t.resolve("layer2"))]
    ['layer3.0', 'layer3.1', 'layer3.2', 'layer3.3', 'layer3.4']
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from dksgraph.branches.head import fresh_copy, resized_norm
from dksgraph.errors import GraphError
from dksgraph.fx.graph import Traced
from dksgraph.fx.tracing import CONSTANTS, EVAL, attribute_at, copy_view, mode_of, move_constants, view_program

__all__ = ["Piece", "Unit", "build_piece", "build_segment", "segment_units", "spans", "widen", "widened", "with_depth"]


@dataclass(frozen=True)
class Unit:
    """The backbone's graph between two cut points: a whole block, or the ops between blocks."""

    src: str
    dst: str
    name: str
    kind: str  # the block's class, or "ops"
    block: bool
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    downsamplings: int
    repeat: int = 1  # 0: dropped by `depth`, n > 1: repeated
    width: float = 1.0  # the channel multiplier of its stage


def segment_units(traced: Traced, node: str) -> list[Unit]:
    """The units from ``node`` to the final feature map, in graph order."""
    idx, final = traced.index, traced.final
    inside = [b for b in traced.blocks if idx[node] <= idx[b.src] and idx[b.node] <= idx[final]]
    bounds = sorted({node, final, *(b.src for b in inside), *(b.node for b in inside)}, key=idx.get)
    by_span = {(b.src, b.node): b for b in inside}
    units = []
    for src, dst in zip(bounds, bounds[1:]):
        block = by_span.get((src, dst))
        units.append(Unit(src, dst, block.path if block else traced.alias(dst), block.type_name if block else "ops",
                          block is not None, traced.shapes[src], traced.shapes[dst], traced.downsamplings[dst]))
    return units


def spans(traced: Traced, node: str, units: list[Unit]) -> list[tuple[int, list[Unit]]]:
    """Units grouped by the downsampling they follow: one group per count d(t)+1 .. d(f) (the ones before the
    first downsampling join the first group), or one group at d(t) when the tap is in the last stage."""
    d_tap, d_final = traced.downsamplings[node], traced.downsamplings[traced.final]
    counts = list(range(d_tap + 1, d_final + 1)) or [d_tap]
    groups: dict[int, list[Unit]] = {k: [] for k in counts}
    for u in units:
        groups[max(u.downsamplings, counts[0])].append(u)
    return list(groups.items())


def with_depth(units: list[Unit], depth: int, label: str, where: str) -> list[Unit]:
    """``units`` of one span with ``depth`` blocks: the longest run of identical consecutive blocks shortened or
    its last block repeated."""
    blocks = [u for u in units if u.block]
    if depth == len(blocks):
        return units
    runs: list[list[int]] = []
    for i, u in enumerate(units):
        identical = u.block and u.in_shape == u.out_shape
        if identical and runs and runs[-1][-1] == i - 1 and units[i - 1].kind == u.kind:
            runs[-1].append(i)
        elif identical:
            runs.append([i])
    run = max(runs, key=len, default=[])
    length = len(run) + depth - len(blocks)
    if not run or length < 0:
        kinds = ", ".join(dict.fromkeys(u.kind for u in blocks)) or "none"
        raise GraphError(
            f"tap `{label}`: depth {depth} for the branch stage at `{where}` needs a run of identical "
            f"consecutive blocks (same class, same input and output shape) to shorten or repeat, "
            + (f"and the longest ({len(run)} x {units[run[0]].kind}) allows a depth of {len(blocks) - len(run)} or "
               "more" if run else f"but its blocks ({kinds}) change shape")
            + f". Use such a depth, or omit `depth` for this stage (the backbone's {len(blocks)})."
        )
    out = list(units)
    for k, i in enumerate(run):
        out[i] = replace(units[i], repeat=1 if k < length else 0)
    if length > len(run):
        out[run[-1]] = replace(units[run[-1]], repeat=1 + length - len(run))
    return out


def widened(traced: Traced, units: list[Unit], width: float, label: str, channels: int) -> list[Unit]:
    """``units`` of one span at ``width``, its input ``channels`` wide (the tap's, or a widened span's before it):
    the planned shapes. A unit that runs a convolution (or Linear) outputs ``width`` x its channels, one without
    passes its input's through."""
    if width == 1.0 and channels == units[0].in_shape[0]:
        return units
    if any(len(u.out_shape) != 3 for u in units):
        raise GraphError(f"tap `{label}`: width {width} widens convolution channels, but the branch stage at "
                         f"`{units[0].name}` carries a token sequence, not a C x H x W map. Use width 1.0 (or omit "
                         "`width`) for this stage.")
    out = []
    for u in units:
        nodes = _piece_nodes(traced.graphs[EVAL], u)[0]
        convolves = any(n.op == "call_module" and isinstance(traced.model.get_submodule(n.target),
                                                              (nn.Conv2d, nn.Linear)) for n in nodes)
        after = _channels(u.out_shape[0], width) if convolves or u.out_shape[0] != u.in_shape[0] else channels
        out.append(replace(u, width=width, in_shape=(channels, *u.in_shape[1:]), out_shape=(after, *u.out_shape[1:])))
        channels = after
    return out


def _channels(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class Piece(nn.Module):
    """One unit of a segment branch: fresh copies of the modules it calls (under ``body``, at their backbone
    paths) and the backbone's own graph of that unit, one program per train/eval mode."""

    def __init__(self, body: nn.Module, programs: dict[bool, fx.GraphModule]) -> None:
        super().__init__()
        self.body = body
        self.__dict__["_programs"] = programs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__["_programs"][mode_of(self)](x)

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        for program in self.__dict__["_programs"].values():
            move_constants(program, fn)
        return result

    def __deepcopy__(self, memo: dict) -> Piece:  # the copy's programs view the copy's modules
        body = copy.deepcopy(self.body, memo)
        piece = Piece(body, {mode: copy_view(p, body, memo) for mode, p in self.__dict__["_programs"].items()})
        piece.train(self.training)
        return piece


def build_piece(traced: Traced, unit: Unit) -> Piece:
    """A :class:`Piece` for ``unit`` with fresh modules."""
    body = nn.Module()
    graphs = {}
    for mode, graph in traced.graphs.items():
        nodes, src, dst = _piece_nodes(graph, unit)
        constants = getattr(graph, CONSTANTS, {})
        new = fx.Graph()
        env = {src: new.placeholder("x")}
        for n in nodes:
            env[n] = new.node_copy(n, lambda m: env[m])
            if n.op in ("call_module", "get_attr") and n.target not in constants and not _has(body, n.target):
                original = attribute_at(traced.model, n.target)
                _put(body, n.target, fresh_copy(original) if isinstance(original, nn.Module) else _copy(original))
        new.output(env[dst])
        graphs[mode] = (new, {k: v for k, v in constants.items() if any(n.target == k for n in nodes)})
    return Piece(body, {mode: view_program(body, g, "SegmentPiece", c) for mode, (g, c) in graphs.items()})


def _piece_nodes(graph: fx.Graph, unit: Unit) -> tuple[list[fx.Node], fx.Node, fx.Node]:
    """The nodes on a path from the unit's input to its output (and constant sources they read), in order."""
    by_name = {n.meta["qualname"]: n for n in graph.nodes}
    if unit.src not in by_name or unit.dst not in by_name:
        raise GraphError(f"`{unit.name}` exists in the eval-mode graph but not in the train-mode graph; the backbone "
                         "changes structure with `.train()`, so it cannot be copied. Tap after it.")
    src, dst = by_name[unit.src], by_name[unit.dst]
    order = {n: i for i, n in enumerate(graph.nodes)}
    needed: set[fx.Node] = set()
    stack = [dst]
    while stack:
        n = stack.pop()
        if n is src or n in needed:
            continue
        if n.op == "placeholder" or (order[n] < order[src] and n.all_input_nodes):
            raise GraphError(f"`{unit.name}` reads a value computed before `{unit.src}` (other than through it), "
                             "so that part of the backbone cannot be copied on its own. Tap after it.")
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(needed, key=order.get), src, dst


def _has(root: nn.Module, path: str) -> bool:
    try:
        attribute_at(root, path)
        return True
    except AttributeError:
        return False


def _copy(value):
    if isinstance(value, nn.Parameter):
        return nn.Parameter(value.detach().clone(), value.requires_grad)
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _put(root: nn.Module, path: str, value) -> None:
    """Set ``value`` at a dotted ``path`` under ``root``, creating plain containers on the way."""
    *parents, name = path.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, (nn.Module, nn.Parameter)) or not isinstance(value, torch.Tensor):
        setattr(owner, name, value)
    else:
        owner.register_buffer(name, value)


def build_segment(traced: Traced, units: tuple[Unit, ...], label: str = "") -> list[nn.Module]:
    """The pieces of a planned segment, each repeated unit with its own fresh modules, widened where planned."""
    pieces = [(u, build_piece(traced, u)) for u in units for _ in range(u.repeat)]
    if any(u.width != 1.0 for u in units):  # every piece then rebuilt for the map that reaches it
        x = torch.zeros((2, *units[0].in_shape))  # the tap's map: every piece is sized for what reaches it
        for unit, piece in pieces:
            x = widen(piece, unit, x, label)
    return [piece for _, piece in pieces]


def widen(piece: Piece, unit: Unit, x: torch.Tensor, label: str = "") -> torch.Tensor:
    """Rebuild ``piece``'s modules for ``unit.width``: run it on a probe ``x`` (its input, already widened by the
    pieces before it) and give every convolution and Linear ``width`` x its output channels and every module its
    input's channels (at width 1 only the latter, after a widened stage). Returns the piece's output; a GraphError names the node that cannot be widened."""
    program = piece.__dict__["_programs"][EVAL]
    try:
        out = _Widener(program, piece.body, unit.width).run(x)
    except GraphError as exc:  # a shape error: something in the block is tied to the backbone's channel count
        raise GraphError(f"tap `{label}`: width {unit.width} cannot widen `{unit.name}` ({unit.kind}): "
                         f"{str(exc).splitlines()[0]}. Use width 1.0 (or omit `width`) for this stage.") from None
    if tuple(out.shape[1:]) != unit.out_shape:
        raise GraphError(f"tap `{label}`: width {unit.width} gives `{unit.name}` ({unit.kind}) an output of "
                         f"{tuple(out.shape[1:])}, not {unit.out_shape}: its output channels are not one widened "
                         "convolution's (a concatenation, a fixed channel count). Use width 1.0 (or omit `width`) "
                         "for this stage.")
    return out


class _Widener(fx.Interpreter):
    """Runs a piece once in eval mode, replacing each module it calls by one sized for the input it receives."""

    def __init__(self, program: fx.GraphModule, body: nn.Module, width: float) -> None:
        super().__init__(program)
        self.body, self.width = body, width

    def call_module(self, target, args, kwargs):
        x = args[0] if args else None
        module = self.body.get_submodule(target)
        if isinstance(x, torch.Tensor):
            try:
                module = _resized(module, x, self.width)
            except ValueError as exc:
                raise GraphError(f"node `{target}`: {exc}") from None
            owner, _, name = target.rpartition(".")
            setattr(self.body.get_submodule(owner) if owner else self.body, name, module)
        with torch.no_grad():
            was = module.training
            module.eval()
            try:
                return module(*args, **kwargs)
            finally:
                module.train(was)

    def run_node(self, n: fx.Node):
        with torch.no_grad():
            try:
                return super().run_node(n)
            except GraphError:
                raise
            except Exception as exc:
                params = [f"`{a.target}`" for a in n.all_input_nodes if a.op == "get_attr"]
                why = (f"it reads {', '.join(params)}, a tensor sized for the backbone's channels" if params else
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                raise GraphError(f"node `{n.name}` fails ({why})") from None


def _resized(module: nn.Module, x: torch.Tensor, width: float) -> nn.Module:
    """A module like ``module`` for the input ``x``, with ``width`` x its output channels where it has them."""
    channels = x.shape[1]
    if isinstance(module, nn.Conv2d):
        m = module
        if m.groups == 1:
            groups, out = 1, _channels(m.out_channels, width)
        elif m.groups == m.in_channels:  # depthwise: one group per input channel, the same multiplier
            groups, out = channels, channels * (m.out_channels // m.in_channels)
        else:
            groups, out = m.groups, _channels(m.out_channels, width)
            if channels % groups or out % groups:
                raise ValueError(f"a convolution with {groups} groups cannot take {channels} input and {out} "
                                 "output channels")
        return nn.Conv2d(channels, out, m.kernel_size, m.stride, m.padding, m.dilation, groups, m.bias is not None,
                         m.padding_mode)
    if isinstance(module, nn.Linear):  # a pointwise layer on channels-last maps, or a squeeze-excitation's
        return nn.Linear(x.shape[-1], _channels(module.out_features, width), module.bias is not None)
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return resized_norm(module, channels)
    if isinstance(module, nn.GroupNorm):
        if channels % module.num_groups:
            raise ValueError(f"GroupNorm's {module.num_groups} groups do not divide {channels} channels")
        return nn.GroupNorm(module.num_groups, channels, module.eps, module.affine)
    if isinstance(module, nn.LayerNorm):  # LayerNorm2d (torchvision, timm) normalises dim 1, nn.LayerNorm the last
        return resized_norm(module, x.shape[1] if type(module) is not nn.LayerNorm and x.dim() == 4 else x.shape[-1])
    return module
