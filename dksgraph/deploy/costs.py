"""What each classifier costs and gives: parameters, FLOPs, CPU latency, accuracy (`dksgraph eval --costs`).

This is the table to read when choosing which classifier to ship: ``main`` (the original network),
an auxiliary classifier (often nearly as accurate for a fraction of the cost), or an ensemble.
Each classifier is measured as the standalone module `dksgraph export` would write: FLOPs per image
from ``torch.utils.flop_counter`` (a multiply-add counts 2), latency as the median of repeated CPU
runs at batch 1 and batch 32 with the thread count stated.
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

import torch

from dksgraph.augmented import AugmentedModel
from dksgraph.checkpoint import atomic_write
from dksgraph.deploy.classifiers import classifier
from dksgraph.errors import DksError
from dksgraph.formatting import format_table
from dksgraph.names import ENSEMBLE, MAIN
from dksgraph.summary import count_parameters, flops

__all__ = ["HEADERS", "classifier_costs", "latency_ms", "markdown", "plot"]

HEADERS = ["classifier", "params (M)", "MFLOPs / image", "CPU ms, batch 1", "CPU ms, batch 32", "top-1 %"]


@torch.no_grad()
def latency_ms(module: torch.nn.Module, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``module(x)`` over ``repeats`` runs, in milliseconds."""
    for _ in range(warmup):
        module(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def classifier_costs(model: AugmentedModel, accuracy: dict[str, float], repeats: int = 20) -> list[dict]:
    """One row per classifier and for the ensemble of all of them (CPU, eval mode, the model's input size)."""
    size = model.spec.backbone.input_size
    names = model.classifiers + ([ENSEMBLE] if len(model.classifiers) > 1 else [])
    rows = []
    for name in names:
        module = classifier(model.cpu(), name).cpu()
        one = torch.zeros(1, *size)
        rows.append({
            "classifier": name, "params": count_parameters(module), "flops": flops(module, one),
            "ms_1": latency_ms(module, torch.randn(1, *size), repeats),
            "ms_32": latency_ms(module, torch.randn(32, *size), max(3, repeats // 4)),
            "top1": accuracy.get(name),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    table = [[r["classifier"], f"{r['params'] / 1e6:.3f}", f"{r['flops'] / 1e6:.1f}", f"{r['ms_1']:.2f}",
              f"{r['ms_32']:.1f}", "-" if r["top1"] is None else f"{r['top1']:.2f}"] for r in rows]
    return format_table(table, HEADERS)


def plot(rows: list[dict], path: str | Path) -> Path:
    """Accuracy against FLOPs per image, one point per classifier (PNG or SVG by the suffix; matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DksError("the plot needs matplotlib: `pip install 'dksgraph[plots]'` (the table is printed "
                       "without it).") from None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in rows:
        if r["top1"] is None:
            continue
        ax.scatter(r["flops"] / 1e6, r["top1"], color="#c8621b" if r["classifier"] != MAIN else "#2b6ca3")
        ax.annotate(r["classifier"], (r["flops"] / 1e6, r["top1"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))
