"""Strip every branch: give back the original network, verified bit for bit.

:func:`strip` rebuilds the backbone from the spec, loads the ``backbone.*`` weights with
``strict=True`` and checks, on a fixed input in eval mode, that its output equals the augmented
model's ``main`` logits exactly (``torch.equal``); :mod:`dksgraph.deploy.exports` writes nothing
that has not passed this check.

Stripping a checkpoint needs only the backbone: the ``branches.*`` weights are checked to be there
and otherwise ignored, and the reference output is the backbone's FX program (what the augmented
model runs for ``main``) over the checkpoint's own tensors. So no branch is built, and a checkpoint
written by any earlier release strips whatever the branch builders have become since.

Example::

    >>> original = strip("runs/r32/last.pt")                 # doctest: +SKIP
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dksgraph.augmented import AugmentedModel, main_program
from dksgraph.checkpoint import checkpoint_spec, load_checkpoint, strict_load
from dksgraph.deploy.formats import identical
from dksgraph.errors import CheckpointError, DksError, SpecError
from dksgraph.fx.tracing import EVAL, in_mode, trace_graph
from dksgraph.models import build_backbone, main_logits
from dksgraph.names import Key
from dksgraph.spec import Spec

__all__ = ["BRANCHES", "PREFIX", "backbone_state", "probe_input", "strip", "strip_checkpoint", "verify"]

PREFIX = "backbone."
BRANCHES = "branches."


@torch.no_grad()
def probe_input(spec: Spec, batch: int = 2, like: nn.Module | None = None) -> torch.Tensor:
    """The fixed input strip and export verify on: seeded normal noise at the spec's input size."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *spec.backbone.input_size), generator=gen)
    param = next(like.parameters(), None) if like is not None else None
    return x.to(param.device, param.dtype) if param is not None else x


def strip(source: AugmentedModel | str | Path) -> nn.Module:
    """The original network with the trained backbone weights, verified against the augmented model's ``main``.

    Args:
        source: an AugmentedModel, or the path of a dksgraph checkpoint (then only its backbone is built).

    Returns:
        The network ``spec.backbone`` names, of its own class, holding the trained backbone weights; its eval
        output equals the augmented model's ``main`` logits exactly (checked before it is returned).

    Raises:
        CheckpointError: the file is not a whole dksgraph checkpoint; DksError: the check failed.
    """
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
    _check_branch_keys(ckpt[Key.MODEL], spec, path)
    state = backbone_state(ckpt[Key.MODEL])
    original = _rebuild(spec, state)
    program = main_program(original, trace_graph(original, spec.backbone.leaf_modules, EVAL))
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
    with torch.no_grad(), in_mode(EVAL, original, *modules):
        want = reference(x)
        got = main_logits(original(x))
    if not identical(want, got):
        diff = (want.float() - got.float()).abs().max().item() if want.shape == got.shape else "shape"
        raise DksError(
            f"strip verification failed: the stripped network's output differs from the augmented model's "
            f"`main` output (max abs difference {diff}). Nothing was written. This is a dksgraph bug for "
            f"`{spec.backbone.model}`; please report it with the spec."
        )


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
        strict_load(shell, state, "the backbone weights", spec, assign=True)
        if not any(t.is_meta for t in [*shell.parameters(), *shell.buffers()]):
            return shell
    original = build_backbone(spec.backbone, pretrained=False)
    strict_load(original, state, "the backbone weights", spec)
    return original
