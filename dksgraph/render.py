"""Draw the augmented network with graphviz, for checking where branches attach and what they hold.

The backbone is collapsed into its stages (one cluster per stage, one box per block; ``detail``
expands blocks into their ops), branches are drawn in a second colour, every classifier is a
labelled node, edges carry C x H x W and the downsampling count d, and the synergy pairs are
dashed arrows between classifiers.

Example::

    >>> path, rendered = render(model, out_dir=".", fmt="svg")     # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import graphviz

from dksgraph.augmented import AugmentedModel
from dksgraph.checkpoint import atomic_write
from dksgraph.errors import DksError
from dksgraph.formatting import fmt_shape
from dksgraph.names import ENSEMBLE, RENDER_FORMATS

__all__ = ["BACKBONE", "BRANCH", "CLASSIFIER", "build_graph", "render"]

BACKBONE = {"fillcolor": "#dbe9f6", "color": "#2b6ca3"}
BRANCH = {"fillcolor": "#fde3c8", "color": "#c8621b"}
CLASSIFIER = {"shape": "ellipse", "style": "filled,bold", "fillcolor": "#ffffff"}


def _shape_label(shape: tuple[int, ...], d: int | None) -> str:
    return f"{fmt_shape(shape)}  d={d}" if d is not None else fmt_shape(shape)


def _id(text: str) -> str:
    return "n_" + "".join(c if c.isalnum() else "_" for c in text)


def build_graph(model: AugmentedModel, detail: bool = False) -> graphviz.Digraph:
    """The graphviz description of ``model``; :func:`render` writes it to a file."""
    t = model.traced
    name = model.spec.display_name
    g = graphviz.Digraph(name=name, graph_attr={"rankdir": "TB", "label": f"{name} (dksgraph)", "labelloc": "t",
                                                "fontname": "Helvetica", "compound": "true"},
                         node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                                    "fontsize": "10"},
                         edge_attr={"fontname": "Helvetica", "fontsize": "9"})
    index = t.index
    first_block = index[t.blocks[0].node] if t.blocks else index[t.final]
    stem = [q for q in t.order if index[q] < first_block and q in t.shapes and not t.inside_block(q)][1:]
    c, h, w = t.input_size
    g.node("input", f"input\n{c}x{h}x{w}", shape="invhouse", **BACKBONE)
    anchors: dict[str, str] = {}
    prev, prev_shape = "input", (t.input_size, 0)
    stem_cut = [q for q in t.cut_points if index[q] < first_block and not t.inside_block(q)]
    if stem_cut:
        ops = stem if detail else [t.alias(q) for q in stem_cut]
        g.node("stem", "stem\n" + "\n".join(ops[:12]) + ("\n..." if len(ops) > 12 else ""), **BACKBONE)
        g.edge(prev, "stem", label=_shape_label(*prev_shape))
        for q in stem_cut:
            anchors[q] = "stem"
        prev, prev_shape = "stem", (t.shapes[stem_cut[-1]], t.downsamplings.get(stem_cut[-1]))
    for stage in t.stages:
        with g.subgraph(name=f"cluster_stage_{stage.downsamplings}") as sg:
            sg.attr(label=f"stage {stage.name}  (d={stage.downsamplings})", style="rounded", color=BACKBONE["color"])
            for block in stage.blocks:
                node_id = _id(block.path)
                if detail:
                    ops = [q for q in t.order if q.startswith(block.path + ".")]
                    label = f"{block.path}: {block.type_name}\n" + "\n".join(ops)
                else:
                    label = f"{block.path}\n{block.type_name}"
                sg.node(node_id, label, **BACKBONE)
                g.edge(prev, node_id, label=_shape_label(*prev_shape))
                anchors[block.node] = node_id
                prev, prev_shape = node_id, (block.out_shape, block.downsamplings)
    head_ops = [q for q in t.head if q in t.shapes]
    g.node("head", "head\n" + "\n".join(head_ops), **BACKBONE)
    g.edge(prev, "head", label=_shape_label(t.shapes[t.final], t.downsamplings[t.final]))
    g.node("clf_main", "main (C1)", **CLASSIFIER, color=BACKBONE["color"])
    g.edge("head", "clf_main")
    obj = model.objective
    for number, plan in enumerate(model.plans, start=2):
        anchor = anchors.get(plan.node) or _nearest_anchor(t, anchors, plan.node)
        with g.subgraph(name=f"cluster_branch_{_id(plan.label)}") as bg:
            bg.attr(label=f"branch {plan.label} @ {plan.tap}", style="rounded,dashed", color=BRANCH["color"])
            src, shape = anchor, (plan.in_shape, plan.downsamplings)
            for i, stage in enumerate(plan.stages):
                sid = _id(f"{plan.label}_stage{i}")
                width = f" x{stage.width:g} width" if stage.width != 1.0 else ""
                kind = "copied" if stage.copied else "built"
                bg.node(sid, f"{stage.block} x{stage.depth} -> {fmt_shape(stage.out_shape)}{width}\n"
                        f"({kind} like {stage.source})", **BRANCH)
                g.edge(src, sid, label=_shape_label(*shape), color=BRANCH["color"])
                src, shape = sid, (stage.out_shape, stage.downsamplings)  # the plan's shapes, never worked out again
            hid = _id(f"{plan.label}_head")
            bg.node(hid, "head (fresh copy)", **BRANCH)
            g.edge(src, hid, label=_shape_label(*shape), color=BRANCH["color"])
        cid = f"clf_{_id(plan.label)}"
        g.node(cid, f"{plan.label} (C{number})\nalpha={obj.ce[plan.label]:g}", **CLASSIFIER, color=BRANCH["color"])
        g.edge(hid, cid, color=BRANCH["color"])
    ids = {"main": "clf_main", **{p.label: f"clf_{_id(p.label)}" for p in model.plans}}
    if any(teacher == ENSEMBLE for teacher, _ in obj.pairs):
        ids[ENSEMBLE] = "clf_ensemble"
        g.node(ids[ENSEMBLE], "ensemble\n(mean softmax)", **CLASSIFIER, color="#6a3d9a")
    for teacher, student in obj.pairs:
        g.edge(ids[teacher], ids[student], style="dashed", color="#6a3d9a", constraint="false", arrowsize="0.6",
               tooltip=f"synergy {teacher} -> {student} (beta={obj.beta:g}, T={obj.temperature:g})")
    return g


def _nearest_anchor(t, anchors: dict[str, str], node: str) -> str:
    index = t.index
    before = [q for q in anchors if index[q] <= index[node]]
    return anchors[max(before, key=index.get)] if before else "input"


def render(model: AugmentedModel, out_dir: str | Path = ".", fmt: str = "svg", detail: bool = False) -> tuple[Path, bool]:
    """Write ``<spec name>.augmented.<fmt>``; returns (path, rendered). Without `dot`, writes the .dot source."""
    if fmt not in RENDER_FORMATS:
        raise DksError(f"unknown render format `{fmt}`; choose one of {', '.join(RENDER_FORMATS)}.")
    g = build_graph(model, detail)
    stem = Path(out_dir) / f"{model.spec.display_name}.augmented"
    if fmt != "dot":
        try:
            data = g.pipe(format=fmt)
        except graphviz.ExecutableNotFound:
            pass
        else:
            return atomic_write(stem.with_suffix(f".augmented.{fmt}"), lambda f: f.write(data)), True
    path = atomic_write(stem.with_suffix(".augmented.dot"), lambda f: f.write(g.source.encode()))
    return path, fmt == "dot"
