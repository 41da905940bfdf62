"""Every torchvision classification model augments with `taps: auto`, trains a step and strips bit-exactly.

Light models run in this process; the heavy ones (hundreds of MB of weights each) run in a fresh
process each, so that the allocator's memory from one does not pile up under the next.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision.models as tvm

from zoo_check import check

HEAVY = {
    "alexnet", "convnext_base", "convnext_large", "densenet161", "efficientnet_v2_l", "efficientnet_v2_m",
    "maxvit_t", "regnet_x_16gf", "regnet_x_32gf", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
    "resnet152", "resnext101_32x8d", "resnext101_64x4d", "swin_b", "swin_v2_b", "vit_b_16", "vit_b_32",
    "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet50_2", "wide_resnet101_2",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
}
NAMES = tvm.list_models(module=tvm)


def test_the_zoo_is_what_we_think():
    assert len(NAMES) >= 80 and HEAVY <= set(NAMES)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in HEAVY])
def test_torchvision_model(name):
    check(f"torchvision:{name}", taps=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_heavy_torchvision_model(name):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "zoo_check.py"),
                           f"torchvision:{name}", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
