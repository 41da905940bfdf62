"""Fresh branches are initialised the way the backbone initialises its own, and the summary says how."""

import math

import pytest
import torch
from torch import nn

from dksgraph.augmented import augment
from dksgraph.spec import parse_spec


def model(name, branch_init="backbone", size=32, **backbone):
    return augment(parse_spec({"backbone": {"model": name, "input_size": [3, size, size], **backbone},
                               "branch_init": branch_init}))


def big_convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() >= 20000]


def test_the_zoo_routine_gives_kaiming_fan_out_and_pytorch_keeps_its_default():
    torch.manual_seed(0)
    ours = model("zoo:resnet32")
    assert ours.branch_init == "the backbone's own init_weights()"
    for conv in big_convs(ours.branches):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    plain = model("zoo:resnet32", branch_init="pytorch")
    assert plain.branch_init.startswith("PyTorch's per-layer defaults")
    for conv in big_convs(plain.branches):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.detach().std()) == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)


def test_without_a_routine_the_documented_default():
    torch.manual_seed(0)
    m = model("torchvision:resnet18", size=64)
    assert m.branch_init.startswith("Kaiming normal (fan-out)")
    for conv in big_convs(m.branches):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    norms = [b for b in m.branches.modules() if isinstance(b, nn.BatchNorm2d)]
    assert norms and all(bool((b.weight == 1).all() and (b.bias == 0).all()) for b in norms)
    head = m.branches["c2"].head.get_submodule("fc")
    bound = 1 / math.sqrt(head.in_features)  # torchvision's fc keeps PyTorch's default: so does the branch head
    assert float(head.weight.detach().abs().max()) <= bound


def test_a_per_module_routine_of_the_backbone_is_applied_to_the_branch():
    m = model("toynets:own_init_net")
    assert m.branch_init == "the backbone's own _init_weights()"
    convs = [c for c in m.branches.modules() if isinstance(c, nn.Conv2d)]
    assert convs and all(bool((c.weight == 0.5).all()) for c in convs)


def test_the_summary_says_how_branches_were_initialised(run):
    result = run("augment", "--model", "zoo:resnet32", "--taps", "auto")
    assert "branch initialisation: the backbone's own init_weights()" in result.output


def test_an_assertion_in_the_backbones_own_code_is_a_one_paragraph_error(run):
    result = run("inspect", "toynets:sized_net", "--input-size", 3, 64, 64)
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "failed in `stage2.1.1._assert`" in flat and "feature map must be 16 pixels high" in flat
    assert "backbone.input_size" in flat
    assert run("inspect", "toynets:sized_net", "--input-size", 3, 32, 32).exit_code == 0
