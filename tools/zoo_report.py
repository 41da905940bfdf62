"""Coverage report: every torchvision classification model augmented with `taps: auto` and stripped.

    python tools/zoo_report.py --out docs/zoo.md            # all of torchvision.models.list_models()
    python tools/zoo_report.py resnet18 vit_b_16           # a few, printed

Per model: the input size used (the smallest the family allows), the auto taps, the branch stages,
parameters and MFLOPs (one image) of backbone and branches, seconds to augment, and whether strip
is bit-exact (eval mode, ``torch.equal``), with the reason when a model is refused or fails.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
import warnings
from pathlib import Path

import torch
import torchvision
import torchvision.models as tvm

from dksgraph.augment import augment, count_parameters
from dksgraph.errors import DksError
from dksgraph.models import small_input_size
from dksgraph.spec import parse_spec
from dksgraph.strip import strip
from dksgraph.summary import flops


def report(name: str) -> dict:
    size = small_input_size(f"torchvision:{name}")
    row = {"model": name, "input": size, "taps": "", "branches": "", "backbone_M": "", "branches_M": "",
           "backbone_MFLOPs": "", "branches_MFLOPs": "", "augment_s": "", "strip": "✗", "reason": ""}
    try:
        torch.manual_seed(0)
        spec = parse_spec({"backbone": {"model": f"torchvision:{name}", "kwargs": {"num_classes": 10},
                                        "input_size": [3, size, size]}})
        start = time.perf_counter()
        model = augment(spec)
        row["augment_s"] = f"{time.perf_counter() - start:.2f}"
        row["taps"] = ", ".join(f"{p.label}={p.tap}" for p in model.plans)
        row["branches"] = "; ".join(f"{p.label}: {p.describe()}" for p in model.plans)
        one = torch.zeros(1, 3, size, size)
        row["backbone_M"] = f"{count_parameters(model.backbone) / 1e6:.2f}"
        row["branches_M"] = f"{count_parameters(model.branches) / 1e6:.2f}"
        row["backbone_MFLOPs"] = f"{flops(model.backbone, one) / 1e6:.0f}"
        row["branches_MFLOPs"] = f"{(flops(model, one) - flops(model.backbone, one)) / 1e6:.0f}"
        strip(model)  # raises unless the stripped network's output equals `main` bit for bit
        row["strip"] = "✓"
    except DksError as exc:
        row["reason"] = " ".join(str(exc).split())[:300]
    except Exception as exc:  # a bug: report it rather than stop the whole report
        row["reason"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"
    gc.collect()
    _release_memory()
    return row


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so that 80 models in a row fit in RAM."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def markdown(rows: list[dict]) -> str:
    ok = sum(r["strip"] == "✓" for r in rows)
    lines = [
        "# torchvision coverage",
        "",
        f"**{ok} of {len(rows)}** classification models of torchvision {torchvision.__version__} "
        "augment with `taps: auto`, and strip bit-exactly.",
        "",
        "Regenerate with `python tools/zoo_report.py --out docs/zoo.md` (CPU, torch "
        f"{torch.__version__}). Parameters and MFLOPs are for one image at the input size shown, 10 classes.",
        "",
        "| model | input | auto taps | branch stages | backbone M | branches M | backbone MFLOPs | branches MFLOPs "
        "| augment s | strip | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]).replace("|", "/") for k in r) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="torchvision model names (default: all classification models)")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # GoogLeNet / Inception init notices
    names = args.models or tvm.list_models(module=tvm)
    rows = []
    for name in names:
        rows.append(report(name))
        print(f"{rows[-1]['strip']} {name} {rows[-1]['augment_s']}s {rows[-1]['reason']}", flush=True)
    text = markdown(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
