"""Methods are data: each training method is a preset over the objective's terms, expanded here.

Classifiers are ordered deep -> shallow: ``main`` (the paper's C1), then the taps. For logits z_c, pooled
features f_c (what enters a classifier's final linear layer) and labels y, every method optimises::

    L = sum_c w_c(t) CE(z_c, y)
        + beta * s * sum_{(m, n) in B, not dropped} H(softmax(z_m / T).detach(), softmax(z_n / T))
        + lambda * sum_{c != main} || A_c f_c - f_main.detach() ||^2

with H(p, q) = -sum_k p_k log q_k, s = T^2 or 1, ``ensemble`` as a teacher meaning the detached mean of every
classifier's softmax(z / T), t the run's progress (0 at the first step, 1 at the last), and each pair dropped
at a step with probability ``pair_drop`` (one draw per pair and step, the same on every process).

:data:`PRESETS` is the one table of methods; a spec field that is given (a tap's ``alpha``, any ``synergy``
or ``objective`` field) overrides the method's value, except what defines a method: ``baseline`` has no taps,
``ds`` and ``sdn`` have no pairs. :func:`resolve_objective` expands a spec into an :class:`Objective`;
``dksgraph augment`` prints :meth:`Objective.describe`.

Example::

    >>> from dksgraph.spec import parse_spec
    >>> spec = parse_spec({"backbone": {"model": "zoo:resnet32"}, "train": {"method": "byot"}})
    >>> obj = resolve_objective(spec, ["c2", "c3"])
    >>> obj.ce["c2"], obj.pairs, obj.temperature, obj.hint_weight
    (0.7, (('main', 'c2'), ('main', 'c3')), 3.0, 0.03)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dksgraph.errors import SpecError
from dksgraph.names import ENSEMBLE, MAIN
from dksgraph.spec import METHODS, Spec, check_pairs

__all__ = ["PRESETS", "Objective", "pair_set", "resolve_objective", "sdn_weights"]


def sdn_weights(count: int) -> list[float]:
    """SDN's final internal-classifier weights, shallow -> deep: 0.15 x i for the i-th (0.15, 0.3, ... 0.9 for the
    release's six), as a deep -> shallow list for ``count`` taps."""
    return [round(0.15 * (count - k), 10) for k in range(count)]


# The one table of methods. Keys: alpha (every tap's CE weight, or a function of the tap count giving the
# deep -> shallow list), pairs, beta, temperature, temperature_squared, pair_drop, ce_ramp, hint_weight.
# Sources: DKS (Sun et al., CVPR 2019); BYOT (Zhang et al., ICCV 2019; its release: CE 0.7, KD 0.3, T 3 without
# T^2, hint 0.03); DHM (Li et al., CVPR 2020: the DKS loss at T = 1, the layout differs: see
# specs/dhm_resnet110.yaml); SDN (Kaya et al., ICML 2019: CE weights 0.15 i, ramped over training).
_DKS = {"alpha": 1.0, "pairs": "bidirectional", "beta": 1.0, "temperature": 1.0, "temperature_squared": True,
        "pair_drop": 0.0, "ce_ramp": "constant", "hint_weight": 0.0}
PRESETS: dict[str, dict] = {
    "baseline": {**_DKS, "pairs": "none"},
    "ds": {**_DKS, "pairs": "none"},
    "dks": _DKS,
    "byot": {**_DKS, "alpha": 0.7, "pairs": "from_main", "beta": 0.3, "temperature": 3.0,
             "temperature_squared": False, "hint_weight": 0.03},
    "dhm": _DKS,
    "sdn": {**_DKS, "alpha": sdn_weights, "pairs": "none", "ce_ramp": "linear"},
}
NO_PAIRS = ("baseline", "ds", "sdn")  # methods defined by having no synergy pairs
assert set(PRESETS) == set(METHODS), "every method of the spec needs a preset"

SDN_RAMP_START = 0.01  # a linearly ramped weight starts here (SDN's release), reaching its value at the last step


