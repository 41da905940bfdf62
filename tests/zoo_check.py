"""The per-model check of the zoo tests; `python tests/zoo_check.py SOURCE:NAME` runs it in a fresh process."""

import sys
import warnings

import torch

from dksgraph.augmented import augment
from dksgraph.models import build_backbone, small_input_size
from dksgraph.spec import parse_spec
from dksgraph.deploy import strip


def check(model_name: str, taps: int | None = None) -> None:
    """``model_name`` (``torchvision:resnet18``, ``timm:resnet50d``) augments with `taps: auto`, trains a step
    with gradients in every branch, strips bit-exactly, and gives back the stock model's state_dict keys."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    size = small_input_size(model_name)
    torch.manual_seed(0)
    spec = parse_spec({"backbone": {"model": model_name, "kwargs": {"num_classes": 10},
                                    "input_size": [3, size, size]}})
    model = augment(spec)
    assert model.plans and len(model.plans) == (taps or len(model.plans)), [p.tap for p in model.plans]
    t = model.traced
    final = t.shapes[t.final]
    for plan in model.plans:  # the downsampling rule: every branch ends at the final feature map's size
        assert plan.out_shape[1:] == final[1:], (model_name, plan.label, plan.out_shape, final)
    model.train()
    out = model(torch.randn(2, 3, size, size))
    sum(v.float().logsumexp(1).mean() for v in out.values()).backward()
    for label in model.classifiers[1:]:
        grads = [p.grad for p in model.branches[label].parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), (model_name, label)
    original = strip(model)  # raises unless bit-exact in eval mode
    stock = build_backbone(spec.backbone)
    assert list(original.state_dict()) == list(stock.state_dict())


if __name__ == "__main__":
    check(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
    print("ok")
