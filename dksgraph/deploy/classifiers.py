"""Any classifier of an AugmentedModel as a standalone module: ``main``, an auxiliary one, or an ensemble.

* ``main``: the stripped original network (:func:`dksgraph.deploy.strip`).
* an auxiliary classifier (``c2``, ``c3``, ...): the backbone's graph cut at the tap, only the nodes
  the tap needs, followed by the tap's branch.
* ``ensemble``: the mean of the chosen classifiers' softmax, in one pass that shares the backbone.

Every module is a copy in eval mode: no parameter is shared with the augmented model.

Example::

    >>> from dksgraph.augmented import augment
    >>> from dksgraph.spec import parse_spec
    >>> model = augment(parse_spec({"backbone": {"model": "zoo:resnet32", "input_size": [3, 32, 32]}}))
    >>> c2 = classifier(model, "c2")
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.equal(c2(x), model.eval()(x)["c2"])
    True
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from dksgraph.augmented import AugmentedModel
from dksgraph.branches.build import Branch
from dksgraph.deploy.strip import strip
from dksgraph.errors import DksError
from dksgraph.fx.tracing import CONSTANTS, EVAL, graph_module
from dksgraph.loss import ensemble_probabilities
from dksgraph.models import main_logits
from dksgraph.names import ENSEMBLE, MAIN

__all__ = ["Ensemble", "TapClassifier", "check_name", "classifier"]


class TapClassifier(nn.Module):
    """An auxiliary classifier on its own: ``trunk`` (the backbone up to the tap) then ``branch``."""

    def __init__(self, trunk: fx.GraphModule, branch: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(self.trunk(x))


class Ensemble(nn.Module):
    """The mean softmax of ``members`` (classifier names); the backbone runs once for all of them."""

    def __init__(self, trunk: fx.GraphModule, branches: nn.ModuleDict, members: list[str], taps: list[str]) -> None:
        super().__init__()
        self.trunk = trunk
        self.branches = branches
        self.members = list(members)
        self.taps = list(taps)  # the branch labels, in the order of the trunk's extra outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result, *features = self.trunk(x)
        feature = dict(zip(self.taps, features))
        logits = [main_logits(result) if name == MAIN else self.branches[name](feature[name]) for name in self.members]
        return ensemble_probabilities(logits)


def check_name(model: AugmentedModel, name: str, members: list[str] | None = None) -> list[str]:
    """The classifiers ``name`` stands for (one, or the ensemble's members); a DksError naming the choices."""
    names = model.classifiers
    if name == ENSEMBLE:
        chosen = list(members) if members else list(names)
        unknown = [m for m in chosen if m not in names]
        if unknown or len(chosen) < 2:
            raise DksError(
                f"an ensemble needs two or more of this checkpoint's classifiers ({', '.join(names)}); "
                + (f"it has no {', '.join(unknown)}." if unknown else f"got {', '.join(chosen) or 'none'}.")
                + " Name them with `--classifiers main,c2`."
            )
        return chosen
    if name not in names:
        extra = "" if len(names) > 1 else " (a baseline run has only `main`)"
        raise DksError(f"no classifier `{name}` in this checkpoint{extra}; its classifiers are "
                       f"{', '.join(names)}{', ensemble' if len(names) > 1 else ''}. Pick one with `--classifier`.")
    return [name]


def classifier(model: AugmentedModel, name: str, members: list[str] | None = None) -> nn.Module:
    """Classifier ``name`` of ``model`` (``main``, a tap's label, or ``ensemble`` of ``members``), in eval mode."""
    chosen = check_name(model, name, members)
    if name == MAIN:
        return strip(model).eval()
    plans = [p for p in model.plans if p.label in chosen]
    taps = [p.label for p in plans]
    trunk = _cut(model, [p.node for p in plans], ensemble=name == ENSEMBLE, keep_output=MAIN in chosen)
    if name == ENSEMBLE:
        branches = nn.ModuleDict({label: model.branches[label] for label in taps})
        module = Ensemble(trunk, branches, chosen, taps)
    else:
        module = TapClassifier(trunk, model.branches[name])
    module = copy.deepcopy(module).eval()
    for part in module.modules():  # hint adapters serve the training loss only; no classifier's output needs them
        if isinstance(part, Branch) and hasattr(part, "adapter"):
            del part.adapter
    return module


def _cut(model: AugmentedModel, nodes: list[str], ensemble: bool, keep_output: bool) -> fx.GraphModule:
    """The backbone's eval-mode graph keeping only what the tap ``nodes`` (and, with ``keep_output``, the
    backbone's own output) need: the tap's feature, or ``(output or None, *features)`` for an ensemble."""
    graph = model.traced.graphs[EVAL]
    by_name = {n.meta["qualname"]: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    needed: set[fx.Node] = set()
    stack = [by_name[q] for q in nodes] + (list(output.all_input_nodes) if keep_output else [])
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n in needed:
            env[n] = new.node_copy(n, lambda a: env[a])
    features = [env[by_name[q]] for q in nodes]
    if ensemble:
        result = fx.node.map_arg(output.args[0], lambda a: env[a]) if keep_output else None
        new.output((result, *features))
    else:
        new.output(features[0])
    return graph_module(model.backbone, new, "Trunk", getattr(graph, CONSTANTS, {}))
