"""User-facing errors.

Every problem a user can cause (a wrong spec field, an unknown tap, a missing or hostile
checkpoint) raises a :class:`DksError` whose message is one paragraph naming the problem and
the fix. The CLI prints it and exits with status 2; no traceback reaches the user.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["CheckpointError", "DksError", "GraphError", "RunAborted", "SpecError", "WriteError", "close_matches",
           "first_line"]


class DksError(Exception):
    """A problem with the user's input, explained in one paragraph (exit status :attr:`exit_code`)."""

    exit_code = 2


class SpecError(DksError):
    """The spec file is missing, malformed or inconsistent."""


class GraphError(DksError):
    """The backbone cannot be traced, or a tap cannot be placed where the spec asks."""


class CheckpointError(DksError):
    """A checkpoint file is missing, corrupt, foreign or does not fit its spec."""


class WriteError(DksError):
    """A file could not be written (disk full, no permission, read-only folder); nothing was half-written."""


class RunAborted(DksError):
    """A training run stopped for a reason outside the user's input (another rank died): exit status 1."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 200, empty: str = "no detail") -> str:
    """The first non-blank line of an exception's message, at most ``limit`` characters (``empty`` when it
    has none): what a one-paragraph error quotes of a library's or a model's own exception."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:limit] if lines else empty


def close_matches(word: str, choices: Iterable[str], n: int = 5) -> str:
    """Format the closest candidates to ``word`` for a "did you mean" hint ('' when none)."""
    choices = list(dict.fromkeys(choices))
    found = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not found:
        found = [c for c in choices if word.lower() in c.lower()][:n]
    return ", ".join(f"`{c}`" for c in found)
