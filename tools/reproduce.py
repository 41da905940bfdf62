"""Run an experiment grid and write its results in the paper's format.

    python tools/reproduce.py specs/grids/cpu_cifar10.yaml                 # CPU, one run after another
    python tools/reproduce.py specs/grids/table1_cifar100.yaml --gpus 0,1,2,3
    python tools/reproduce.py specs/grids/table4_taps_resnet18.yaml --epochs 30 --train-subset 50000
    python tools/reproduce.py specs/grids/cpu_cifar10.yaml --dry-run       # what would run, what is done
    python tools/reproduce.py specs/grids/table1_cifar100.yaml --slurm --partition gpu --gpus-per-run 1 --time 8:00:00
    python tools/reproduce.py specs/grids/table1_cifar100.yaml --status    # each run's state, from folders and SLURM

Every run is a normal `dksgraph train` run folder under --runs-dir. Invoking the command again skips
finished runs and resumes interrupted ones from their last.pt. The report (report.md, curves_*.png/svg)
goes to --report-dir (default: the runs folder).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dksgraph.experiments import grid as grid_lib  # noqa: E402
from dksgraph.experiments import report  # noqa: E402
from dksgraph.errors import DksError  # noqa: E402
from dksgraph.checkpoint import atomic_write  # noqa: E402
from dksgraph.train.progress import progress  # noqa: E402


def _machine(gpus: list[int] | None) -> str:
    import torch

    if gpus and torch.cuda.is_available():
        device = f"{len(gpus)} x {torch.cuda.get_device_name(gpus[0])}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{device}; Python {platform.python_version()}, torch {torch.__version__}, {platform.system()}"


def _parse_gpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise DksError(f"`--gpus {text}` must be comma-separated GPU indices, e.g. `--gpus 0,1,2,3`.") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("grid_file", metavar="GRID.yaml", type=click.Path(dir_okay=False))
@click.option("--runs-dir", type=click.Path(file_okay=False), help="Where the run folders go (default: runs/grids/NAME).")
@click.option("--report-dir", type=click.Path(file_okay=False), help="Where report.md and curves go (default: --runs-dir).")
@click.option("--gpus", help="Comma-separated CUDA devices; one run per GPU at a time.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs at a time on CPU (CPU threads are split between them).")
@click.option("--epochs", type=click.IntRange(min=1), help="Override every run's epochs (LR milestones scale along).")
@click.option("--train-subset", type=click.IntRange(min=1), help="Train every run on a fixed random subset of N images.")
@click.option("--test-subset", type=click.IntRange(min=1), help="Score each epoch on N fixed test images.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Override every run's global batch size.")
@click.option("--data-dir", type=click.Path(), help="Override every run's data folder.")
@click.option("--reuse", "reuse", multiple=True, type=click.Path(file_okay=False),
              help="A folder of run records (a report's runs/) whose finished runs with the same settings are taken "
              "instead of trained again; repeatable, added to the grid file's own `reuse:`.")
@click.option("--dry-run", is_flag=True, help="List the runs and their state; train nothing.")
@click.option("--report-only", is_flag=True, help="Write the report from the finished runs; train nothing.")
@click.option("--slurm", is_flag=True, help="Submit every run that is neither done nor queued as a SLURM job (one "
              "job array, through submitit: the `cluster` extra) and return; the options below default to the grid "
              "file's `slurm:` section.")
@click.option("--partition", help="SLURM partition (default: the cluster's default).")
@click.option("--time", "time_limit", help="Each job's time limit, e.g. 08:00:00; a run that needs longer is "
              "requeued before the limit and resumes from last.pt.")
@click.option("--gpus-per-run", type=click.IntRange(min=0), help="GPUs of each run (over all its nodes).")
@click.option("--cpus-per-run", type=click.IntRange(min=1), help="CPUs of each node of a run.")
@click.option("--nodes-per-run", type=click.IntRange(min=1), help="Nodes of each run: one torchrun agent per node.")
@click.option("--tasks-per-node", type=click.IntRange(min=1), help="torchrun agents per node (default 1; more only "
              "to try a several-node launch on one machine).")
@click.option("--account", help="SLURM account.")
@click.option("--qos", help="SLURM quality of service.")
@click.option("--max-parallel", type=click.IntRange(min=1), help="At most N of the grid's jobs at once.")
@click.option("--slurm-extra", multiple=True, metavar="KEY=VALUE", help="Any further sbatch option (repeatable), "
              "e.g. --slurm-extra constraint=a100 --slurm-extra mem=64G.")
@click.option("--wait", is_flag=True, help="With --slurm: wait until every job has ended, then write the report.")
@click.option("--status", "show_status", is_flag=True, help="Each run's state (done, pending, running, failed with "
              "its log's last line, not submitted) from the run folders and the scheduler; submit nothing.")
def main(grid_file, runs_dir, report_dir, gpus, jobs, epochs, train_subset, test_subset, batch_size, data_dir,
         reuse, dry_run, report_only, slurm, partition, time_limit, gpus_per_run, cpus_per_run, nodes_per_run,
         tasks_per_node, account, qos, max_parallel, slurm_extra, wait, show_status) -> None:
    """Train every run of GRID.yaml that is not finished, then write the markdown report and the curves.

    With --report-dir, every finished run's small files (run.json, spec.yaml, metrics.jsonl, final.json; never
    checkpoints) are copied to REPORT_DIR/runs/, so that the report can be rebuilt from them and a later grid
    can reuse them (--reuse, or `reuse:` in the grid file).
    """
    cluster = {"partition": partition, "time": time_limit, "gpus_per_run": gpus_per_run, "cpus_per_run": cpus_per_run,
               "nodes_per_run": nodes_per_run, "tasks_per_node": tasks_per_node, "account": account, "qos": qos,
               "max_parallel": max_parallel, "extra": _parse_extra(slurm_extra)}
    try:
        _main(grid_file, runs_dir, report_dir, gpus, jobs, epochs, train_subset, test_subset, batch_size, data_dir,
              reuse, dry_run, report_only, slurm, cluster, wait, show_status)
    except DksError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


def _parse_extra(items: tuple[str, ...]) -> dict[str, str] | None:
    if not items:
        return None
    bad = [item for item in items if "=" not in item or not item.split("=", 1)[0].strip()]
    if bad:
        raise click.BadParameter(f"`{bad[0]}` is not KEY=VALUE (e.g. `constraint=a100`)", param_hint="--slurm-extra")
    return {k.strip().lstrip("-"): v for k, v in (item.split("=", 1) for item in items)}


def _slurm_options(grid, cluster: dict):
    given = {k: v for k, v in cluster.items() if v is not None}
    if "extra" in given:
        given["extra"] = {**grid.slurm.extra, **given["extra"]}
    try:
        return grid_lib.SlurmOptions.model_validate({**grid.slurm.model_dump(), **given})
    except ValueError as exc:
        raise DksError(f"the SLURM options do not hold: {exc}") from None


def _slurm(runs, grid, runs_dir: Path, cluster: dict, wait: bool, show_status: bool) -> bool:
    """Submit (or show) the grid's runs on SLURM; True when every run is done (the report can be written)."""
    from dksgraph.experiments import slurm

    if show_status:
        rows = slurm.states(runs)
        for run, state, job, detail in rows:
            click.echo(f"  {state:<14} {job:<12} {run.id}" + (f"  {detail}" if detail else ""))
        return False
    options = _slurm_options(grid, cluster)
    log_dir = runs_dir.resolve() / "slurm"
    submitted = slurm.submit(runs, options, log_dir, grid.name)
    if submitted:
        click.echo(f"submitted {len(submitted)} job(s) to SLURM ({options.nodes_per_run} node(s), "
                   f"{options.cpus_per_run} CPU(s), {options.gpus_per_run} GPU(s) per run; time limit {options.time}; "
                   f"logs in {log_dir}/<job id>/):")
        for run, job in submitted:
            click.echo(f"  {job:<12} {run.id}")
    else:
        click.echo("nothing to submit: every run is done or already queued")
    if not wait:
        click.echo(f"follow them with: python tools/reproduce.py {' '.join(sys.argv[1:2])} --status; "
                   "the report: the same command with --report-only once they are done")
        return False
    while True:
        rows = slurm.states(runs)
        if not any(state not in ("done", "failed", "not submitted") for _, state, _, _ in rows):
            break
        time.sleep(5)
    failed = [(run, detail) for run, state, _, detail in rows if state != "done"]
    for run, detail in failed:
        click.echo(f"{run.id} did not finish: {detail}", err=True)
    if failed:
        raise SystemExit(1)
    return True


