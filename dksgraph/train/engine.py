"""The training and evaluation loops of `dksgraph train` / `dksgraph eval`.

:class:`Trainer` builds everything a run needs from a spec and a :class:`RunConfig`, trains with
:class:`~dksgraph.loss.SynergyLoss`, evaluates every classifier and their ensemble each epoch,
and writes ``last.pt`` / ``best.pt`` and the metrics files (rank 0 only). Resuming from
``last.pt`` restores model, optimiser, scheduler, scaler, epoch and RNG states; the data order is
a function of (seed, epoch), so a resumed CPU run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dksgraph.augment import augment
from dksgraph.errors import DksError
from dksgraph.loss import SynergyLoss
from dksgraph.spec import Spec
from dksgraph.train import distributed
from dksgraph.train import optim as optim_lib
from dksgraph.train.checkpoint import save_checkpoint
from dksgraph.train.data import ShardSampler, build_datasets, make_loader
from dksgraph.train.metrics import AccuracyCounter, RunLog

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv")


@dataclass
class RunConfig:
    """Everything about a run besides the spec; stored in every checkpoint as ``config``."""

    method: str = "dks"
    out: str = "runs/run"
    dataset: str = "synthetic"
    data_dir: str = "./data"
    epochs: int = 1
    batch_size: int = 64
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    workers: int | None = None
    log_every: int = 10

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DksError("`--device cuda` was asked for but PyTorch sees no CUDA GPU; use `--device cpu` or `auto`.")
    if name not in ("cpu", "cuda"):
        raise DksError(f"unknown device `{name}`; choose auto, cpu or cuda.")
    return torch.device(name)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_spec(spec: Spec, method: str) -> Spec:
    """The spec a method trains: ``baseline`` has no taps (so its checkpoint strips without branches)."""
    return spec.model_copy(update={"taps": []}) if method == "baseline" else spec


class Trainer:
    """One training run. ``on_step(epoch, step)`` is called after every optimiser step."""

    def __init__(self, spec: Spec, config: RunConfig, resume: dict | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.world = distributed.setup(self.device)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        if config.amp == "fp16" and self.device.type != "cuda":
            raise DksError("`--amp fp16` needs a CUDA GPU; on CPU use `--amp bf16` or leave AMP off.")
        if config.batch_size % self.world.size:
            raise DksError(f"batch size {config.batch_size} (the global batch) does not split evenly over "
                           f"{self.world.size} processes; pick a multiple of {self.world.size}.")
        self.on_step = on_step
        self.out = Path(config.out)
        self.spec = run_spec(spec, config.method)
        torch.manual_seed(config.seed)
        model = augment(self.spec).to(self.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.loss_fn = SynergyLoss.for_model(model, config.method).to(self.device)
        self.optimizer, self.scheduler = optim_lib.build(self.spec.train, model.parameters(), config.epochs)
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
        net: nn.Module = model
        if self.world.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.world.local_rank] if self.device.type == "cuda" else None)
        self.net = torch.compile(net) if config.compile else net
        num_classes = int(self.spec.backbone.kwargs.get("num_classes", 1000))
        self.data = build_datasets(config.dataset, config.data_dir, self.spec.train.augmentation,
                                   self.spec.backbone.input_size, num_classes, config.train_subset, config.seed,
                                   config.test_subset)
        self.epoch, self.best, self.history = 0, -1.0, []
        if resume is not None:
            self._restore(resume)

    # ------------------------------------------------------------------ state

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.best = float(ckpt.get("best", -1.0))
        self.history = list(ckpt.get("history", []))
        set_rng_state(ckpt["rng"])

    def _payload(self, record: dict) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "best": self.best, "rng": rng_state(), "metrics": record,
            "history": self.history, "config": asdict(self.config), "method": self.config.method,
        }

    # ------------------------------------------------------------------ loops

    def _autocast(self):
        if self.config.amp == "none":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.config.amp == "bf16" else torch.float16)

    def _loader(self, dataset, train: bool, epoch: int):
        sampler = ShardSampler(len(dataset), self.world.rank, self.world.size, shuffle=train,
                               seed=self.config.seed, pad=train)
        sampler.set_epoch(epoch)
        workers = self.config.workers
        if workers is None:
            workers = 4 if self.device.type == "cuda" else 0
        return make_loader(dataset, self.config.batch_size // self.world.size, sampler, workers,
                           self.device.type == "cuda", drop_last=False, seed=self.config.seed)

    def _to_device(self, x, y):
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def train_epoch(self, epoch: int) -> dict:
        loader = self._loader(self.data.train, True, epoch)
        steps = len(loader) if self.config.limit_train_batches is None else min(len(loader),
                                                                              self.config.limit_train_batches)
        self.net.train()
        names = self.loss_fn.names
        sums = torch.zeros(len(names), device=self.device, dtype=torch.float64)
        acc = AccuracyCounter(self.loss_fn.classifiers, self.device)
        finite: list[torch.Tensor] = []
        images, start = 0, time.perf_counter()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="batch",
                   disable=not self.world.is_main, dynamic_ncols=True, leave=False)
        scheduled = [g["lr"] for g in self.optimizer.param_groups]
        warmup_steps = self.spec.train.schedule.warmup_epochs * steps
        for step, (x, y) in enumerate(itertools.islice(loader, steps)):
            if epoch * steps + step < warmup_steps:
                factor = (epoch * steps + step + 1) / warmup_steps
                for group, lr in zip(self.optimizer.param_groups, scheduled):
                    group["lr"] = lr * factor
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = self.net(x)
                out = self.loss_fn(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(out.total).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                out.total.backward()
                self.optimizer.step()
            sums += out.components.double() * y.numel()
            acc.update(logits, y)
            finite.append(torch.isfinite(out.total))
            images += y.numel()
            if self.on_step is not None:
                self.on_step(epoch, step)
            if (step + 1) % self.config.log_every == 0 or step + 1 == steps:
                self._check_finite(finite, epoch, step + 1 - len(finite))
                finite = []
                rate = images * self.world.size / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{sums[0].item() / acc.seen.item():.3f}",
                                acc=f"{100 * acc.hits[0, 0].item() / acc.seen.item():.1f}%", img_s=f"{rate:.0f}")
            bar.update(1)
        bar.close()
        for group, lr in zip(self.optimizer.param_groups, scheduled):
            group["lr"] = lr  # the per-epoch scheduler continues from the un-warmed value
        elapsed = time.perf_counter() - start
        distributed.all_reduce_sum(sums)
        distributed.all_reduce_sum(acc.hits)
        distributed.all_reduce_sum(acc.seen)
        seen = max(acc.seen.item(), 1.0)
        record = {f"train/{n}": round(v / seen, 6) for n, v in zip(names, sums.tolist())}
        record.update(acc.result("train"))
        record["train/images_per_s"] = round(images * self.world.size / max(elapsed, 1e-9), 1)
        record["train/seconds"] = round(elapsed, 2)
        return record

    def _check_finite(self, flags: list[torch.Tensor], epoch: int, first_step: int) -> None:
        ok = torch.stack(flags)
        bad_here = not bool(ok.all().item())
        if distributed.any_rank(bad_here, self.device):
            step = first_step + (int((~ok).nonzero()[0].item()) if bad_here else 0)
            last = self.out / "last.pt"
            raise DksError(
                f"the training loss became NaN or infinite at epoch {epoch + 1}, step {step + 1}"
                f"{'' if bad_here else ' (on another rank)'}; training stopped and nothing of this epoch was "
                f"saved{f' (the last good checkpoint `{last}` is intact)' if last.exists() else ''}. Lower the "
                "learning rate, use `--amp bf16` instead of fp16, or check the data for broken images."
            )

    @torch.no_grad()
    def evaluate(self, limit: int | None = None) -> dict:
        loader = self._loader(self.data.test, False, 0)
        self.model.eval()
        acc = AccuracyCounter(self.loss_fn.classifiers, self.device)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        steps = len(loader) if limit is None else min(limit, len(loader))
        for x, y in tqdm(itertools.islice(loader, steps), total=steps, desc="eval", unit="batch", leave=False,
                         disable=not self.world.is_main, dynamic_ncols=True):
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = self.model(x)
            acc.update(logits, y)
            loss_sum += nn.functional.cross_entropy(logits["main"].float(), y, reduction="sum").double()
        for t in (acc.hits, acc.seen, loss_sum):
            distributed.all_reduce_sum(t)
        record = acc.result("test")
        record["test/loss/main"] = round(loss_sum.item() / max(acc.seen.item(), 1.0), 6)
        return record

    def fit(self) -> list[dict]:
        """Train from the current epoch to ``config.epochs``; returns the run's history."""
        log = None
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            log = RunLog(self.out, self.history)
        try:
            while self.epoch < self.config.epochs:
                epoch = self.epoch
                lr = self.optimizer.param_groups[0]["lr"]
                record = {"epoch": epoch + 1, "lr": lr}
                record.update(self.train_epoch(epoch))
                record.update(self.evaluate(self.config.limit_eval_batches))
                self.scheduler.step()
                self.epoch = epoch + 1
                improved = record["test/acc1/main"] > self.best
                self.best = max(self.best, record["test/acc1/main"])
                self.history.append(record)
                if self.world.is_main:
                    payload = self._payload(record)
                    save_checkpoint(self.out / "last.pt", self.spec, self.model, **payload)
                    if improved:
                        save_checkpoint(self.out / "best.pt", self.spec, self.model, **payload)
                    log.append(record)
                    tqdm.write(_epoch_line(record, self.loss_fn.classifiers))
                distributed.barrier()
        finally:
            if log is not None:
                log.close()
        return self.history


def _epoch_line(record: dict, classifiers: list[str]) -> str:
    accs = " ".join(f"{c}={record[f'test/acc1/{c}']:.2f}" for c in [*classifiers, "ensemble"]
                    if f"test/acc1/{c}" in record)
    return (f"epoch {record['epoch']}: loss {record['train/total']:.4f}, train acc {record['train/acc1/main']:.2f}%, "
            f"test top-1 {accs}, {record['train/images_per_s']:.0f} img/s")


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

