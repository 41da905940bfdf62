"""Trace a backbone and describe its topology: shapes, downsampling counts, cut points, blocks, stages.

:func:`trace` traces the model twice with :mod:`dksgraph.tracing` (train and eval mode, since FX
bakes ``self.training`` into the graph; nodes are named like torchvision's
``get_graph_node_names``), propagates shapes at the spec's ``input_size`` and finds

* **cut points**: nodes every input->output path passes through (dominators of the output);
* **blocks**: building-block modules (children of a stage container) whose output is a cut point;
* **stages**: runs of blocks at one resolution, keyed by their downsampling count d;
* **final**: the final feature map f, the last block boundary before the head.

Example::

    >>> from dksgraph.models.cifar_resnet import resnet32
    >>> t = trace(resnet32(), (3, 32, 32))
    >>> t.final, t.d[t.final], [s.d for s in t.stages]
    ('layer3.4.relu_1', 2, [0, 1, 2])
    >>> t.resolve("layer1")
    'layer1.4.relu_1'
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import networkx as nx
from torch import fx, nn

from dksgraph.errors import GraphError, close_matches
from dksgraph.formatting import fmt_shape
from dksgraph.tracing import check_resolution, propagate_shapes, stride_of, trace_graph

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Block:
    """A building-block module whose output is a cut point."""

    path: str
    module: nn.Module = field(repr=False, compare=False)
    node: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    d_in: int
    d: int

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


@dataclass(frozen=True)
class Stage:
    """The run of blocks at downsampling count ``d``; ``downsamples`` when its first block strides."""

    d: int
    blocks: tuple[Block, ...]

    @property
    def end(self) -> Block:
        return self.blocks[-1]

    @property
    def downsamples(self) -> bool:
        return self.blocks[0].d_in == self.d - 1

    @property
    def name(self) -> str:
        """The stage container's path when all blocks share one (``layer2``), else the block span."""
        parents = {b.path.rpartition(".")[0] for b in self.blocks}
        if len(parents) == 1 and "" not in parents:
            return parents.pop()
        return f"{self.blocks[0].path}..{self.blocks[-1].path}" if len(self.blocks) > 1 else self.blocks[0].path


