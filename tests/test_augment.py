import copy

import pytest
import torch
import torchvision

from dksgraph.augmented import augment
from dksgraph.loss import SynergyLoss
from dksgraph.spec import parse_spec


def spec_for(model="zoo:resnet32", size=32, **extra):
    return parse_spec({"backbone": {"model": model, "input_size": [3, size, size]}, **extra})


def test_forward_returns_main_then_taps_deep_to_shallow():
    model = augment(spec_for())
    out = model(torch.randn(2, 3, 32, 32))
    assert list(out) == ["main", "c2", "c3"]
    assert all(v.shape == (2, 10) for v in out.values())


def test_state_dict_is_backbone_keys_plus_branches():
    backbone = torchvision.models.resnet18()
    original_keys = list(backbone.state_dict())
    model = augment(spec_for("torchvision:resnet18", 64), backbone)
    keys = list(model.state_dict())
    assert [k for k in keys if k.startswith("backbone.")] == [f"backbone.{k}" for k in original_keys]
    assert all(k.startswith(("backbone.", "branches.c2.", "branches.c3.")) for k in keys)
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))


def test_backbone_is_never_mutated():
    backbone = torchvision.models.resnet18()
    before = copy.deepcopy(backbone.state_dict())
    structure = repr(backbone)
    backbone.train()
    model = augment(spec_for("torchvision:resnet18", 64), backbone)
    assert model.backbone is backbone
    assert repr(backbone) == structure
    assert all(m.training for m in backbone.modules())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_eval_main_equals_backbone_output():
    model = augment(spec_for()).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)["main"], model.backbone(x))


def test_branch_initialisation_is_deterministic_under_manual_seed():
    torch.manual_seed(7)
    a = augment(spec_for())
    torch.manual_seed(7)
    b = augment(spec_for())
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gradients_reach_backbone_and_branches():
    model = augment(spec_for())
    out = model(torch.randn(4, 3, 32, 32))
    sum(o.logsumexp(1).mean() for o in out.values()).backward()
    assert model.backbone.conv1.weight.grad is not None
    assert model.branches["c3"].stages[0][0].conv1.weight.grad is not None


def test_dtype_and_device_moves_keep_working():
    model = augment(spec_for()).double().eval()
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out["c2"].dtype == torch.float64


def test_taps_at_one_point_with_different_names():
    model = augment(spec_for(taps=[{"at": "layer2", "name": "a", "depth": [1]},
                                   {"at": "layer2", "name": "b", "depth": [2]}]))
    assert model.classifiers == ["main", "a", "b"]


@pytest.mark.parametrize("pairs,expected", [
    ("top_down", [("main", "c2"), ("main", "c3"), ("c2", "c3")]),
    ("bottom_up", [("c2", "main"), ("c3", "main"), ("c3", "c2")]),
    ("none", []),
    ([["c3", "main"]], [("c3", "main")]),
])
def test_pair_sets(pairs, expected):
    model = augment(spec_for(synergy={"pairs": pairs}))
    assert SynergyLoss.for_model(model).pairs == expected


def test_bidirectional_is_all_ordered_pairs():
    model = augment(spec_for())
    assert sorted(SynergyLoss.for_model(model).pairs) == sorted((a, b) for a in model.classifiers for b in model.classifiers if a != b)
