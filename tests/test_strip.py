import pytest
import torch
import torchvision
from torch import nn

from conftest import SPECS
from dksgraph.augmented import augment
from dksgraph.spec import load_spec, parse_spec
from dksgraph.deploy import export, probe_input, strip
from dksgraph.deploy.formats import identical
from dksgraph.checkpoint import save_checkpoint
from dksgraph.errors import DksError


def assert_stripped_equals(model, original):
    assert list(original.state_dict()) == [k[len("backbone."):] for k in model.state_dict() if k.startswith("backbone.")]
    model.eval()
    original.eval()
    x = probe_input(model.spec, batch=3)
    with torch.no_grad():
        assert identical(model(x)["main"], original(x))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_strip_is_bit_exact_for_every_spec(path):
    spec = load_spec(path)
    model = augment(spec)
    original = strip(model)
    assert type(original) is type(model.backbone) and original is not model.backbone
    shared = {p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in original.parameters()}
    assert not shared  # an independent copy, not a view of the training weights
    assert_stripped_equals(model, original)


TORCHVISION = ["resnet18", "densenet121", "mobilenet_v2"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_strip_torchvision_after_training_steps(name):
    spec = parse_spec({"backbone": {"model": f"torchvision:{name}", "kwargs": {"num_classes": 5},
                                    "input_size": [3, 64, 64]}})
    model = augment(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
        loss = sum(nn.functional.cross_entropy(z, y) for z in model(x).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    original = strip(model)
    stock = getattr(torchvision.models, name)(num_classes=5)
    stock.load_state_dict(original.state_dict())  # strict: a stock class takes the weights
    sd, ref = stock.state_dict(), model.backbone.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)  # weights and BN running statistics
    x = torch.randn(4, 3, 64, 64)
    model.train()
    stock.train()
    with torch.no_grad():  # train mode: batch statistics and dropout (same RNG state for both)
        torch.manual_seed(1)
        want = model(x)["main"]
        torch.manual_seed(1)
        assert torch.equal(want, stock(x))
    assert_stripped_equals(model, stock)


def test_strip_checkpoint_loads_into_stock_class(tmp_path):
    spec = parse_spec({"name": "r18", "backbone": {"model": "torchvision:resnet18", "input_size": [3, 64, 64]}})
    model = augment(spec)
    save_checkpoint(tmp_path / "init.pt", spec, model)
    export(tmp_path / "init.pt", tmp_path / "r18.pt")
    stock = torchvision.models.resnet18()
    stock.load_state_dict(torch.load(tmp_path / "r18.pt", weights_only=True))
    assert_stripped_equals(model, stock)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches(tmp_path):
    spec = parse_spec({"backbone": {"model": "zoo:resnet32", "input_size": [3, 32, 32]}})
    model = augment(spec)
    original = strip(model)
    path = export(model, tmp_path / "r32.ts.pt", "main", "torchscript").path
    scripted = torch.jit.load(str(path))
    x = torch.randn(2, 3, 32, 32)
    original.eval()
    with torch.no_grad():
        assert torch.equal(scripted(x), original(x))


def test_export_refuses_a_plain_module(tmp_path):
    spec = parse_spec({"backbone": {"model": "zoo:resnet32", "input_size": [3, 32, 32]}})
    with pytest.raises(DksError, match="AugmentedModel or a checkpoint path"):
        export(strip(augment(spec)), tmp_path / "r32.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["mnasnet0_5", "regnet_x_400mf", "convnext_tiny", "efficientnet_b0"])
def test_strip_other_torchvision_families(name):
    """Regressions: MNASNet reads state_dict version metadata, RegNet cannot be built on the meta
    device, ConvNeXt's head holds a channels-first LayerNorm subclass."""
    spec = parse_spec({"backbone": {"model": f"torchvision:{name}", "kwargs": {"num_classes": 10},
                                    "input_size": [3, 64, 64]}})
    model = augment(spec)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    original = strip(model)
    stock = getattr(torchvision.models, name)(num_classes=10)
    stock.load_state_dict(original.state_dict())
    assert_stripped_equals(model, stock)