@dataclass
class Traced:
    """A traced backbone and everything dksgraph derives from its graph."""

    model: nn.Module
    input_size: tuple[int, int, int]
    graphs: dict[bool, fx.Graph]
    order: list[str]
    shapes: dict[str, tuple[int, ...]]
    d: dict[str, int]
    cut_points: list[str]
    blocks: list[Block]
    stages: list[Stage]
    final: str
    head: list[str]
    aliases: dict[str, str]
    module_end: dict[str, str]

    @property
    def index(self) -> dict[str, int]:
        return {q: i for i, q in enumerate(self.order)}

    def alias(self, node: str) -> str:
        """The shortest module path whose output is ``node`` (``layer2`` for ``layer2.3.relu_2``)."""
        return self.aliases.get(node, node)

    def valid_taps(self) -> list[str]:
        """Cut points with a 4-D feature map before f whose branch stages all exist, in graph order."""
        idx = self.index
        return [q for q in self.cut_points if len(self.shapes.get(q, ())) in (2, 3) and idx[q] < idx[self.final]
                and self._copyable(q)]

    def _copyable(self, node: str) -> bool:
        try:
            self.branch_stages(node)
        except GraphError:
            return False
        return True

    def branch_stages(self, node: str, at: str | None = None) -> list[Stage]:
        """The backbone stages a branch at ``node`` reproduces, one per downsampling between ``node`` and f
        (the paper's rule, Sec. 3.2); a GraphError saying why when one of them cannot be copied."""
        stages = []
        for k in range(self.d[node] + 1, self.d[self.final] + 1):
            stage = self.stage_at(k)
            if stage is None or not stage.downsamples:
                where = "it happens outside any building block" if stage is None else (
                    f"stage `{stage.name}` does not start with a strided block")
                later = [self.alias(s.end.node) for s in self.stages if s.d >= k and s.d < self.d[self.final]]
                raise GraphError(
                    f"tap `{at or self.alias(node)}` (downsampling count {self.d[node]}) needs a branch stage that "
                    f"reproduces downsampling number {k}, but {where}, so no branch can copy it. Tap at or after the "
                    f"end of the stage at count {k} instead" + (f" (e.g. `{later[0]}`)." if later else ".")
                )
            stages.append(stage)
        return stages

    def inside_block(self, node: str) -> bool:
        """Whether ``node`` is an op inside a building block (not the block's output)."""
        return _inside(node, self.blocks)

    def stage_at(self, d: int) -> Stage | None:
        return next((s for s in self.stages if s.d == d), None)

    def resolve(self, at: str) -> str:
        """The node a tap's ``at`` names: a node name, or a module path meaning that module's output."""
        if at in self.shapes or at in self.order:
            return at
        if at in self.module_end:
            return self.module_end[at]
        choices = [self.alias(q) for q in self.valid_taps()] + self.valid_taps()
        hint = close_matches(at, choices)
        raise GraphError(
            f"unknown tap `{at}`: no node or module of this backbone has that name"
            + (f"; did you mean {hint}?" if hint else ".")
            + " Run `dksgraph inspect` on the spec to list the valid taps."
        )

    def check_tap(self, at: str) -> str:
        """Resolve ``at`` and refuse it unless a branch obeying the downsampling rule can start there."""
        node = self.resolve(at)
        idx = self.index
        final_name = self.alias(self.final)
        if idx[node] >= idx[self.final]:
            raise GraphError(
                f"tap `{at}` is at or after the final feature map `{final_name}`, where the backbone's own head "
                f"takes over, so an auxiliary classifier there would duplicate `main`. Tap an earlier point; "
                f"the deepest valid taps are {self._near(idx[self.final], before_only=True)}."
            )
        if node not in set(self.cut_points):
            raise GraphError(
                f"tap `{at}` is not a cut point: some path from the input to the output bypasses it (a skip "
                f"connection or a parallel path), so a branch there would not see the whole signal. "
                f"The nearest valid taps are {self._near(idx[node])}."
            )
        if len(self.shapes.get(node, ())) not in (2, 3):
            raise GraphError(
                f"tap `{at}` outputs shape {self.shapes.get(node)}, not a C x H x W feature map or an L x D token "
                f"sequence; tap a node "
                f"such as {self._near(idx[node])}."
            )
        self.branch_stages(node, at)
        return node

    def auto_taps(self) -> list[tuple[str, str, str]]:
        """(label, node, reason) of DESIGN.md's automatic taps, deep to shallow.

        The ends of the two stages before the last downsampling stage; a network whose blocks all
        sit at one resolution (ViT) is tapped after 2/3 and 1/3 of its blocks instead.
        """
        df = self.d[self.final]
        chosen = []
        for label, k in (("c2", df - 1), ("c3", df - 2)):
            stage = self.stage_at(k)
            if stage is None or k < 0:
                continue
            node = stage.end.node
            try:
                self.check_tap(node)
            except GraphError:
                continue
            reason = f"end of stage `{stage.name}` (count {k}), {df - k} stage(s) before the final feature map"
            chosen.append((f"c{len(chosen) + 2}", node, reason))
        if chosen or any(s.d < df for s in self.stages):
            return chosen
        valid = set(self.valid_taps())
        ends = [b.node for b in self.blocks if b.node in valid]
        for frac in (2 / 3, 1 / 3):
            if ends:
                node = ends[max(0, min(len(ends) - 1, round(len(ends) * frac) - 1))]
                if node not in [c[1] for c in chosen]:
                    chosen.append((f"c{len(chosen) + 2}", node,
                                   f"after {frac:.0%} of the blocks (all blocks share one resolution)"))
        return chosen

    def _near(self, position: int, before_only: bool = False) -> str:
        idx = self.index
        taps = self.valid_taps()
        before = [q for q in taps if idx[q] < position][-2:]
        after = [] if before_only else [q for q in taps if idx[q] > position][:2]
        names = [f"`{self.alias(q)}`" for q in before + after]
        return ", ".join(names) if names else "(none)"


