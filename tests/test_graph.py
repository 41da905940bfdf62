import pytest
import torchvision
from torchvision.models.feature_extraction import get_graph_node_names

from dksgraph.errors import GraphError
from dksgraph.fx.graph import trace
from dksgraph.models.cifar_resnet import resnet32
from toynets import gated_net, odd_net, tree_net


@pytest.fixture(scope="module")
def r32():
    return trace(resnet32(), (3, 32, 32))


def test_node_names_match_torchvision():
    model = torchvision.models.resnet18()
    t = trace(model, (3, 64, 64))
    _, eval_names = get_graph_node_names(model)
    assert t.order[:-1] == eval_names and t.order[-1] == "output"


def test_cut_points_are_block_outputs_not_block_interiors(r32):
    cuts = set(r32.cut_points)
    assert "layer1.0.relu_1" in cuts and "layer2.4.relu_1" in cuts
    assert "layer1.0.conv1" not in cuts  # the shortcut bypasses it


def test_downsampling_counts_stages_and_final_map(r32):
    assert [(s.downsamplings, s.name, len(s.blocks), s.downsamples) for s in r32.stages] == [
        (0, "layer1", 5, False), (1, "layer2", 5, True), (2, "layer3", 5, True)]
    assert r32.final == "layer3.4.relu_1" and r32.downsamplings[r32.final] == 2
    assert r32.head == ["avgpool", "flatten", "fc"]


def test_module_path_means_its_output(r32):
    assert r32.resolve("layer2") == "layer2.4.relu_1"
    assert r32.alias("layer2.4.relu_1") == "layer2"


def test_auto_taps_are_the_two_stage_ends_before_the_last():
    t = trace(torchvision.models.resnet18(), (3, 64, 64))
    assert [(label, t.alias(node)) for label, node, _ in t.auto_taps()] == [("c2", "layer3"), ("c3", "layer2")]


def test_stride2_expand_conv_is_cut_point_but_not_block_boundary():
    t = trace(torchvision.models.mobilenet_v2(), (3, 64, 64))
    expand = t.resolve("features.2.conv.0")
    assert expand in t.cut_points
    assert expand not in {b.node for b in t.blocks}
    assert "features.2" in {b.path for b in t.blocks}


def test_preactivation_head_includes_bn_relu():
    from dksgraph.models.wrn import wrn28_4

    t = trace(wrn28_4(), (3, 32, 32))
    assert t.alias(t.final) == "block3"
    assert t.head[:2] == ["bn1", "relu"]


def test_unknown_tap_suggests_close_names(r32):
    with pytest.raises(GraphError, match=r"unknown tap `layer22`.*did you mean .*`layer2`"):
        r32.check_tap("layer22")


def test_non_cut_point_names_nearest_valid_taps(r32):
    with pytest.raises(GraphError, match=r"not a cut point.*nearest valid taps are .*`layer1.0`"):
        r32.check_tap("layer1.1.conv1")


def test_tap_at_or_after_final_feature_map(r32):
    for at in ("layer3", "fc"):
        with pytest.raises(GraphError, match="at or after the final feature map `layer3`"):
            r32.check_tap(at)


def test_input_too_small_for_downsampling():
    with pytest.raises(GraphError, match="input_size is too small"):
        trace(torchvision.models.resnet18(), (3, 16, 16))


def test_untraceable_module_is_named_with_leaf_module_advice():
    with pytest.raises(GraphError, match=r"module `stage2.1.1` \(Gate\).*backbone.leaf_modules"):
        trace(gated_net(), (3, 32, 32))
    t = trace(gated_net(), (3, 32, 32), leaf_modules=["Gate"])
    assert t.downsamplings[t.final] == 2


def test_generic_family_stages():
    t = trace(odd_net(), (3, 32, 32))
    assert [(s.downsamplings, len(s.blocks)) for s in t.stages] == [(0, 2), (1, 2), (2, 2)]


def test_downsampling_children_of_the_root_after_the_last_container_are_stages():
    """DLA's layout: level2..level4 are stages, the composite global pool belongs to the head."""
    t = trace(tree_net(), (3, 32, 32))
    assert [b.path for b in t.blocks][-3:] == ["level2", "level3", "level4"]
    assert t.final == "level4.relu" and t.downsamplings[t.final] == 4
    assert t.head[0] == "global_pool.pool" and "scale" in t.head
    assert [t.alias(node) for _, node, _ in t.auto_taps()] == ["level3", "level2"]


def test_tree_net_augments_and_strips_with_a_head_parameter():
    import torch

    from dksgraph.augmented import augment
    from dksgraph.spec import parse_spec
    from dksgraph.deploy import strip

    model = augment(parse_spec({"backbone": {"model": "toynets:tree_net", "input_size": [3, 32, 32]}}))
    assert [p.tap for p in model.plans] == ["level3", "level2"]
    for label in model.classifiers[1:]:
        head_scale = [v for k, v in model.branches[label].named_parameters() if k.endswith("scale")]
        assert len(head_scale) == 1 and head_scale[0].item() == 2.0  # the head's own parameter, copied
    model(torch.randn(2, 3, 32, 32))["c3"].sum().backward()
    strip(model)


def test_a_network_that_upsamples_is_refused_naming_the_node(run):
    result = run("inspect", "toynets:up_net")
    assert result.exit_code == 2
    assert "goes back down at `up.0.relu`" in result.output and "count 2 -> 1" in result.output
    assert "Traceback" not in result.output
