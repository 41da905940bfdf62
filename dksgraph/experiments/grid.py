"""Experiment grids: specs x methods x seeds x variants, each run a normal `dksgraph train` run folder.

A grid file (``specs/grids/*.yaml``) names spec files (relative to the grid file), the methods, the
seeds, optional *variants* (a subset of the spec's taps, another pair set) and training overrides.
:func:`plan` expands it into :class:`Run` s; :func:`execute` trains the runs that are not finished
(resuming any interrupted one from its ``last.pt``) and scores each on the whole test set with
``dksgraph eval --json`` into ``final.json``. ``tools/reproduce.py`` is the command line for both.

Example::

    >>> grid = Grid(name="toy", specs=["../resnet32.yaml"], seeds=[0, 1])
    >>> [v.name for v in grid.variants], grid.methods
    ([''], ['baseline', 'ds', 'dks'])
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import (Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      model_validator)

from dksgraph.errors import DksError, SpecError
from dksgraph.names import RunFile
from dksgraph.objective import resolve_objective
from dksgraph.spec import (BACKBONE_OVERRIDES, RECIPE_OVERRIDES, Dataset, Method, ObjectiveSpec, PairSet, Schedule,
                           SynergySpec, _Strict, apply_overrides, describe_errors, parse_spec, read_yaml)
from dksgraph.train.metrics import read_history
from dksgraph.train.runconfig import AmpMode

__all__ = ["RECORD_FILES", "EqualCompute", "Grid", "GridTrain", "Run", "SlurmOptions", "Variant", "adopt_records",
           "commands", "derive_spec", "execute", "load_grid", "plan", "prepare", "save_record", "status", "with_budget"]



class GridTrain(_Strict):
    """Overrides of every run's recipe (unset fields keep each spec's own) and runtime settings."""

    dataset: Dataset | None = None
    data_dir: str | None = Field(None, description="Relative to the directory tools/reproduce.py runs in.")
    num_classes: PositiveInt | None = None
    epochs: PositiveInt | None = Field(None, description="LR milestones are scaled by epochs / the spec's epochs.")
    batch_size: PositiveInt | None = None
    lr: PositiveFloat | None = None
    warmup_epochs: NonNegativeFloat | None = None
    schedule: Schedule | None = None
    train_subset: PositiveInt | None = None
    test_subset: PositiveInt | None = Field(None, description="Per-epoch scoring only; final.json uses every image.")
    # runtime settings (dksgraph train flags that do not change the recipe)
    limit_train_batches: PositiveInt | None = None
    eval_every: PositiveInt | None = Field(None, description="Score the per-epoch test subset every N epochs.")
    amp: AmpMode | None = None
    channels_last: bool = False
    data_on_device: bool = False
    workers: NonNegativeInt | None = None

    def recipe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (*BACKBONE_OVERRIDES, *RECIPE_OVERRIDES) if k in type(self).model_fields}


class Variant(_Strict):
    """A change to the spec's auxiliary classifiers (baseline runs, which have none, ignore it)."""

    name: str = Field(description="Short label used in run folder names and tables, e.g. C1C3.")
    taps: list[str] | None = Field(None, description="Keep only these taps (by name), in the spec's order.")
    pairs: PairSet | list[tuple[str, str]] | None = Field(None, description="Replace synergy.pairs.")


class MethodTerms(_Strict):
    """Terms of one method's objective that differ from its preset in this grid (fixed before the grid runs)."""

    synergy: SynergySpec | None = None
    objective: ObjectiveSpec | None = None


class EqualCompute(_Strict):
    """One more arm: ``method`` trained for as long (in wall time) as one run of ``matches`` takes, i.e. for
    ``time_ratio`` times the grid's epochs (the schedule scaled by the one ``--epochs`` rule)."""

    method: Method = "baseline"
    matches: Method = "dks"
    time_ratio: PositiveFloat = Field(description="Wall time of a `matches` run over a `method` run of the same "
                                      "epochs, measured before the grid (e.g. with tools/bench_train.py).")

    @property
    def arm(self) -> str:
        return f"{self.method}_at_{self.matches}_time"

    def epochs(self, grid_epochs: int) -> int:
        return max(1, round(self.time_ratio * grid_epochs))


