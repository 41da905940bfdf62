"""Export any classifier of a trained model as a verified file, and load such a file back.

:func:`export` writes ``main`` (the stripped original network, :mod:`dksgraph.deploy.strip`), an auxiliary
classifier or the ensemble (:mod:`dksgraph.deploy.classifiers`) in one of the file formats of
:mod:`dksgraph.deploy.formats`, after checking that the standalone module gives exactly what the
augmented model gives for it. :func:`load_exported` rebuilds a written file in one line.

Example::

    >>> export("runs/r32/last.pt", "resnet32.pt")            # doctest: +SKIP
    >>> model = load_exported("resnet32.pt")                 # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dksgraph.augmented import AugmentedModel, augment, load_with_checkpoint
from dksgraph.checkpoint import Loaded, checkpoint_spec
from dksgraph.deploy import formats
from dksgraph.deploy.classifiers import classifier
from dksgraph.deploy.formats import SIDECAR, Check, identical
from dksgraph.deploy.strip import probe_input, strip, strip_checkpoint
from dksgraph.errors import DksError
from dksgraph.fx.tracing import EVAL, in_mode
from dksgraph.loss import ensemble_probabilities
from dksgraph.models import build_backbone
from dksgraph.names import ENSEMBLE, EXPORT_SUFFIXES, MAIN
from dksgraph.spec import parse_spec
from dksgraph.summary import count_parameters

__all__ = ["Exported", "export", "load_exported", "rebuild"]


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote and how it was verified."""

    path: Path
    fmt: str
    classifier: str
    check: Check
    parameters: int
    checkpoint: Loaded | None  # the checkpoint it came from (with the seal it was verified against), from a file


def export(source: AugmentedModel | str | Path, path: str | Path | None = None, classifier_name: str = MAIN,
           fmt: str = "state_dict", members: list[str] | None = None) -> Exported:
    """Write one classifier of an AugmentedModel or checkpoint: ``main`` (the stripped original network), an
    auxiliary one (``c2``, ...) or ``ensemble`` (of ``members``, default all), as ``fmt`` (state_dict, exported,
    onnx, torchscript), each verified against the augmented model before anything is written.

    Args:
        source: an AugmentedModel, or the path of a dksgraph checkpoint.
        path: the file to write; for a checkpoint, default ``<checkpoint stem>.<classifier><suffix>`` beside it.
        classifier_name: ``main``, a tap's name, or ``ensemble``.
        fmt: ``state_dict`` (with a JSON sidecar), ``exported`` (``.pt2``), ``onnx`` or ``torchscript``.
        members: the ensemble's classifiers (default: all).

    Returns:
        What was written (path, format, classifier, parameters) and how it was verified.

    Raises:
        DksError: an unknown classifier or format, or a file that does not reproduce the classifier (nothing
            is written then); CheckpointError, WriteError: a bad checkpoint, a disk or permission problem.

    >>> export("runs/r32/best.pt", "r32-c2.pt2", "c2", "exported")          # doctest: +SKIP
    """
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
        model, ckpt = (source, None) if isinstance(source, AugmentedModel) else load_with_checkpoint(source)
        spec = model.spec
        module = classifier(model, classifier_name, members)
        _verify_classifier(model, module, classifier_name, members)
    if path is None:
        if isinstance(source, AugmentedModel):
            raise DksError("give the output path: export(model, path, ...).")
        path = Path(source).with_name(f"{Path(source).stem}.{classifier_name}{EXPORT_SUFFIXES.get(fmt, '')}")
    sidecar = {"format": SIDECAR, "classifier": classifier_name, "members": members,
               "model": spec.backbone.model, "kwargs": dict(spec.backbone.kwargs),
               "input_size": list(spec.backbone.input_size), "spec": spec.model_dump(mode="json")}
    probes = [probe_input(spec, batch, like=module) for batch in (2, 3)]
    check = formats.write(module, path, fmt, probes, sidecar, rebuild)
    return Exported(Path(path), fmt, classifier_name, check, count_parameters(module), ckpt)


def _verify_classifier(model: AugmentedModel, module: nn.Module, name: str, members: list[str] | None) -> None:
    """The standalone classifier gives exactly what the augmented model gives for it (eval mode)."""
    x = probe_input(model.spec, like=module)
    with torch.no_grad(), in_mode(EVAL, model):
        logits = model.logits(x)
        if name == ENSEMBLE:
            want = ensemble_probabilities([logits[m] for m in (members or model.classifiers)])
        else:
            want = logits[name]
        got = module(x)
    if not identical(want, got):
        raise DksError(f"the standalone `{name}` classifier differs from the augmented model's output; nothing was "
                       f"written. This is a dksgraph bug for `{model.spec.backbone.model}`; please report it.")




def rebuild(info: dict) -> nn.Module:
    """The (untrained) module an export's sidecar describes."""
    spec = parse_spec(info["spec"], source="the export's sidecar")
    if info["classifier"] == MAIN:
        return build_backbone(spec.backbone, pretrained=False)
    return classifier(augment(spec, pretrained=False), info["classifier"], info.get("members"))


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild an exported classifier in one line: a ``.pt2`` program, or a state_dict with its JSON sidecar.

    Args:
        path: a file :func:`export` wrote (``.pt2``, or a ``.pt`` state_dict with ``FILE.json`` beside it).

    Returns:
        The classifier as a module in eval mode.

    >>> model = load_exported("resnet32.main.pt")          # doctest: +SKIP
    """
    return formats.load(path, rebuild)
