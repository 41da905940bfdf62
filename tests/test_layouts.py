"""Backbones as people write them: downsampling between stage containers, a pooling module called twice,
a fixed-size head pool, reduction cells between stages, functional pooling (hand-written toy versions)."""

import pytest
import torch
from toynets import flat_densenet, functional_pool_net, reduction_cell_net, twice_pool_net

from dksgraph.augmented import augment
from dksgraph.deploy import strip
from dksgraph.fx.graph import trace
from dksgraph.fx.tracing import TRAIN
from dksgraph.spec import parse_spec

LAYOUTS = {  # toy: (stage ends tapped by `taps: auto` (c2, c3), the downsampling modules between stages)
    "flat_densenet": (["dense3", "dense2"], ["trans1", "trans2", "trans3"]),
    "twice_pool_net": (["b4", "b3"], ["maxpool", "maxpool_1"]),
    "reduction_cell_net": (["layer3", "layer1"], ["layer2", "layer4"]),
    "functional_pool_net": (["stage2", "stage1"], ["max_pool2d", "max_pool2d_1"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_auto_taps_train_a_step_and_strip_bit_exactly(name):
    spec = parse_spec({"backbone": {"model": f"toynets:{name}", "input_size": [3, 32, 32]}})
    model = augment(spec)
    assert [p.tap for p in model.plans] == LAYOUTS[name][0]
    final = model.traced.shapes[model.traced.final]
    for plan in model.plans:  # every branch sees the backbone's downsampling count
        assert plan.out_shape[1:] == final[1:]
    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    loss = sum(torch.nn.functional.cross_entropy(v, torch.arange(4)) for v in out.values())
    loss.backward()
    for label in model.classifiers[1:]:
        assert all(p.grad is not None for p in model.branches[label].parameters())
    strip(model)  # raises unless bit-exact


@pytest.mark.parametrize("name", LAYOUTS)
def test_inspect_lists_a_tap_before_every_downsampling(name):
    t = trace({"flat_densenet": flat_densenet, "twice_pool_net": twice_pool_net,
               "reduction_cell_net": reduction_cell_net, "functional_pool_net": functional_pool_net}[name](),
              (3, 32, 32))
    for k in range(1, t.downsamplings[t.final] + 1):  # the end of the run at count k - 1, just before downsampling k
        last = max((q for q in t.cut_points if t.downsamplings.get(q) == k - 1), key=t.index.get)
        assert last in t.valid_taps(), (k, last)


def test_the_pool_called_twice_is_two_blocks_and_the_fixed_head_pool_is_the_heads():
    t = trace(twice_pool_net(), (3, 32, 32))
    pools = [b for b in t.blocks if b.path == "maxpool"]
    assert [b.node for b in pools] == ["maxpool", "maxpool_1"] and [b.downsamplings for b in pools] == [1, 2]
    assert "avgpool" in t.head and not any(b.path == "avgpool" for b in t.blocks)
    assert [s.downsamplings for s in t.stages] == [0, 1, 2] and all(s.downsamples for s in t.stages[1:])


def test_functional_pooling_between_stages_gets_a_segment_that_copies_the_pooling():
    model = augment(parse_spec({"backbone": {"model": "toynets:functional_pool_net", "input_size": [3, 32, 32]},
                                "taps": [{"at": "stage1", "name": "c3", "depth": [4, 1]}]}))
    plan = model.plans[0]
    assert plan.segment and [s.depth for s in plan.stages] == [4, 1]
    assert [(u.name, u.repeat) for u in plan.units if u.repeat != 1] == [("stage2.2", 2), ("stage3.1", 0)]
    assert any(u.kind == "ops" for u in plan.units)  # the functional max-pool between stages
    code = "".join(piece.__dict__["_programs"][TRAIN].code for piece in model.branches["c3"].stages)
    assert code.count("functional.max_pool2d(") == 2


def test_segment_depth_that_cannot_be_met_is_refused_and_width_is_honoured(run, tmp_path):
    from conftest import write

    write(tmp_path / "s.yaml", "backbone: {model: 'toynets:flat_densenet', input_size: [3, 32, 32]}\n"
                               "taps: [{at: dense2, name: c3, depth: [2, 3]}]\n")
    result = run("augment", "s.yaml")
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "blocks (Transition, DenseLayer) change shape" in flat
    write(tmp_path / "w.yaml", "backbone: {model: 'toynets:functional_pool_net', input_size: [3, 32, 32]}\n"
                               "taps: [{at: stage1, name: c3, width: [2.0, 1.0]}]\n")
    result = run("augment", "w.yaml")
    assert result.exit_code == 0, result.output
    assert "segment: OddBlock x3 -> 32x16x16, OddBlock x2 -> 32x8x8" in result.output