def trace(model: nn.Module, input_size, leaf_modules: list[str] | None = None) -> Traced:
    """Trace ``model`` in both modes and analyse its eval-mode graph at ``input_size`` (C, H, W)."""
    leaf_modules = list(leaf_modules or [])
    graphs = {mode: trace_graph(model, leaf_modules, mode) for mode in (False, True)}
    graph = graphs[False]
    nodes = list(graph.nodes)
    qual = {n: n.meta["qualname"] for n in nodes}
    order = [qual[n] for n in nodes]
    shapes = propagate_shapes(model, graph, qual, tuple(input_size))
    d = _downsampling_counts(order, shapes, input_size[1])
    check_resolution(model, graph, qual, shapes)
    cut_points = _cut_points(graph, qual)
    index = {q: i for i, q in enumerate(order)}
    module_first, module_end = _module_spans(model, order)
    blocks = _blocks(model, module_first, module_end, set(cut_points), shapes, d, index, cut_points)
    stages = _stages(blocks)
    final, head = _final_and_head(graph, qual, cut_points, blocks, shapes, index)
    _check_invariants(blocks, stages, final, index)
    aliases: dict[str, str] = {}
    for path, node in sorted(module_end.items(), key=lambda kv: (kv[0].count("."), len(kv[0]))):
        aliases.setdefault(node, path)
    return Traced(model, tuple(input_size), graphs, order, shapes, d, cut_points, blocks, stages, final, head,
                  aliases, module_end)


def valid_taps(model: nn.Module, input_size, leaf_modules: list[str] | None = None) -> list[str]:
    """Where a branch can attach to ``model`` traced at ``input_size``: the names a spec's ``at:`` takes."""
    traced = trace(model, input_size, leaf_modules)
    return [traced.alias(q) for q in traced.valid_taps()]


def _downsampling_counts(order: list[str], shapes: dict, h_in: int) -> dict[str, int]:
    """d(v) = round(log2(H_in / H_v)) for feature maps; token sequences (L x D) inherit the last map's d."""
    d: dict[str, int] = {}
    last = 0
    for q in order:
        s = shapes.get(q, ())
        if len(s) == 3 and s[1] > 0:
            last = d[q] = round(math.log2(h_in / s[1]))
        elif len(s) == 2:
            d[q] = last
    return d


def _cut_points(graph: fx.Graph, qual) -> list[str]:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for src in n.all_input_nodes:
            g.add_edge(src, n)
    idom = nx.immediate_dominators(g, placeholders[0])
    chain, v = [], output
    while v in idom and idom[v] is not v:
        v = idom[v]
        chain.append(v)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return [qual[n] for n in sorted(chain, key=order.get) if n.op not in ("placeholder", "output")]


def _module_spans(model: nn.Module, order: list[str]) -> tuple[dict[str, int], dict[str, str]]:
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


def _blocks(model, module_first, module_end, cuts, shapes, d, index, cut_points) -> list[Block]:
    """Building blocks: composite children of stage containers, downsampling layers between them, and
    the layers of flat conv stacks. A model with no stage container is its own (GoogLeNet, Inception);
    downsampling children of the model after its last stage container are blocks as well."""
    blocks = _find_blocks(model, module_first, module_end, cuts, shapes, d, index, cut_points, root=False)
    as_root = _find_blocks(model, module_first, module_end, cuts, shapes, d, index, cut_points, root=True)
    if not blocks:
        return as_root
    # the network's own downsampling children after its last stage container are blocks too (DLA's
    # level2..level5)
    last = index[blocks[-1].node]
    return blocks + [b for b in as_root if "." not in b.path and module_first[b.path] > last and b.d > b.d_in
                     and b.out_shape[1:] != (1, 1)]  # SqueezeNet's classifier ends in a global pool


def _global_pool(m: nn.Module, shape: tuple[int, ...]) -> bool:
    """A parameter-free module that leaves a 1x1 map (an AdaptiveAvgPool2d, GoogLeNet's pool, timm's
    SelectAdaptivePool2d) pools globally, whatever its class: it belongs to the head, not a stage."""
    return len(shape) == 3 and shape[1:] == (1, 1) and next(m.parameters(), None) is None


