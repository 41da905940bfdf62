"""The DKS objective's pair sets (which classifier teaches which).

Classifiers are ordered deep -> shallow: ``main`` (the paper's C1), then the taps (C2, C3, ...).

Example::

    >>> pair_set("top_down", ["main", "c2", "c3"])
    [('main', 'c2'), ('main', 'c3'), ('c2', 'c3')]
    >>> pair_set("bidirectional", ["main", "c2"])
    [('main', 'c2'), ('c2', 'main')]
"""

from __future__ import annotations

from dksgraph.errors import SpecError
from dksgraph.spec import check_pairs


def pair_set(pairs, classifiers: list[str]) -> list[tuple[str, str]]:
    """Expand a pair-set keyword (or validate an explicit list) into (teacher, student) pairs."""
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
