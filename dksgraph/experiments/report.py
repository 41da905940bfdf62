"""A grid's results in the paper's format: markdown tables and train/test error curves.

Error and accuracy figures are the *last* epoch's (never the best one, which would select on the
test set), scored on the whole test set by ``final.json`` when a run has one. Spreads are the
sample standard deviation over seeds, written ``mean(std)`` as in the paper's tables.

Example::

    >>> mean_std([7.5, 7.7]), mean_std([7.5])
    ('7.60(0.14)', '7.50')
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from dksgraph.experiments.grid import Run
from dksgraph.names import MAIN, RunFile, acc1
from dksgraph.train.metrics import read_history

__all__ = ["METHOD_NAMES", "Result", "arm_name", "classifier_table", "curves", "error_table", "gap_table",
           "load_results", "markdown", "mean_std", "paired_table", "plot_curves", "run_table", "time_table"]

METHOD_NAMES = {"baseline": "baseline", "ds": "DS", "dks": "DKS", "byot": "BYOT", "dhm": "DHM", "sdn": "SDN"}


def arm_name(arm: str) -> str:
    """A report column's name: ``dks`` -> DKS, ``baseline_at_dks_time`` -> baseline at DKS's time."""
    method, _, rest = arm.partition("_at_")
    name = METHOD_NAMES.get(method, method)
    return f"{name} at {METHOD_NAMES.get(rest.removesuffix('_time'), rest)}'s time" if rest else name


def mean_std(values: list[float], digits: int = 2) -> str:
    """``mean(std)`` with the sample standard deviation; just the mean for a single value."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}({statistics.stdev(values):.{digits}f})"


@dataclass
class Result:
    run: Run
    history: list[dict]
    final: dict

    @property
    def scored_on(self) -> str:
        return f"{self.final['images']} test images" if "images" in self.final else "the per-epoch test subset"

    def acc(self, classifier: str) -> float | None:
        return self.final.get(acc1("test", classifier))

    @property
    def classifiers(self) -> list[str]:
        return [k.split("/")[-1] for k in self.final if k.startswith(acc1("test", ""))]

    @property
    def train_seconds(self) -> float:
        return sum(r.get("train/seconds", 0.0) for r in self.history)

    @property
    def run_seconds(self) -> float:
        """Training plus the per-epoch scoring (the final scoring on the whole test set is apart)."""
        return self.train_seconds + sum(r.get("test/seconds", 0.0) for r in self.history)

    @property
    def train_acc(self) -> float:
        """The last epoch's training accuracy of the main classifier, on its augmented batches."""
        return self.history[-1][acc1("train", MAIN)]

    @property
    def error(self) -> float:
        return 100.0 - self.acc("main")


def load_results(runs: list[Run]) -> list[Result]:
    """Every finished run's history and final scores (runs still training are left out)."""
    results = []
    for run in runs:
        history = read_history(run.folder)
        if not history or history[-1]["epoch"] < run.epochs:
            continue
        final_path = run.folder / RunFile.FINAL
        final = json.loads(final_path.read_text()) if final_path.is_file() else history[-1]
        results.append(Result(run, history, final))
    return results


