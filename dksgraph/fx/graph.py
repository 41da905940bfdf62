"""Trace a backbone and describe its topology: shapes, downsampling counts, cut points, blocks, stages.

:func:`trace` traces the model twice with :mod:`dksgraph.fx.tracing` (train and eval mode, since FX
bakes ``self.training`` into the graph; nodes are named like torchvision's
``get_graph_node_names``), propagates shapes at the spec's ``input_size`` and finds

* **cut points**: nodes every input->output path passes through (dominators of the output);
* **blocks**: building-block modules (children of a stage container) whose output is a cut point;
* **stages**: runs of blocks at one resolution, keyed by their downsampling count d;
* **final**: the final feature map f, the last block boundary before the head.

Example::

    >>> from dksgraph.models.cifar_resnet import resnet32
    >>> t = trace(resnet32(), (3, 32, 32))
    >>> t.final, t.downsamplings[t.final], [s.downsamplings for s in t.stages]
    ('layer3.4.relu_1', 2, [0, 1, 2])
    >>> t.resolve("layer1")
    'layer1.4.relu_1'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
from torch import fx, nn

from dksgraph.errors import GraphError, close_matches
from dksgraph.formatting import fmt_shape
from dksgraph.fx.blocks import Block, GraphFacts, Stage, find_blocks, inside_any, module_spans, stages_of
from dksgraph.fx.tracing import EVAL, MODES, check_resolution, propagate_shapes, trace_graph

__all__ = ["Traced", "final_linear", "trace", "valid_taps"]


@dataclass
class Traced:
    """A traced backbone and everything dksgraph derives from its graph."""

    model: nn.Module
    input_size: tuple[int, int, int]
    graphs: dict[bool, fx.Graph]
    order: list[str]
    shapes: dict[str, tuple[int, ...]]
    downsamplings: dict[str, int]
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
        """Cut points with a feature map (C x H x W, or L x D tokens) before f, in graph order: a branch can
        start at each (a segment branch copies the backbone's graph from any of them)."""
        idx = self.index
        return [q for q in self.cut_points if len(self.shapes.get(q, ())) in (2, 3) and idx[q] < idx[self.final]]

    def branch_stages(self, node: str, at: str | None = None) -> list[Stage]:
        """The backbone stages a branch built from block families reproduces at ``node``, one per downsampling
        between ``node`` and f (the paper's rule, Sec. 3.2); a GraphError saying why when a downsampling is
        not a stage's first block (then only a segment branch can reproduce it)."""
        stages = []
        for k in range(self.downsamplings[node] + 1, self.downsamplings[self.final] + 1):
            stage = self.stages_by_count.get(k)
            if stage is None or not stage.downsamples:
                where = "it happens outside any building block" if stage is None else (
                    f"stage `{stage.name}` does not start with a strided block")
                final = self.downsamplings[self.final]
                later = [self.alias(s.end.node) for s in self.stages if k <= s.downsamplings < final]
                raise GraphError(
                    f"tap `{at or self.alias(node)}` (downsampling count {self.downsamplings[node]}) needs a branch "
                    f"stage that reproduces downsampling number {k}, but {where}, so no branch can copy it. Tap at or "
                    f"after the end of the stage at count {k} instead" + (f" (e.g. `{later[0]}`)." if later else ".")
                )
            stages.append(stage)
        return stages

    def inside_block(self, node: str) -> bool:
        """Whether ``node`` is an op inside a building block (not the block's output)."""
        return inside_any(node, self.blocks)

    @property
    def stages_by_count(self) -> dict[int, Stage]:
        """The backbone's stages by their downsampling count (a count without a stage is absent)."""
        return {s.downsamplings: s for s in self.stages}

    def stage_at(self, downsamplings: int) -> Stage:
        """The stage at a downsampling count; a GraphError when no stage sits there."""
        stage = self.stages_by_count.get(downsamplings)
        if stage is None:
            raise GraphError(f"`{self.model.__class__.__name__}` has no stage at downsampling count {downsamplings} "
                             f"(its stages sit at {sorted(self.stages_by_count)}). This is a dksgraph bug if a plan "
                             "asked for it; please report it with the spec.")
        return stage

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
        return node

    def auto_taps(self) -> list[tuple[str, str, str]]:
        """(label, node, reason) of the automatic taps (``taps: auto``), deep to shallow.

        The ends of the two stages before the last downsampling stage; a network whose blocks all
        sit at one resolution (ViT) is tapped after 2/3 and 1/3 of its blocks instead.
        """
        df = self.downsamplings[self.final]
        chosen = []
        for label, k in (("c2", df - 1), ("c3", df - 2)):
            stage = self.stages_by_count.get(k)
            if stage is None or k < 0:
                continue
            node = stage.end.node
            try:
                self.check_tap(node)
            except GraphError:
                continue
            reason = f"end of stage `{stage.name}` (count {k}), {df - k} stage(s) before the final feature map"
            chosen.append((f"c{len(chosen) + 2}", node, reason))
        if chosen or any(s.downsamplings < df for s in self.stages):
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
    """Trace ``model`` in both modes and analyse its eval-mode graph.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (``leaf_modules`` help where it cannot).
        input_size: (C, H, W) of one input image.
        leaf_modules: qualified names of submodules to keep as single calls.

    Returns:
        The Traced analysis: node shapes, downsampling counts, blocks, stages, the final feature map and the
        valid tap points.

    Raises:
        GraphError: the model cannot be traced or run at ``input_size``.
    """
    leaf_modules = list(leaf_modules or [])
    graphs = {mode: trace_graph(model, leaf_modules, mode) for mode in MODES}
    graph = graphs[EVAL]
    nodes = list(graph.nodes)
    qual = {n: n.meta["qualname"] for n in nodes}
    order = [qual[n] for n in nodes]
    shapes = propagate_shapes(model, graph, qual, tuple(input_size))
    d = _downsampling_counts(order, shapes, input_size[1])
    check_resolution(model, graph, qual, shapes)
    cut_points = _cut_points(graph, qual)
    index = {q: i for i, q in enumerate(order)}
    _, module_end = module_spans(model, order)
    blocks = find_blocks(model, GraphFacts.of(graph, shapes, d, cut_points))
    stages = stages_of(blocks)
    final, head = _final_and_head(graph, qual, cut_points, blocks, shapes, index)
    _check_invariants(blocks, stages, final, index)
    aliases: dict[str, str] = {}
    for path, node in sorted(module_end.items(), key=lambda kv: (kv[0].count("."), len(kv[0]))):
        aliases.setdefault(node, path)
    return Traced(model, tuple(input_size), graphs, order, shapes, d, cut_points, blocks, stages, final, head,
                  aliases, module_end)


def final_linear(graph: fx.Graph, root: nn.Module) -> fx.Node | None:
    """The last call of an ``nn.Linear`` in a graph: its input is the feature a classifier's final linear layer
    reads (a CNN's pooled feature, a ViT's class token); None when the graph calls no Linear."""
    last = None
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(root.get_submodule(node.target), nn.Linear):
            last = node
    return last if last is not None and isinstance(last.args[0], fx.Node) else None


def valid_taps(model: nn.Module, input_size, leaf_modules: list[str] | None = None) -> list[str]:
    """Where a branch can attach to ``model``.

    Args:
        model, input_size, leaf_modules: as for :func:`trace`.

    Returns:
        The names a spec's ``at:`` takes, shallow to deep (what ``dksgraph inspect`` marks).
    """
    traced = trace(model, input_size, leaf_modules)
    return [traced.alias(q) for q in traced.valid_taps()]


def _downsampling_counts(order: list[str], shapes: dict, h_in: int) -> dict[str, int]:
    """d(v) = round(log2(H_in / H_v)) for feature maps. A token sequence (L x D) whose L is a square grid of h x h
    tokens (plus up to two class tokens) counts as a map of height h; any other inherits the last count."""
    d: dict[str, int] = {}
    last = 0
    for q in order:
        s = shapes.get(q, ())
        if len(s) == 3 and s[1] > 0:
            last = d[q] = round(math.log2(h_in / s[1]))
        elif len(s) == 2:
            grid = next((h for extra in (0, 1, 2) if s[0] - extra >= 4
                         for h in [math.isqrt(s[0] - extra)] if h * h == s[0] - extra), None)
            last = d[q] = round(math.log2(h_in / grid)) if grid else last
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


def _check_invariants(blocks: list[Block], stages: list[Stage], final: str, index: dict[str, int]) -> None:
    """What the rest of dksgraph relies on: along the main path the downsampling count never goes down (so
    each count has one stage), and every block lies at or before the final feature map."""
    for before, after in zip(stages, stages[1:]):
        if after.downsamplings <= before.downsamplings:
            node = after.blocks[0].node
            raise GraphError(
                f"the downsampling count goes back down at `{node}` (block `{after.blocks[0].path}`: "
                f"{fmt_shape(after.blocks[0].in_shape)} -> {fmt_shape(after.blocks[0].out_shape)}, count "
                f"{before.downsamplings} -> {after.downsamplings}): the network upsamples, like a decoder or a U-Net. "
                "DKS's rule counts downsamplings from the input to each classifier, so dksgraph augments "
                "classification backbones whose resolution only decreases; augment the encoder part as its own backbone instead."
            )
    late = [b.path for b in blocks if index[b.node] > index[final]]
    if late:
        raise GraphError(
            f"block(s) {', '.join(late[:3])} run after the final feature map `{final}`, inside what dksgraph takes "
            "for the classifier head. This network's head is not a pooling + classifier dksgraph recognises; "
            "please report the model."
        )


def _final_and_head(graph, qual, cut_points, blocks, shapes, index) -> tuple[str, list[str]]:
    """The final feature map f (last block boundary before the spatial collapse) and the head's nodes."""
    collapse = None
    for i, q in enumerate(cut_points):
        s = shapes.get(q, ())
        vector = len(s) <= 1 or (len(s) == 3 and s[1:] == (1, 1))
        if i and vector and not inside_any(q, blocks) and len(shapes.get(cut_points[i - 1], ())) in (2, 3):
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
