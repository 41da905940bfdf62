"""Per-epoch metrics: accuracy counting for every classifier and the ensemble, and the run's log files.

Each epoch appends one JSON object to ``metrics.jsonl`` and rewrites ``metrics.csv``; TensorBoard
scalars go to ``tb/`` when the ``tensorboard`` package is installed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from torch import Tensor

from dksgraph.checkpoint import atomic_write
from dksgraph.loss import ensemble_probabilities
from dksgraph.names import ENSEMBLE, RunFile, acc1, acc5

__all__ = ["SUMMARY_HEADERS", "AccuracyCounter", "RunLog", "read_history", "summary_rows"]

class AccuracyCounter:
    """Top-1 / top-5 hits of each classifier and of the ensemble (mean of the classifiers' softmax)."""

    def __init__(self, classifiers: list[str], device: torch.device) -> None:
        self.names = [*classifiers, ENSEMBLE] if len(classifiers) > 1 else list(classifiers)
        self.classifiers = classifiers
        self.hits = torch.zeros((2, len(self.names)), device=device, dtype=torch.float64)
        self.seen = torch.zeros((), device=device, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: dict[str, Tensor], target: Tensor) -> None:
        z = torch.stack([logits[c] for c in self.classifiers]).float()  # K x N x C
        if len(self.classifiers) > 1:
            z = torch.cat([z, ensemble_probabilities(list(z)).unsqueeze(0)])
        k = min(5, z.shape[-1])
        hit = z.topk(k, dim=-1).indices == target.view(1, -1, 1)
        self.hits[0] += hit[..., 0].sum(1)
        self.hits[1] += hit.any(-1).sum(1)
        self.seen += target.numel()

    def result(self, prefix: str) -> dict[str, float]:
        """Accuracies in percent; call after :func:`all_reduce_sum` on ``hits`` and ``seen`` when distributed."""
        acc = (100.0 * self.hits / self.seen.clamp(min=1)).tolist()
        out = {}
        for i, name in enumerate(self.names):
            out[acc1(prefix, name)] = round(acc[0][i], 4)
            if prefix != "train":
                out[acc5(prefix, name)] = round(acc[1][i], 4)
        return out


class RunLog:
    """metrics.jsonl, metrics.csv and optional TensorBoard scalars in a run folder (rank 0 only)."""

    def __init__(self, folder: Path, history: list[dict]) -> None:
        self.folder = folder
        self.history = list(history)
        # a resumed run continues from its checkpoint's history, whatever the files said after it
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        atomic_write(folder / RunFile.METRICS, lambda f: f.write(lines.encode()))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tb"))
        except Exception:  # tensorboard is an optional extra
            self.tb = None

    def append(self, record: dict) -> None:
        self.history.append(record)
        with open(self.folder / RunFile.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        columns = list(dict.fromkeys(k for r in self.history for k in r))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write(self.folder / RunFile.METRICS_CSV, lambda f: f.write(text.getvalue().encode()))
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, record["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_history(folder: Path) -> list[dict]:
    """The per-epoch records in a run folder's metrics.jsonl (none when it has no such file)."""
    path = folder / RunFile.METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_rows(history: list[dict], names: list[str]) -> list[list[object]]:
    """Final and best test accuracy of every classifier over a run's history."""
    rows = []
    last = history[-1]
    for name in names:
        key = acc1("test", name)
        if key not in last:
            continue
        best = max(history, key=lambda r: r.get(key, -1))
        rows.append([name, f"{last[key]:.2f}", f"{last.get(f'test/acc5/{name}', float('nan')):.2f}",
                     f"{best[key]:.2f}", best["epoch"]])
    return rows


SUMMARY_HEADERS = ["classifier", "top-1 %", "top-5 %", "best top-1 %", "best epoch"]