class SlurmOptions(_Strict):
    """How each run of a grid is asked of SLURM (a grid file's ``slurm:`` section; ``tools/reproduce.py
    --slurm`` options override it)."""

    partition: str | None = Field(None, description="Default: the cluster's default partition.")
    time: str = Field("24:00:00", description="Each job's time limit (SLURM's format); a run that needs longer "
                      "is requeued and resumes.")
    gpus_per_run: NonNegativeInt = 0
    cpus_per_run: PositiveInt = Field(1, description="CPUs of each node of a run (SLURM's --cpus-per-task).")
    nodes_per_run: PositiveInt = 1
    tasks_per_node: PositiveInt = Field(1, description="torchrun agents per node: 1, except to try several "
                                        "nodes' launch on one machine.")
    account: str | None = None
    qos: str | None = None
    max_parallel: PositiveInt | None = Field(None, description="At most this many of the grid's jobs at once.")
    extra: dict[str, str] = Field(default_factory=dict, description="Further sbatch options, e.g. "
                                  "`{constraint: a100, mem: 64G}`.")
    signal_s: PositiveInt = Field(120, description="SIGUSR2 this long before the time limit: save, requeue.")

    @property
    def agents(self) -> int:
        """torchrun agents per run (one per task)."""
        return self.nodes_per_run * self.tasks_per_node

    @property
    def processes_per_agent(self) -> int:
        return max(1, self.gpus_per_run // self.agents) if self.gpus_per_run else 1


class Grid(_Strict):
    name: str
    description: str = ""
    cost: str = Field("", description="What a full run of the grid costs, for the README and the report.")
    specs: list[str] = Field(min_length=1, description="Spec files, relative to the grid file.")
    methods: list[Method] = Field(default_factory=lambda: ["baseline", "ds", "dks"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    variants: list[Variant] = Field(default_factory=lambda: [Variant(name="")], min_length=1)
    train: GridTrain = Field(default_factory=GridTrain)
    equal_compute: EqualCompute | None = Field(None, description="Add a run of a method (the baseline) trained "
                                               "as long as another (DKS) takes, for every seed.")
    method_terms: dict[Method, MethodTerms] = Field(
        default_factory=dict, description="Per method, `synergy:`/`objective:` fields set over its preset in every "
        "spec of the grid (e.g. `dhm: {synergy: {pair_drop: 0.5}}` for DHM's stochastic variant).")
    compare: list[tuple[str, str]] | None = Field(
        None, description="Pairs [a, b] of arms (methods, or the equal-compute arm) whose per-seed error "
        "differences a - b the report tabulates; default: the last method against every other arm.")
    reuse: list[str] = Field(default_factory=list, description="Folders of run records (a report's runs/, "
                             "relative to the grid file) whose finished runs with the same settings are taken "
                             "instead of trained again.")
    slurm: SlurmOptions = Field(default_factory=SlurmOptions, description="Defaults of `--slurm` for this grid.")

    @property
    def arms(self) -> list[str]:
        """The methods, then the equal-compute arm: the columns of the report."""
        return [*self.methods, *([self.equal_compute.arm] if self.equal_compute else [])]

    @property
    def comparisons(self) -> list[tuple[str, str]]:
        if self.compare is not None:
            return list(self.compare)
        return [(self.methods[-1], arm) for arm in self.arms if arm != self.methods[-1]]

    @model_validator(mode="after")
    def _known_arms(self) -> Grid:
        for pair in self.compare or []:
            for arm in pair:
                if arm not in self.arms:
                    raise ValueError(f"`compare` names `{arm}`, which is not an arm of this grid ({', '.join(self.arms)})")
        return self


@dataclass
class Run:
    spec_file: Path
    spec_name: str
    variant: str
    method: str
    seed: int
    folder: Path
    spec: dict[str, Any]
    args: list[str] = field(default_factory=list)
    arm: str = ""  # the report's column: the method, or an equal-compute arm such as baseline_at_dks_time

    def __post_init__(self) -> None:
        self.arm = self.arm or self.method

    @property
    def shared(self) -> bool:
        """A run without auxiliary classifiers (a baseline arm), the same for every variant."""
        return self.method == "baseline"

    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def epochs(self) -> int:
        return int(self.spec["train"]["epochs"])

    def settings(self) -> dict[str, Any]:
        return {"spec": self.spec, "method": self.method, "seed": self.seed, "args": self.args}


RECORD_FILES = (RunFile.RUN, RunFile.SPEC, RunFile.METRICS, RunFile.FINAL)  # a finished run, without its checkpoints


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise DksError(f"grid file `{path}` does not exist; the grids of the paper are in specs/grids/.")
    try:
        return Grid.model_validate(read_yaml(path) or {})
    except ValidationError as exc:
        raise SpecError(f"grid file `{path}` is invalid: {describe_errors(exc, Grid)}. See specs/grids/ for "
                        "examples.") from None


def with_budget(grid: Grid, **overrides: Any) -> Grid:
    """The grid with command-line budget overrides (``epochs``, ``train_subset``, ...) set where not None."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return grid.model_copy(update={"train": grid.train.model_copy(update=given)}) if given else grid


def derive_spec(base: dict[str, Any], variant: Variant, train: GridTrain, source: str, method: str = "dks",
                seed: int | None = None, terms: MethodTerms | None = None) -> dict[str, Any]:
    """The spec dictionary of one run: the spec file with the variant, the method's terms, the grid's overrides,
    the method and the seed applied (through :func:`~dksgraph.spec.apply_overrides`, the rule `dksgraph train`
    follows)."""
    spec = json.loads(json.dumps(base))  # deep copy that also turns tuples into lists
    for section, given in (terms.model_dump(exclude_none=True) if terms else {}).items():
        spec[section] = {**(spec.get(section) or {}), **given}
    if variant.taps is not None:
        taps = spec.get("taps")
        if not isinstance(taps, list):
            raise DksError(f"variant `{variant.name}` picks taps by name but `{source}` has `taps: {taps}`; "
                           "list the taps in the spec to select among them.")
        names = [t.get("name") or t["at"] for t in taps]
        unknown = [t for t in variant.taps if t not in names]
        if unknown:
            raise DksError(f"variant `{variant.name}` names taps {unknown} that `{source}` does not have; its taps "
                           f"are {names}.")
        spec["taps"] = [t for t, n in zip(taps, names) if n in variant.taps]
    if variant.pairs is not None:
        pairs = variant.pairs if isinstance(variant.pairs, str) else [list(p) for p in variant.pairs]
        spec.setdefault("synergy", {})["pairs"] = pairs
    parsed = apply_overrides(parse_spec(spec, source=source), source=source, method=method, seed=seed,
                             **train.recipe())
    return parsed.model_dump(mode="json", exclude_none=True)


def plan(grid: Grid, grid_path: str | Path, runs_dir: str | Path) -> list[Run]:
    """Every run of the grid, seed by seed; baseline runs (no taps) are shared by all variants."""
    runs: list[Run] = []
    root = Path(grid_path).parent
    for spec_rel in grid.specs:
        spec_file = (root / spec_rel).resolve()
        if not spec_file.is_file():
            raise DksError(f"grid `{grid.name}` names spec `{spec_rel}`, which is not at `{spec_file}`; spec paths "
                           "are relative to the grid file.")
        base = read_yaml(spec_file) or {}
        name = base.get("name") or spec_file.stem
        arms = [(m, m, grid.train) for m in grid.methods]
        if grid.equal_compute:
            eq = grid.equal_compute
            epochs = grid.train.epochs or int(parse_spec(base, source=str(spec_file)).train.epochs)
            arms.append((eq.arm, eq.method, grid.train.model_copy(update={"epochs": eq.epochs(epochs)})))
        for arm, method, train in arms:
            variants = [Variant(name="")] if method == "baseline" else grid.variants
            for variant in variants:
                for seed in grid.seeds:
                    spec = derive_spec(base, variant, train, f"{spec_file} (variant `{variant.name}`)", method, seed,
                                       grid.method_terms.get(method))
                    label = "-".join(p for p in (name, variant.name, arm, f"s{seed}") if p)
                    runs.append(Run(spec_file, name, variant.name, method, seed, Path(runs_dir) / label, spec,
                                    _runtime_args(train), arm))
    # seed by seed, so that a grid stopped early has every method for its first seeds
    return sorted(runs, key=lambda r: grid.seeds.index(r.seed))


def _runtime_args(train: GridTrain) -> list[str]:
    args = []
    for key in ("limit_train_batches", "eval_every", "amp", "workers"):
        if getattr(train, key) is not None:
            args += [f"--{key.replace('_', '-')}", str(getattr(train, key))]
    for key in ("channels_last", "data_on_device"):
        if getattr(train, key):
            args.append(f"--{key.replace('_', '-')}")
    return args


def same_settings(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a run record's settings (``run.json``) are a run's: the same spec, method, seed and flags, with
    the objective compared as its method expands it, so a record written when specs spelled out the DKS
    preset's values (``synergy: {pairs: bidirectional, beta: 1, temperature: 1}``, ``alpha: 1``) still matches."""
    return _canonical(saved) == _canonical(wanted)


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
    settings = json.loads(json.dumps(settings))
    try:
        spec = parse_spec(settings["spec"], source="a run record")
        labels = [t.label for t in spec.taps] if isinstance(spec.taps, list) else []
        objective = asdict(resolve_objective(spec, labels, settings["method"]))
    except (KeyError, TypeError, DksError):
        return settings  # compared as written
    objective.pop("given")
    data = settings["spec"]
    data.pop("synergy", None)
    data.pop("objective", None)
    for tap in data["taps"] if isinstance(data.get("taps"), list) else []:
        tap.pop("alpha", None)
    settings["objective"] = objective
    return settings


def status(run: Run) -> str:
    """``done`` (trained and scored: a run folder, or its record), ``eval`` (trained), ``resume`` (has a
    last.pt) or ``new``."""
    saved = run.folder / RunFile.RUN
    if saved.is_file() and not same_settings(json.loads(saved.read_text()), run.settings()):
        raise DksError(f"`{run.folder}` holds a run with other settings than the grid now asks for (spec, method, "
                       "seed or budget changed). Delete that folder to rerun it, or pass another `--runs-dir`.")
    history = read_history(run.folder) if saved.is_file() else []
    trained = bool(history) and int(history[-1]["epoch"]) >= run.epochs
    if trained and (run.folder / RunFile.FINAL).is_file():
        return "done"
    if not (run.folder / RunFile.LAST).is_file():
        return "new"
    return "eval" if trained else "resume"


def save_record(run: Run, dest: Path) -> Path:
    """Copy a finished run's small files (:data:`RECORD_FILES`, never checkpoints) to ``dest/<run id>``, from
    which a report can be rebuilt and a later grid can take the run (``reuse``)."""
    folder = Path(dest) / run.id
    if folder.resolve() != run.folder.resolve():
        folder.mkdir(parents=True, exist_ok=True)
        for name in RECORD_FILES:
            if (run.folder / name).is_file():
                (folder / name).write_bytes((run.folder / name).read_bytes())
    return folder


def adopt_records(runs: list[Run], record_dirs: list[Path]) -> int:
    """Point every run that is not done at a finished record with the same settings in ``record_dirs``;
    returns how many were taken."""
    taken = 0
    for run in runs:
        if status(run) == "done":
            continue
        for folder in (Path(d) / run.id for d in record_dirs):
            saved = folder / RunFile.RUN
            if not saved.is_file() or not same_settings(json.loads(saved.read_text()), run.settings()):
                continue
            original, run.folder = run.folder, folder
            if status(run) == "done":
                taken += 1
                break
            run.folder = original
    return taken


def prepare(run: Run) -> None:
    """Write a new run's folder: its derived ``spec.yaml`` and the ``run.json`` that :func:`status` checks."""
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / RunFile.SPEC).write_text(yaml.safe_dump(run.spec, sort_keys=False))
    (run.folder / RunFile.RUN).write_text(json.dumps(run.settings(), indent=1) + "\n")


def commands(run: Run, state: str, device: str) -> list[list[str]]:
    """The `dksgraph` command lines that bring a run from ``state`` to done."""
    dks = [sys.executable, "-m", "dksgraph"]
    out: list[list[str]] = []
    if state == "new":
        out.append([*dks, "train", str(run.folder / RunFile.SPEC), *run.args, "--device", device,
                    "--out", str(run.folder), "--overwrite"])
    elif state == "resume":
        out.append([*dks, "train", "--resume", str(run.folder / RunFile.LAST), *run.args, "--device", device])
    if state != "done":
        out.append([*dks, "eval", str(run.folder / RunFile.LAST), "--json", str(run.folder / RunFile.FINAL),
                    "--device", device])
    return out


def execute(todo: list[tuple[Run, str]], gpus: list[int] | None = None, jobs: int = 1,
            on_event: Callable[[Run, str, str], None] | None = None) -> dict[str, str]:
    """Bring each run from its :func:`status` to ``done``; ``jobs`` at a time on CPU, or one per GPU
    of ``gpus`` at a time.

    Each run's output goes to ``train.log`` in its folder. Returns the failed runs' ids and the last
    lines of their logs; the other runs go on when one fails. Ctrl-C stops every run (each keeps its
    last finished epoch, from which the next invocation resumes) and re-raises KeyboardInterrupt.
    """
    slots: queue.Queue = queue.Queue()
    for slot in (gpus if gpus else range(jobs)):
        slots.put(slot)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs)) if not gpus else None
    failures: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    running: set[subprocess.Popen] = set()

    def work(run: Run, state: str) -> None:
        slot = slots.get()
        try:
            if stop.is_set():
                return
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
            elif jobs > 1:
                env["OMP_NUM_THREADS"] = str(threads)
            if state == "new":
                prepare(run)
            start = time.perf_counter()
            if on_event:
                on_event(run, "start", f"{state} on {'cuda:' + str(slot) if gpus else 'cpu'}")
            for cmd in commands(run, state, "cuda" if gpus else "cpu"):
                with open(run.folder / RunFile.LOG, "a") as log:
                    log.write(f"$ {' '.join(cmd)}\n")
                    log.flush()
                    with lock:
                        if stop.is_set():
                            return
                        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                        running.add(proc)
                    code = proc.wait()
                    with lock:
                        running.discard(proc)
                if stop.is_set():
                    return
                if code != 0:
                    tail = (run.folder / RunFile.LOG).read_text().splitlines()[-8:]
                    with lock:
                        failures[run.id] = "\n".join(tail)
                    if on_event:
                        on_event(run, "failed", f"exit {code}, see {run.folder / 'train.log'}")
                    return
            if on_event:
                on_event(run, "done", f"{(time.perf_counter() - start) / 60:.1f} min")
        finally:
            slots.put(slot)

    todo = [(r, s) for r, s in todo if s != "done"]
    pool = ThreadPoolExecutor(max_workers=len(gpus) if gpus else jobs)
    try:
        for future in [pool.submit(work, r, s) for r, s in todo]:
            future.result()
    except KeyboardInterrupt:
        # stop starting runs; running ones get SIGINT and exit keeping their last finished epoch
        stop.set()
        with lock:
            for proc in running:
                proc.send_signal(signal.SIGINT)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failures
