"""Benchmark: training step time of every method (baseline, DS, DKS, BYOT, DHM, SDN) per backbone, against the
FLOPs the branches add; and (``--throughput``) end-to-end training images/s through dksgraph's own loop and data paths.

    python tools/bench_train.py                   # zoo:resnet32 (batch 64) and torchvision:resnet18 (224, batch 16)
    python tools/bench_train.py --steps 20 --json
    python tools/bench_train.py --throughput --device cuda       # the GPU table of the README

For each backbone, every method's model is built from the spec in `specs/` and stepped in
turn on random data (forward, SynergyLoss, backward, SGD step), ``--steps`` rounds after a
warm-up, so that machine noise hits all alike; the median step is reported, with its ratio
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

from dksgraph.errors import first_line
from dksgraph.objective import PRESETS

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = {  # name: (spec, input size, batch)
    "zoo:resnet32": ("resnet32.yaml", 32, 64),
    "torchvision:resnet18": ("resnet18.yaml", 224, 16),
}
METHODS = tuple(PRESETS)  # baseline, ds, dks, byot, dhm, sdn: the order of the ratios
# --throughput rows: the baseline and the two branch methods of the paper; on ResNet-32 every method with branches
# costs the same per step (the step-time table), so the other presets would only lengthen the table
THROUGHPUT_METHODS = ("baseline", "ds", "dks")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """One method's model, loss, optimiser and batch, ready to step."""

    def __init__(self, backbone: str, method: str, device: torch.device, channels_last: bool = False) -> None:
        from dksgraph.augmented import augment
        from dksgraph.loss import SynergyLoss
        from dksgraph.spec import apply_overrides, load_spec
        from dksgraph.summary import flops
        from dksgraph.train.engine import run_spec

        spec_file, size, batch = BACKBONES[backbone]
        spec = apply_overrides(load_spec(ROOT / "specs" / spec_file), input_size=(3, size, size), method=method)
        torch.manual_seed(0)
        self.device, self.batch, self.size = device, batch, size
        self.model = augment(run_spec(spec))
        one = torch.zeros(1, 3, size, size)
        self.flops_ratio = flops(self.model, one) / flops(self.model.backbone, one)
        self.model.to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)
        self.loss_fn = SynergyLoss.for_model(self.model, method).to(device)
        self.model.with_features = self.loss_fn.hints
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        classes = int(spec.backbone.kwargs.get("num_classes", 1000))
        self.x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, classes, (batch,), device=device)

    def step(self):
        """One training step; returns the model's output (the logits, and the hint features where there are)."""
        output = self.model(self.x)
        out, _ = self.loss_fn.of_output(output, self.y)
        self.opt.zero_grad(set_to_none=True)
        out.total.backward()
        self.opt.step()
        return output

    def timed(self, fn) -> float:
        sync(self.device)
        start = time.perf_counter()
        fn()
        sync(self.device)
        return time.perf_counter() - start

    def loss_time(self, output) -> float:
        leaf = [{k: v.detach().requires_grad_(True) for k, v in part.items()}
                for part in (output if isinstance(output, tuple) else (output,))]
        return self.timed(lambda: self.loss_fn.of_output(tuple(leaf) if len(leaf) > 1 else leaf[0],
                                                         self.y)[0].total.backward())


def time_methods(backbone: str, steps: int, device_name: str, channels_last: bool = False) -> dict:
    """Step times of every method, interleaved step by step so machine noise hits all alike."""
    device = torch.device(device_name)
    setups = {m: Setup(backbone, m, device, channels_last) for m in METHODS}
    for s in setups.values():
        for _ in range(3):
            s.step()
    times = {m: [] for m in METHODS}
    for _ in range(steps):
        for m, s in setups.items():
            times[m].append(s.timed(s.step))
    out = {}
    for m, s in setups.items():
        output = s.step()
        loss_s = statistics.median(s.loss_time(output) for _ in range(max(steps, 20)))
        step_s = statistics.median(times[m])
        out[m] = {"backbone": backbone, "method": m, "batch": s.batch, "input": s.size, "step_ms": step_s * 1e3,
                  "flops_ratio": s.flops_ratio, "loss_share_pct": 100 * loss_s / step_s,
                  "images_per_s": s.batch / step_s}
    return out


def peak_memory(backbone: str, method: str, device_name: str, channels_last: bool = False) -> float:
    """Peak memory (MiB) of a few training steps of one method, in this (fresh) process."""
    device = torch.device(device_name)
    s = Setup(backbone, method, device, channels_last)
    for _ in range(3):
        s.step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM is this process's own high-water mark (ru_maxrss would include the parent's at fork time)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ throughput

