"""The loss every method optimises: weighted cross-entropy on every classifier, synergy pairs, feature hints.

:mod:`dksgraph.objective` expands a method (dks, ds, baseline, byot, dhm, sdn) into an
:class:`~dksgraph.objective.Objective`; :class:`SynergyLoss` evaluates it. Classifiers are ordered
deep -> shallow: ``main`` (the paper's C1), then the taps (C2, C3, ...). For logits z_c and labels y::

    L = sum_c w_c(t) CE(z_c, y)
        + beta * s * sum_{(m, n) in B} H(softmax(z_m / T).detach(), softmax(z_n / T))
        + lambda * sum_{c != main} mean_batch || A_c f_c - f_main.detach() ||^2

with H(p, q) = -sum_k p_k log q_k and s = T^2 (Hinton et al., 2015: the pair gradients' scale stays
independent of T; 1 at the paper's T = 1) or 1 where the method says so (BYOT). The teacher side is
detached, so no gradient reaches a teacher through its own target; an ``ensemble`` teacher is the
detached mean of every classifier's softmax(z / T). The released DKS code uses KL(p || q) = H(p, q) - H(p)
instead: with p detached both have the same gradient, and :class:`SynergyLoss` reports both forms. All
pairs are computed at once over stacked log-probabilities. Weights ramped over training (SDN) and pair
drop (DHM's stochastic variant) depend on the step, so a resumed run continues exactly.

Example::

    >>> loss = SynergyLoss(["main", "c2"], pairs=pair_set("bidirectional", ["main", "c2"]))
    >>> out = loss({"main": torch.zeros(4, 10), "c2": torch.zeros(4, 10)}, torch.zeros(4, dtype=torch.long))
    >>> round(out.total.item(), 4)   # 2 x log(10) cross-entropy + 2 x log(10) synergy
    9.2103
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dksgraph.errors import SpecError
from dksgraph.names import ENSEMBLE, MAIN
from dksgraph.objective import Objective, pair_set, resolve_objective

__all__ = ["LossOutput", "SynergyLoss", "ensemble_probabilities", "pair_set"]

_DROP_SEED = 0x5D0C  # mixed with the run's seed and the step for the pair-drop draws


class LossOutput(NamedTuple):
    """``total`` for backward; ``components`` (detached, one value per name in ``SynergyLoss.names``)."""

    total: Tensor
    components: Tensor


class SynergyLoss(nn.Module):
    """The objective's terms over the classifiers ``classifiers`` (deep -> shallow).

    Args:
        classifiers: the classifier names, ``main`` first (``AugmentedModel.classifiers``).
        alphas: the weight of each auxiliary classifier's cross-entropy (default 1).
        pairs: (teacher, student) pairs of the synergy term (a teacher may be ``ensemble``); empty for deep
            supervision.
        beta: the weight of the synergy term.
        temperature: the softmax temperature of the synergy term.
        objective: every term at once (what :meth:`for_model` passes); replaces the five arguments above.
        total_steps: the run's optimiser steps, for weights ramped over training.
        seed: the run's seed, for the pair-drop draws.

    Calling it with ``({classifier: logits}, targets)`` returns a LossOutput: the total and each component;
    ``step=`` gives the run's step (for ramps and pair drop) and ``features=`` the hint features
    (``AugmentedModel.logits_and_features``).
    """

    def __init__(self, classifiers: list[str] | None = None, alphas: dict[str, float] | None = None,
                 pairs: list[tuple[str, str]] = (), beta: float = 1.0, temperature: float = 1.0, *,
                 objective: Objective | None = None, total_steps: int = 1, seed: int = 0) -> None:
        super().__init__()
        if objective is None:
            alphas = alphas or {}
            objective = Objective("custom", tuple(classifiers), {c: 1.0 if i == 0 else float(alphas.get(c, 1.0))
                                                                 for i, c in enumerate(classifiers)},
                                  "constant", tuple(tuple(p) for p in pairs), float(beta), float(temperature),
                                  True, 0.0, 0.0)
        self.objective = o = objective
        self.classifiers = list(o.classifiers)
        self.pairs = list(o.pairs)
        self.total_steps, self.seed = max(1, int(total_steps)), int(seed)
        self.register_buffer("weights", torch.tensor(o.ce_weights(1.0)), persistent=False)
        pos = {c: i for i, c in enumerate(self.classifiers)}
        pos[ENSEMBLE] = len(self.classifiers)  # the ensemble's row follows the classifiers' when it teaches
        self.ensemble_teaches = any(t == ENSEMBLE for t, _ in self.pairs)
        self.register_buffer("teacher", torch.tensor([pos[t] for t, _ in self.pairs], dtype=torch.long),
                             persistent=False)
        self.register_buffer("student", torch.tensor([pos[s] for _, s in self.pairs], dtype=torch.long),
                             persistent=False)
        self.hints = o.hints
        self.names = (["total"] + [f"ce/{c}" for c in self.classifiers]
                      + [f"synergy/{t}->{s}" for t, s in self.pairs]
                      + (["synergy_ce", "synergy_kl"] if self.pairs else [])
                      + ([f"hint/{c}" for c in self.classifiers[1:]] if self.hints else []))

    @classmethod
    def for_model(cls, model, method: str | None = None, total_steps: int = 1, seed: int = 0) -> SynergyLoss:
        """The loss for an AugmentedModel: its spec's method (``train.method``) or ``method``, expanded by
        :func:`~dksgraph.objective.resolve_objective`."""
        objective = model.objective if method in (None, model.objective.method) else resolve_objective(
            model.spec, model.classifiers[1:], method)
        if objective.hints and not model.objective.hints:
            raise SpecError(f"method `{objective.method}` has feature hints, whose adapters are built with the "
                            "model: augment a spec with `train.method: " + objective.method + "` instead.")
        return cls(objective=objective, total_steps=total_steps, seed=seed)

    def ce_weights(self, step: int) -> Tensor:
        """Each classifier's CE weight at the run's ``step`` (constant unless the objective ramps them)."""
        if self.objective.ce_ramp == "constant":
            return self.weights
        progress = step / max(1, self.total_steps - 1)
        return self.weights.new_tensor(self.objective.ce_weights(progress))

    def kept_pairs(self, step: int) -> Tensor | None:
        """Which pairs count at ``step`` (None: all): one draw per pair from a generator seeded by the run's seed
        and the step, so every process and a resumed run draw the same."""
        if not self.objective.pair_drop or not self.pairs:
            return None
        gen = torch.Generator().manual_seed(_DROP_SEED * 1_000_003 + self.seed * 100_003 + int(step))
        return (torch.rand(len(self.pairs), generator=gen) >= self.objective.pair_drop).to(self.teacher.device)

    def of_output(self, output, target: Tensor, step: int = 0) -> tuple[LossOutput, dict[str, Tensor]]:
        """The loss of an AugmentedModel's training output (the logits, or ``(logits, features)`` with
        ``with_features``) and the logits."""
        logits, features = output if isinstance(output, tuple) else (output, None)
        return self(logits, target, step, features), logits

    def forward(self, logits: dict[str, Tensor], target: Tensor, step: int = 0,
                features: dict[str, Tensor] | None = None) -> LossOutput:
        o = self.objective
        z = torch.stack([logits[c] for c in self.classifiers]).float()  # K x N x C
        log_p = F.log_softmax(z, dim=-1)
        picked = log_p.gather(-1, target.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1)
        ce = -picked.mean(dim=1)  # K
        total = (self.ce_weights(step) * ce).sum()
        parts = [ce]
        if self.pairs:
            log_q = log_p if o.temperature == 1.0 else F.log_softmax(z / o.temperature, dim=-1)
            teachers = log_q.detach()
            if self.ensemble_teaches:  # the mean softmax of every classifier, as one more teacher row
                teachers = torch.cat([teachers, teachers.exp().mean(0, keepdim=True).log()])
            target_log_p = teachers[self.teacher]  # P x N x C, no gradient into the teacher
            p = target_log_p.exp()
            cross = -(p * log_q[self.student]).sum(-1).mean(-1)  # H(p_m, q_n), P
            entropy = -(p * target_log_p).sum(-1).mean(-1)  # H(p_m)
            kept = self.kept_pairs(step)
            if kept is not None:
                cross, entropy = cross * kept, entropy * kept
            scale = o.pair_scale
            synergy = scale * cross.sum()
            total = total + synergy
            parts += [scale * cross, synergy.reshape(1), (scale * (cross - entropy).sum()).reshape(1)]
        if self.hints:
            if features is None:
                raise ValueError("this objective has feature hints: pass features= "
                                 "(AugmentedModel.logits_and_features, or with_features=True)")
            goal = features[MAIN].detach().flatten(1).float()
            hint = torch.stack([(features[c].flatten(1).float() - goal).pow(2).sum(-1).mean()
                                for c in self.classifiers[1:]])
            total = total + o.hint_weight * hint.sum()
            parts.append(o.hint_weight * hint)
        return LossOutput(total, torch.cat([total.detach().reshape(1), *[t.detach() for t in parts]]))


def ensemble_probabilities(logits: list[Tensor]) -> Tensor:
    """The ensemble's output, the one rule for it everywhere: the mean over classifiers of their softmax,
    in float32 (``logits``: one N x C tensor per classifier)."""
    return torch.stack([z.float() for z in logits]).softmax(-1).mean(0)
