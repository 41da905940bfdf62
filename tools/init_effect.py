"""How branch initialisation changes the start of DKS training: PyTorch's defaults vs the backbone's own scheme.

    make data/cifar10                       # extracts ../shared/data/cifar10-jpeg.tar.gz
    python tools/init_effect.py --data-dir data/cifar10 --steps 200

Trains DKS ResNet-32 (specs/resnet32.yaml, 10 classes) on CIFAR-10 at lr 0.1 without warm-up, once
with ``branch_init: pytorch`` and once with ``branch_init: backbone``, from the same seed and data
order, and prints every 25 steps the mean training loss of those steps and the largest |logit| of
any classifier on the last batch (JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from dksgraph.augmented import augment
from dksgraph.formatting import format_table
from dksgraph.loss import SynergyLoss
from dksgraph.spec import apply_overrides, load_spec
from dksgraph.train import distributed
from dksgraph.train import optim as optim_lib
from dksgraph.train.engine import batches_for
from dksgraph.train.runconfig import RunConfig
from dksgraph.train.seeds import seed_process

ROOT = Path(__file__).resolve().parent.parent


def run(init: str, data_dir: str, steps: int, every: int, batch: int) -> list[dict]:
    spec = apply_overrides(load_spec(ROOT / "specs" / "resnet32.yaml"), num_classes=10, dataset="imagefolder",
                           data_dir=data_dir, lr=0.1, warmup_epochs=0, batch_size=batch)
    spec = spec.model_copy(update={"branch_init": init})
    torch.manual_seed(spec.train.seed)
    model = augment(spec)
    loss_fn = SynergyLoss.for_model(model)
    batches = batches_for(spec, "train", batch, RunConfig(device="cpu"), torch.device("cpu"), distributed.World())
    optimizer, scheduler = optim_lib.build(spec.train, model.parameters(), spec.train.epochs, len(batches))
    seed_process(spec.train.seed, 0, 0)
    batches.set_epoch(0)
    model.train()
    rows, window = [], []
    for step, (x, y) in enumerate(itertools.islice(batches, steps), start=1):
        logits = model(x)
        out = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        optimizer.step()
        scheduler.step()
        window.append(out.total.item())
        if step == 1 or step % every == 0:
            peak = max(v.detach().abs().max().item() for v in logits.values())
            rows.append({"init": init, "step": step, "loss": sum(window) / len(window), "max_abs_logit": peak})
            window = []
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/cifar10", help="CIFAR-10 as train/ and test/ class folders")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {init: run(init, args.data_dir, args.steps, args.every, args.batch) for init in ("pytorch", "backbone")}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    table = [[a["step"], f"{a['loss']:.3f}", f"{b['loss']:.3f}", f"{a['max_abs_logit']:.1f}", f"{b['max_abs_logit']:.1f}"]
             for a, b in zip(results["pytorch"], results["backbone"])]
    print(f"DKS ResNet-32, CIFAR-10, lr 0.1, no warm-up, batch {args.batch}, CPU; loss = mean of the steps since the "
          "previous row")
    print(format_table(table, ["step", "loss (pytorch init)", "loss (backbone init)", "max|logit| (pytorch)",
                               "max|logit| (backbone)"]))


if __name__ == "__main__":
    main()
