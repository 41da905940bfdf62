"""The names dksgraph's files and records use, each spelled once: classifiers, run-folder files, metric keys,
checkpoint keys, export and render formats.

Example::

    >>> acc1("test", MAIN), RunFile.LAST
    ('test/acc1/main', 'last.pt')
"""

from __future__ import annotations

__all__ = ["CHECKPOINT_FORMAT", "ENSEMBLE", "EXPORT_FORMATS", "EXPORT_SUFFIXES", "Key", "MAIN", "RENDER_FORMATS",
           "RunFile", "acc1", "acc5", "loss_key"]

MAIN = "main"  # the backbone's own classifier
ENSEMBLE = "ensemble"  # the mean softmax of several classifiers (evaluation and export)

CHECKPOINT_FORMAT = "dksgraph/1"

EXPORT_SUFFIXES = {"state_dict": ".pt", "exported": ".pt2", "onnx": ".onnx", "torchscript": ".torchscript.pt"}
EXPORT_FORMATS = tuple(EXPORT_SUFFIXES)
RENDER_FORMATS = ("svg", "png", "pdf", "dot")


class RunFile:
    """Files of a run folder."""

    LAST = "last.pt"  # the latest checkpoint, every epoch (and every --save-every steps)
    BEST = "best.pt"  # a hard link to the epoch with the best main top-1
    METRICS = "metrics.jsonl"
    METRICS_CSV = "metrics.csv"
    LOCK = "run.lock"
    FINAL = "final.json"  # a grid run's whole-test-set scores
    RUN = "run.json"  # a grid run's settings
    SPEC = "spec.yaml"  # a grid run's spec
    LOG = "train.log"  # a grid run's output


class Key:
    """Top-level keys of a dksgraph/1 checkpoint (``augment --save`` writes the first three)."""

    FORMAT = "format"
    SPEC = "spec"
    MODEL = "model"
    OPTIMIZER = "optimizer"
    SCHEDULER = "scheduler"
    SCALER = "scaler"
    EPOCH = "epoch"
    STEP = "step"
    PROGRESS = "progress"
    BEST = "best"
    RNG = "rng"
    METRICS = "metrics"
    HISTORY = "history"
    CONFIG = "config"
    METHOD = "method"


def acc1(split: str, classifier: str) -> str:
    """The metric key of a classifier's top-1 accuracy in percent (``split``: train or test)."""
    return f"{split}/acc1/{classifier}"


def acc5(split: str, classifier: str) -> str:
    """The metric key of a classifier's top-5 accuracy in percent."""
    return f"{split}/acc5/{classifier}"


def loss_key(split: str, classifier: str) -> str:
    """The metric key of a classifier's cross-entropy."""
    return f"{split}/loss/{classifier}"
