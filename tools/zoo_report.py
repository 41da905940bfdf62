"""Coverage report: classification models augmented with `taps: auto` and stripped.

    python tools/zoo_report.py --out docs/zoo.md              # all of torchvision.models.list_models()
    python tools/zoo_report.py --timm --out docs/zoo_timm.md  # TIMM_SAMPLE: 72 timm models, every family
    python tools/zoo_report.py resnet18 timm:dla34            # a few, printed

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

from dksgraph.augmented import augment
from dksgraph.summary import count_parameters
from dksgraph.errors import DksError
from dksgraph.models import small_input_size
from dksgraph.spec import parse_spec
from dksgraph.deploy import strip
from dksgraph.summary import flops


# A broad sample of timm (ImageNet classification) models: one or more per family, at most ~30M parameters.
TIMM_SAMPLE = """
resnet18 resnet50d resnet26t seresnet18 ecaresnet26t skresnet18 res2net50_14w_8s resnest14d resnext26ts
wide_resnet50_2 regnetx_002 regnety_002 regnetz_b16 efficientnet_b0 efficientnet_lite0 tf_efficientnetv2_b0
mobilenetv2_050 mobilenetv3_small_050 mobilenetv4_conv_small mnasnet_small fbnetc_100 spnasnet_100 ghostnet_100
hrnet_w18_small dla34 dpn48b densenet121 vgg11 repvgg_a0 rexnet_100 lcnet_050 tinynet_e convnext_atto
convnextv2_atto cspresnet50 cspdarknet53 selecsls42b xception41 inception_v3 gernet_s nf_resnet26 resnetv2_50
ese_vovnet19b_dw hardcorenas_a mixnet_s tresnet_m deit_tiny_patch16_224 vit_tiny_patch16_224
swin_tiny_patch4_window7_224 levit_128s efficientformer_l1 poolformer_s12 mobilevit_xxs edgenext_xx_small
fastvit_t8 efficientvit_b0 repvit_m0_9 xcit_nano_12_p16_224 pvt_v2_b0 twins_pcpvt_small mvitv2_tiny
inception_next_tiny davit_tiny gcvit_xxtiny hgnet_tiny hgnetv2_b0 mixer_s32_224 resmlp_12_224 gmlp_ti16_224
coatnet_nano_rw_224 maxvit_nano_rw_256 focalnet_tiny_srf
""".split()


def report(model_name: str) -> dict:
    name = model_name.partition(":")[2]
    size = small_input_size(model_name)
    row = {"model": name, "input": size, "taps": "", "branches": "", "backbone_M": "", "branches_M": "",
           "backbone_MFLOPs": "", "branches_MFLOPs": "", "augment_s": "", "strip": "✗", "reason": ""}
    try:
        torch.manual_seed(0)
        spec = parse_spec({"backbone": {"model": model_name, "kwargs": {"num_classes": 10},
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


def markdown(rows: list[dict], source: str) -> str:
    ok = sum(r["strip"] == "✓" for r in rows)
    if source == "timm":
        import timm

        title, what = "timm coverage", f"sampled models of timm {timm.__version__} (`TIMM_SAMPLE` in the tool)"
        command = "python tools/zoo_report.py --timm --out docs/zoo_timm.md"
    else:
        title, what = "torchvision coverage", f"classification models of torchvision {torchvision.__version__}"
        command = "python tools/zoo_report.py --out docs/zoo.md"
    lines = [
        f"# {title}",
        "",
        f"**{ok} of {len(rows)}** {what} augment with `taps: auto`, and strip bit-exactly.",
        "",
        f"Regenerate with `{command}` (CPU, torch {torch.__version__}). Parameters and MFLOPs are for one "
        "image at the input size shown, 10 classes.",
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
    parser.add_argument("models", nargs="*",
                        help="model names, `timm:` prefixed for timm (default: every torchvision classification model)")
    parser.add_argument("--timm", action="store_true", help="report TIMM_SAMPLE instead (needs timm)")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # GoogLeNet / Inception init notices
    if args.models:
        names = [n if ":" in n else f"torchvision:{n}" for n in args.models]
    else:
        names = [f"timm:{n}" for n in TIMM_SAMPLE] if args.timm else [f"torchvision:{n}" for n in
                                                                     tvm.list_models(module=tvm)]
    rows = []
    for name in names:
        rows.append(report(name))
        print(f"{rows[-1]['strip']} {name} {rows[-1]['augment_s']}s {rows[-1]['reason']}", flush=True)
    text = markdown(rows, "timm" if all(n.startswith("timm:") for n in names) else "torchvision")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