def pair_set(pairs, classifiers: list[str]) -> list[tuple[str, str]]:
    """Expand a pair-set keyword (or validate an explicit list) into (teacher, student) pairs.

    >>> pair_set("top_down", ["main", "c2", "c3"])
    [('main', 'c2'), ('main', 'c3'), ('c2', 'c3')]
    >>> pair_set("from_main", ["main", "c2", "c3"])
    [('main', 'c2'), ('main', 'c3')]
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
    if pairs == "from_main":
        return [(classifiers[0], c) for c in classifiers[1:]]
    if pairs == ENSEMBLE:
        return [(ENSEMBLE, c) for c in classifiers]
    try:
        check_pairs(pairs, classifiers)
    except ValueError as exc:
        raise SpecError(f"{exc}. Fix `synergy.pairs` in the spec.") from None
    return [tuple(p) for p in pairs]


@dataclass(frozen=True)
class Objective:
    """Every term of a method's loss, expanded: what :class:`~dksgraph.loss.SynergyLoss` evaluates."""

    method: str
    classifiers: tuple[str, ...]  # main first, then the taps deep -> shallow
    ce: dict[str, float]  # each classifier's cross-entropy weight (its final value when ramped)
    ce_ramp: str  # constant | linear (the taps' weights; main's stays 1)
    pairs: tuple[tuple[str, str], ...]  # (teacher, student); the teacher may be `ensemble`
    beta: float
    temperature: float
    temperature_squared: bool
    pair_drop: float
    hint_weight: float
    given: tuple[str, ...] = field(default=())  # the fields the spec set over the preset

    @property
    def pair_scale(self) -> float:
        """beta, times T^2 where the method asks for it."""
        return self.beta * (self.temperature ** 2 if self.temperature_squared else 1.0)

    @property
    def hints(self) -> bool:
        return self.hint_weight > 0 and len(self.classifiers) > 1

    def ce_weights(self, progress: float) -> list[float]:
        """Each classifier's CE weight at ``progress`` (0: the first step, 1: the last), in classifier order."""
        if self.ce_ramp == "constant":
            return [self.ce[c] for c in self.classifiers]
        p = min(max(progress, 0.0), 1.0)
        return [w if c == MAIN else min(w, SDN_RAMP_START + w * p) for c, w in self.ce.items()]

    def describe(self) -> list[str]:
        """One line per term with its weight, as ``dksgraph augment`` prints it."""
        given = f" (spec sets {', '.join(self.given)})" if self.given else ""
        lines = [f"objective: {self.method}{given}"]
        ramp = (f", ramped per step from {SDN_RAMP_START:g} to this value over training"
                if self.ce_ramp == "linear" else "")
        for c in self.classifiers:
            lines.append(f"  {self.ce[c]:g} x CE({c}, y){ramp if c != MAIN else ''}")
        scale = f"{self.beta:g}" + (f" x T^2={self.temperature ** 2:g}" if self.temperature_squared
                                    and self.temperature != 1 else "")
        drop = f", each dropped with probability {self.pair_drop:g} per step" if self.pair_drop else ""
        for teacher, student in self.pairs:
            lines.append(f"  {scale} x H(softmax({teacher} / {self.temperature:g}).detach(), "
                         f"softmax({student} / {self.temperature:g})){drop}")
        if self.hints:
            for c in self.classifiers[1:]:
                lines.append(f"  {self.hint_weight:g} x ||adapter_{c}(f_{c}) - f_main.detach()||^2")
        if len(lines) == 1 + len(self.classifiers) and len(self.classifiers) > 1:
            lines.append("  no synergy pairs (deep supervision)")
        return lines


def resolve_objective(spec: Spec, taps: list[str], method: str | None = None) -> Objective:
    """The objective of ``method`` (default: the spec's ``train.method``) for a model with the tap labels ``taps``
    (deep -> shallow): the method's preset, overridden by what the spec gives."""
    method = method or spec.train.method
    if method not in PRESETS:
        raise SpecError(f"unknown method `{method}`; choose one of {', '.join(PRESETS)}.")
    preset = PRESETS[method]
    taps = [] if method == "baseline" else list(taps)
    classifiers = [MAIN, *taps]
    given: list[str] = []
    alpha = preset["alpha"]
    preset_alphas = alpha(len(taps)) if callable(alpha) else [alpha] * len(taps)
    spec_alphas = {t.label: t.alpha for t in spec.taps} if spec.taps != "auto" else {}
    ce = {MAIN: 1.0}
    for tap, default in zip(taps, preset_alphas):
        ce[tap] = default if spec_alphas.get(tap) is None else spec_alphas[tap]
    if any(spec_alphas.get(t) is not None for t in taps):
        given.append("alpha")
    values = {}
    sections = {"pairs": spec.synergy, "beta": spec.synergy, "temperature": spec.synergy,
                "temperature_squared": spec.synergy, "pair_drop": spec.synergy,
                "ce_ramp": spec.objective, "hint_weight": spec.objective}
    for key, section in sections.items():
        value = getattr(section, key)
        if value is None or (key == "pairs" and method in NO_PAIRS):
            values[key] = preset[key]
        else:
            values[key] = value
            given.append(key)
    pairs = [] if method in NO_PAIRS else pair_set(values["pairs"], classifiers)
    return Objective(method, tuple(classifiers), ce, values["ce_ramp"], tuple(pairs), float(values["beta"]),
                     float(values["temperature"]), bool(values["temperature_squared"]), float(values["pair_drop"]),
                     float(values["hint_weight"]), tuple(given))
