"""Benchmark: training step time of baseline / DS / DKS per backbone, against the FLOPs the branches add.

    python tools/bench_train.py                   # zoo:resnet32 (batch 64) and torchvision:resnet18 (224, batch 16)
    python tools/bench_train.py --steps 20 --json

For each backbone, the three methods' models are built from the spec in `specs/` and stepped in
turn on random data (forward, SynergyLoss, backward, SGD step), ``--steps`` rounds after a
warm-up, so that machine noise hits all three alike; the median step is reported, with its ratio
to baseline, the FLOPs ratio of the augmented vs the plain model (torch.utils.flop_counter,
forward), the share of a step spent in SynergyLoss (its forward + backward on the step's logits)
and peak memory (one fresh process per method; VmHWM on Linux, max allocated on CUDA).
Targets: synergy < 1 % of a DKS step; DKS/baseline step ratio <= 1.05 x the FLOPs ratio; DS and
DKS within 3 %.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = {  # name: (spec, input size, batch)
    "zoo:resnet32": ("resnet32.yaml", 32, 64),
    "torchvision:resnet18": ("resnet18.yaml", 224, 16),
}
METHODS = ("baseline", "ds", "dks")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """One method's model, loss, optimiser and batch, ready to step."""

    def __init__(self, backbone: str, method: str, device: torch.device) -> None:
        from dksgraph.augment import augment
        from dksgraph.loss import SynergyLoss
        from dksgraph.spec import load_spec
        from dksgraph.summary import flops
        from dksgraph.train.engine import run_spec

        spec_file, size, batch = BACKBONES[backbone]
        spec = load_spec(ROOT / "specs" / spec_file)
        spec = spec.model_copy(update={"backbone": spec.backbone.model_copy(update={"input_size": (3, size, size)})})
        torch.manual_seed(0)
        self.device, self.batch, self.size = device, batch, size
        self.model = augment(run_spec(spec, method))
        one = torch.zeros(1, 3, size, size)
        self.flops_ratio = flops(self.model, one) / flops(self.model.backbone, one)
        self.model.to(device)
        self.loss_fn = SynergyLoss.for_model(self.model, method).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        classes = int(spec.backbone.kwargs.get("num_classes", 1000))
        self.x = torch.randn(batch, 3, size, size, device=device)
        self.y = torch.randint(0, classes, (batch,), device=device)

    def step(self) -> dict:
        logits = self.model(self.x)
        out = self.loss_fn(logits, self.y)
        self.opt.zero_grad(set_to_none=True)
        out.total.backward()
        self.opt.step()
        return logits

    def timed(self, fn) -> float:
        sync(self.device)
        start = time.perf_counter()
        fn()
        sync(self.device)
        return time.perf_counter() - start

    def loss_time(self, logits: dict) -> float:
        leaf = {k: v.detach().requires_grad_(True) for k, v in logits.items()}
        return self.timed(lambda: self.loss_fn(leaf, self.y).total.backward())


def time_methods(backbone: str, steps: int, device_name: str) -> dict:
    """Step times of the three methods, interleaved step by step so machine noise hits all alike."""
    device = torch.device(device_name)
    setups = {m: Setup(backbone, m, device) for m in METHODS}
    for s in setups.values():
        for _ in range(3):
            s.step()
    times = {m: [] for m in METHODS}
    for _ in range(steps):
        for m, s in setups.items():
            times[m].append(s.timed(s.step))
    out = {}
    for m, s in setups.items():
        logits = s.step()
        loss_s = statistics.median(s.loss_time(logits) for _ in range(max(steps, 20)))
        step_s = statistics.median(times[m])
        out[m] = {"backbone": backbone, "method": m, "batch": s.batch, "input": s.size, "step_ms": step_s * 1e3,
                  "flops_ratio": s.flops_ratio, "loss_share_pct": 100 * loss_s / step_s,
                  "images_per_s": s.batch / step_s}
    return out


def peak_memory(backbone: str, method: str, device_name: str) -> float:
    """Peak memory (MiB) of a few training steps of one method, in this (fresh) process."""
    device = torch.device(device_name)
    s = Setup(backbone, method, device)
    for _ in range(3):
        s.step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM is this process's own high-water mark (ru_maxrss would include the parent's at fork time)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("BACKBONE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(peak_memory(*args.worker, args.device)))
        return
    rows = []
    for backbone in args.backbones:
        results = time_methods(backbone, args.steps, args.device)
        for method in METHODS:  # one fresh process per method for a clean peak-memory reading
            out = subprocess.run([sys.executable, __file__, "--worker", backbone, method, "--device", args.device],
                                 capture_output=True, text=True, check=True)
            results[method]["peak_mem_mib"] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["baseline"]["step_ms"]
        for method in METHODS:
            r = results[method]
            r["ratio_to_baseline"] = r["step_ms"] / base
            r["ratio_over_flops_ratio"] = r["ratio_to_baseline"] / r["flops_ratio"]
            rows.append(r)
        ds, dks = results["ds"]["step_ms"], results["dks"]["step_ms"]
        results["dks"]["dks_vs_ds_pct"] = 100 * (dks - ds) / ds
    if args.json:
        print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return
    from dksgraph.summary import format_table

    headers = ["backbone", "method", "batch", "input", "step ms", "x baseline", "FLOPs x", "x / FLOPs x",
               "loss % of step", "peak MiB", "img/s"]
    table = [[r["backbone"], r["method"], r["batch"], r["input"], f"{r['step_ms']:.1f}", f"{r['ratio_to_baseline']:.3f}",
              f"{r['flops_ratio']:.3f}", f"{r['ratio_over_flops_ratio']:.3f}", f"{r['loss_share_pct']:.2f}",
              f"{r['peak_mem_mib']:.0f}", f"{r['images_per_s']:.1f}"] for r in rows]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps")
    print(format_table(table, headers))
    for r in rows:
        if "dks_vs_ds_pct" in r:
            print(f"{r['backbone']}: DKS step vs DS step {r['dks_vs_ds_pct']:+.2f}%")


if __name__ == "__main__":
    main()
