"""How a branch's fresh modules are initialised: the way the backbone initialises its own.

* The backbone's own routine, found by name (``init_weights``, ``_init_weights``,
  ``_initialize_weights``, ``initialize_weights``): one that takes a module (timm's and
  torchvision's ``_init_weights(m)``) is applied to every module of the branch; one that takes
  none (the zoo's ``init_weights()``, timm's ResNet ``init_weights()``) runs with the branch as
  ``self``.
* Otherwise the scheme torchvision's CNNs use: Kaiming normal (fan-out, ReLU) convolution weights
  with zero biases, normalisation layers with weight 1 and bias 0, and the head's Linear like the
  backbone's classifier (PyTorch's default, or a normal draw at the classifier's own scale when it
  was initialised otherwise).
* ``branch_init: pytorch`` in the spec keeps PyTorch's per-layer defaults (``reset_parameters``).

Example::

    >>> from dksgraph.models.cifar_resnet import resnet32
    >>> initialise(nn.Sequential(nn.Conv2d(3, 8, 3)), resnet32())
    "the backbone's own init_weights()"
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

__all__ = ["DEFAULT", "ROUTINES", "initialise"]

ROUTINES = ("init_weights", "_init_weights", "_initialize_weights", "initialize_weights")
DEFAULT = ("Kaiming normal (fan-out) convolutions, norm layers weight 1 / bias 0, head Linear like the backbone's "
           "classifier (the backbone has no init routine)")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def initialise(branch: nn.Module, backbone: nn.Module, scheme: str = "backbone", head: nn.Module | None = None) -> str:
    """Initialise ``branch`` (fresh modules) as ``backbone`` initialises its own; returns how, for the summary."""
    if scheme == "pytorch":
        return "PyTorch's per-layer defaults (branch_init: pytorch)"
    for name in ROUTINES:
        routine = getattr(type(backbone), name, None)
        if not callable(routine):
            continue
        try:
            required = [p for p in list(inspect.signature(routine).parameters.values())[1:]
                        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            continue
        try:
            if len(required) == 1:
                for m in branch.modules():
                    routine(backbone, m)
            elif not required:
                routine(branch)
            else:
                continue
        except Exception:  # a routine that reads the backbone's own attributes: the default below instead
            continue
        return f"the backbone's own {name}()"
    _default(branch, backbone, head)
    return DEFAULT


def _default(branch: nn.Module, backbone: nn.Module, head: nn.Module | None) -> None:
    for m in branch.modules():
        if isinstance(m, _CONVS):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    classifier = next((m for m in reversed(list(backbone.modules())) if isinstance(m, nn.Linear)), None)
    for m in (head or branch).modules():
        if isinstance(m, nn.Linear) and classifier is not None:
            _like(m, classifier)


def _like(linear: nn.Linear, classifier: nn.Linear) -> None:
    """``linear`` drawn like the backbone's ``classifier``: PyTorch's default, unless the classifier's weights
    have another scale (VGG's N(0, 0.01), say); a zero bias stays zero."""
    std = float(classifier.weight.std())
    default = 1.0 / math.sqrt(3.0 * classifier.in_features)
    if std > 0 and abs(math.log(std / default)) > math.log(1.25):
        nn.init.normal_(linear.weight, 0.0, std)
    else:
        linear.reset_parameters()
    if linear.bias is not None and classifier.bias is not None and not classifier.bias.any():
        nn.init.zeros_(linear.bias)
