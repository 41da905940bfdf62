import pytest
import torch
from torch import nn

from conftest import ROOT
from dksgraph.augmented import augment
from dksgraph.errors import GraphError
from dksgraph.spec import load_spec, parse_spec


def blocks_of(stage: nn.Sequential, cls_name: str) -> list[nn.Module]:
    return [m for m in stage if type(m).__name__ == cls_name]


# (spec, tap) -> per branch stage: (block class, count, output channels)
REFERENCE = {
    ("resnet32", "c3"): [("CifarBasicBlock", 5, 32), ("CifarBasicBlock", 3, 64)],
    ("resnet32", "c2"): [("CifarBasicBlock", 5, 128)],
    ("resnet110", "c3"): [("CifarBasicBlock", 9, 32), ("CifarBasicBlock", 9, 64)],
    ("resnet110", "c2"): [("CifarBasicBlock", 18, 128)],
    ("wrn28_4", "c3"): [("PreActBlock", 4, 128), ("PreActBlock", 2, 256)],
    ("wrn28_4", "c2"): [("PreActBlock", 4, 512)],
    ("densenet40", "c3"): [("DenseLayer", 12, 160 + 12 * 12), ("DenseLayer", 6, 304 + 6 * 12)],
    ("densenet40", "c2"): [("DenseLayer", 12, 304 + 12 * 36)],
    ("resnet18", "c3"): [("BasicBlock", 1, 256), ("BasicBlock", 2, 512)],
    ("resnet18", "c2"): [("BasicBlock", 2, 1024)],
    ("resnet50", "c3"): [("Bottleneck", 3, 1024), ("Bottleneck", 2, 2048)],
    ("resnet50", "c2"): [("Bottleneck", 3, 4096)],
}


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = augment(load_spec(ROOT / "specs" / f"{name}.yaml"))
        return cache[name]

    return get


@pytest.mark.parametrize("key", sorted(REFERENCE), ids=lambda k: f"{k[0]}-{k[1]}")
def test_reference_branch_sizes(built, key):
    model = built(key[0])
    branch = model.branches[key[1]]
    plan = next(p for p in model.plans if p.label == key[1])
    assert len(branch.stages) == len(REFERENCE[key])
    for stage, plan_stage, (cls_name, count, channels) in zip(branch.stages, plan.stages, REFERENCE[key]):
        assert len(blocks_of(stage, cls_name)) == count
        assert plan_stage.out_channels == channels


@pytest.mark.parametrize("name", ["resnet32", "wrn28_4", "densenet40", "resnet18", "mobilenet"])
def test_every_branch_ends_at_the_final_feature_map_size(built, name):
    """The paper's rule: every classifier's path has as many downsamplings as the main path."""
    model = built(name)
    t = model.traced
    final = t.shapes[t.final]
    model.eval()
    for plan in model.plans:
        feature = torch.randn(2, *t.shapes[plan.node])
        out = model.branches[plan.label].stages(feature)
        assert out.shape[2:] == final[1:], plan.label
        assert len(plan.stages) == t.downsamplings[t.final] - t.downsamplings[plan.node]


def test_branch_head_is_a_fresh_resized_copy(built):
    model = built("resnet32")
    head = model.branches["c2"].head
    assert head.fc.in_features == 128 and head.fc.out_features == 100
    assert head.fc is not model.backbone.fc


def _spec(taps, model="zoo:resnet32"):
    return parse_spec({"backbone": {"model": model, "input_size": [3, 32, 32]}, "taps": taps})


def test_depth_list_length_must_match_stage_count():
    with pytest.raises(GraphError, match=r"`depth` has 1 entry but this branch has 2 stages.*count 0 and the final feature map at 2"):
        augment(_spec([{"at": "layer1", "depth": [5]}]))


def test_width_on_a_segment_branch_widens_its_stages_and_what_follows():
    model = augment(_spec([{"at": "stage1", "name": "c3", "width": [2.0, 1.0]}], model="toynets:odd_net"))
    plan = model.plans[0]
    assert plan.segment and [s.out_shape for s in plan.stages] == [(32, 16, 16), (32, 8, 8)]  # 16 -> 32, then 32
    convs = [m for m in model.branches["c3"].stages.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].in_channels == 8 and convs[0].out_channels == 32  # the tap's input kept, the output widened
    assert model.branches["c3"].head.fc.in_features == 32
    assert model(torch.randn(2, 3, 32, 32))["c3"].shape == (2, 10)


def test_width_on_copies_of_blocks_without_a_builder_is_refused():
    with pytest.raises(GraphError, match="no builder for that block family, and `branch_copy: blocks`"):
        augment(_spec([{"at": "stage2", "width": [2.0]}], model="toynets:odd_net").model_copy(
            update={"branch_copy": "blocks"}))


def test_without_a_builder_the_branch_is_a_fresh_copy_of_the_graph_with_depth_applied():
    model = augment(_spec([{"at": "stage1", "name": "c3", "depth": [3, 1]}], model="toynets:odd_net"))
    plan = model.plans[0]
    assert plan.segment and [s.depth for s in plan.stages] == [3, 1]
    # stage2: its first (strided) block, then its last block twice; stage3: only its first block
    assert [(u.name, u.repeat) for u in plan.units] == [("stage2.0", 1), ("stage2.1", 2), ("stage3.0", 1),
                                                        ("stage3.1", 0)]
    pieces = list(model.branches["c3"].stages)
    assert len(pieces) == 4
    copy, original = pieces[0].body.get_submodule("stage2.0.conv"), model.backbone.stage2[0].conv
    assert type(copy) is nn.Conv2d and copy is not original and copy.stride == (2, 2)  # the backbone's own layer
    assert not torch.equal(copy.weight, original.weight)  # re-initialised, not shared
    repeated = [p.body.get_submodule("stage2.1.conv") for p in pieces[1:3]]
    assert repeated[0] is not repeated[1]  # a repeated block has its own parameters  # a repeated block has its own parameters


def test_width_scales_channels_for_builder_families():
    model = augment(_spec([{"at": "layer2", "name": "c2", "width": [0.5]}]))
    assert model.plans[0].stages[0].out_channels == 32