class CifarLike(torch.utils.data.Dataset):
    """Random uint8 images kept in memory and served as torchvision's CIFAR10 serves them (PIL, then the
    transform), so the DataLoader path does the work it does on the real dataset."""

    def __init__(self, n: int, transform) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen).numpy()
        self.labels = torch.randint(0, 10, (n,), generator=gen).tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class FixedBatches:
    """The same uint8 batch over and over, already on the device (data loading out of the picture)."""

    def __init__(self, batch: int, size: int, classes: int, normalize, device) -> None:
        self.x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        self.y = torch.randint(0, classes, (batch,), device=device)
        self.normalize = normalize

    def __len__(self) -> int:
        return 1 << 30

    def __iter__(self):
        while True:
            yield self.normalize(self.x), self.y


THROUGHPUT = [  # (spec, input size, batch, data paths)
    ("resnet32.yaml", 32, 128, ("loader", "device")),
    ("resnet50.yaml", 224, 128, ("synthetic",)),
]


def throughput(spec_file: str, size: int, batch: int, method: str, data: str, compile_: bool, device: torch.device,
               steps: int, images: int, workers: int | None) -> dict:
    """Images/s of dksgraph's own training loop (bf16 autocast, channels-last) for one configuration."""
    from dksgraph.augmented import augment
    from dksgraph.loss import SynergyLoss
    from dksgraph.spec import apply_overrides, load_spec
    from dksgraph.train import device_data, optim as optim_lib
    from dksgraph.train.data import LoaderBatches, Normalizer, ShardSampler, default_workers, transforms_for
    from dksgraph.train.engine import EpochOptions, configure_backends, run_spec, train_one_epoch

    spec = apply_overrides(load_spec(ROOT / "specs" / spec_file), input_size=(3, size, size), method=method,
                           num_classes=10, batch_size=batch)
    configure_backends(device, deterministic=False)
    torch.manual_seed(0)
    model = augment(run_spec(spec)).to(device).to(memory_format=torch.channels_last)
    loss_fn = SynergyLoss.for_model(model, method).to(device)
    model.with_features = loss_fn.hints
    optimizer, scheduler = optim_lib.build(spec.train, model.parameters(), 1, steps)
    normalize = Normalizer((0.5,) * 3, (0.25,) * 3, device, channels_last=True)
    workers = default_workers(device) if workers is None else workers
    if data == "synthetic":
        batches = FixedBatches(batch, size, 10, normalize, device)
    elif data == "loader":
        dataset = CifarLike(images, transforms_for("cifar", (3, size, size), train=True))
        batches = LoaderBatches(dataset, batch, ShardSampler(len(dataset)), normalize, device, workers, train=True)
    else:
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
        labels = torch.randint(0, 10, (images,), generator=gen).to(device)
        batches = device_data.DeviceBatches(pixels, labels, batch, normalize, train=True, augmentation="cifar")
    net = torch.compile(model) if compile_ else model
    common = dict(scheduler=scheduler, amp="bf16", show_progress=False)
    warm = train_one_epoch(net, loss_fn, optimizer, batches, EpochOptions(steps=3, **common))  # compile, autotune
    timed = train_one_epoch(net, loss_fn, optimizer, batches, EpochOptions(steps=steps, epoch=1, **common))
    return {"backbone": spec.backbone.model, "input": size, "batch": batch, "method": method, "data": data,
            "workers": workers if data == "loader" else 0, "compile": compile_, "images_per_s": timed["train/images_per_s"],
            "first_step_s": warm["train/first_step_s"]}


def throughput_table(args) -> list[dict]:
    """Every row of the table, each in its own try: a row that fails is kept with its error and the table goes
    on; after ``args.seconds`` no new row starts. With ``args.save`` the table is written after every row, so
    that a run killed at a deadline keeps the rows it finished."""
    device = torch.device(args.device)
    rows = []
    start = time.perf_counter()
    for spec_file, size, batch, paths in THROUGHPUT:
        if args.specs and spec_file.removesuffix(".yaml") not in args.specs:
            continue
        batch = args.batch or batch
        for data in paths:
            for compile_ in {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]:
                for method in THROUGHPUT_METHODS:
                    if args.seconds and time.perf_counter() - start > args.seconds:
                        print(f"--seconds {args.seconds} reached: the rows after {len(rows)} are left out",
                              file=sys.stderr)
                        return rows
                    try:
                        row = throughput(spec_file, size, batch, method, data, compile_, device, args.steps,
                                         args.images, args.workers)
                    except Exception as error:  # noqa: BLE001 - one failing row is reported, the table goes on
                        row = {"backbone": spec_file.removesuffix(".yaml"), "input": size, "batch": batch,
                               "method": method, "data": data, "workers": 0, "compile": compile_,
                               "images_per_s": None, "first_step_s": None,
                               "error": f"{type(error).__name__}: {first_line(error, 160)}"}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if args.save:
                        save_throughput(args, rows)
    return rows


