"""Building blocks and stages of a traced backbone.

A **block** is a module call whose output is a cut point: a composite child of a stage container
(``layer2.1``, ``features.denseblock2``), a layer of a flat conv stack (VGG's ``features``), a
downsampling module at the top level wherever it sits (DenseNet transitions and PNASNet reduction
cells between stages), or, in a network without stage containers, any composite child of the
network (GoogLeNet's inception modules). A leaf module called twice (one ``maxpool`` after two
stages) makes a block per call. A parameter-free module whose output is 1x1 or flattened next is
a global pool: it belongs to the head, whatever its class.

A **stage** is the run of consecutive blocks between two downsamplings along the main path, keyed
by its downsampling count d; it ``downsamples`` when its first block does.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from torch import fx, nn

from dksgraph.fx.tracing import stride_of

__all__ = ["Block", "GraphFacts", "Stage", "find_blocks", "inside_any", "module_spans", "stages_of"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Block:
    """A building-block module call whose output is a cut point; ``src`` is the cut point feeding it."""

    path: str
    module: nn.Module = field(repr=False, compare=False)
    node: str
    src: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    downsamplings_in: int
    downsamplings: int

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


@dataclass(frozen=True)
class Stage:
    """The run of blocks at downsampling count ``d``; ``downsamples`` when its first block strides."""

    downsamplings: int
    blocks: tuple[Block, ...]

    @property
    def end(self) -> Block:
        return self.blocks[-1]

    @property
    def downsamples(self) -> bool:
        return self.blocks[0].downsamplings_in == self.downsamplings - 1

    @property
    def name(self) -> str:
        """The stage container's path when all blocks share one (``layer2``), else the block span."""
        parents = {b.path.rpartition(".")[0] for b in self.blocks}
        if len(parents) == 1 and "" not in parents:
            return parents.pop()
        return f"{self.blocks[0].path}..{self.blocks[-1].path}" if len(self.blocks) > 1 else self.blocks[0].path


@dataclass(frozen=True)
class GraphFacts:
    """What block finding reads off the traced graph."""

    order: list[str]
    index: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    downsamplings: dict[str, int]
    cut_points: list[str]
    calls: dict[str, list[str]]  # leaf module path -> its call nodes, in order
    flattened: set[str]  # nodes whose every user flattens them

    @classmethod
    def of(cls, graph: fx.Graph, shapes, d, cut_points) -> GraphFacts:
        qual = {n: n.meta["qualname"] for n in graph.nodes}
        order = [qual[n] for n in graph.nodes]
        calls: dict[str, list[str]] = {}
        flattened = set()
        for n in graph.nodes:
            if n.op == "call_module":
                calls.setdefault(str(n.target), []).append(qual[n])
            if n.users and all(_flattens(u) for u in n.users):
                flattened.add(qual[n])
        return cls(order, {q: i for i, q in enumerate(order)}, shapes, d, cut_points, calls, flattened)


def _flattens(n: fx.Node) -> bool:
    import torch

    if n.op == "call_function":
        return n.target is torch.flatten
    return n.op == "call_method" and n.target in ("flatten", "view", "reshape")


