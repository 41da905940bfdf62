"""Benchmark: trace+augment and strip+verify time per spec, with parameter counts.

    python tools/bench_augment.py                       # every spec in specs/, a table
    python tools/bench_augment.py specs/resnet152.yaml --repeat 5 --json

Times are the median of ``--repeat`` runs after one warm-up, on whatever CPU runs this
(``torch.get_num_threads()`` threads). Targets on a 2-core CPU: augment <= 1 s for resnet152
and densenet100; strip with verification <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dksgraph.augmented import augment
from dksgraph.summary import count_parameters
from dksgraph.models import build_backbone
from dksgraph.spec import load_spec
from dksgraph.deploy import strip
from dksgraph.formatting import fmt_shape, format_table

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeat: int) -> tuple[float, object]:
    result = fn()  # warm-up (first-call allocations, lazy imports)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(path: Path, repeat: int) -> dict:
    spec = load_spec(path)
    backbone = build_backbone(spec.backbone)
    torch.manual_seed(0)
    augment_s, model = timed(lambda: augment(spec, backbone), repeat)
    strip_s, _ = timed(lambda: strip(model), repeat)
    return {
        "spec": spec.display_name,
        "model": spec.backbone.model,
        "input": fmt_shape(spec.backbone.input_size),
        "augment_s": round(augment_s, 3),
        "strip_verify_s": round(strip_s, 3),
        "backbone_params_M": round(count_parameters(model.backbone) / 1e6, 3),
        "branch_params_M": round(count_parameters(model.branches) / 1e6, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="*", type=Path, help="spec files (default: all of specs/)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    paths = args.specs or sorted((ROOT / "specs").glob("*.yaml"))
    rows = [bench(p, args.repeat) for p in paths]
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=2))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, median of {args.repeat} runs")
    print(format_table([list(r.values()) for r in rows], list(rows[0])))


if __name__ == "__main__":
    main()
