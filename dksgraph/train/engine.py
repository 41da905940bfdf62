"""The training and evaluation loops of `dksgraph train` / `dksgraph eval`, usable from your own code.

Shaped like torchvision's reference ``train.py``: two free functions that any loop can call,

* :func:`train_one_epoch` (forward, :class:`~dksgraph.loss.SynergyLoss`, backward, step, per-step
  LR schedule, NaN guard, progress bar) and
* :func:`evaluate` (top-1 / top-5 of every classifier and of their ensemble, summed over ranks),

and :class:`Trainer`, which assembles a run from a spec (the recipe: ``spec.train``) and a
:class:`RunConfig` (runtime settings only), and whose :meth:`Trainer.fit` is a thin epoch loop
writing ``last.pt`` / ``best.pt`` and the metrics files (rank 0 only).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dksgraph.augmented import augment
from dksgraph.errors import DksError
from dksgraph.loss import SynergyLoss
from dksgraph.spec import Spec
from dksgraph.train import device_data, distributed
from dksgraph.train import optim as optim_lib
from dksgraph.checkpoint import link_file, save_checkpoint
from dksgraph.train.data import LoaderBatches, Normalizer, ShardSampler, default_workers, load_split, stats_for
from dksgraph.train.metrics import AccuracyCounter, RunLog
from dksgraph.train.runconfig import AMP_MODES, DEVICES, RunConfig
from dksgraph.train.seeds import rng_state, seed_process, set_rng_state

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv")
AMP = dict(zip(AMP_MODES, (None, torch.bfloat16, torch.float16)))


class NonFiniteLoss(DksError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DksError("`--device cuda` was asked for but PyTorch sees no CUDA GPU; use `--device cpu` or `auto`.")
    if name not in DEVICES:
        raise DksError(f"unknown device `{name}`; choose one of {', '.join(DEVICES)}.")
    return torch.device(name)


def check_amp(amp: str, device: torch.device) -> None:
    if amp not in AMP:
        raise DksError(f"unknown AMP mode `{amp}`; choose one of {', '.join(AMP)}.")
    if amp == "fp16" and device.type != "cuda":
        raise DksError("`--amp fp16` needs a CUDA GPU; on CPU use `--amp bf16` or leave AMP off.")


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """On CUDA: cuDNN autotuning and TF32 matmuls, unless ``deterministic`` (bit-reproducible kernels)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


def _autocast(device: torch.device, amp: str):
    return nullcontext() if AMP[amp] is None else torch.autocast(device.type, dtype=AMP[amp])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_spec(spec: Spec) -> Spec:
    """The spec a recipe trains: ``baseline`` has no taps (so its checkpoint strips without branches)."""
    return spec.model_copy(update={"taps": []}) if spec.train.method == "baseline" else spec


