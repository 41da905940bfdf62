"""Benchmark: training step time of baseline / DS / DKS per backbone, against the FLOPs the branches add.

    python tools/bench_train.py                   # zoo:resnet32 (batch 64) and torchvision:resnet18 (224, batch 16)
    python tools/bench_train.py --steps 20 --json

For each backbone and method, a fresh process builds the model from the spec in `specs/`, runs
warm-up steps on random data, then times ``--steps`` optimiser steps (forward, SynergyLoss,
backward, SGD step; median reported). It reports the ratio to baseline, the FLOPs ratio of the
augmented vs the plain model (torch.utils.flop_counter, forward), the share of a step spent in
SynergyLoss (its forward + backward on the step's logits), and peak memory (max RSS on CPU,
max allocated on CUDA). Targets: synergy < 1 % of a DKS step; DKS/baseline step ratio <= 1.05 x
the FLOPs ratio; DS and DKS within 3 %.
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


def worker(backbone: str, method: str, steps: int, device_name: str) -> dict:
    from dksgraph.augment import augment
    from dksgraph.loss import SynergyLoss
    from dksgraph.spec import load_spec
    from dksgraph.summary import flops
    from dksgraph.train.engine import run_spec

    spec_file, size, batch = BACKBONES[backbone]
    device = torch.device(device_name)
    spec = load_spec(ROOT / "specs" / spec_file)
    spec = spec.model_copy(update={"backbone": spec.backbone.model_copy(update={"input_size": (3, size, size)})})
    torch.manual_seed(0)
    model = augment(run_spec(spec, method)).to(device)
    loss_fn = SynergyLoss.for_model(model, method).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    classes = int(spec.backbone.kwargs.get("num_classes", 1000))
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    one = x[:1].cpu()
    model_flops = flops(model.cpu(), one)
    backbone_flops = flops(model.backbone, one)
    model.to(device)

    def step():
        logits = model(x)
        out = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        return logits

    for _ in range(3):
        logits = step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        logits = step()
        sync(device)
        times.append(time.perf_counter() - start)
    leaf = {k: v.detach().requires_grad_(True) for k, v in logits.items()}
    loss_times = []
    for _ in range(max(steps, 20)):
        sync(device)
        start = time.perf_counter()
        loss_fn(leaf, y).total.backward()
        sync(device)
        loss_times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"backbone": backbone, "method": method, "batch": batch, "input": size, "step_ms": step_s * 1e3,
            "flops_ratio": model_flops / backbone_flops, "loss_share_pct": 100 * statistics.median(loss_times) / step_s,
            "peak_mem_mib": peak, "images_per_s": batch / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("BACKBONE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.device)))
        return
    rows = []
    for backbone in args.backbones:
        results = {}
        for method in METHODS:  # one process per measurement: clean peak memory and allocator state
            out = subprocess.run([sys.executable, __file__, "--worker", backbone, method, "--steps", str(args.steps),
                                  "--device", args.device], capture_output=True, text=True, check=True)
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
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