def _groups(results: list[Result]) -> dict[tuple[str, str], dict[str, list[Result]]]:
    """(spec, variant) -> arm -> results over seeds; baselines are shared by every variant."""
    variants: dict[str, list[str]] = defaultdict(list)
    for r in results:
        if not r.run.shared and r.run.variant not in variants[r.run.spec_name]:
            variants[r.run.spec_name].append(r.run.variant)
    groups: dict[tuple[str, str], dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        for variant in ([r.run.variant] if not r.run.shared else variants[r.run.spec_name] or [""]):
            groups[(r.run.spec_name, variant)][r.run.arm].append(r)
    return groups


def _label(spec: str, variant: str) -> str:
    return f"{spec} {variant}".strip()


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def error_table(results: list[Result], arms: list[str]) -> str:
    """Paper Table 1 / 2: top-1 error of the main classifier, mean(std) over seeds, and gain vs baseline."""
    headers = ["model", *(f"{arm_name(m)} error %" for m in arms)]
    others = [m for m in arms if m != "baseline"]
    if "baseline" in arms:
        headers += [f"{arm_name(m)} gain" for m in others]
    rows = []
    for (spec, variant), by_arm in _groups(results).items():
        errors = {m: [r.error for r in by_arm.get(m, [])] for m in arms}
        row = [_label(spec, variant), *(mean_std(errors[m]) for m in arms)]
        if "baseline" in arms:
            for m in others:
                ok = errors["baseline"] and errors[m]
                row.append(f"{statistics.fmean(errors['baseline']) - statistics.fmean(errors[m]):+.2f}" if ok else "–")
        rows.append(row)
    return _table(headers, rows)


def paired_table(results: list[Result], comparisons: list[tuple[str, str]]) -> str:
    """Per-seed differences of the main classifier's top-1 error, a - b, between arms trained with the same seed
    (the same backbone initialisation, data order and augmentation draws), with their mean and standard error."""
    seeds = sorted({r.run.seed for r in results})
    rows = []
    for (spec, variant), by_arm in _groups(results).items():
        for a, b in comparisons:
            err_a = {r.run.seed: r.error for r in by_arm.get(a, [])}
            err_b = {r.run.seed: r.error for r in by_arm.get(b, [])}
            diffs = {s: err_a[s] - err_b[s] for s in seeds if s in err_a and s in err_b}
            if not diffs:
                continue
            values = list(diffs.values())
            se = f"{statistics.stdev(values) / len(values) ** 0.5:.2f}" if len(values) > 1 else "–"
            rows.append([_label(spec, variant), f"{arm_name(a)} − {arm_name(b)}",
                         *(f"{diffs[s]:+.2f}" if s in diffs else "–" for s in seeds),
                         f"{statistics.fmean(values):+.2f}", se, f"{sum(v < 0 for v in values)}/{len(values)}"])
    return _table(["model", "difference (error points)", *(f"seed {s}" for s in seeds), "mean", "std. error",
                   "seeds where a is better"], rows)


def gap_table(results: list[Result], arms: list[str]) -> str:
    """Generalisation gap of the main classifier: the last epoch's training accuracy (augmented batches) minus
    the final test accuracy, mean(std) over seeds."""
    rows = []
    for (spec, variant), by_arm in _groups(results).items():
        for arm in arms:
            group = by_arm.get(arm, [])
            if group:
                rows.append([_label(spec, variant), arm_name(arm), mean_std([r.train_acc for r in group]),
                             mean_std([r.acc("main") for r in group]),
                             mean_std([r.train_acc - r.acc("main") for r in group])])
    return _table(["model", "arm", "train top-1 %", "test top-1 %", "gap (points)"], rows)


def classifier_table(results: list[Result]) -> str:
    """Paper Table 5: top-1 accuracy of every classifier and of the ensemble, mean(std) over seeds."""
    rows = []
    for (spec, variant), by_arm in _groups(results).items():
        for arm, group in by_arm.items():
            names = group[0].classifiers
            cells = [f"{n}: {mean_std([r.acc(n) for r in group if r.acc(n) is not None])}" for n in names]
            rows.append([_label(spec, variant), arm_name(arm), str(len(group)), ", ".join(cells)])
    return _table(["model", "arm", "seeds", "top-1 accuracy % per classifier"], rows)


def time_table(results: list[Result]) -> str:
    """Paper Sec. 4.4: training wall time (excluding evaluation) and its ratio to the baseline's, and the run's
    wall time with its per-epoch scoring."""
    rows = []
    for (spec, variant), by_arm in _groups(results).items():
        base = [r.train_seconds for r in by_arm.get("baseline", [])]
        for arm, group in by_arm.items():
            seconds = [r.train_seconds for r in group]
            ratio = f"{statistics.fmean(seconds) / statistics.fmean(base):.2f}" if base else "–"
            per_epoch = [s / max(1, len(r.history)) for s, r in zip(seconds, group)]
            rows.append([_label(spec, variant), arm_name(arm), str(len(group[0].history)),
                         mean_std([s / 60 for s in seconds], 1), mean_std(per_epoch, 2), ratio,
                         mean_std([r.run_seconds / 60 for r in group], 1)])
    return _table(["model", "arm", "epochs", "train minutes", "s / epoch", "train time vs baseline",
                   "minutes with per-epoch scoring"], rows)


def run_table(results: list[Result]) -> str:
    rows = [[r.run.id, str(len(r.history)), f"{r.acc('main'):.2f}", f"{r.train_acc:.2f}",
             f"{r.train_seconds / 60:.1f}", r.scored_on] for r in results]
    return _table(["run", "epochs", "test top-1 % (main)", "train top-1 % (main)", "train minutes", "scored on"],
                  rows)


def curves(results: list[Result]) -> dict[tuple[str, str], dict[str, dict[str, list[float]]]]:
    """(spec, variant) -> arm -> {"epoch", "train", "test_epoch", "test"}: main-classifier error per epoch (the
    test error on the scored epochs only, see ``--eval-every``), mean over seeds."""
    out: dict = {}
    for key, by_arm in _groups(results).items():
        out[key] = {}
        for arm, group in by_arm.items():
            epochs = min(len(r.history) for r in group)
            train = [statistics.fmean(100 - r.history[e][acc1("train", MAIN)] for r in group) for e in range(epochs)]
            scored = [e for e in range(epochs) if all(acc1("test", MAIN) in r.history[e] for r in group)]
            test = [statistics.fmean(100 - r.history[e][acc1("test", MAIN)] for r in group) for e in scored]
            out[key][arm] = {"epoch": list(range(1, epochs + 1)), "train": train,
                             "test_epoch": [e + 1 for e in scored], "test": test}
    return out


def plot_curves(results: list[Result], out_dir: Path) -> list[Path]:
    """Paper Fig. 3: train and test error of the main classifier per epoch, one PNG and one SVG per model.

    Needs matplotlib (the ``plots`` extra); without it, returns nothing and writes no picture.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for (spec, variant), by_arm in curves(results).items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
        for arm, c in by_arm.items():
            axes[0].plot(c["epoch"], c["train"], label=arm_name(arm))
            axes[1].plot(c["test_epoch"], c["test"], label=arm_name(arm))
        for ax, split in zip(axes, ("train", "test")):
            ax.set_title(f"{_label(spec, variant)}: {split} error (main classifier)")
            ax.set_xlabel("epoch")
            ax.set_ylabel("top-1 error %")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        stem = "curves_" + "_".join(p for p in (spec, variant) if p)
        for ext in ("png", "svg"):
            path = out_dir / f"{stem}.{ext}"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written


def markdown(title: str, preamble: str, results: list[Result], arms: list[str], pictures: list[Path],
             comparisons: list[tuple[str, str]] = ()) -> str:
    """The whole report: the tables above, the curve pictures, and every run."""
    parts = [f"# {title}", preamble.strip(),
             "## Top-1 error of the main classifier (last epoch)", error_table(results, arms),
             "Gain: baseline error minus the method's error (positive: better than the baseline)."]
    if comparisons:
        parts += ["## Paired differences, seed by seed",
                  "Runs with the same seed share the backbone's initial weights, the data order and every "
                  "augmentation draw, so each seed gives one paired difference of the main classifier's top-1 "
                  "error (a − b, in points; negative: a is better). Standard error: the differences' sample "
                  "standard deviation over the square root of their number.",
                  paired_table(results, comparisons)]
    parts += ["## Generalisation gap (main classifier)", gap_table(results, arms),
              "## Every classifier and their ensemble (last epoch)", classifier_table(results),
              "## Training time", time_table(results)]
    pngs = [p for p in pictures if p.suffix == ".png"]
    if pngs:
        parts += ["## Error curves (mean over seeds)", *(f"![{p.stem}]({p.name})" for p in pngs)]
    parts += ["## Runs", run_table(results)]
    return "\n\n".join(p for p in parts if p) + "\n"
