"""Backbone registry: ``zoo:NAME``, ``torchvision:NAME``, ``timm:NAME`` and ``package.module:callable``.

Example::

    >>> from dksgraph.spec import BackboneSpec
    >>> m = build_backbone(BackboneSpec(model="zoo:resnet32", kwargs={"num_classes": 100}))
    >>> m.fc.out_features
    100
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor, nn

from dksgraph.errors import GraphError, SpecError, close_matches, first_line
from dksgraph.models import cifar_resnet, densenet, mobilenet, wrn
from dksgraph.models.weights import load_pretrained

__all__ = ["ZOO", "ZooEntry", "build_backbone", "main_logits", "resolve_factory", "small_input_size"]


class ZooEntry(NamedTuple):
    factory: Callable[..., nn.Module]
    source: str


ZOO: dict[str, ZooEntry] = {
    "resnet32": ZooEntry(cifar_resnet.resnet32, "He et al. 2016, Sec. 4.2 (6n+2, n=5, option-A shortcuts)"),
    "resnet56": ZooEntry(cifar_resnet.resnet56, "He et al. 2016, Sec. 4.2 (n=9; SDN's CIFAR ResNet-56)"),
    "resnet110": ZooEntry(cifar_resnet.resnet110, "He et al. 2016, Sec. 4.2 (n=18)"),
    "resnet1202": ZooEntry(cifar_resnet.resnet1202, "He et al. 2016, Sec. 4.2 (n=200)"),
    "resnet18_cifar": ZooEntry(cifar_resnet.resnet18_cifar, "torchvision's ResNet-18 with a 3x3 stride-1 stem and "
                               "no max-pool (BYOT's CIFAR ResNet-18)"),
    "densenet40": ZooEntry(densenet.densenet40, "Huang et al. 2017 (L=40, k=12, no bottleneck)"),
    "densenet100": ZooEntry(densenet.densenet100, "Huang et al. 2017 (L=100, k=12, no bottleneck)"),
    "densenet_bc100": ZooEntry(densenet.densenet_bc100, "Huang et al. 2017 (DenseNet-BC, L=100, k=12)"),
    "wrn28_4": ZooEntry(wrn.wrn28_4, "Zagoruyko & Komodakis 2016 (WRN-28-4, `dropout` kwarg)"),
    "wrn28_10": ZooEntry(wrn.wrn28_10, "Zagoruyko & Komodakis 2016 (WRN-28-10, `dropout` kwarg)"),
    "mobilenet": ZooEntry(mobilenet.mobilenet, "Howard et al. 2017, unstrided stem for 32x32 (as in Zhang et al. 2018, DML)"),
}


def small_input_size(name: str) -> int:
    """The smallest square input (H = W) at which ``name`` keeps all its downsamplings meaningful:
    64 for most CNNs, the fixed or minimum size for the families that need one."""
    prefix, _, model = name.partition(":")
    if prefix == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(model)
        if cfg is not None and (cfg.fixed_input_size or model.startswith("inception")):
            return int(cfg.input_size[-1])
        return 64
    if model.startswith("inception"):
        return 299
    if model.startswith(("vit_", "swin", "maxvit", "alexnet")):
        return 224
    return 32 if name.startswith("zoo:") else 64


def build_backbone(backbone, pretrained: bool = True) -> nn.Module:
    """Instantiate the network a :class:`~dksgraph.spec.BackboneSpec` names, holding its ``weights`` when
    ``pretrained`` (a run's start; resuming, evaluating and stripping load a checkpoint instead)."""
    name, kwargs = backbone.model, dict(backbone.kwargs)
    given = sorted(k for k in ("weights", "pretrained", "pretrained_cfg") if k in kwargs)
    if given:
        raise SpecError(
            f"backbone.kwargs sets {', '.join(given)}; pretrained weights go in `backbone.weights` instead (a "
            "torchvision weights name such as IMAGENET1K_V1, `timm`, or a local file), which works with any "
            "num_classes and is not re-read when a run resumes, is evaluated or stripped."
        )
    factory = resolve_factory(name)
    if pretrained and backbone.weights:
        model = load_pretrained(backbone, factory)
    else:
        try:
            model = factory(**kwargs)
        except (TypeError, ValueError) as exc:
            raise SpecError(
                f"`{name}` does not accept backbone.kwargs {kwargs}: {exc}. "
                "Fix `backbone.kwargs` in the spec (for example `{num_classes: 100}`)."
            ) from None
        except Exception as exc:  # the model's own code failed while building
            first = first_line(exc)
            raise SpecError(
                f"building `{name}` with backbone.kwargs {kwargs} raised {type(exc).__name__}: {first}. The error "
                "comes from the model's own code; check its arguments (backbone.kwargs) and that it builds on its "
                "own in Python."
            ) from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"`{name}` returned a {type(model).__name__}, not a torch.nn.Module; point it at a model factory.")
    return model


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """The callable behind a model name, or a SpecError with close matches."""
    prefix, sep, rest = name.partition(":")
    if not sep or not rest:
        raise SpecError(
            f"model `{name}` has no source prefix; write `zoo:NAME`, `torchvision:NAME`, `timm:NAME` or "
            f"`package.module:callable` (for example `zoo:resnet32` or `torchvision:resnet18`)."
        )
    if prefix == "zoo":
        if rest not in ZOO:
            raise SpecError(_unknown(name, rest, ZOO, "`dksgraph inspect` accepts any of: " + ", ".join(ZOO)))
        return ZOO[rest].factory
    if prefix == "torchvision":
        import torchvision.models as tvm

        names = tvm.list_models(module=tvm)
        if rest not in names:
            raise SpecError(_unknown(name, rest, names, "torchvision's classification models are listed by "
                                     "`torchvision.models.list_models(module=torchvision.models)`"))
        return lambda **kw: tvm.get_model(rest, **kw)
    if prefix == "timm":
        try:
            import timm
        except ImportError:
            raise SpecError(
                f"model `{name}` needs timm, which is not installed; run `pip install 'dksgraph[timm]'`."
            ) from None
        names = timm.list_models()
        if rest not in names:
            raise SpecError(_unknown(name, rest, names, "`timm.list_models()` lists them"))
        return lambda **kw: timm.create_model(rest, pretrained=False, **kw)
    return _import_callable(prefix, rest, name)


def _import_callable(module_name: str, attr: str, name: str) -> Callable[..., nn.Module]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(
            f"cannot import `{module_name}` for model `{name}` ({exc}); check the module path and that its "
            "package is installed, or use a `zoo:`, `torchvision:` or `timm:` model."
        ) from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            hint = close_matches(part, [a for a in dir(target) if not a.startswith("_")])
            raise SpecError(
                f"`{module_name}` has no attribute `{attr}` for model `{name}`"
                + (f"; did you mean {hint}?" if hint else "; check the name after the colon.")
            )
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"`{name}` is not callable; it must name a class or function that returns an nn.Module.")
    return target


def _unknown(name: str, rest: str, choices, where: str) -> str:
    hint = close_matches(rest, choices)
    return f"unknown model `{name}`" + (f"; did you mean {hint}?" if hint else ".") + f" {where}."


def main_logits(result: Any) -> Tensor:
    """The backbone's logits from whatever its forward returns (tensor, tuple, or `.logits`)."""
    if isinstance(result, Tensor):
        return result
    if hasattr(result, "logits"):
        return result.logits
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], Tensor):
        return result[0]
    raise GraphError(f"cannot find the logits in the backbone's output of type {type(result).__name__}.")
