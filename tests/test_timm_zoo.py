"""timm models (the optional extra) augment with `taps: auto`, train a step and strip bit-exactly.

One fast model per family; `python tools/zoo_report.py --timm` covers the broad 72-model sample.
"""

import pytest

pytest.importorskip("timm")

from zoo_check import check  # noqa: E402

FAST = [
    "resnet18", "resnet26t", "seresnet18", "resnext26ts", "regnetx_002", "efficientnet_lite0", "mobilenetv3_small_050",
    "mnasnet_small", "ghostnet_100", "dla34", "repvgg_a0", "rexnet_100", "lcnet_050", "convnext_atto", "cspresnet50",
    "hgnetv2_b0", "poolformer_s12", "mobilevit_xxs", "efficientvit_b0", "deit_tiny_patch16_224", "mixer_s32_224", "resmlp_12_224",
]


@pytest.mark.parametrize("name", FAST)
def test_timm_model(name):
    check(f"timm:{name}")


def test_timm_notrace_modules_are_leaves():
    """timm's registered not-traceable modules are single nodes in dksgraph's graph, as in timm's own FX."""
    import timm
    from timm.layers import get_notrace_modules

    from dksgraph.fx.tracing import trace_graph

    model = timm.create_model("efficientvit_b0", num_classes=10)
    leaf_types = tuple(get_notrace_modules())
    leaves = {path for path, m in model.named_modules() if leaf_types and isinstance(m, leaf_types)}
    graph = trace_graph(model, [], training=False)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    assert leaves and leaves <= called
