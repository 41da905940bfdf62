"""`dksgraph train` and `dksgraph eval`: the command-line faces of :mod:`dksgraph.train.engine`.

Flags are of two kinds. Recipe flags (``--method``, ``--dataset``, ``--epochs``, ``--lr``, ...) override
the spec's ``train:`` section through :func:`dksgraph.spec.apply_overrides` and are stored in the
checkpoint's spec; a resumed run refuses to change them. Runtime flags (``--device``, ``--amp``,
``--workers``, ``--compile``, limits, ...) form the :class:`~dksgraph.train.runconfig.RunConfig` and may
change on every resume.
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import fields, replace
from pathlib import Path
from typing import get_args

import click

from dksgraph.errors import DksError, first_line
from dksgraph.names import ENSEMBLE, Key, RunFile, acc1, acc5
from dksgraph.spec import DATASETS, METHODS, Schedule
from dksgraph.train.runconfig import AMP_MODES, DEVICES

__all__ = ["RESUMABLE_RECIPE", "evaluate", "train"]
RESUMABLE_RECIPE = ("data_dir",)  # where the data lives may change between machines; what it is may not


def _recipe_options(f):
    options = [
        click.option("--method", type=click.Choice(METHODS), help="The objective's preset: dks (taps + synergy pairs), ds "
                     "(taps, no pairs), baseline (no taps), byot, dhm, sdn (README, Methods; `dksgraph augment "
                     "--method` prints it). Default: the spec's train.method."),
        click.option("--dataset", type=click.Choice(DATASETS), help="Default: the spec's train.dataset."),
        click.option("--data-dir", type=click.Path(), help="Where the dataset is (default: the spec's "
                     "train.data_dir); may change on resume."),
        click.option("--num-classes", type=click.IntRange(min=1), help="Override the classifier size."),
        click.option("--epochs", type=click.IntRange(min=1), help="Default: the spec's train.epochs; the LR "
                     "milestones and step size scale with it."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Global batch size (split over processes)."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Default: the spec's learning rate."),
        click.option("--warmup-epochs", type=click.FloatRange(min=0), help="Linear LR warm-up (default: the spec's)."),
        click.option("--schedule", type=click.Choice(get_args(Schedule)), help="LR decay (default: the spec's)."),
        click.option("--seed", type=click.IntRange(min=0), help="Default: the spec's train.seed."),
        click.option("--train-subset", type=click.IntRange(min=1), help="Train on a fixed random subset of N images."),
        click.option("--test-subset", type=click.IntRange(min=1), help="Score each epoch on a fixed random subset "
                     "of N test images (the same for every seed)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _runtime_options(f):
    options = [
        click.option("--device", type=click.Choice(DEVICES), help="Default: auto (CUDA when PyTorch sees a GPU)."),
        click.option("--amp", type=click.Choice(AMP_MODES), help="Automatic mixed precision (default: none; fp16 "
                     "uses a GradScaler and needs CUDA)."),
        click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory format (faster "
                     "convolutions on recent GPUs)."),
        click.option("--compile/--no-compile", "compile", default=None, help="torch.compile the training step and "
                     "the evaluation forward; compile time is reported apart."),
        click.option("--workers", type=click.IntRange(min=0), help="Data-loading processes (default: 0 on CPU; on "
                     "CUDA the cores per process, at most 16)."),
        click.option("--sync-bn/--no-sync-bn", default=None, help="SyncBatchNorm across GPUs under torchrun."),
        click.option("--data-on-device/--no-data-on-device", default=None, help="Keep a CIFAR-sized dataset on "
                     "the GPU as uint8 and augment it there (no loader processes)."),
        click.option("--deterministic/--no-deterministic", default=None, help="Bit-reproducible CUDA kernels: no "
                     "cuDNN autotuning, no TF32 (slower)."),
        click.option("--limit-train-batches", type=click.IntRange(min=1), help="At most N training batches per "
                     "epoch."),
        click.option("--limit-eval-batches", type=click.IntRange(min=1), help="At most N evaluation batches per "
                     "epoch."),
        click.option("--eval-every", type=click.IntRange(min=1), help="Score the test set every N epochs and after "
                     "the last one (default 1); best.pt is chosen among the scored epochs."),
        click.option("--save-every", type=click.IntRange(min=1), help="Also write last.pt every N optimiser steps "
                     "inside an epoch (a resume continues at the next step)."),
        click.option("--skip-bad-images/--no-skip-bad-images", default=None, help="Leave out images that cannot be "
                     "read (counted in the log) instead of stopping with their path."),
        click.option("--print-every", type=click.IntRange(min=1), help="Off a terminal (a log file, nohup, a job "
                     "scheduler): one progress line every N steps (default 50) instead of a bar."),
        click.option("--collective-timeout", type=click.FloatRange(min=1), help="Seconds a rank waits for the "
                     "others under torchrun before the run stops (default 600)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False), required=False)
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue the run of this last.pt exactly (runtime "
              "flags may change, recipe flags may not).")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: runs/<spec name>-<method>).")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out.")
@_recipe_options
@_runtime_options
def train(spec_path, resume, out, overwrite, **flags) -> None:
    """Train the spec's backbone with DKS (or DS / the plain baseline) on CPU, a GPU, or DDP via torchrun.

    \b
      dksgraph train specs/resnet32.yaml --method dks --out runs/r32-dks
      dksgraph train --resume runs/r32-dks/last.pt --device cpu
      torchrun --nproc-per-node 8 -m dksgraph train specs/resnet50.yaml --amp bf16 --channels-last
    """
    from dksgraph.checkpoint import checkpoint_spec, remove_stale_temps
    from dksgraph.spec import apply_overrides, load_spec
    from dksgraph.train import distributed
    from dksgraph.train.runconfig import RunConfig
    from dksgraph.train.runlock import RunLock
    from dksgraph.train.trainer import Trainer, prepare_run_folder

    runtime_names = {f.name for f in fields(RunConfig)}
    runtime = {k: v for k, v in flags.items() if k in runtime_names and v is not None}
    recipe = {k: v for k, v in flags.items() if k not in runtime_names and v is not None}
    ckpt = None
    if resume:
        if spec_path or out:
            raise DksError("`--resume` continues the run in the checkpoint's own folder with its own spec; drop the "
                           "SPEC argument and `--out`.")
        ckpt = _resumable(resume)
        if "optimizer" not in ckpt:
            raise DksError(f"`{resume}` is an untrained checkpoint with no training state; start a run from its "
                           "spec instead of resuming it.")
        spec = checkpoint_spec(ckpt, f"{resume} (its spec)")
        changed = [k for k, v in recipe.items()
                   if k not in RESUMABLE_RECIPE and apply_overrides(spec, **{k: v}) != spec]
        if changed:
            named = ", ".join(f"`--{k.replace('_', '-')} {recipe[k]}`" for k in changed)
            raise DksError(
                f"{named} would change the recipe of the run in `{resume}` halfway through, so its result would "
                "match neither recipe. A resumed run keeps the flags that decide its data and optimisation (method, "
                "dataset, epochs, batch size, learning rate, schedule, seed, subsets, classes); runtime flags "
                "(device, AMP, workers, compile, limits) may change. Drop those flags, or start a new run with them."
            )
        spec = apply_overrides(spec, data_dir=recipe.get("data_dir"))
        config = replace(RunConfig.from_dict(ckpt.get(Key.CONFIG) or {}), **runtime, out=str(Path(resume).parent))
        if config.amp == "fp16" and "amp" not in runtime and (config.device == "cpu" or not _has_cuda()):
            raise DksError(f"the run in `{resume}` trained with `--amp fp16`, which needs a CUDA GPU; to continue it "
                           "here add `--amp bf16` or `--amp none` (runtime settings may change on resume).")
    else:
        if spec_path is None:
            raise DksError("give a spec file (e.g. `dksgraph train specs/resnet32.yaml`) or `--resume last.pt`.")
        spec = apply_overrides(load_spec(spec_path), source=spec_path, **recipe)
        config = RunConfig(out=out or f"runs/{spec.display_name}-{spec.train.method}", **runtime)
    world, folder = distributed.from_env(), Path(config.out)
    lock = RunLock(folder) if world.is_main else None
    trainer, finished = None, False
    try:
        if lock is not None:
            lock.acquire()
            if lock.taken_over:
                click.echo(f"took over {lock.path} from pid {lock.taken_over.get('pid')}, which no longer runs",
                           err=True)
            stale = remove_stale_temps(folder)
            if stale:
                click.echo(f"removed {len(stale)} temp file(s) of writes that a stopped process never finished",
                           err=True)
            if not resume:
                prepare_run_folder(folder, overwrite)
        trainer = Trainer(spec, config, resume=ckpt)
        _train(trainer, spec, config, world)
        finished = True
    finally:
        if trainer is not None:
            trainer.close()
            trainer = None
        distributed.teardown(finished)
        if lock is not None:
            lock.release()


def _train(trainer, spec, config, world) -> None:
    """Run ``trainer`` and report: the summary, a preemption (exit 143 / 130), a dead rank (exit 1)."""
    from dksgraph.errors import RunAborted
    from dksgraph.formatting import format_table
    from dksgraph.train.metrics import SUMMARY_HEADERS, summary_rows
    from dksgraph.train.trainer import Preempted

    if world.is_main:
        data = ("on the device" if config.data_on_device else
                f"DataLoader, {trainer.train_batches.loader.num_workers} workers")
        start = f"epoch {trainer.epoch + 1}" + (f" step {trainer.step + 1}" if trainer.step else "")
        click.echo(f"training {spec.display_name} ({trainer.recipe.method}) on {trainer.device} "
                   f"x{trainer.world.size}: {trainer.train_batches.num_images} train / "
                   f"{trainer.test_batches.num_images} test images ({data}), from {start} to epoch "
                   f"{trainer.recipe.epochs}, run folder {config.out}")
        click.echo("\n".join(trainer.loss_fn.objective.describe()))
        for note in trainer.notes:
            click.echo(f"  {note}")
    try:
        try:
            history = trainer.fit()
        except BaseException as exc:  # its frames hold the DDP wrapper, which must not outlive the process group
            traceback.clear_frames(exc.__traceback__)
            raise
    except Preempted as exc:
        if world.is_main:
            click.echo(f"\n{exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        if world.is_main:
            click.echo(f"\ninterrupted; continue with: dksgraph train --resume {Path(config.out) / 'last.pt'}",
                       err=True)
        raise SystemExit(130) from None
    except RuntimeError as exc:
        if not world.distributed:
            raise
        first = first_line(exc, empty=type(exc).__name__)
        raise RunAborted(
            f"rank {world.rank} lost the other processes of this run ({type(exc).__name__}: {first}): another rank "
            f"died or hung for longer than `--collective-timeout` ({config.collective_timeout:g} s). `"
            f"{Path(config.out) / 'last.pt'}` holds the last saved position; continue with `torchrun ... -m dksgraph "
            f"train --resume {Path(config.out) / 'last.pt'}`."
        ) from None
    if world.is_main and history:
        click.echo(format_table(summary_rows(history, [*trainer.loss_fn.classifiers, ENSEMBLE]), SUMMARY_HEADERS))
        click.echo(f"checkpoints: {Path(config.out) / 'last.pt'}, {Path(config.out) / 'best.pt'}; "
                   f"metrics: {Path(config.out) / 'metrics.csv'}")


def _resumable(path: str) -> dict:
    """The checkpoint to resume, or an error that offers the run's other checkpoint (``best.pt`` for a broken or
    damaged ``last.pt``, and the reverse) when that one is a different file and reads."""
    from dksgraph.checkpoint import load_checkpoint
    from dksgraph.errors import CheckpointError

    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        other = Path(path).with_name(RunFile.LAST if Path(path).name == RunFile.BEST else RunFile.BEST)
        hint = ""
        if other.is_file() and Path(path).is_file() and not os.path.samefile(other, path):
            try:
                older = load_checkpoint(other)
                hint = (f" The run's `{other}` (epoch {older.get('epoch', '?')}) is readable: continue from it with "
                        f"`dksgraph train --resume {other}`.")
            except CheckpointError:
                pass
        raise CheckpointError(f"{exc}{hint}") from None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@click.command(name="eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--dataset", type=click.Choice(DATASETS), help="Default: the dataset the run trained on.")
@click.option("--data-dir", type=click.Path(), help="Default: the run's data folder.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--limit-eval-batches", type=click.IntRange(min=1), help="At most N evaluation batches.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--amp", type=click.Choice(AMP_MODES), default="none", show_default=True,
              help="Evaluate under autocast; full precision by default, whatever the run trained with.")
@click.option("--channels-last", is_flag=True, help="NHWC memory format.")
@click.option("--workers", type=click.IntRange(min=0), help="Data-loading processes (default: 0 on CPU).")
@click.option("--data-on-device", is_flag=True, help="Decode the test set once onto the device (CIFAR-sized data).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the accuracies to this JSON file.")
@click.option("--costs", is_flag=True, help="Also measure every classifier's parameters, FLOPs and CPU latency "
              "(batch 1 and 32): the table for choosing which classifier to ship.")
@click.option("--plot", type=click.Path(dir_okay=False), help="With --costs: accuracy vs FLOPs as PNG or SVG "
              "(needs matplotlib, the `plots` extra).")
def evaluate(checkpoint, dataset, data_dir, batch_size, limit_eval_batches, device, amp, channels_last, workers,
             data_on_device, json_out, costs, plot) -> None:
    """Top-1 / top-5 accuracy of every classifier of a checkpoint, and of their ensemble, on the whole test set.

    Only the model and the test set are built; any checkpoint evaluates on any machine (a run
    trained with `--amp fp16` on GPUs evaluates on a CPU).
    """
    import torch

    from dksgraph.augmented import load_with_checkpoint
    from dksgraph.checkpoint import atomic_write
    from dksgraph.formatting import fmt_shape, format_table
    from dksgraph.spec import apply_overrides
    from dksgraph.train import distributed
    from dksgraph.train.engine import (batches_for, check_amp, configure_backends, evaluate as run_eval, resolve_device,
                                       run_spec)
    from dksgraph.train.runconfig import RunConfig

    model, ckpt = load_with_checkpoint(checkpoint)
    spec = run_spec(apply_overrides(model.spec, dataset=dataset, data_dir=data_dir))
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"test_subset": None})})
    config = RunConfig(device=device, amp=amp, channels_last=channels_last, workers=workers,
                       data_on_device=data_on_device)
    target = resolve_device(device)
    check_amp(amp, target)
    configure_backends(target, deterministic=False)
    model.to(target)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    batches = batches_for(spec, "test", batch_size, config, target, distributed.World())
    record = run_eval(model, batches, model.classifiers, amp=amp, steps=limit_eval_batches)
    names = [*model.classifiers, ENSEMBLE]
    rows = [[n, f"{record[acc1('test', n)]:.2f}", f"{record[acc5('test', n)]:.2f}"]
            for n in names if acc1("test", n) in record]
    click.echo(f"{spec.display_name} ({spec.train.method}), epoch {ckpt.get('epoch', '?')}, {spec.train.dataset} "
               f"test set ({batches.num_images} images{f', first {limit_eval_batches} batches' if limit_eval_batches else ''}"
               f") on {target}{f', {amp} autocast' if amp != 'none' else ''}:")
    click.echo(format_table(rows, ["classifier", "top-1 %", "top-5 %"]))
    if costs:
        from dksgraph.deploy import costs as cost_lib

        measured = cost_lib.classifier_costs(model.eval(), {n: record[acc1("test", n)] for n in names
                                                            if acc1("test", n) in record})
        click.echo(f"\ncosts per classifier (CPU, {torch.get_num_threads()} threads, median of repeated runs; "
                   f"input {fmt_shape(spec.backbone.input_size)}):")
        click.echo(cost_lib.markdown(measured))
        record["costs"] = measured
        if plot:
            click.echo(f"wrote {cost_lib.plot(measured, plot)}")
    elif plot:
        raise DksError("`--plot` draws the costs; add `--costs`.")
    if json_out:
        record.update({"epoch": ckpt.get(Key.EPOCH), "images": batches.num_images, "dataset": spec.train.dataset,
                       "limit_eval_batches": limit_eval_batches})
        atomic_write(json_out, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
        click.echo(f"wrote {json_out}")
