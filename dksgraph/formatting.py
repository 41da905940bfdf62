"""How dksgraph writes shapes and tables, in one place.

Example::

    >>> fmt_shape((64, 8, 8))
    '64x8x8'
    >>> print(format_table([["main", 1], ["c2", 22]], ["classifier", "n"]))
    classifier   n
    ----------  --
    main         1
    c2          22
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fmt_shape", "format_table"]


def fmt_shape(shape: Sequence[int]) -> str:
    """``(64, 8, 8)`` -> ``64x8x8``."""
    return "x".join(str(s) for s in shape)


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Plain aligned text columns; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return False
