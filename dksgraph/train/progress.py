"""Progress of long work: a tqdm bar on a terminal, plain lines everywhere else.

A bar redraws itself with a carriage return at every update; written into a log file (``nohup``, a
job scheduler, a grid's ``train.log``) that is one line of noise per batch. Off a terminal,
:func:`progress` returns a :class:`LineProgress` instead, which prints one line every ``every`` steps,
as torchvision's reference scripts do; what the work ends with (the epoch's line, a table) is the
caller's to print.

Example::

    >>> import io
    >>> out = io.StringIO()
    >>> bar = LineProgress(total=5, desc="epoch 1/3", every=2, stream=out)
    >>> for step in range(5):
    ...     bar.set_postfix(loss="0.5")
    ...     bar.update(1)
    >>> bar.close()
    >>> [line.split(" [")[0] for line in out.getvalue().splitlines()]
    ['epoch 1/3: 2/5 loss=0.5', 'epoch 1/3: 4/5 loss=0.5']
"""

from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm

__all__ = ["PRINT_EVERY", "LineProgress", "on_terminal", "progress"]

PRINT_EVERY = 50  # steps between two lines off a terminal (`dksgraph train --print-every`)


def on_terminal(stream: IO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where progress goes) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class LineProgress:
    """tqdm's interface (``update``, ``set_postfix``, ``close``) as plain lines: one every ``every`` steps before
    the last (``every=None``: none at all)."""

    def __init__(self, total: int, desc: str, every: int | None = PRINT_EVERY, initial: int = 0,
                 stream: IO | None = None) -> None:
        self.total, self.desc, self.every, self.n = total, desc, every, initial
        self.stream = sys.stderr if stream is None else stream
        self.postfix: dict[str, str] = {}
        self.start = time.perf_counter()

    def set_postfix(self, **values: object) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.every and self.n % self.every == 0 and self.n < self.total:
            self._line()

    def close(self) -> None:
        pass

    def _line(self) -> None:
        stats = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        elapsed = time.perf_counter() - self.start
        print(f"{self.desc}: {self.n}/{self.total}{' ' + stats if stats else ''} [{elapsed:.0f} s]",
              file=self.stream, flush=True)


def progress(total: int, desc: str, *, unit: str = "batch", initial: int = 0, enabled: bool = True,
             every: int | None = PRINT_EVERY, transient: bool = True) -> tqdm | LineProgress:
    """A progress report of ``total`` steps: a tqdm bar on a terminal (removed when done if ``transient``),
    else a :class:`LineProgress` (``every=None``: silent); a silent bar when not ``enabled``."""
    if enabled and not on_terminal():
        return LineProgress(total, desc, every, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                leave=not transient)