def throughput_text(args, rows: list[dict]) -> tuple[dict, str]:
    """The table as JSON-ready data and as text; a failed row shows its error in place of the figures."""
    from dksgraph.formatting import format_table

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    result = {"device": name, "torch": torch.__version__, "steps": args.steps, "rows": rows}
    table = [[r["backbone"], r["input"], r["batch"], r["method"], r["data"], r["workers"],
              "yes" if r["compile"] else "no",
              *((f"{r['images_per_s']:.0f}", f"{r['first_step_s']:.1f}") if r["images_per_s"] is not None
                else ("failed", r["error"]))] for r in rows]
    text = "\n".join([
        f"{name}, torch {torch.__version__}, bf16 autocast + channels-last, {args.steps} timed steps after 3 "
        "warm-up steps (compilation and autotuning land in the warm-up)", "",
        format_table(table, ["backbone", "input", "batch", "method", "data", "workers", "compile", "img/s",
                             "first step s"])])
    return result, text


def save_throughput(args, rows: list[dict]) -> None:
    result, text = throughput_text(args, rows)
    Path(args.save + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.save + ".md").write_text("```\n" + text + "\n```\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="step times in NHWC memory format (as "
                        "`dksgraph train --channels-last`)")
    parser.add_argument("--throughput", action="store_true", help="end-to-end images/s of the training loop: "
                        "ResNet-32 (DataLoader vs on-device data) and ResNet-50 at 224 (synthetic), bf16 + "
                        "channels-last, with and without torch.compile")
    parser.add_argument("--batch", type=int, help="with --throughput: override every batch size (e.g. a quick check)")
    parser.add_argument("--images", type=int, default=50_000, help="with --throughput: CIFAR-sized images in memory")
    parser.add_argument("--workers", type=int, help="with --throughput: loader processes (default: dksgraph's)")
    parser.add_argument("--specs", nargs="*", help="with --throughput: only these rows (resnet32, resnet50)")
    parser.add_argument("--compile", choices=["both", "off", "on"], default="both",
                        help="with --throughput: rows without and/or with torch.compile")
    parser.add_argument("--save", metavar="PREFIX", help="with --throughput: also write PREFIX.json and PREFIX.md "
                        "(rewritten after every row)")
    parser.add_argument("--seconds", type=float, help="with --throughput: start no new row after this many seconds")
    parser.add_argument("--worker", nargs=2, metavar=("BACKBONE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(peak_memory(*args.worker, args.device, args.channels_last)))
        return
    if args.throughput:
        rows = throughput_table(args)
        result, text = throughput_text(args, rows)
        if args.save:
            save_throughput(args, rows)
        print(json.dumps(result, indent=2) if args.json else text)
        return
    rows = []
    for backbone in args.backbones:
        results = time_methods(backbone, args.steps, args.device, args.channels_last)
        for method in METHODS:  # one fresh process per method for a clean peak-memory reading
            out = subprocess.run([sys.executable, __file__, "--worker", backbone, method, "--device", args.device,
                                  *(["--channels-last"] if args.channels_last else [])],
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
    from dksgraph.formatting import format_table

    headers = ["backbone", "method", "batch", "input", "step ms", "x baseline", "FLOPs x", "x / FLOPs x",
               "loss % of step", "peak MiB", "img/s"]
    table = [[r["backbone"], r["method"], r["batch"], r["input"], f"{r['step_ms']:.1f}", f"{r['ratio_to_baseline']:.3f}",
              f"{r['flops_ratio']:.3f}", f"{r['ratio_over_flops_ratio']:.3f}", f"{r['loss_share_pct']:.2f}",
              f"{r['peak_mem_mib']:.0f}", f"{r['images_per_s']:.1f}"] for r in rows]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'channels-last' if args.channels_last else 'NCHW'}, median of {args.steps} steps")
    print(format_table(table, headers))
    for r in rows:
        if "dks_vs_ds_pct" in r:
            print(f"{r['backbone']}: DKS step vs DS step {r['dks_vs_ds_pct']:+.2f}%")


if __name__ == "__main__":
    main()
