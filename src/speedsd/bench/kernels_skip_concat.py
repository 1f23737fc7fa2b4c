"""The UNet up path's skip concatenation, formed vs unformed, on SD-1.x's 12 up ResNets: correctness and time.

    python -m speedsd.bench.kernels_skip_concat --out bench/results [--smoke]

fp16 channels_last, CFG batch 2 at 64x64 latents (512² images). Per ResNet input cat([x, skip]) (C1 + C2
channels), what reads it, both ways:
  * formed (before): ``torch.cat`` + GroupNorm+SiLU of the concatenation + the 1x1 shortcut as one GEMM;
  * unformed (models/skip_concat.py): the two-source GroupNorm+SiLU (``group_norm(x, concat=skip)``) + the
    shortcut as two GEMMs over the split weight, the second accumulating in place.
Times are CUDA-graph replay (20 calls in one graph, per call: what the engine pays), in us, each part and
the sum; "x step" weighs a row by how often its shape occurs in one UNet step. Correct = the two-source
GroupNorm's error vs fp32 <= 2x torch's fp16 GroupNorm's (expected: equal bit for bit to the one-source
kernel's on the concatenation, same plan; recorded), and the split shortcut's error vs fp32 <= 2x the
one-GEMM shortcut's. Exit code 1 if any shape is wrong or raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench import common
from speedsd.kernels.group_norm import group_norm
from speedsd.models.skip_concat import split_shortcut

GROUPS = 32
# (label, C1 from below, C2 skip, C_out, H = W, ResNets of that shape in one UNet step): 12 in all
SHAPES = [
    ("8² 1280+1280", 1280, 1280, 1280, 8, 3),
    ("16² 1280+1280", 1280, 1280, 1280, 16, 2),
    ("16² 1280+640", 1280, 640, 1280, 16, 1),
    ("32² 1280+640", 1280, 640, 640, 32, 1),
    ("32² 640+640", 640, 640, 640, 32, 1),
    ("32² 640+320", 640, 320, 640, 32, 1),
    ("64² 640+320", 640, 320, 320, 64, 1),
    ("64² 320+320", 320, 320, 320, 64, 2),
]
SMOKE_SHAPES = [("smoke 3² 40+24", 40, 24, 32, 3, 1), ("smoke 4² 24+8 (straddle)", 24, 8, 16, 4, 2)]


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """us per call: CUDA-graph replay on CUDA, wall time on CPU (smoke runs)."""
    if device == "cuda":
        return lambda fn: common.graph_ms(fn) * 1e3
    return lambda fn: common.median_ms(fn, warmup=1, rep=2) * 1e3


@torch.inference_mode()
def _row(shape: tuple[Any, ...], device: str, timer: Callable[[Callable[[], object]], float]) -> dict[str, Any]:
    label, c1, c2, co, hw, count = shape
    cl = torch.channels_last
    h = dict(device=device, dtype=torch.float16)
    x = (torch.randn(2, c1, hw, hw, device=device) * 2 + 0.5).to(**h).contiguous(memory_format=cl)
    s = (torch.randn(2, c2, hw, hw, device=device) * 2 - 0.5).to(**h).contiguous(memory_format=cl)
    w = (torch.randn(c1 + c2, device=device) * 0.5 + 1).to(**h)
    b = (torch.randn(c1 + c2, device=device) * 0.5).to(**h)
    conv = torch.nn.Conv2d(c1 + c2, co, 1, bias=False).to(**h)
    w2d = conv.weight.flatten(1)  # [Co, C1 + C2]

    def gemm(t: torch.Tensor) -> torch.Tensor:  # conv2d_op's 1x1 conv on channels_last input
        return F.linear(t.permute(0, 2, 3, 1), w2d).permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, Co, H, W]

    cat = torch.cat([x, s], dim=1)
    norm = lambda t, **kw: group_norm(t, GROUPS, w, b, 1e-6, True, **kw)
    y = norm(x, concat=s)
    gn_ref = F.silu(F.group_norm(cat.float(), GROUPS, w.float(), b.float(), 1e-6))
    torch_gn = F.silu(F.group_norm(cat, GROUPS, w, b, 1e-6))
    gn_err, torch_gn_err = common.rel_err(y, gn_ref), common.rel_err(torch_gn, gn_ref)
    ref = F.conv2d(cat.float(), conv.weight.float())
    sc_err, gemm_err = common.rel_err(split_shortcut(x, s, conv), ref), common.rel_err(gemm(cat), ref)
    t = {
        "cat_us": timer(lambda: torch.cat([x, s], dim=1)),
        "norm_us": timer(lambda: norm(cat)),
        "gemm_us": timer(lambda: gemm(cat)),
        "norm_dual_us": timer(lambda: norm(x, concat=s)),
        "split_us": timer(lambda: split_shortcut(x, s, conv)),
    }
    before = t["cat_us"] + t["norm_us"] + t["gemm_us"]
    after = t["norm_dual_us"] + t["split_us"]
    return {
        "label": label, "shape": [2, c1, c2, co, hw, hw], "per_step": count, **t,
        "before_us": before, "after_us": after, "saved_step_us": (before - after) * count,
        "norm_bit_exact": torch.equal(y, norm(cat)), "norm_err": gn_err, "torch_norm_err": torch_gn_err,
        "shortcut_err": sc_err, "gemm_err": gemm_err,
        "correct": gn_err <= 2 * torch_gn_err + 1e-7 and sc_err <= 2 * gemm_err + 1e-7,
    }  # fmt: skip


def run(device: str, smoke: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    timer = _timer(device)
    rows, errors = [], []
    for shape in SMOKE_SHAPES if smoke else SHAPES:
        row = common.guard(errors, shape[0], _row, shape, device, timer)
        if row is not None:
            rows.append(row)
    return {"device": device, "smoke": smoke, "rows": rows, "errors": errors}


def markdown(res: dict[str, Any]) -> str:
    head = ["shape", "x step", "cat", "norm", "gemm", "before", "norm 2-src", "split gemm", "after", "saved x step",
            "norm bit-exact"]  # fmt: skip
    body = [
        [r["label"], r["per_step"], r["cat_us"], r["norm_us"], r["gemm_us"], r["before_us"], r["norm_dual_us"],
         r["split_us"], r["after_us"], r["saved_step_us"], r["norm_bit_exact"]]
        for r in res["rows"]
    ]  # fmt: skip
    total = sum(r["saved_step_us"] for r in res["rows"])
    bad = [r["label"] for r in res["rows"] if not r["correct"]] + [e["what"] for e in res["errors"]]
    return (
        "## Skip concatenation: formed vs unformed (us per call, CUDA-graph replay)\n\n"
        + common.md_table(head, body)
        + f"\n\nSaved per UNet step: {total:.1f} us. Wrong or failed: {', '.join(bad) or 'none'}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    a = common.kernel_bench_args("kernels_skip_concat", __doc__).parse_args(argv)
    device, smoke = common.device_and_smoke(a.smoke)
    res = run(device, smoke=smoke)
    ok = not res["errors"] and all(r["correct"] for r in res["rows"])
    return common.publish(a.out, "kernels_skip_concat", res, markdown(res), ok)


if __name__ == "__main__":
    raise SystemExit(main())
