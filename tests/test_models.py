import pytest
import torch

from dksgraph.models import ZOO, build_backbone
from dksgraph.spec import BackboneSpec


def params(name: str, **kwargs) -> int:
    return sum(p.numel() for p in build_backbone(BackboneSpec(model=f"zoo:{name}", kwargs=kwargs)).parameters())


@pytest.mark.parametrize("name,published_millions", [
    ("resnet32", 0.46), ("resnet110", 1.7), ("wrn28_10", 36.5), ("densenet40", 1.0), ("densenet_bc100", 0.8),
])
def test_parameter_counts_match_the_papers(name, published_millions):
    assert abs(params(name, num_classes=10) / 1e6 - published_millions) < 0.05 * published_millions + 0.02


@pytest.mark.parametrize("name", [n for n in ZOO if n != "resnet1202"])
def test_zoo_models_classify_32x32(name):
    model = build_backbone(BackboneSpec(model=f"zoo:{name}", kwargs={"num_classes": 7}))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_wrn_dropout_kwarg_is_used():
    model = build_backbone(BackboneSpec(model="zoo:wrn28_4", kwargs={"dropout": 0.3}))
    assert model.block1[0].dropout.p == 0.3


def test_module_callable_backbones():
    model = build_backbone(BackboneSpec(model="toynets:odd_net", kwargs={"num_classes": 3}))
    assert model.fc.out_features == 3