def _find_blocks(model, module_first, module_end, cuts, shapes, d, index, cut_points, root) -> list[Block]:
    modules = dict(model.named_modules())
    cut_index = [index[c] for c in cut_points]
    blocks: list[Block] = []
    inside: list[str] = []
    for path, m in modules.items():
        if not path or path not in module_end or any(path.startswith(b + ".") for b in inside):
            continue
        parent_path = path.rpartition(".")[0]
        parent = modules[parent_path]
        node = module_end[path]
        if node not in cuts or len(shapes.get(node, ())) not in (2, 3) or _global_pool(m, shapes[node]):
            continue
        pos = bisect.bisect_left(cut_index, module_first[path]) - 1
        if pos < 0 or len(shapes.get(cut_points[pos], ())) not in (2, 3):
            continue
        src = cut_points[pos]
        composite = bool(list(m.children()))
        container = _is_container(parent) or (root and parent_path == "")
        if composite:
            ok = container and not _is_container(m)
        else:
            ok = _is_flat_stack(parent) or (container and d[node] > d[src])
        if not ok:
            continue
        inside.append(path)
        blocks.append(Block(path, m, node, shapes[src], shapes[node], d[src], d[node]))
    blocks.sort(key=lambda b: index[b.node])
    return blocks


def _check_invariants(blocks: list[Block], stages: list[Stage], final: str, index: dict[str, int]) -> None:
    """What the rest of dksgraph relies on: along the main path the downsampling count never goes down (so
    each count has one stage), and every block lies at or before the final feature map."""
    for before, after in zip(stages, stages[1:]):
        if after.d <= before.d:
            node = after.blocks[0].node
            raise GraphError(
                f"the downsampling count goes back down at `{node}` (block `{after.blocks[0].path}`: "
                f"{fmt_shape(after.blocks[0].in_shape)} -> {fmt_shape(after.blocks[0].out_shape)}, count {before.d} "
                f"-> {after.d}): the network upsamples, like a decoder or a U-Net. DKS's rule counts downsamplings "
                "from the input to each classifier, so dksgraph augments classification backbones whose resolution "
                "only decreases; augment the encoder part as its own backbone instead."
            )
    late = [b.path for b in blocks if index[b.node] > index[final]]
    if late:
        raise GraphError(
            f"block(s) {', '.join(late[:3])} run after the final feature map `{final}`, inside what dksgraph takes "
            "for the classifier head. This network's head is not a pooling + classifier dksgraph recognises; "
            "please report the model."
        )


def _inside(node: str, blocks) -> bool:
    return any(node.startswith(b.path + ".") for b in blocks)


def _stages(blocks: list[Block]) -> list[Stage]:
    stages: list[Stage] = []
    run: list[Block] = []
    for b in blocks:
        if run and b.d != run[-1].d:
            stages.append(Stage(run[-1].d, tuple(run)))
            run = []
        run.append(b)
    if run:
        stages.append(Stage(run[-1].d, tuple(run)))
    return stages


def _final_and_head(graph, qual, cut_points, blocks, shapes, index) -> tuple[str, list[str]]:
    """The final feature map f (last block boundary before the spatial collapse) and the head's nodes."""
    collapse = None
    for i, q in enumerate(cut_points):
        s = shapes.get(q, ())
        vector = len(s) <= 1 or (len(s) == 3 and s[1:] == (1, 1))
        if i and vector and not _inside(q, blocks) and len(shapes.get(cut_points[i - 1], ())) in (2, 3):
            collapse = q
            break
    if collapse is None:
        raise GraphError(
            "found no classifier head: the network's output never collapses a C x H x W feature map "
            "(global pooling, flatten). dksgraph augments classification networks; check `backbone.model`."
        )
    before = [b.node for b in blocks if index[b.node] < index[collapse]]
    if not before:
        before = [c for c in cut_points if index[c] < index[collapse] and len(shapes.get(c, ())) in (2, 3)]
    final = before[-1]
    head = [qual[n] for n in graph.nodes if index[qual[n]] > index[final] and n.op not in ("output",)]
    return final, head