def module_spans(model: nn.Module, order: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """First node index and last node name of every module scope seen in the graph."""
    paths = {p for p, _ in model.named_modules() if p}
    first: dict[str, int] = {}
    end: dict[str, str] = {}
    for i, q in enumerate(order):
        parts = q.split(".")
        for j in range(1, len(parts) + 1):
            prefix = ".".join(parts[:j])
            if prefix in paths:
                first.setdefault(prefix, i)
                end[prefix] = q
    return first, end


def find_blocks(model: nn.Module, facts: GraphFacts) -> list[Block]:
    """Every block of ``model`` (see the module docstring), in graph order."""
    first, end = module_spans(model, facts.order)
    blocks = _find(model, facts, first, end, root=False)
    as_root = _find(model, facts, first, end, root=True)
    if not blocks:
        return as_root
    taken = {b.node for b in blocks}
    # the network's own downsampling children are blocks too, wherever they sit: DenseNet's transitions and
    # PNASNet's reduction cells between stage containers, DLA's levels after the last one
    extra = [b for b in as_root if "." not in b.path and b.downsamplings > b.downsamplings_in and b.node not in taken
             and not inside_any(b.node, blocks)
             and b.out_shape[1:] != (1, 1)]  # SqueezeNet's classifier ends in a global pool
    return sorted(blocks + extra, key=lambda b: facts.index[b.node])


def _find(model: nn.Module, facts: GraphFacts, first: dict[str, int], end: dict[str, str], root: bool) -> list[Block]:
    modules = dict(model.named_modules())
    cuts = set(facts.cut_points)
    cut_index = [facts.index[c] for c in facts.cut_points]
    blocks: list[Block] = []
    inside: list[str] = []
    for path, m in modules.items():
        if not path or path not in end or any(path.startswith(b + ".") for b in inside):
            continue
        parent_path = path.rpartition(".")[0]
        parent = modules[parent_path]
        composite = bool(list(m.children()))
        container = _is_container(parent) or (root and parent_path == "")
        calls = [end[path]] if composite else facts.calls.get(path, [end[path]])
        found = False
        for node in calls:  # a leaf module called twice is a block per call
            start = first[path] if composite else facts.index[node]
            if node not in cuts or len(facts.shapes.get(node, ())) not in (2, 3) or _global_pool(m, node, facts):
                continue
            pos = bisect.bisect_left(cut_index, start) - 1
            if pos < 0 or len(facts.shapes.get(facts.cut_points[pos], ())) not in (2, 3):
                continue
            src = facts.cut_points[pos]
            if composite:
                ok = container and not _is_container(m)
            else:
                ok = _is_flat_stack(parent) or (container and facts.downsamplings[node] > facts.downsamplings[src])
            if ok:
                found = True
                blocks.append(Block(path, m, node, src, facts.shapes[src], facts.shapes[node], facts.downsamplings[src],
                                    facts.downsamplings[node]))
        if found:
            inside.append(path)
    blocks.sort(key=lambda b: facts.index[b.node])
    return blocks


def _is_container(m: nn.Module) -> bool:
    """A module that only sequences other composite modules (``layer2``, ``features``, ``denseblock1``)."""
    if not isinstance(m, _CONTAINERS):
        return False
    if isinstance(m, nn.Sequential) and type(m).forward is not nn.Sequential.forward:
        return False
    if isinstance(m, nn.ModuleDict) and "forward" in type(m).__dict__:
        return False
    return any(len(list(c.children())) > 0 for c in m.children())


def _is_flat_stack(m: nn.Module) -> bool:
    """A plain Sequential of single layers that downsamples (VGG's and AlexNet's ``features``, not a
    classifier's): its layers act as blocks."""
    return (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            and len(m) > 1 and not any(list(c.children()) for c in m.children())
            and any(stride_of(c) > 1 for c in m.children()))


def _global_pool(m: nn.Module, node: str, facts: GraphFacts) -> bool:
    """A parameter-free module leaving a 1x1 map or a map that is flattened next (an AdaptiveAvgPool2d, a
    fixed-size AvgPool2d(8), timm's SelectAdaptivePool2d) pools globally: it belongs to the head."""
    shape = facts.shapes[node]
    collapses = len(shape) == 3 and (shape[1:] == (1, 1) or node in facts.flattened)
    return collapses and next(m.parameters(), None) is None


def stages_of(blocks: list[Block]) -> list[Stage]:
    """Runs of consecutive blocks at one downsampling count."""
    stages: list[Stage] = []
    run: list[Block] = []
    for b in blocks:
        if run and b.downsamplings != run[-1].downsamplings:
            stages.append(Stage(run[-1].downsamplings, tuple(run)))
            run = []
        run.append(b)
    if run:
        stages.append(Stage(run[-1].downsamplings, tuple(run)))
    return stages


def inside_any(node: str, blocks) -> bool:
    """Whether ``node`` is an op inside one of ``blocks`` (not a block's output)."""
    return any(node.startswith(b.path + ".") for b in blocks)