def _main(grid_file, runs_dir, report_dir, gpus, jobs, epochs, train_subset, test_subset, batch_size, data_dir,
          reuse, dry_run, report_only, slurm=False, cluster=None, wait=False, show_status=False) -> None:
    gpu_list = _parse_gpus(gpus)
    grid = grid_lib.with_budget(grid_lib.load_grid(grid_file), epochs=epochs, train_subset=train_subset,
                                    test_subset=test_subset, batch_size=batch_size, data_dir=data_dir)
    runs_dir = Path(runs_dir or f"runs/grids/{grid.name}")
    runs = grid_lib.plan(grid, grid_file, runs_dir)
    records = [Path(grid_file).parent / d for d in grid.reuse] + [Path(d) for d in reuse]
    missing = [str(d) for d in records if not d.is_dir()]
    if missing:
        raise DksError(f"the run records to reuse are not there: {', '.join(missing)}; `reuse:` folders are "
                       "relative to the grid file, `--reuse` ones to the current folder.")
    taken = grid_lib.adopt_records(runs, records)
    if taken:
        click.echo(f"{taken} finished run(s) taken from the records in {', '.join(map(str, records))}")
    states = {r.id: grid_lib.status(r) for r in runs}
    counts = {s: sum(1 for v in states.values() if v == s) for s in ("done", "eval", "resume", "new")}
    click.echo(f"grid {grid.name}: {len(runs)} runs in {runs_dir} ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    if dry_run:
        for r in runs:
            click.echo(f"  {states[r.id]:<6} {r.id}")
        return
    if (slurm or show_status) and not report_only:
        if not _slurm(runs, grid, runs_dir, cluster or {}, wait, show_status):
            return
    elif not report_only and counts["done"] < len(runs):
        data = grid.train.data_dir
        if grid.train.dataset == "imagefolder" and data and not (Path(data) / "train").is_dir():
            raise DksError(f"the grid trains on `{data}`, which has no train/ folder. For the shared CIFAR-10: "
                           f"`mkdir -p {data} && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C {data}` "
                           "(or `make data/cifar10`), or pass `--data-dir`.")
        bar = progress(len(runs), grid.name, unit="run", initial=counts["done"], every=None, transient=False)

        def event(run, what, detail):
            tqdm.write(f"{datetime.datetime.now():%H:%M} {what:<6} {run.id} ({detail})")
            if what in ("done", "failed"):
                bar.update(1)

        try:
            failures = grid_lib.execute([(r, states[r.id]) for r in runs], gpu_list, jobs, event)
        except KeyboardInterrupt:
            bar.close()
            click.echo("\ninterrupted; run the same command again to go on (finished runs are kept, "
                       "interrupted ones resume from their last epoch).", err=True)
            raise SystemExit(130) from None
        bar.close()
        if failures:
            for rid, tail in failures.items():
                click.echo(f"\n{rid} failed; the end of its log:\n{tail}", err=True)
            click.echo(f"\n{len(failures)} run(s) failed; fix the cause and run the same command again (finished "
                       "runs are kept).", err=True)
            raise SystemExit(1)
    results = report.load_results(runs)
    out = Path(report_dir) if report_dir else runs_dir
    out.mkdir(parents=True, exist_ok=True)
    if report_dir:
        for result in results:
            grid_lib.save_record(result.run, out / "runs")
    pictures = report.plot_curves(results, out)
    args = [a for a in sys.argv[1:] if a != "--report-only"]  # the report is the same as the full run's
    command = "python " + " ".join(shlex.quote(a) for a in ["tools/reproduce.py", *args])
    t = grid.train
    preamble = "\n".join([
        grid.description.strip(), "",
        f"- command: `{command}`",
        f"- machine: {_machine(gpu_list)}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- runs: {len(results)} of {len(runs)} finished ({len(grid.seeds)} seeds: {grid.seeds})",
        f"- overrides: {', '.join(f'{k}={v}' for k, v in t.model_dump(exclude_defaults=True).items()) or 'none'}",
        "- every figure is the last epoch's; final scores use the whole test set (`dksgraph eval`), per-epoch "
        "curves use the per-epoch test subset when one is set",
    ])
    if not pictures and results:
        preamble += "\n- curves: install matplotlib (`pip install -e .[plots]`) and run again with `--report-only`"
    text = report.markdown(f"Grid `{grid.name}`", preamble, results, grid.arms, pictures, grid.comparisons)
    path = atomic_write(out / "report.md", lambda f: f.write(text.encode()))
    click.echo(text)
    click.echo(f"wrote {path}" + (f" and {len(pictures)} curve files" if pictures else ""))


if __name__ == "__main__":
    main()
