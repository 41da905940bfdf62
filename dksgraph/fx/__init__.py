"""Trace a backbone and read its structure: the FX graph in train and eval mode with every node's shape
(:mod:`~dksgraph.fx.tracing`), its building blocks and stages (:mod:`~dksgraph.fx.blocks`), and the
downsampling count of every node with the valid tap points (:mod:`~dksgraph.fx.graph`)."""

from dksgraph.fx.graph import Traced, trace, valid_taps

__all__ = ["Traced", "trace", "valid_taps"]
