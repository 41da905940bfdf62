"""The training and evaluation loops of `dksgraph train` / `dksgraph eval`, usable from your own code.

Shaped like torchvision's reference ``train.py``: two free functions that any loop can call,

* :func:`train_one_epoch` (forward, :class:`~dksgraph.loss.SynergyLoss`, backward, step, per-step
  LR schedule, NaN guard, progress bar) and
* :func:`evaluate` (top-1 / top-5 of every classifier and of their ensemble, summed over ranks),

and :func:`batches_for`, the device-ready batches of a split. :class:`dksgraph.train.trainer.Trainer`
assembles a run from them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dksgraph.errors import DksError
from dksgraph.loss import SynergyLoss
from dksgraph.names import MAIN, loss_key
from dksgraph.spec import Spec
from dksgraph.train import device_data, distributed
from dksgraph.train.data import LoaderBatches, Normalizer, ShardSampler, default_workers, load_split, stats_for
from dksgraph.train.metrics import AccuracyCounter
from dksgraph.train.progress import PRINT_EVERY, progress as progress_report
from dksgraph.train.runconfig import AMP_MODES, DEVICES, RunConfig
from dksgraph.train.seeds import seed_process

__all__ = ["AMP", "EpochOptions", "EpochProgress", "NonFiniteLoss", "batches_for", "check_amp", "configure_backends",
           "evaluate", "resolve_device", "run_spec", "train_one_epoch"]

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


class EpochProgress:
    """What an epoch has gathered so far (loss sums, hit counts, images, timings): a mid-epoch checkpoint holds
    it (summed over ranks), so a resumed epoch reports what the uninterrupted one would have."""

    def __init__(self, names: list[str], classifiers: list[str], device: torch.device) -> None:
        self.sums = torch.zeros(len(names), device=device, dtype=torch.float64)
        self.acc = AccuracyCounter(classifiers, device)
        self.images, self.elapsed, self.first_step_s = 0, 0.0, 0.0

    def global_state(self) -> dict:
        """The progress of every rank together (a collective: call it on every rank)."""
        sums, hits, seen = (distributed.all_reduce_sum(t.clone()) for t in (self.sums, self.acc.hits, self.acc.seen))
        return {"sums": sums.cpu(), "hits": hits.cpu(), "seen": seen.cpu(), "images": self.images,
                "elapsed": self.elapsed, "first_step_s": self.first_step_s}

    def load(self, state: dict, mine: bool) -> None:
        """Continue from :meth:`global_state`; one rank (``mine``) takes the sums, so that summing over ranks
        at the end of the epoch counts them once."""
        if mine:
            self.sums.copy_(state["sums"])
            self.acc.hits.copy_(state["hits"])
            self.acc.seen.copy_(state["seen"])
        self.images, self.elapsed, self.first_step_s = state["images"], state["elapsed"], state["first_step_s"]


@dataclass
class EpochOptions:
    """How :func:`train_one_epoch` runs an epoch; every field has the default of a plain, single-process epoch."""

    scheduler: Any = None  # stepped after every optimiser step (RecipeLR or any LR scheduler)
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
    amp: str = "none"  # none, bf16 or fp16 autocast
    steps: int | None = None  # steps in the epoch (default: len(batches) + start_step)
    epoch: int = 0  # zero-based, for the RNG streams and the progress label
    epochs: int = 1  # for the progress label
    start_step: int = 0  # a resumed epoch starts here, ``batches`` positioned there
    resumed: EpochProgress | None = None  # what the epoch gathered before start_step
    seed: int | None = None  # reseed the process RNGs (dropout) from (seed, epoch, step, rank) before every step
    rank: int = 0
    on_step: Callable[[int, int], None] | None = None  # called with (epoch, step) after every step
    finite_check_every: int = 10  # steps between the all-rank checks for a non-finite loss
    show_progress: bool = True  # a bar on a terminal, a line every print_every steps elsewhere
    print_every: int = PRINT_EVERY


def train_one_epoch(net: nn.Module, loss_fn: SynergyLoss, optimizer: torch.optim.Optimizer, batches: Iterable,
                    options: EpochOptions | None = None) -> dict:
    """One epoch of DKS training over ``batches`` (device-ready ``(x, y)``).

    Args:
        net: the AugmentedModel (or its compiled or DDP-wrapped form); it returns ``{classifier: logits}``.
        loss_fn: the SynergyLoss for its classifiers.
        optimizer: any optimiser over the model's parameters.
        batches: an iterable of device-ready ``(images, labels)``.
        options: scheduler, AMP, resumption, seeding and progress (:class:`EpochOptions`).

    Returns:
        The epoch's metrics: ``train/<loss component>``, ``train/acc1/<classifier>``, images/s, seconds and
        the first step's seconds.

    With ``options.seed``, the process RNGs are reseeded before every step, so an epoch resumed at
    ``start_step`` continues exactly. The first step this call runs is timed apart (``train/first_step_s``:
    compilation and cuDNN autotuning land there) and left out of images/s. Raises :class:`NonFiniteLoss` on
    every rank when any rank's loss is NaN or infinite.
    """
    o = options or EpochOptions()
    scheduler, scaler, amp, steps, epoch, start_step = o.scheduler, o.scaler, o.amp, o.steps, o.epoch, o.start_step
    seed, rank, on_step, log_every, print_every = o.seed, o.rank, o.on_step, o.finite_check_every, o.print_every
    total = len(batches) + start_step if steps is None else steps
    device = loss_fn.weights.device
    net.train()
    names = loss_fn.names
    state = o.resumed or EpochProgress(names, loss_fn.classifiers, device)
    sums, acc = state.sums, state.acc
    finite: list[torch.Tensor] = []
    first = True
    start = time.perf_counter()
    bar = progress_report(total, f"epoch {epoch + 1}/{o.epochs}", initial=start_step, enabled=o.show_progress,
                          every=print_every)
    for step, (x, y) in enumerate(itertools.islice(batches, total - start_step), start=start_step):
        if seed is not None:
            seed_process(seed, epoch, rank, step)
        with _autocast(device, amp):
            out, logits = loss_fn.of_output(net(x), y, epoch * total + step)
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
        now = time.perf_counter()
        if first:
            _sync(device)
            now = time.perf_counter()
            state.first_step_s += now - start
            first = False
        else:
            state.images += y.numel()
            state.elapsed += now - start
        start = now
        checked = (step + 1) % log_every == 0 or step + 1 == total
        if checked:  # every rank at the same steps: a collective
            _check_finite(finite, epoch, step + 1 - len(finite), device)
            finite = []
        if checked or (step + 1) % print_every == 0:  # a progress line shows the statistics of its own step
            rate = state.images * distributed.world_size() / max(state.elapsed, 1e-9)
            bar.set_postfix(loss=f"{sums[0].item() / acc.seen.item():.3f}",
                            acc=f"{100 * acc.hits[0, 0].item() / acc.seen.item():.1f}%", img_s=f"{rate:.0f}")
        bar.update(1)
        if on_step is not None:
            on_step(epoch, step)
    bar.close()
    _sync(device)
    for t in (sums, acc.hits, acc.seen):
        distributed.all_reduce_sum(t)
    seen = max(acc.seen.item(), 1.0)
    record = {f"train/{n}": round(v / seen, 6) for n, v in zip(names, sums.tolist())}
    record.update(acc.result("train"))
    images, elapsed = state.images, state.elapsed
    if images == 0:  # a one-step epoch: nothing but the first step to time
        images, elapsed = int(seen) // distributed.world_size(), state.first_step_s
    record["train/images_per_s"] = round(images * distributed.world_size() / max(elapsed, 1e-9), 1)
    record["train/seconds"] = round(state.elapsed + state.first_step_s, 2)
    record["train/first_step_s"] = round(state.first_step_s, 3)
    return record


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
    bar = progress_report(steps, "eval", enabled=progress)
    for x, y in itertools.islice(batches, steps):
        with _autocast(device, amp):
            logits = model(x)
        acc.update(logits, y)
        loss_sum += nn.functional.cross_entropy(logits[MAIN].float(), y, reduction="sum").double()
        bar.update(1)
    bar.close()
    for t in (acc.hits, acc.seen, loss_sum):
        distributed.all_reduce_sum(t)
    record = acc.result("test")
    record[loss_key("test", MAIN)] = round(loss_sum.item() / max(acc.seen.item(), 1.0), 6)
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
        images, labels = device_data.decode(dataset, input_size, device, workers, config.skip_bad_images)
        return device_data.DeviceBatches(images, labels, batch_size, normalize, train=is_train,
                                         augmentation=train.augmentation, seed=train.seed, rank=world.rank,
                                         world=world.size)
    sampler = ShardSampler(len(dataset), world.rank, world.size, shuffle=is_train, seed=train.seed)
    return LoaderBatches(dataset, batch_size, sampler, normalize, device, workers, is_train, train.seed,
                         config.skip_bad_images)
