import re

import pytest
import torch

from conftest import HAS_DOT, ROOT
from dksgraph.augmented import augment
from dksgraph.formatting import fmt_shape
from dksgraph.render import build_graph
from dksgraph.spec import load_spec, parse_spec


@pytest.mark.skipif(not HAS_DOT, reason="graphviz's `dot` is not installed (CI installs it)")
def test_render_svg_has_one_cluster_per_stage(run, tmp_path):
    result = run("augment", ROOT / "specs" / "resnet32.yaml", "--render")
    assert result.exit_code == 0, result.output
    svg = tmp_path / "resnet32.augmented.svg"
    assert f"rendered {svg.name}" in result.output
    text = svg.read_text()
    clusters = re.findall(r'class="cluster"[^>]*>\s*<title>(cluster_[^<]+)</title>', text)
    assert sorted(c for c in clusters if c.startswith("cluster_stage")) == [
        "cluster_stage_0", "cluster_stage_1", "cluster_stage_2"]
    assert sorted(c for c in clusters if c.startswith("cluster_branch")) == [
        "cluster_branch_n_c2", "cluster_branch_n_c3"]
    for label in ("main (C1)", "c2 (C2)", "c3 (C3)", "16x32x32 &#160;d=0", "64x8x8 &#160;d=2"):
        assert label in text


def test_graph_draws_pairs_dashed_and_branches_coloured():
    torch.manual_seed(0)
    model = augment(load_spec(ROOT / "specs" / "resnet32.yaml"))
    source = build_graph(model).source
    dashed = re.findall(r"(clf_\w+) -> (clf_\w+) \[[^\]]*style=dashed", source)
    assert sorted(dashed) == sorted((f"clf_{'n_' if a != 'main' else ''}{a}", f"clf_{'n_' if b != 'main' else ''}{b}")
                                    for a, b in model.objective.pairs)
    assert "#c8621b" in source  # second colour for branches
    detailed = build_graph(model, detail=True).source
    assert "layer1.0.conv1" in detailed and "layer1.0.conv1" not in source


def test_without_dot_writes_dot_source_and_explains(run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = run("augment", ROOT / "specs" / "resnet32.yaml", "--render", "--format", "png", "--out-dir", "pics")
    assert result.exit_code == 0, result.output
    dot = tmp_path / "pics" / "resnet32.augmented.dot"
    assert dot.read_text().startswith("digraph")
    text = " ".join(result.output.split())
    assert "`dot` program is not installed" in text and "apt-get install graphviz" in text
    assert "dot -Tpng" in text


def test_dot_format_needs_no_graphviz(run, tmp_path):
    result = run("augment", ROOT / "specs" / "resnet32.yaml", "--render", "--format", "dot")
    assert result.exit_code == 0
    assert (tmp_path / "resnet32.augmented.dot").exists()


KINDS = {  # one backbone of each kind of branch: (model, input size)
    "CIFAR family (built stages)": ("zoo:resnet32", [3, 32, 32]),
    "torchvision segment": ("torchvision:mobilenet_v3_small", [3, 64, 64]),
    "token-sequence segment (LeViT)": ("timm:levit_128s", [3, 224, 224]),
    "head only (ViT)": ("timm:vit_tiny_patch16_224", [3, 224, 224]),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_picture_labels_every_branch_stage_with_the_plans_shapes(kind):
    model_name, size = KINDS[kind]
    if model_name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = augment(parse_spec({"backbone": {"model": model_name, "input_size": size, "kwargs": {"num_classes": 10}},
                                "taps": "auto"}), pretrained=False)
    source = build_graph(model).source
    for plan in model.plans:
        labels = _branch_edge_labels(source, plan.label)
        want = [fmt_shape(plan.in_shape)] + [fmt_shape(s.out_shape) for s in plan.stages]
        assert [label.split("  d=")[0] for label in labels] == want, (plan.label, labels, want)
        for stage in plan.stages:
            assert f"x{stage.depth} -> {fmt_shape(stage.out_shape)}" in source
    kinds = {"CIFAR family (built stages)": lambda p: p.stages and not p.segment,
             "torchvision segment": lambda p: p.segment,
             "token-sequence segment (LeViT)": lambda p: p.segment and len(p.stages[-1].out_shape) == 2,
             "head only (ViT)": lambda p: not p.stages}
    assert any(kinds[kind](p) for p in model.plans), [p.describe() for p in model.plans]


def _branch_edge_labels(source: str, label: str) -> list[str]:
    """The shape labels of the edges inside a branch's cluster, in drawing order (into each stage, into the head)."""
    ident = f"n_{label}"
    edges = re.findall(rf'-> {ident}_(?:stage\d+|head) \[[^\]]*label="([^"]+)"', source)
    return [e.replace("\\n", " ").strip() for e in edges]
