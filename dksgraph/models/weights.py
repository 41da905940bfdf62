"""Start from pretrained weights (`backbone.weights`), with any number of classes.

``backbone.weights`` names

* a torchvision weights enum member of the model (``IMAGENET1K_V1``, ``DEFAULT``, ...),
* ``timm``: timm's pretrained weights of the model (``timm.create_model(..., pretrained=True)``),
* or a local file: a state_dict, or a dksgraph checkpoint (its ``backbone.*`` weights).

The network is loaded first and its classifier is then replaced by a fresh one of the spec's
``num_classes`` when the sizes differ (as timm's ``num_classes`` does); the branches are built
around the result. Pretrained weights are read only when a run starts (``dksgraph train``,
``dksgraph augment``); resuming, evaluating and stripping use the checkpoint's own weights.

Example::

    >>> from dksgraph.spec import BackboneSpec
    >>> spec = BackboneSpec(model="torchvision:resnet18", kwargs={"num_classes": 10}, weights="IMAGENET1K_V1")
    >>> model = load_pretrained(spec)          # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dksgraph.checkpoint import read_tensors
from dksgraph.errors import SpecError, first_line
from dksgraph.names import CHECKPOINT_FORMAT, Key

__all__ = ["load_pretrained"]


def load_pretrained(backbone, factory) -> nn.Module:
    """The network ``backbone`` (a BackboneSpec) names, holding the pretrained weights it asks for."""
    name, kwargs, weights = backbone.model, dict(backbone.kwargs), backbone.weights
    prefix, _, model_name = name.partition(":")
    num_classes = kwargs.pop("num_classes", None)
    if Path(weights).suffix in (".pt", ".pth", ".bin", ".ckpt") or Path(weights).is_file():
        return _from_file(name, factory, kwargs, num_classes, Path(weights))
    if weights in ("timm", "pretrained") and prefix == "timm":
        return _from_timm(model_name, kwargs, num_classes)
    if prefix == "torchvision":
        return _from_torchvision(model_name, kwargs, num_classes, weights)
    raise SpecError(
        f"backbone.weights `{weights}` is neither a file nor weights dksgraph can fetch for `{name}`: use a "
        "torchvision weights name (e.g. IMAGENET1K_V1 or DEFAULT) with `torchvision:` models, `timm` with `timm:` "
        "models, or the path of a state_dict or dksgraph checkpoint."
    )


def _from_torchvision(model: str, kwargs: dict, num_classes: int | None, weights: str) -> nn.Module:
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(model)
        member = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        names = ", ".join(["DEFAULT", *(m.name for m in tvm.get_model_weights(model))]) if _has_weights(model) else ""
        raise SpecError(
            f"torchvision has no weights `{weights}` for `{model}`"
            + (f"; it has {names}." if names else "; it ships no pretrained weights for this model.")
            + " Fix backbone.weights."
        ) from None
    try:
        net = tvm.get_model(model, weights=member, **kwargs)
    except Exception as exc:
        if isinstance(exc, (TypeError, ValueError)) and "urlopen" not in str(exc):
            raise SpecError(f"`torchvision:{model}` with weights {member.name} refuses backbone.kwargs "
                            f"{kwargs}: {exc}. Fix backbone.kwargs.") from None
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
        raise SpecError(
            f"could not fetch the {member.name} weights of `{model}` from {member.url} ({type(exc).__name__}: "
            f"{first_line(exc, 120)}). On a machine without internet, "
            f"download that file elsewhere and place it at `{cache}` (torch's hub cache; TORCH_HOME moves it), or "
            "set backbone.weights to a local state_dict file."
        ) from None
    return _with_classes(net, len(member.meta["categories"]), num_classes)


def _has_weights(model: str) -> bool:
    import torchvision.models as tvm

    try:
        tvm.get_model_weights(model)
        return True
    except (KeyError, ValueError):
        return False


def _from_timm(model: str, kwargs: dict, num_classes: int | None) -> nn.Module:
    import timm

    extra = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(model, pretrained=True, **kwargs, **extra)
    except Exception as exc:
        raise SpecError(
            f"could not load timm's pretrained weights for `{model}` ({type(exc).__name__}: "
            f"{first_line(exc, 160)}). timm fetches them from the Hugging "
            "Face hub into its cache (HF_HOME, default ~/.cache/huggingface); on a machine without internet, copy "
            "that cache from a machine that has it, or set backbone.weights to a local state_dict file."
        ) from None


def _from_file(name: str, factory, kwargs: dict, num_classes: int | None, path: Path) -> nn.Module:
    state = read_tensors(path, "backbone.weights file", "Copy the weights file again from its source.",
                         notice=False)  # weights files come from other programs too; a sealed one is verified
    if state.get(Key.FORMAT) == CHECKPOINT_FORMAT:
        state = {k[len("backbone."):]: v for k, v in state[Key.MODEL].items() if k.startswith("backbone.")}
    elif isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    elif isinstance(state.get("model"), dict):
        state = state["model"]
    net = factory(**kwargs, **({} if num_classes is None else {"num_classes": num_classes}))
    own = net.state_dict()
    head = _classifier(net, num_classes)
    resized = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    foreign = [k for k in resized + missing if head is None or not k.startswith(head + ".")]
    if foreign or unexpected:
        raise SpecError(
            f"backbone.weights `{path}` does not fit `{name}` (kwargs {kwargs}): "
            + "; ".join(part for part in (
                f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                f"{len(resized)} of another shape (e.g. {', '.join(resized[:3])})" if resized else "") if part)
            + ". Only the classifier may differ (its size follows num_classes); use weights saved from this model."
        )
    net.load_state_dict({k: v for k, v in state.items() if k not in resized}, strict=False)
    return net


def _classifier(net: nn.Module, num_classes: int | None) -> str | None:
    """The path of the last layer producing ``num_classes`` outputs (a Linear, or SqueezeNet's 1x1 Conv2d)."""
    found = None
    for path, m in net.named_modules():
        out = m.out_features if isinstance(m, nn.Linear) else m.out_channels if isinstance(m, nn.Conv2d) else None
        if out is not None and (num_classes is None or out == num_classes):
            found = path
    return found


def _with_classes(net: nn.Module, trained: int, num_classes: int | None) -> nn.Module:
    """``net`` with a fresh classifier of ``num_classes`` outputs in place of its ``trained``-class one."""
    if num_classes is None or num_classes == trained:
        return net
    path = _classifier(net, trained)
    if path is None:
        raise SpecError(f"found no classifier layer with {trained} outputs to resize to {num_classes} classes in "
                        f"{type(net).__name__}; leave out num_classes or use a local weights file.")
    old = net.get_submodule(path)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    owner, _, attr = path.rpartition(".")
    setattr(net.get_submodule(owner) if owner else net, attr, new.to(old.weight.device, old.weight.dtype))
    return net
