"""Strip every branch: give back the original network, verified bit for bit, and export it.

:func:`strip` rebuilds the backbone from the spec, loads the ``backbone.*`` weights with
``strict=True`` and checks, on a fixed input in eval mode, that its output equals the augmented
model's ``main`` logits exactly (``torch.equal``). Only then does :func:`export` write anything.

Stripping a checkpoint needs only the backbone: the ``branches.*`` weights are checked to be there
and otherwise ignored, and the reference output is the backbone's FX program (what the augmented
model runs for ``main``) over the checkpoint's own tensors. So no branch is built, and a checkpoint
written by any earlier release strips whatever the branch builders have become since.

Example::

    >>> original = strip("runs/r32/last.pt")                 # doctest: +SKIP
    >>> export(original, "resnet32.pt", spec)                # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dksgraph.augmented import AugmentedModel, augment, main_program
from dksgraph.checkpoint import atomic_save, atomic_write, checkpoint_spec, load_checkpoint
from dksgraph.errors import CheckpointError, DksError, SpecError
from dksgraph.models import build_backbone, main_logits
from dksgraph.spec import Spec
from dksgraph.tracing import in_mode, trace_graph

FORMATS = ("state_dict", "torchscript")
PREFIX = "backbone."
BRANCHES = "branches."


@torch.no_grad()
def probe_input(spec: Spec, batch: int = 2, like: nn.Module | None = None) -> torch.Tensor:
    """The fixed input strip and export verify on: seeded normal noise at the spec's input size."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *spec.backbone.input_size), generator=gen)
    param = next(like.parameters(), None) if like is not None else None
    return x.to(param.device, param.dtype) if param is not None else x


def load_augmented(path: str | Path) -> tuple[AugmentedModel, dict]:
    """Rebuild the AugmentedModel a checkpoint was saved from and load its weights strictly."""
    ckpt = load_checkpoint(path)
    model = augment(checkpoint_spec(ckpt, f"{path} (its spec)"), pretrained=False)
    load_augmented_state(model, ckpt["model"], path)
    return model, ckpt


def load_augmented_state(model: AugmentedModel, state: dict, path: str | Path) -> None:
    """Strictly load a checkpoint's weights, with a readable error when they do not fit its spec."""
    _strict_load(model, state, f"the weights in `{path}`", model.spec)


def strip(source: AugmentedModel | str | Path) -> nn.Module:
    """The original network with the trained backbone weights, verified against the augmented model's ``main``."""
    if not isinstance(source, AugmentedModel):
        return strip_checkpoint(source)[0]
    spec = source.spec
    original = _rebuild(spec, backbone_state(source.state_dict()))
    param = next(source.parameters(), None)
    if param is not None:
        original.to(param.device, param.dtype)
    verify(spec, original, source.forward_main, source)
    return original


def strip_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Strip a checkpoint file, building only its backbone; returns the network and the checkpoint."""
    ckpt = load_checkpoint(path)
    spec = checkpoint_spec(ckpt, f"{path} (its spec)")
    _check_branch_keys(ckpt["model"], spec, path)
    state = backbone_state(ckpt["model"])
    original = _rebuild(spec, state)
    program = main_program(original, trace_graph(original, spec.backbone.leaf_modules, training=False))
    raw = dict(state)  # the file's own tensors, not what load_state_dict made of them

    def reference(x: torch.Tensor) -> torch.Tensor:
        return main_logits(torch.func.functional_call(program, raw, (x,)))

    verify(spec, original, reference)
    return original, ckpt


def _check_branch_keys(state: dict, spec: Spec, path: str | Path) -> None:
    """Every entry is the backbone's or a branch's, and every listed tap has its branch's weights."""
    stray = [k for k in state if not k.startswith((PREFIX, BRANCHES))]
    labels = {k[len(BRANCHES):].split(".", 1)[0] for k in state if k.startswith(BRANCHES)}
    listed = [t.label for t in spec.taps] if isinstance(spec.taps, list) else []
    missing = [label for label in listed if label not in labels]
    if stray or missing:
        problem = (f"{len(stray)} entries belong to neither the backbone nor a branch (e.g. {', '.join(stray[:3])})"
                   if stray else f"the weights of branch(es) {', '.join(missing)} that its spec lists are missing")
        raise CheckpointError(
            f"`{path}` is not a whole dksgraph/1 checkpoint: {problem}. It was edited or saved from another "
            "model; use the checkpoint as `dksgraph train` or `dksgraph augment --save` wrote it."
        )


