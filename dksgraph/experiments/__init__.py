"""Grids of training runs and their reports: :mod:`~dksgraph.experiments.grid` reads a grid file and runs
its runs (resumably, several at a time); :mod:`~dksgraph.experiments.report` writes the paper-style report."""

__all__: list[str] = []
