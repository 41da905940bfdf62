"""``width`` on segment branches: every convolution of a copied stage widened, on torchvision and timm families
that have no block-family builder; what cannot be widened is refused with the node and the reason."""

import pytest
import torch

from dksgraph.augmented import augment
from dksgraph.deploy import strip
from dksgraph.errors import GraphError
from dksgraph.loss import SynergyLoss
from dksgraph.spec import parse_spec

FAST = ["torchvision:mnasnet0_5", "torchvision:mobilenet_v3_small"]
SLOW = ["torchvision:regnet_x_400mf", "torchvision:efficientnet_b0", "torchvision:shufflenet_v2_x0_5",
        "timm:resnet18", "timm:mobilenetv3_small_050", "timm:regnetx_002"]
SIZE = 64


def widened_spec(model, width=2.0):
    """The backbone with one tap: the shallowest `taps: auto` picks, every branch stage at ``width``."""
    base = {"backbone": {"model": model, "kwargs": {"num_classes": 5}, "input_size": [3, SIZE, SIZE]}}
    tap = augment(parse_spec({**base, "taps": "auto"})).plans[-1]
    return parse_spec({**base, "taps": [{"at": tap.tap, "name": "c2", "width": [width] * len(tap.stages)}]}), tap


def check_widened_trains_a_step_and_strips(name):
    torch.manual_seed(0)
    spec, narrow = widened_spec(name)
    model = augment(spec)
    plan = model.plans[0]
    assert plan.segment
    assert [s.out_shape[0] for s in plan.stages] == [2 * s.out_shape[0] for s in narrow.stages]
    assert plan.stages[0].in_shape == narrow.stages[0].in_shape  # the first input stays the tap's
    wide = sum(p.numel() for p in model.branches["c2"].stages.parameters())
    one = augment(widened_spec(name, 1.0)[0]).branches["c2"].stages
    assert wide > 2 * sum(p.numel() for p in one.parameters())  # convolutions about 4x, norms 2x
    loss = SynergyLoss.for_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, 5, (4,))
    before = {k: v.clone() for k, v in model.branches["c2"].state_dict().items()}
    out = loss(model(x), y)
    opt.zero_grad()
    out.total.backward()
    opt.step()
    assert torch.isfinite(out.total)
    after = model.branches["c2"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the widened branch learned
    original = strip(model)  # verifies main's output bit for bit before it returns
    model.eval()
    original.eval()
    with torch.no_grad():
        probe = torch.randn(2, 3, SIZE, SIZE)
        assert torch.equal(model(probe)["main"], original(probe))


@pytest.mark.parametrize("name", FAST)
def test_widened_segment_branch_trains_a_step_and_strips(name):
    check_widened_trains_a_step_and_strips(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_widened_segment_branch_on_more_families(name):
    check_widened_trains_a_step_and_strips(name)


def test_a_block_tied_to_its_channel_count_is_refused_with_the_node():
    spec, _ = widened_spec("torchvision:convnext_tiny")
    with pytest.raises(GraphError, match=r"tap `c2`: width 2.0 cannot widen `features\.\d\.0` \(CNBlock\): node "
                                         r"`mul_\d+` fails \(it reads `features\.\d\.0\.layer_scale`"):
        augment(spec)


def test_widening_a_token_sequence_is_refused():
    base = {"backbone": {"model": "timm:levit_128s", "kwargs": {"num_classes": 5}, "input_size": [3, 224, 224]}}
    tap = augment(parse_spec({**base, "taps": "auto"})).plans[-1]
    assert tap.segment and len(tap.stages[0].out_shape) == 2  # L x D tokens
    with pytest.raises(GraphError, match="carries a token sequence, not a C x H x W map"):
        augment(parse_spec({**base, "taps": [{"at": tap.tap, "width": [2.0] * len(tap.stages)}]}))
