"""Benchmark: what the seal costs next to writing and reading a training checkpoint, per spec.

    python tools/bench_checksum.py                              # ResNet-1202, WRN-28-10 and ResNet-32, a table
    python tools/bench_checksum.py specs/resnet110.yaml --repeat 5 --json

For each spec, a checkpoint as ``dksgraph train`` writes it (the AugmentedModel's weights, SGD momentum
buffers, scheduler, RNG, metrics) is saved the way :func:`dksgraph.checkpoint.atomic_write` saves it
(temp file, ``torch.save``, flush, fsync) and timed:

* ``save_s``: the write without its seal; ``seal_s``: sealing that written file (what a sealed save adds);
* ``full_sha256_s``: a SHA-256 over every byte, for comparison (what hashing the tensors again would cost);
* ``verify_s``: checking a sealed file (SHA-256 of its structure, CRC-32 of every record), ``load_s``:
  ``torch.load`` of it (``weights_only=True``), which every read does after the check.

Times are the median of ``--repeat`` runs after one warm-up, with the file in the page cache, on whatever
machine runs this. Target: ``seal_s`` < 10 % of ``save_s``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dksgraph.augmented import augment
from dksgraph.checkpoint import atomic_write, save_checkpoint
from dksgraph.formatting import format_table
from dksgraph.integrity import ZIP, seal_file, verify
from dksgraph.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ("resnet1202", "wrn28_10", "resnet32")


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_payload(spec) -> dict:
    """What the trainer's checkpoint holds, with momentum buffers filled by one SGD step."""
    torch.manual_seed(0)
    model = augment(spec, pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    return {"model": model, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 1,
            "rng": {"torch": torch.get_rng_state()}, "metrics": {"test/acc1/main": 10.0}}


def bench(path: Path, repeat: int, folder: Path) -> dict:
    spec = load_spec(path)
    payload = training_payload(spec)
    sealed = save_checkpoint(folder / "sealed.pt", spec, **payload)
    model = payload.pop("model")
    plain = {"format": "dksgraph/1", "spec": spec.model_dump(mode="json"), "model": model.state_dict(), **payload}
    unsealed = folder / "unsealed.pt"
    save_s = timed(lambda: atomic_write(unsealed, lambda f: torch.save(plain, f)), repeat)
    copy = folder / "copy.pt"

    def seal_once() -> None:  # sealing a fresh copy of the written file, as atomic_write does before the rename
        with open(copy, "r+b") as f:
            seal_file(f, ZIP)

    seal_times = []
    for _ in range(repeat + 1):
        copy.write_bytes(unsealed.read_bytes())
        start = time.perf_counter()
        seal_once()
        seal_times.append(time.perf_counter() - start)
    seal_s = statistics.median(seal_times[1:])

    def full_hash() -> None:
        with open(sealed, "rb") as f:
            hashlib.file_digest(f, "sha256")

    found = verify(sealed)
    return {
        "spec": spec.display_name,
        "file_MB": round(sealed.stat().st_size / 1e6, 1),
        "records": found.records,
        "save_s": round(save_s, 3),
        "seal_s": round(seal_s, 4),
        "seal_pct_of_save": round(100 * seal_s / save_s, 2),
        "full_sha256_s": round(timed(full_hash, repeat), 3),
        "verify_s": round(timed(lambda: verify(sealed), repeat), 3),
        "load_s": round(timed(lambda: torch.load(sealed, map_location="cpu", weights_only=True), repeat), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="*", type=Path, help="spec files (default: ResNet-1202, WRN-28-10, ResNet-32)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    paths = args.specs or [ROOT / "specs" / f"{name}.yaml" for name in DEFAULT]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        rows = [bench(path, args.repeat, Path(tmp)) for path in paths]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"CPU threads: {torch.get_num_threads()}, torch {torch.__version__}")
    headers = list(rows[0])
    print(format_table([[row[h] for h in headers] for row in rows], headers))


if __name__ == "__main__":
    main()
