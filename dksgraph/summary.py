"""Numbers and tables for the CLI: per-classifier parameters and FLOPs, valid-tap listings.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (one multiply-add counts as 2 FLOPs)
for one image at the spec's input size.

Tables are written with :func:`dksgraph.formatting.format_table`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dksgraph.augmented import AugmentedModel
from dksgraph.formatting import fmt_shape
from dksgraph.fx.graph import Traced
from dksgraph.fx.tracing import EVAL, in_mode

__all__ = ["CLASSIFIER_HEADERS", "TAP_HEADERS", "classifier_rows", "count_parameters", "flops", "tap_rows"]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), in_mode(EVAL, module), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def classifier_rows(model: AugmentedModel) -> tuple[list[list[object]], str]:
    """One summary row per classifier, and a footer with the training overhead vs the backbone."""
    t = model.traced
    param = next(model.backbone.parameters())
    x = torch.zeros((1, *t.input_size), dtype=param.dtype, device=param.device)
    base_flops = flops(model.backbone, x)
    base_params = count_parameters(model.backbone)
    rows: list[list[object]] = [[
        "main (C1)", "-", fmt_shape(t.shapes[t.final]), t.downsamplings[t.final], "backbone", f"{base_params / 1e6:.3f}",
        f"{base_flops / 1e6:.1f}",
    ]]
    extra_params = extra_flops = 0
    for number, plan in enumerate(model.plans, start=2):
        branch = model.branches[plan.label]
        feature = torch.zeros((1, *plan.in_shape), dtype=param.dtype, device=param.device)
        f, p = flops(branch, feature), count_parameters(branch)
        extra_flops += f
        extra_params += p
        rows.append([f"{plan.label} (C{number})", plan.tap, fmt_shape(plan.in_shape), plan.downsamplings,
                     plan.describe(),
                     f"{p / 1e6:.3f}", f"{f / 1e6:.1f}"])
    footer = (f"training overhead vs backbone: +{100 * extra_params / base_params:.1f}% parameters, "
              f"+{100 * extra_flops / max(base_flops, 1):.1f}% FLOPs per image; "
              f"deployed after strip: +0 (the original network)")
    return rows, footer


CLASSIFIER_HEADERS = ["classifier", "tap", "feature", "d", "branch stages (block x depth @channels)", "params(M)",
                      "MFLOPs"]


def tap_rows(t: Traced, auto: dict[str, str], inside_blocks: bool = False) -> list[list[object]]:
    """One row per valid tap: preferred name, node, shape, downsampling count, stage, auto label.

    Cut points inside a block (a residual add before the block's last ReLU) are listed only with
    ``inside_blocks``; a tap there is valid but rarely what one wants.
    """
    block_at = {b.node: b for b in t.blocks}
    stage_end = {s.end.node: s for s in t.stages}
    rows = []
    for q in t.valid_taps():
        if not inside_blocks and q not in block_at and t.inside_block(q):
            continue
        where = ""
        if q in stage_end:
            where = f"end of stage {stage_end[q].name}"
        elif q in block_at:
            where = f"block ({block_at[q].type_name})"
        rows.append([t.alias(q), q if q != t.alias(q) else "", fmt_shape(t.shapes[q]), t.downsamplings[q], where,
                     auto.get(q, "")])
    return rows


TAP_HEADERS = ["tap", "node", "shape", "d", "where", "auto"]
