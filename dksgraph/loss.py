"""The DKS objective: cross-entropy on every classifier plus knowledge synergy over a pair set.

Classifiers are ordered deep -> shallow: ``main`` (the paper's C1), then the taps (C2, C3, ...).
For logits z_c and labels y::

    L = CE(z_main, y) + sum_l alpha_l CE(z_l, y)
        + beta * T^2 * sum_{(m, n) in B} H(softmax(z_m / T).detach(), softmax(z_n / T))

with H(p, q) = -sum_k p_k log q_k. The teacher side is detached, so no gradient reaches the
teacher classifier through its own target. The T^2 factor (Hinton et al., 2015) keeps the synergy
gradients' scale independent of T; it is 1 at the paper's default T = 1. The released DKS code
uses KL(p || q) = H(p, q) - H(p) instead: with p detached both have the same gradient, and
:class:`SynergyLoss` reports both forms. All pairs are computed at once over stacked
log-probabilities.

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
from dksgraph.spec import METHODS, check_pairs

__all__ = ["LossOutput", "SynergyLoss", "ensemble_probabilities", "pair_set"]


def pair_set(pairs, classifiers: list[str]) -> list[tuple[str, str]]:
    """Expand a pair-set keyword (or validate an explicit list) into (teacher, student) pairs.

    >>> pair_set("top_down", ["main", "c2", "c3"])
    [('main', 'c2'), ('main', 'c3'), ('c2', 'c3')]
    """
    deep_to_shallow = [(a, b) for i, a in enumerate(classifiers) for b in classifiers[i + 1:]]
    if pairs == "none":
        return []
    if pairs == "top_down":
        return deep_to_shallow
    if pairs == "bottom_up":
        return [(b, a) for a, b in deep_to_shallow]
    if pairs == "bidirectional":
        return deep_to_shallow + [(b, a) for a, b in deep_to_shallow]
    try:
        check_pairs(pairs, classifiers)
    except ValueError as exc:
        raise SpecError(f"{exc}. Fix `synergy.pairs` in the spec.") from None
    return [tuple(p) for p in pairs]


class LossOutput(NamedTuple):
    """``total`` for backward; ``components`` (detached, one value per name in ``SynergyLoss.names``)."""

    total: Tensor
    components: Tensor


class SynergyLoss(nn.Module):
    """L_c + L_a + L_s of the paper over the classifiers ``classifiers`` (deep -> shallow).

    Args:
        classifiers: the classifier names, ``main`` first (``AugmentedModel.classifiers``).
        alphas: the weight of each auxiliary classifier's cross-entropy (default 1).
        pairs: (teacher, student) pairs of the synergy term; empty for deep supervision.
        beta: the weight of the synergy term.
        temperature: the softmax temperature of the synergy term.

    Calling it with ``({classifier: logits}, targets)`` returns a LossOutput: the total and each component.
    """

    def __init__(self, classifiers: list[str], alphas: dict[str, float] | None = None,
                 pairs: list[tuple[str, str]] = (), beta: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.classifiers = list(classifiers)
        self.pairs = [tuple(p) for p in pairs]
        self.beta, self.temperature = float(beta), float(temperature)
        alphas = alphas or {}
        weights = [1.0 if i == 0 else float(alphas.get(c, 1.0)) for i, c in enumerate(self.classifiers)]
        self.register_buffer("weights", torch.tensor(weights), persistent=False)
        pos = {c: i for i, c in enumerate(self.classifiers)}
        self.register_buffer("teacher", torch.tensor([pos[t] for t, _ in self.pairs], dtype=torch.long),
                             persistent=False)
        self.register_buffer("student", torch.tensor([pos[s] for _, s in self.pairs], dtype=torch.long),
                             persistent=False)
        self.names = (["total"] + [f"ce/{c}" for c in self.classifiers]
                      + [f"synergy/{t}->{s}" for t, s in self.pairs]
                      + (["synergy_ce", "synergy_kl"] if self.pairs else []))

    @classmethod
    def for_model(cls, model, method: str | None = None) -> SynergyLoss:
        """The loss for an AugmentedModel: ``dks`` (taps + pairs), ``ds`` (taps only) or ``baseline``;
        by default the method of the model's spec (``train.method``)."""
        method = method or model.spec.train.method
        if method not in METHODS:
            raise SpecError(f"unknown method `{method}`; choose one of {', '.join(METHODS)}.")
        syn = model.spec.synergy
        classifiers = model.classifiers if method != "baseline" else model.classifiers[:1]
        pairs = pair_set(syn.pairs, classifiers) if method == "dks" else []
        alphas = {p.label: p.alpha for p in model.plans}
        return cls(classifiers, alphas, pairs, syn.beta, syn.temperature)

    def forward(self, logits: dict[str, Tensor], target: Tensor) -> LossOutput:
        z = torch.stack([logits[c] for c in self.classifiers]).float()  # K x N x C
        log_p = F.log_softmax(z, dim=-1)
        picked = log_p.gather(-1, target.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1)
        ce = -picked.mean(dim=1)  # K
        total = (self.weights * ce).sum()
        parts = [ce]
        if self.pairs:
            log_q = log_p if self.temperature == 1.0 else F.log_softmax(z / self.temperature, dim=-1)
            target_log_p = log_q.detach()[self.teacher]  # P x N x C, no gradient into the teacher
            p = target_log_p.exp()
            cross = -(p * log_q[self.student]).sum(-1).mean(-1)  # H(p_m, q_n), P
            entropy = -(p * target_log_p).sum(-1).mean(-1)  # H(p_m)
            scale = self.beta * self.temperature ** 2
            synergy = scale * cross.sum()
            total = total + synergy
            parts += [scale * cross, synergy.reshape(1), (scale * (cross - entropy).sum()).reshape(1)]
        return LossOutput(total, torch.cat([total.detach().reshape(1), *[t.detach() for t in parts]]))


def ensemble_probabilities(logits: list[Tensor]) -> Tensor:
    """The ensemble's output, the one rule for it everywhere: the mean over classifiers of their softmax,
    in float32 (``logits``: one N x C tensor per classifier)."""
    return torch.stack([z.float() for z in logits]).softmax(-1).mean(0)
