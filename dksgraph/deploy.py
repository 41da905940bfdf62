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
    >>> export("runs/r32/last.pt", "resnet32.pt")            # doctest: +SKIP
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dksgraph.augmented import AugmentedModel, augment, main_program
from dksgraph.checkpoint import checkpoint_spec, load_checkpoint
from dksgraph.errors import CheckpointError, DksError, SpecError
from dksgraph.formats import SIDECAR, SUFFIXES, Check, identical
from dksgraph.formats import write as write_format
from dksgraph.models import build_backbone, main_logits
from dksgraph.spec import ENSEMBLE, MAIN, Spec
from dksgraph.summary import count_parameters
from dksgraph.tracing import in_mode, trace_graph

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


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote and how it was verified."""

    path: Path
    fmt: str
    classifier: str
    check: Check
    parameters: int
    checkpoint: dict | None  # the checkpoint it came from, when it came from a file


def export(source: AugmentedModel | str | Path, path: str | Path | None = None, classifier_name: str = MAIN,
           fmt: str = "state_dict", members: list[str] | None = None) -> Exported:
    """Write one classifier of an AugmentedModel or checkpoint: ``main`` (the stripped original network), an
    auxiliary one (``c2``, ...) or ``ensemble`` (of ``members``, default all), as ``fmt`` (state_dict, exported,
    onnx, torchscript), each verified against the augmented model before anything is written.

    >>> export("runs/r32/best.pt", "r32-c2.pt2", "c2", "exported")          # doctest: +SKIP
    """
    from dksgraph.classifiers import classifier

    if not isinstance(source, (AugmentedModel, str, Path)):
        raise DksError(
            f"export() takes an AugmentedModel or a checkpoint path, not a {type(source).__name__}: pass the "
            "augmented model (or its checkpoint) and it strips and verifies the classifier itself; a network "
            "you stripped already is saved with torch.save(network.state_dict(), path)."
        )
    ckpt = None
    if classifier_name == MAIN:  # stripping a file builds only the backbone
        module, ckpt = (strip(source), None) if isinstance(source, AugmentedModel) else strip_checkpoint(source)
        spec = source.spec if isinstance(source, AugmentedModel) else checkpoint_spec(ckpt, str(source))
        module = module.eval()
    else:
        model, ckpt = (source, None) if isinstance(source, AugmentedModel) else load_augmented(source)
        spec = model.spec
        module = classifier(model, classifier_name, members)
        _verify_classifier(model, module, classifier_name, members)
    if path is None:
        if isinstance(source, AugmentedModel):
            raise DksError("give the output path: export(model, path, ...).")
        path = Path(source).with_name(f"{Path(source).stem}.{classifier_name}{SUFFIXES.get(fmt, '')}")
    sidecar = {"format": SIDECAR, "classifier": classifier_name, "members": members,
               "model": spec.backbone.model, "kwargs": dict(spec.backbone.kwargs),
               "input_size": list(spec.backbone.input_size), "spec": spec.model_dump(mode="json")}
    probes = [probe_input(spec, batch, like=module) for batch in (2, 3)]
    check = write_format(module, path, fmt, probes, sidecar)
    return Exported(Path(path), fmt, classifier_name, check, count_parameters(module), ckpt)


def _verify_classifier(model: AugmentedModel, module: nn.Module, name: str, members: list[str] | None) -> None:
    """The standalone classifier gives exactly what the augmented model gives for it (eval mode)."""
    from dksgraph.classifiers import mean_softmax

    x = probe_input(model.spec, like=module)
    with torch.no_grad(), in_mode(False, model):
        logits = model.logits(x)
        want = mean_softmax([logits[m] for m in (members or model.classifiers)]) if name == ENSEMBLE else logits[name]
        got = module(x)
    if not identical(want, got):
        raise DksError(f"the standalone `{name}` classifier differs from the augmented model's output; nothing was "
                       f"written. This is a dksgraph bug for `{model.spec.backbone.model}`; please report it.")


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
