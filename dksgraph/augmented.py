"""AugmentedModel: the untouched backbone plus one auxiliary classifier branch per tap.

``forward(x)`` returns an ordered dict of logits, ``main`` first, then the taps deep -> shallow.
The state_dict holds exactly ``backbone.<original keys>`` and ``branches.<tap>.<...>``. The
backbone object is never mutated: the taps are read by an FX program over the backbone's own
submodules (one program per train/eval mode), kept outside the module tree; the programs look the
backbone's submodules up at every call, so a module swapped into the backbone later
(``nn.SyncBatchNorm.convert_sync_batchnorm``, a replacement of your own) takes effect.

Example::

    >>> import torch
    >>> from dksgraph.spec import parse_spec
    >>> spec = parse_spec({"backbone": {"model": "zoo:resnet32", "input_size": [3, 32, 32]}})
    >>> model = augment(spec)
    >>> list(model(torch.randn(2, 3, 32, 32)))
    ['main', 'c2', 'c3']
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

from torch import Tensor, fx, nn

from dksgraph.branches.build import Branch, build_branch
from dksgraph.branches.plan import BranchPlan, plan_branch
from dksgraph.checkpoint import checkpoint_spec, load_checkpoint, strict_load
from dksgraph.errors import GraphError, SpecError
from dksgraph.fx.graph import Traced, final_linear, trace
from dksgraph.fx.tracing import CONSTANTS, EVAL, mode_of, move_constants, view_program
from dksgraph.models import build_backbone, main_logits
from dksgraph.names import MAIN, Key
from dksgraph.objective import resolve_objective
from dksgraph.spec import Spec, TapSpec

__all__ = ["AugmentedModel", "TapChoice", "augment", "load", "load_state", "load_with_checkpoint",
           "main_program", "plan_taps", "resolve_taps"]


class AugmentedModel(nn.Module):
    """The backbone and its branches; ``forward`` returns ``{classifier: logits}``."""

    def __init__(self, spec: Spec, backbone: nn.Module, traced: Traced, plans: list[BranchPlan],
                 branches: list[Branch]) -> None:
        super().__init__()
        self.backbone = backbone
        try:
            self.branches = nn.ModuleDict({p.label: b for p, b in zip(plans, branches)})
        except KeyError as exc:
            raise SpecError(f"a tap's name cannot name a branch module ({exc.args[0]}); give the tap another "
                            "`name` in the spec.") from None
        self.spec = spec
        self.traced = traced
        self.plans = list(plans)
        self.classifiers = [MAIN, *(p.label for p in plans)]
        self.objective = resolve_objective(spec, self.classifiers[1:])
        self.eval_output = "all"
        self.with_features = False  # training forward also returns the hint features (set by the trainer)
        self._build_programs()
        if self.objective.hints:
            self._add_adapters()

    def _build_programs(self) -> None:
        programs = {}
        for mode, graph in self.traced.graphs.items():
            programs[mode] = _tap_program(self.backbone, graph, [p.node for p in self.plans], feature=True)
        # kept in __dict__, not as attributes: nn.Module would register the programs as submodules, and their
        # parameters (the backbone's own) would appear twice in state_dict() and parameters()
        self.__dict__["_programs"] = programs

    def _add_adapters(self) -> None:
        """One ``nn.Linear`` per branch from its pooled feature to main's (``branches.<tap>.adapter``), for the
        feature hints; trained with the branch, dropped by strip, never part of an exported classifier."""
        main_linear = _final_linear(self.backbone, self.traced.graphs[EVAL], "the backbone")
        for label, branch in self.branches.items():
            linear = _final_linear(branch.head, branch.head.graph, f"branch `{label}`")
            branch.adapter = nn.Linear(linear.in_features, main_linear.in_features, bias=False)

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        for program in self.__dict__["_programs"].values():  # the programs' own constants move along
            move_constants(program, fn)
        return result

    def __deepcopy__(self, memo: dict) -> AugmentedModel:
        """A copy whose programs view the copy's backbone (the traced graphs are shared: they are read only)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("_programs", "traced"):
                new.__dict__[key] = copy.deepcopy(value, memo)
        new.__dict__["traced"] = self.traced
        new._build_programs()
        return new

    def forward(self, x: Tensor) -> dict[str, Tensor] | Tensor | tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``{classifier: logits}``; only the ``main`` logits tensor in eval mode when ``eval_output == "main"``
        (for evaluation loops written for plain networks, such as torchvision's and timm's); in training mode with
        ``with_features``, ``(logits, features)`` as :meth:`logits_and_features` gives them."""
        if not self.training and self.eval_output == "main":
            return self.forward_main(x)
        if self.training and self.with_features:
            return self.logits_and_features(x)
        return self.logits(x)

    def logits(self, x: Tensor) -> dict[str, Tensor]:
        """Every classifier's logits, ``main`` first, whatever ``eval_output`` says."""
        return self._run(x, False)[0]

    def logits_and_features(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every classifier's logits, and the features of the hint terms: ``main``'s pooled feature (what enters
        its final Linear) and each branch's through its adapter (empty without hints)."""
        return self._run(x, self.objective.hints)

    def _run(self, x: Tensor, hints: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        result, *features, main_feature = self.__dict__["_programs"][mode_of(self)](x)
        logits = {MAIN: main_logits(result)}
        hinted = {MAIN: main_feature} if hints else {}
        for (label, branch), feature in zip(self.branches.items(), features):
            logits[label], pooled = branch.classify(feature)
            if hints:
                hinted[label] = branch.adapter(pooled)
        return logits, hinted

    def forward_main(self, x: Tensor) -> Tensor:
        """Only the backbone's own logits, through the same program ``forward`` runs (no branches)."""
        return main_logits(self.__dict__["_programs"][mode_of(self)](x)[0])

    def extra_repr(self) -> str:
        return f"classifiers={self.classifiers}"


def main_program(backbone: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The backbone's own forward as the program the augmented model runs (output only, no taps)."""
    return _tap_program(backbone, graph, [])


def _final_linear(root: nn.Module, graph: fx.Graph, what: str) -> nn.Linear:
    """The ``nn.Linear`` whose input is the feature of a hint term, or a SpecError saying why there is none."""
    node = final_linear(graph, root)
    if node is None:
        raise SpecError(f"feature hints need the pooled feature that enters a classifier's final nn.Linear, but "
                        f"{what} has no nn.Linear in its head. Set `objective.hint_weight: 0` in the spec.")
    return root.get_submodule(node.target)


def _tap_program(backbone: nn.Module, graph: fx.Graph, taps: list[str], feature: bool = False) -> fx.GraphModule:
    """A GraphModule over the backbone's submodules returning (original output, *tap features), and with
    ``feature`` the input of its final Linear last (None where there is none)."""
    new = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, val_map)
    by_name = {n.meta["qualname"]: n for n in graph.nodes}
    features = []
    for tap in taps:
        if tap not in by_name:
            raise GraphError(f"tap `{tap}` exists in the eval-mode graph but not in the train-mode graph; the "
                             "backbone changes structure with `.train()`. Tap a point both modes share.")
        node = val_map[by_name[tap]]
        if any(_in_place(user, backbone) for user in node.users):
            with new.inserting_after(node):
                node = new.call_method("clone", (node,))
        features.append(node)
    if feature:
        linear = final_linear(graph, backbone)
        features.append(val_map[linear.args[0]] if linear is not None else None)
    new.output((out, *features))
    return view_program(backbone, new, "TapProgram", getattr(graph, CONSTANTS, {}))


def _in_place(node: fx.Node, backbone: nn.Module) -> bool:
    if node.op == "call_module":
        return bool(getattr(backbone.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    return bool(node.kwargs.get("inplace", False))


class TapChoice(NamedTuple):
    """One tap as the spec (or ``taps: auto``) chose it."""

    label: str  # the classifier's name (c2, c3, ... or the spec's `name`)
    node: str  # the traced node the branch reads
    tap: TapSpec | None  # the spec's entry; None for `taps: auto`
    reason: str  # why this tap (shown by inspect and augment)


def resolve_taps(spec: Spec, traced: Traced) -> list[TapChoice]:
    """Every tap of ``spec`` on ``traced``, deep -> shallow."""
    if spec.taps == "auto":
        chosen = [TapChoice(label, node, None, reason) for label, node, reason in traced.auto_taps()]
        if not chosen:
            raise GraphError(
                "`taps: auto` found no stage end before the final feature map to tap; list taps by hand "
                "(`dksgraph inspect` shows the valid ones)."
            )
    else:
        chosen = [TapChoice(t.label, traced.check_tap(t.at), t, f"from the spec (`at: {t.at}`)") for t in spec.taps]
    index = traced.index
    return sorted(chosen, key=lambda c: -index[c.node])


def plan_taps(spec: Spec, traced: Traced) -> list[BranchPlan]:
    """The plan of every tap's branch, deep -> shallow (nothing built)."""
    plans = []
    for choice in resolve_taps(spec, traced):
        tap = choice.tap
        plans.append(plan_branch(traced, choice.label, choice.node, depth=tap.depth if tap else None,
                                 width=tap.width if tap else None,
                                 tap=tap.at if tap else None, reason=choice.reason, branch_copy=spec.branch_copy))
    return plans


def augment(spec: Spec, backbone: nn.Module | None = None, pretrained: bool = True,
            eval_output: str = "all") -> AugmentedModel:
    """Build (or take) the backbone, trace it, plan a branch per tap and build the branches.

    Args:
        spec: the parsed spec (:func:`dksgraph.load_spec` / :func:`dksgraph.parse_spec`).
        backbone: a network to augment instead of the one ``spec.backbone`` names; it is used as is,
            never mutated.
        pretrained: ``False`` skips ``backbone.weights`` (for a model about to receive a checkpoint's weights).
        eval_output: ``"main"`` makes the model return only the ``main`` logits in eval mode (for evaluation
            loops written for plain networks); ``"all"`` returns every classifier's.

    Returns:
        The AugmentedModel: ``forward(x)`` gives ``{classifier: logits}``, ``main`` first.

    Raises:
        SpecError, GraphError: a tap the backbone does not have, or a branch the rule cannot size.
    """
    if eval_output not in ("all", "main"):
        raise ValueError(f"eval_output must be 'all' or 'main', not {eval_output!r}")
    if backbone is None:
        backbone = build_backbone(spec.backbone, pretrained)
    traced = trace(backbone, spec.backbone.input_size, spec.backbone.leaf_modules)
    plans = plan_taps(spec, traced)
    built = [build_branch(traced, p, spec.branch_init) for p in plans]
    model = AugmentedModel(spec, backbone, traced, plans, [branch for branch, _ in built])
    model.branch_init = built[0][1] if built else "no branches"
    model.eval_output = eval_output
    return model


def load(path: str | Path) -> AugmentedModel:
    """The trained AugmentedModel of a dksgraph checkpoint (``last.pt``, ``best.pt``, ``augment --save``).

    Args:
        path: a dksgraph/1 checkpoint file, from any dksgraph release.

    Returns:
        The model its spec describes, holding its weights (loaded strictly), on the CPU, in train mode.

    Raises:
        CheckpointError: the file is missing, damaged, not a dksgraph checkpoint, or its weights do not fit
            its spec.

    >>> model = dksgraph.load("runs/r32-dks/best.pt").eval()          # doctest: +SKIP
    """
    return load_with_checkpoint(path)[0]


def load_with_checkpoint(path: str | Path) -> tuple[AugmentedModel, dict]:
    """:func:`load`, also returning the checkpoint's dict (epoch, history, metrics, ...)."""
    ckpt = load_checkpoint(path)
    model = augment(checkpoint_spec(ckpt, f"{path} (its spec)"), pretrained=False)
    load_state(model, ckpt[Key.MODEL], path)
    return model, ckpt


def load_state(model: AugmentedModel, state: dict, path: str | Path) -> None:
    """Strictly load a checkpoint's weights into ``model``, with a readable error when they do not fit its spec."""
    strict_load(model, state, f"the weights in `{path}`", model.spec)
