"""A training run: :class:`Trainer` assembles model, loss, data, optimiser and DDP from a spec (the recipe)
and a :class:`~dksgraph.train.runconfig.RunConfig` (runtime settings), and :meth:`Trainer.fit` loops over
:func:`~dksgraph.train.engine.train_one_epoch` and :func:`~dksgraph.train.engine.evaluate`.

What it guarantees, whatever happens to the process:

* ``last.pt`` after every epoch, and every ``save_every`` steps inside one (with the position in
  the epoch), written atomically by rank 0; ``best.pt`` a hard link to the best epoch's ``last.pt``.
  A resumed run continues at the next step and, on CPU, ends bit-identical to an uninterrupted one.
* SIGTERM or SIGINT (preemption, Ctrl-C): every rank finishes its current step, they agree on where
  to stop, ``last.pt`` is written, and :class:`Preempted` is raised (exit 143 or 130); a second
  Ctrl-C stops at once.
* A failed save (disk full, no permission) stops every rank with the path and the cause; the
  previous ``last.pt`` stays intact.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dksgraph.augmented import augment
from dksgraph.checkpoint import link_file, save_checkpoint
from dksgraph.errors import DksError, RunAborted
from dksgraph.loss import SynergyLoss
from dksgraph.names import ENSEMBLE, MAIN, Key, RunFile, acc1
from dksgraph.spec import Spec
from dksgraph.train import distributed, optim as optim_lib
from dksgraph.train.engine import (EpochOptions, EpochProgress, NonFiniteLoss, batches_for, check_amp,
                                   configure_backends, evaluate, resolve_device, run_spec, train_one_epoch)
from dksgraph.train.metrics import RunLog
from dksgraph.train.runconfig import RunConfig
from dksgraph.train.seeds import rng_state, set_rng_state

__all__ = ["EXIT_CODES", "RUN_FILES", "Preempted", "Trainer", "prepare_run_folder"]

RUN_FILES = (RunFile.LAST, RunFile.BEST, RunFile.METRICS, RunFile.METRICS_CSV)
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Preempted(DksError):
    """The run stopped on SIGTERM or SIGINT after saving ``last.pt``."""

    def __init__(self, signum: int, epoch: int, step: int, last: Path) -> None:
        self.exit_code = EXIT_CODES.get(signum, 143)
        name = signal.Signals(signum).name
        where = f"epoch {epoch + 1}, after step {step}" if step else f"the end of epoch {epoch}"
        super().__init__(f"stopped by {name} at {where}; `{last}` holds the run. Continue it with: "
                         f"dksgraph train --resume {last}")


class Trainer:
    """One training run. ``on_step(epoch, step)`` is called after every optimiser step."""

    def __init__(self, spec: Spec, config: RunConfig, resume: dict | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        self.config, self.on_step, self.out = config, on_step, Path(config.out)
        device = resolve_device(config.device)
        self.world = distributed.setup(device, config.collective_timeout)
        if self.world.distributed and device.type == "cuda":
            device = torch.device("cuda", self.world.local_rank)
        self.device = device
        check_amp(config.amp, device)
        configure_backends(device, config.deterministic)
        self.spec = run_spec(spec)
        self.recipe = recipe = self.spec.train
        if recipe.batch_size % self.world.size:
            raise DksError(f"batch size {recipe.batch_size} (the global batch) does not split evenly over "
                           f"{self.world.size} processes; pick a multiple of {self.world.size}.")
        if config.sync_bn and device.type != "cuda":
            raise DksError("`--sync-bn` synchronises BatchNorm statistics between GPUs (NCCL); it needs CUDA. "
                           "Leave it off on CPU.")
        torch.manual_seed(recipe.seed)  # the same initial weights on every rank
        model = augment(self.spec, pretrained=resume is None)
        self.notes: list[str] = []
        if config.sync_bn and self.world.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.notes.append("BatchNorm layers synchronised across GPUs (SyncBatchNorm)")
        model = model.to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        per_rank = recipe.batch_size // self.world.size
        self.train_batches = batches_for(self.spec, "train", per_rank, config, device, self.world)
        self.test_batches = batches_for(self.spec, "test", per_rank, config, device, self.world)
        self.steps = len(self.train_batches) if config.limit_train_batches is None else min(
            len(self.train_batches), config.limit_train_batches)
        if self.steps == 0:
            raise DksError(f"the training set ({self.train_batches.num_images} images) holds less than one batch per "
                           f"process ({per_rank} images); lower `--batch-size`.")
        self.loss_fn = SynergyLoss.for_model(model, recipe.method, recipe.epochs * self.steps, recipe.seed).to(device)
        model.with_features = self.loss_fn.hints
        self.optimizer, self.scheduler = optim_lib.build(recipe, model.parameters(), recipe.epochs, self.steps)
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
        net: nn.Module = model
        if self.world.distributed:
            probe = torch.randn(2, *self.spec.backbone.input_size, device=device)
            unused = distributed.unused_parameters(model, self.loss_fn, probe,
                                                   torch.zeros(2, dtype=torch.long, device=device))
            net, note = distributed.wrap(model, device, unused)
            self.notes.append(f"DDP over {self.world.size} processes: {note}")
        if device.type == "cpu":  # the thread count decides float rounding: runs agree bit for bit only when it does
            threads = distributed.gather_ints(torch.get_num_threads(), device)
            self.notes.append(f"CPU threads per process: {', '.join(map(str, threads))}" + (
                " (rank order)" if len(threads) > 1 else ""))
        self.train_net = torch.compile(net) if config.compile else net
        self.eval_net = torch.compile(model) if config.compile else model
        if config.compile:
            self.notes.append("torch.compile: the training step's forward (model, branches"
                              f"{', DDP' if self.world.distributed else ''}) and the evaluation forward")
        self.epoch, self.step, self.best, self.history = 0, 0, -1.0, []
        self.resumed_progress: dict | None = None
        self.stop_signal: int | None = None
        if resume is not None:
            self._restore(resume)

    # ------------------------------------------------------------------ state

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt[Key.MODEL], strict=True)
        self.optimizer.load_state_dict(ckpt[Key.OPTIMIZER])
        if self.scaler is not None and ckpt.get(Key.SCALER):
            self.scaler.load_state_dict(ckpt[Key.SCALER])
        self.epoch = int(ckpt[Key.EPOCH])
        self.step = int(ckpt.get(Key.STEP) or 0)
        if self.step >= self.steps:
            raise DksError(f"the checkpoint stopped after step {self.step} of epoch {self.epoch + 1}, but this run "
                           f"has {self.steps} steps per epoch (a smaller `--limit-train-batches`?); resume it with "
                           "the limit it was trained with.")
        self.resumed_progress = ckpt.get(Key.PROGRESS) if self.step else None
        self.best = float(ckpt.get(Key.BEST, -1.0))
        self.history = list(ckpt.get(Key.HISTORY, []))
        if ckpt.get(Key.RNG):
            set_rng_state(ckpt[Key.RNG], self.device)

    def _payload(self, record: dict, step: int = 0, progress: dict | None = None) -> dict:
        return {
            Key.OPTIMIZER: self.optimizer.state_dict(), Key.SCHEDULER: self.scheduler.state_dict(),
            Key.SCALER: self.scaler.state_dict() if self.scaler is not None else None,
            Key.EPOCH: self.epoch, Key.STEP: step, Key.PROGRESS: progress, Key.BEST: self.best,
            Key.RNG: rng_state(self.device), Key.METRICS: record, Key.HISTORY: self.history,
            Key.CONFIG: asdict(self.config), Key.METHOD: self.recipe.method,
        }

    def _save(self, record: dict, step: int = 0, progress: dict | None = None, best: bool = False) -> None:
        """Rank 0 writes ``last.pt`` (and links ``best.pt``); every rank learns whether that worked."""
        failure = None
        if self.world.is_main:
            try:
                save_checkpoint(self.out / RunFile.LAST, self.spec, self.model, **self._payload(record, step, progress))
                if best:
                    link_file(self.out / RunFile.LAST, self.out / RunFile.BEST)
            except DksError as exc:
                failure = exc
        if distributed.any_rank(failure is not None, self.device):
            raise failure or RunAborted("rank 0 could not write the run's checkpoint (its log says why); every "
                                        "rank stopped.")

    # ------------------------------------------------------------------ stopping

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.stop_signal = signum
        if self.world.is_main:
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step and saving last.pt "
                       "(Ctrl-C again to stop at once)")

    def _stop_here(self, step: int) -> bool:
        """Whether to stop after ``step``: every rank answers alike (they agree every ``log_every`` steps)."""
        if not self.world.distributed:
            return self.stop_signal is not None
        if (step + 1) % self.config.log_every and step + 1 != self.steps:
            return False
        return distributed.any_rank(self.stop_signal is not None, self.device)

    def _after_step(self, epoch: int, step: int, progress: EpochProgress) -> None:
        if self.on_step is not None:
            self.on_step(epoch, step)
        done = step + 1
        stop = done < self.steps and self._stop_here(step)
        every = self.config.save_every
        if stop or (every and done % every == 0 and done < self.steps):
            self._check_weights(epoch, done)
            self._save(self.history[-1] if self.history else {}, done, progress.global_state())
        if stop:
            raise Preempted(self.stop_signal or signal.SIGTERM, epoch, done, self.out / RunFile.LAST)

    def _check_weights(self, epoch: int, step: int) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise NonFiniteLoss(f"the weights became NaN or infinite by epoch {epoch + 1}, step {step}; nothing of "
                                "this epoch was saved. Lower the learning rate, use `--amp bf16` instead of fp16, or "
                                "check the data.")

    # ------------------------------------------------------------------ the loop

    def close(self) -> None:
        """Drop the DDP wrapper (and compiled forwards): it holds the process group, which
        :func:`~dksgraph.train.distributed.teardown` must be the last to release."""
        self.train_net = self.eval_net = None

    def fit(self) -> list[dict]:
        """Train from the current position to the recipe's last epoch; returns the run's history."""
        log = None
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            log = RunLog(self.out, self.history)
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # a signal the process was started
            # ignoring (SIGINT of a shell's background job) stays ignored, as Python itself leaves it
            handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)
                        if signal.getsignal(s) is not signal.SIG_IGN}
        first = True
        try:
            while self.epoch < self.recipe.epochs:
                record = self._epoch(self.epoch, self.step)
                self.step = 0
                self.epoch += 1
                score = record.get(acc1("test", MAIN))  # None on an epoch that was not scored (--eval-every)
                improved = score is not None and score > self.best
                self.best = max(self.best, score) if score is not None else self.best
                self.history.append(record)
                self._save(record, best=improved)
                if self.world.is_main:
                    log.append(record)
                    if first and self.config.compile:
                        tqdm.write(f"compilation: the first training step took {record['train/first_step_s']:.1f} s "
                                   f"(not counted in img/s), the first evaluation {record['test/seconds']:.1f} s")
                    tqdm.write(_epoch_line(record, self.loss_fn.classifiers))
                first = False
                distributed.barrier()
                if distributed.any_rank(self.stop_signal is not None, self.device) and self.epoch < self.recipe.epochs:
                    raise Preempted(self.stop_signal or signal.SIGTERM, self.epoch, 0, self.out / RunFile.LAST)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
            if log is not None:
                log.close()
        return self.history

    def _epoch(self, epoch: int, start: int) -> dict:
        self.train_batches.set_epoch(epoch, start)
        self.scheduler.seek(epoch, start)
        progress = EpochProgress(self.loss_fn.names, self.loss_fn.classifiers, self.device)
        if start and self.resumed_progress is not None:
            progress.load(self.resumed_progress, mine=self.world.is_main)
        record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        skipped = getattr(self.train_batches, "skipped", 0)
        try:
            record.update(train_one_epoch(self.train_net, self.loss_fn, self.optimizer, self.train_batches, EpochOptions(
                scheduler=self.scheduler, scaler=self.scaler, amp=self.config.amp, steps=self.steps, epoch=epoch,
                epochs=self.recipe.epochs, start_step=start, resumed=progress, seed=self.recipe.seed,
                rank=self.world.rank, on_step=lambda e, s: self._after_step(e, s, progress),
                finite_check_every=self.config.log_every, show_progress=self.world.is_main,
                print_every=self.config.print_every)))
        except NonFiniteLoss as exc:
            last = self.out / RunFile.LAST
            raise NonFiniteLoss(f"{exc}{f' The last good checkpoint `{last}` is intact.' if last.exists() else ''}") from None
        if self.config.skip_bad_images:
            record["train/skipped_images"] = getattr(self.train_batches, "skipped", 0) - skipped
        distributed.sync_buffers(self.model)
        if (epoch + 1) % self.config.eval_every and epoch + 1 < self.recipe.epochs:
            return record
        started = time.perf_counter()
        record.update(evaluate(self.eval_net, self.test_batches, self.loss_fn.classifiers, amp=self.config.amp,
                               steps=self.config.limit_eval_batches, progress=self.world.is_main))
        record["test/seconds"] = round(time.perf_counter() - started, 2)
        return record


def _epoch_line(record: dict, classifiers: list[str]) -> str:
    accs = " ".join(f"{c}={record[acc1('test', c)]:.2f}" for c in [*classifiers, ENSEMBLE]
                    if acc1("test", c) in record)
    skipped = f", {record['train/skipped_images']} unreadable images skipped" if record.get("train/skipped_images") else ""
    return (f"epoch {record['epoch']}: loss {record['train/total']:.4f}, train acc {record[acc1('train', MAIN)]:.2f}%, "
            f"{f'test top-1 {accs}, ' if accs else ''}{record['train/images_per_s']:.0f} img/s{skipped}")


def prepare_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder that already holds a run, unless ``overwrite`` (then its run files are removed)."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise DksError(
            f"`{out}` already holds a run ({', '.join(existing)}). Continue it with `--resume {out / 'last.pt'}`, "
            "start over with `--overwrite`, or pick another `--out`."
        )
    for name in existing:
        (out / name).unlink()