def verify(spec: Spec, original: nn.Module, reference: Callable[[torch.Tensor], torch.Tensor],
           *modules: nn.Module) -> None:
    """Refuse unless the original network's eval output equals ``reference`` (the augmented ``main``) exactly."""
    x = probe_input(spec, like=original)
    with torch.no_grad(), in_mode(False, original, *modules):
        want = reference(x)
        got = main_logits(original(x))
    if not identical(want, got):
        diff = (want.float() - got.float()).abs().max().item() if want.shape == got.shape else "shape"
        raise DksError(
            f"strip verification failed: the stripped network's output differs from the augmented model's "
            f"`main` output (max abs difference {diff}). Nothing was written. This is a dksgraph bug for "
            f"`{spec.backbone.model}`; please report it with the spec."
        )


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, with NaNs at the same positions counted equal (an untrained ResNet-1202 overflows)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def export(original: nn.Module, path: str | Path, spec: Spec, fmt: str = "state_dict") -> Path:
    """Write the stripped network atomically as a state_dict or a verified TorchScript module."""
    if fmt == "state_dict":
        return atomic_save(original.state_dict(), path)
    if fmt == "torchscript":
        x = probe_input(spec, like=original)
        try:  # torch.jit is deprecated upstream but still the portable deployment format
            with warnings.catch_warnings(), in_mode(False, original):
                warnings.simplefilter("ignore", FutureWarning)
                try:
                    program = torch.jit.script(original)
                except Exception:
                    program = torch.jit.trace(original, x)
                with torch.no_grad():
                    same = identical(main_logits(program(x)), main_logits(original(x)))
        except Exception as exc:
            raise DksError(
                f"TorchScript export of `{spec.backbone.model}` failed ({str(exc).splitlines()[0][:200]}); use "
                "`--format state_dict`, which loads into the model's own class."
            ) from None
        if not same:
            raise DksError("the TorchScript module's output differs from the network's; nothing was written. "
                           "Use `--format state_dict`.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return atomic_write(path, lambda f: torch.jit.save(program, f))
    raise DksError(f"unknown export format `{fmt}`; choose one of {', '.join(FORMATS)}.")


def backbone_state(state: dict) -> OrderedDict:
    """The ``backbone.*`` entries with the prefix removed, cloned, keeping the per-module version metadata
    (``_metadata``) that some models' ``_load_from_state_dict`` reads (torchvision's MNASNet)."""
    out = OrderedDict((k[len(PREFIX):], v.clone()) for k, v in state.items() if k.startswith(PREFIX))
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict((k[len(PREFIX):] if k != "backbone" else "", v)
                                    for k, v in metadata.items() if k == "backbone" or k.startswith(PREFIX))
    return out


def _rebuild(spec: Spec, state: dict) -> nn.Module:
    """The spec's network holding ``state``, strictly loaded.

    Built on the meta device first (no time spent on a random init that the load overwrites);
    a network with tensors outside its state_dict (non-persistent buffers) is built normally.
    """
    try:
        with torch.device("meta"):
            shell = build_backbone(spec.backbone, pretrained=False)
    except (NotImplementedError, RuntimeError, SpecError):  # a factory that reads tensor values while initialising
        shell = None
    if shell is not None:
        _strict_load(shell, state, "the backbone weights", spec, assign=True)
        if not any(t.is_meta for t in [*shell.parameters(), *shell.buffers()]):
            return shell
    original = build_backbone(spec.backbone, pretrained=False)
    _strict_load(original, state, "the backbone weights", spec)
    return original


def _strict_load(module: nn.Module, state: dict, what: str, spec: Spec, assign: bool = False) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {'; '.join(wrong[:2])})")
        raise CheckpointError(
            f"{what} do not fit the network the spec describes (`{spec.backbone.model}`, "
            f"kwargs {dict(spec.backbone.kwargs)}): {', '.join(parts)} weights. The weights were saved from a "
            "different model or spec; use the checkpoint together with the spec it was trained with."
        )
    module.load_state_dict(state, strict=True, assign=assign)