def train_one_epoch(net: nn.Module, loss_fn: SynergyLoss, optimizer: torch.optim.Optimizer, batches: Iterable, *,
                    scheduler=None, scaler: torch.amp.GradScaler | None = None, amp: str = "none",
                    steps: int | None = None, epoch: int = 0, epochs: int = 1,
                    on_step: Callable[[int, int], None] | None = None, log_every: int = 10,
                    progress: bool = True) -> dict:
    """One epoch of DKS training over ``batches`` (device-ready ``(x, y)``); returns the epoch's metrics.

    ``scheduler`` is stepped after every optimiser step. The first step is timed apart
    (``train/first_step_s``: compilation and cuDNN autotuning land there) and left out of images/s.
    Raises :class:`NonFiniteLoss` on every rank when any rank's loss is NaN or infinite.
    """
    steps = len(batches) if steps is None else min(steps, len(batches))
    device = loss_fn.weights.device
    net.train()
    names = loss_fn.names
    sums = torch.zeros(len(names), device=device, dtype=torch.float64)
    acc = AccuracyCounter(loss_fn.classifiers, device)
    finite: list[torch.Tensor] = []
    images, first_step_s = 0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress,
               dynamic_ncols=True, leave=False)
    for step, (x, y) in enumerate(itertools.islice(batches, steps)):
        with _autocast(device, amp):
            logits = net(x)
            out = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out.total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            out.total.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        sums += out.components.double() * y.numel()
        acc.update(logits, y)
        finite.append(torch.isfinite(out.total))
        if step == 0:
            _sync(device)
            first_step_s = time.perf_counter() - start
            start, images = time.perf_counter(), 0
        else:
            images += y.numel()
        if on_step is not None:
            on_step(epoch, step)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            _check_finite(finite, epoch, step + 1 - len(finite), device)
            finite = []
            rate = images * max(1, _world_size()) / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{sums[0].item() / acc.seen.item():.3f}",
                            acc=f"{100 * acc.hits[0, 0].item() / acc.seen.item():.1f}%", img_s=f"{rate:.0f}")
        bar.update(1)
    bar.close()
    _sync(device)
    elapsed = time.perf_counter() - start
    for t in (sums, acc.hits, acc.seen):
        distributed.all_reduce_sum(t)
    seen = max(acc.seen.item(), 1.0)
    record = {f"train/{n}": round(v / seen, 6) for n, v in zip(names, sums.tolist())}
    record.update(acc.result("train"))
    if images == 0:  # a one-step epoch: nothing but the first step to time
        images, elapsed = int(seen) // max(1, _world_size()), first_step_s
    record["train/images_per_s"] = round(images * max(1, _world_size()) / max(elapsed, 1e-9), 1)
    record["train/seconds"] = round(elapsed + first_step_s, 2)
    record["train/first_step_s"] = round(first_step_s, 3)
    return record


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _check_finite(flags: list[torch.Tensor], epoch: int, first_step: int, device: torch.device) -> None:
    ok = torch.stack(flags)
    bad_here = not bool(ok.all().item())
    if distributed.any_rank(bad_here, device):
        step = first_step + (int((~ok).nonzero()[0].item()) if bad_here else 0)
        raise NonFiniteLoss(
            f"the training loss became NaN or infinite at epoch {epoch + 1}, step {step + 1}"
            f"{'' if bad_here else ' (on another rank)'}; training stopped and nothing of this epoch was saved. "
            "Lower the learning rate, use `--amp bf16` instead of fp16, or check the data for broken images."
        )


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, classifiers: list[str], *, amp: str = "none",
             steps: int | None = None, progress: bool = True) -> dict:
    """Top-1 / top-5 of every classifier and of the ensemble, and the main classifier's loss, over ``batches``
    (summed over ranks when distributed); the model is put in eval mode."""
    steps = len(batches) if steps is None else min(steps, len(batches))
    model.eval()
    device = next(iter(model.parameters())).device
    acc = AccuracyCounter(classifiers, device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for x, y in tqdm(itertools.islice(batches, steps), total=steps, desc="eval", unit="batch", leave=False,
                     disable=not progress, dynamic_ncols=True):
        with _autocast(device, amp):
            logits = model(x)
        acc.update(logits, y)
        loss_sum += nn.functional.cross_entropy(logits["main"].float(), y, reduction="sum").double()
    for t in (acc.hits, acc.seen, loss_sum):
        distributed.all_reduce_sum(t)
    record = acc.result("test")
    record["test/loss/main"] = round(loss_sum.item() / max(acc.seen.item(), 1.0), 6)
    return record


def batches_for(spec: Spec, split: str, batch_size: int, config: RunConfig, device: torch.device,
                world: distributed.World):
    """The device-ready batches of one split: a DataLoader's, or the on-device path's (``--data-on-device``)."""
    train = spec.train
    num_classes = int(spec.backbone.kwargs.get("num_classes", 1000))
    input_size = spec.backbone.input_size
    is_train = split == "train"
    if config.data_on_device and train.augmentation not in device_data.AUGMENTATIONS:
        raise DksError(
            f"`--data-on-device` reproduces the {' and '.join(device_data.AUGMENTATIONS)} pipelines of "
            f"CIFAR-sized data, not `augmentation: {train.augmentation}`; leave it off for this recipe.")
    dataset, _ = load_split(train, input_size, num_classes, split, transform=not config.data_on_device)
    normalize = Normalizer(*stats_for(train), device, config.channels_last)
    workers = default_workers(device) if config.workers is None else config.workers
    if config.data_on_device:
        images, labels = device_data.decode(dataset, input_size, device, workers)
        return device_data.DeviceBatches(images, labels, batch_size, normalize, train=is_train,
                                         augmentation=train.augmentation, seed=train.seed, rank=world.rank,
                                         world=world.size)
    sampler = ShardSampler(len(dataset), world.rank, world.size, shuffle=is_train, seed=train.seed)
    return LoaderBatches(dataset, batch_size, sampler, normalize, device, workers, is_train, train.seed)


class Trainer:
    """One training run. ``on_step(epoch, step)`` is called after every optimiser step."""

    def __init__(self, spec: Spec, config: RunConfig, resume: dict | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        self.config, self.on_step, self.out = config, on_step, Path(config.out)
        device = resolve_device(config.device)
        self.world = distributed.setup(device)
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
        self.loss_fn = SynergyLoss.for_model(model, recipe.method).to(device)
        per_rank = recipe.batch_size // self.world.size
        self.train_batches = batches_for(self.spec, "train", per_rank, config, device, self.world)
        self.test_batches = batches_for(self.spec, "test", per_rank, config, device, self.world)
        self.steps = len(self.train_batches) if config.limit_train_batches is None else min(
            len(self.train_batches), config.limit_train_batches)
        if self.steps == 0:
            raise DksError(f"the training set ({self.train_batches.num_images} images) holds less than one batch per "
                           f"process ({per_rank} images); lower `--batch-size`.")
        self.optimizer, self.scheduler = optim_lib.build(recipe, model.parameters(), recipe.epochs, self.steps)
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
        net: nn.Module = model
        if self.world.distributed:
            probe = torch.randn(2, *self.spec.backbone.input_size, device=device)
            unused = distributed.unused_parameters(model, self.loss_fn, probe,
                                                   torch.zeros(2, dtype=torch.long, device=device))
            net, note = distributed.wrap(model, device, unused)
            self.notes.append(f"DDP over {self.world.size} processes: {note}")
        self.train_net = torch.compile(net) if config.compile else net
        self.eval_net = torch.compile(model) if config.compile else model
        if config.compile:
            self.notes.append("torch.compile: the training step's forward (model, branches"
                              f"{', DDP' if self.world.distributed else ''}) and the evaluation forward")
        self.epoch, self.best, self.history = 0, -1.0, []
        if resume is not None:
            self._restore(resume)

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.best = float(ckpt.get("best", -1.0))
        self.history = list(ckpt.get("history", []))
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"], self.device)

    def _payload(self, record: dict) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "best": self.best, "rng": rng_state(self.device), "metrics": record,
            "history": self.history, "config": asdict(self.config), "method": self.recipe.method,
        }

    def fit(self) -> list[dict]:
        """Train from the current epoch to the recipe's last; returns the run's history."""
        log = None
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            log = RunLog(self.out, self.history)
        first = True
        try:
            while self.epoch < self.recipe.epochs:
                epoch = self.epoch
                seed_process(self.recipe.seed, epoch, self.world.rank)
                self.train_batches.set_epoch(epoch)
                self.scheduler.seek(epoch)
                record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
                try:
                    record.update(train_one_epoch(
                        self.train_net, self.loss_fn, self.optimizer, self.train_batches, scheduler=self.scheduler,
                        scaler=self.scaler, amp=self.config.amp, steps=self.steps, epoch=epoch,
                        epochs=self.recipe.epochs, on_step=self.on_step, log_every=self.config.log_every,
                        progress=self.world.is_main))
                except NonFiniteLoss as exc:
                    last = self.out / "last.pt"
                    raise NonFiniteLoss(f"{exc}{f' The last good checkpoint `{last}` is intact.' if last.exists() else ''}") from None
                distributed.sync_buffers(self.model)
                started = time.perf_counter()
                record.update(evaluate(self.eval_net, self.test_batches, self.loss_fn.classifiers, amp=self.config.amp,
                                       steps=self.config.limit_eval_batches, progress=self.world.is_main))
                record["test/seconds"] = round(time.perf_counter() - started, 2)
                self.epoch = epoch + 1
                improved = record["test/acc1/main"] > self.best
                self.best = max(self.best, record["test/acc1/main"])
                self.history.append(record)
                if self.world.is_main:
                    save_checkpoint(self.out / "last.pt", self.spec, self.model, **self._payload(record))
                    if improved:
                        link_file(self.out / "last.pt", self.out / "best.pt")
                    log.append(record)
                    if first and self.config.compile:
                        tqdm.write(f"compilation: the first training step took {record['train/first_step_s']:.1f} s "
                                   f"(not counted in img/s), the first evaluation {record['test/seconds']:.1f} s")
                    tqdm.write(_epoch_line(record, self.loss_fn.classifiers))
                first = False
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
