"""The per-model check of test_torchvision_zoo.py; `python tests/zoo_check.py NAME` runs it in a fresh process."""

import sys
import warnings

import torch
import torchvision.models as tvm

from dksgraph.augment import augment
from dksgraph.models import small_input_size
from dksgraph.spec import parse_spec
from dksgraph.strip import strip


def check(name: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    size = small_input_size(f"torchvision:{name}")
    torch.manual_seed(0)
    spec = parse_spec({"backbone": {"model": f"torchvision:{name}", "kwargs": {"num_classes": 10},
                                    "input_size": [3, size, size]}})
    model = augment(spec)
    assert len(model.plans) == 2, f"{name}: auto taps {[p.tap for p in model.plans]}"
    t = model.traced
    final = t.shapes[t.final]
    for plan in model.plans:  # the downsampling rule: every branch ends at the final feature map's size
        assert plan.out_shape[1:] == final[1:], (name, plan.label, plan.out_shape, final)
    model.train()
    out = model(torch.randn(2, 3, size, size))
    sum(v.float().logsumexp(1).mean() for v in out.values()).backward()
    for label in model.classifiers[1:]:
        grads = [p.grad for p in model.branches[label].parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), (name, label)
    original = strip(model)  # raises unless bit-exact in eval mode
    stock = tvm.get_model(name, num_classes=10)
    assert list(original.state_dict()) == list(stock.state_dict())


if __name__ == "__main__":
    check(sys.argv[1])
    print("ok")
