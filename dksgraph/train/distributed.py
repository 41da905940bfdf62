"""Process groups under `torchrun`, DDP wrapping, and the few collectives training needs.

Under ``torchrun`` (RANK, WORLD_SIZE and LOCAL_RANK in the environment) :func:`setup` initialises
the default process group: NCCL when the run uses CUDA, gloo on CPU. Even a one-process torchrun
run is distributed (DDP-wrapped), so one GPU can check the whole path. Without torchrun the run is
a world of one and every collective here is a no-op. Multi-node runs use ``torchrun --nnodes N
--node-rank I --rdzv-endpoint HOST:PORT ...`` on every node with the same command.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "all_reduce_sum", "any_rank", "barrier", "from_env", "gather_ints", "main_first", "setup",
           "sync_buffers", "teardown", "unused_parameters", "world_size", "wrap"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # by torchrun: the model is DDP-wrapped, even in a world of one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launched


def from_env() -> World:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True)


def setup(device: torch.device, timeout: float) -> World:
    """Join the process group torchrun describes (if any); pins this process to its GPU on CUDA.

    A collective that waits longer than ``timeout`` seconds (``RunConfig.collective_timeout``) for the other ranks (one of them died)
    fails instead of hanging.
    """
    world = from_env()
    if world.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    return world


def teardown(finished: bool) -> None:
    """Leave the process group so that nothing of it outlives the interpreter: call it once the DDP wrapper
    (which holds the group) is dropped. A finished run first waits for every rank (no rank destroys the group
    while another still uses it); then the group is destroyed and collected, which joins gloo's worker threads
    while Python is fully alive. A gloo group still referenced when the interpreter shuts down has its threads
    release Python tensors during finalisation, which aborts the process ("terminate called without an active
    exception", exit -6), so that a run that finished would be reported as failed by torchrun or a scheduler.
    """
    if not dist.is_initialized():
        return
    if finished and _active():
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def world_size() -> int:
    """The number of processes of the run (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def _active() -> bool:
    return world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity in a world of one)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (used to stop all ranks together)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def gather_ints(value: int, device: torch.device) -> list[int]:
    """``value`` of every rank, in rank order (``[value]`` in a world of one)."""
    if not _active():
        return [value]
    mine = torch.tensor([value], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


def barrier() -> None:
    if _active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (a download, say) while the others wait; yields whether this is rank 0.

    Rank 0 releases the others even when its block fails, so nobody hangs at the barrier.
    """
    world = from_env()
    if _active() and not world.is_main:
        dist.barrier()
    try:
        yield world.is_main
    finally:
        if _active() and world.is_main:
            dist.barrier()


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Make every rank's buffers equal: floating ones (BatchNorm running statistics) are averaged over
    ranks, as timm's ``distribute_bn(reduce=True)``, the others (counters) taken from rank 0.

    Called before evaluating and before saving, so that the accuracy a run reports is the saved
    model's and every rank evaluates the same network.
    """
    if not _active():
        return
    size = dist.get_world_size()
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(size)
        else:
            dist.broadcast(buf, 0)


def unused_parameters(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Names of the trainable parameters that get no gradient from ``loss`` on a probe batch.

    GoogLeNet's and Inception's auxiliary heads, or any backbone output the loss ignores, never
    reach it; DDP would wait for their gradients forever. The probe runs in train mode and leaves
    no trace: buffers (BatchNorm statistics), gradients and RNG states are restored.
    """
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.zero_grad(set_to_none=True)
        was_training = model.training
        model.train()
        try:
            loss.of_output(model(x), y)[0].total.backward()
        finally:
            model.train(was_training)
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(saved[name])
    return unused


def wrap(model: nn.Module, device: torch.device, unused: list[str]) -> tuple[nn.Module, str]:
    """``model`` in DistributedDataParallel, told to ignore ``unused`` parameters; and a line saying how."""
    note = "every parameter reaches the loss"
    options: dict = {}
    if unused:
        count = sum(model.get_parameter(n).numel() for n in unused)
        modules = sorted({".".join(n.split(".")[:2]) for n in unused})
        where = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
        ignore = getattr(nn.parallel.DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
        if ignore is not None:
            ignore(model, unused)
            how = "DDP ignores them (they keep their values, as in a one-process run)"
        else:
            options["find_unused_parameters"] = True
            how = "DDP runs with find_unused_parameters=True"
        note = f"{len(unused)} parameter tensors ({count / 1e6:.3f}M, in {where}) never reach the loss; {how}"
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **options), note
