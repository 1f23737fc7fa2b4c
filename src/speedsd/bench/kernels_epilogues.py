"""Conv epilogues on SD-1.4's shapes: per-channel bias add (+ residual) and nearest 2x upsampling vs torch.

    python -m speedsd.bench.kernels_epilogues --out bench/results [--nchw] [--smoke]

Bias add: every conv output shape of the VAE decoder at 512² (batch 1) and of the UNet at 64x64
latents (CFG batch 2), fp16 channels_last (``--nchw`` adds NCHW rows). Ours is
``bias_add(x, b, out=x)`` (in place, as the lead calls it after a bias-free conv) against torch's
``x.add_(b.view(1, C, 1, 1))`` (what a conv with bias runs); "+res" rows add a residual too
(``bias_add(x, b, r, out=x)`` vs ``x.add_(b.view(1, C, 1, 1)).add_(r)``). Upsample: the VAE's three
nearest 2x inputs and 1x256x256², ``upsample_nearest2x(x)`` vs ``F.interpolate(x, scale_factor=2)``.

Clock: CUDA-graph replay (``common.graph_ms``: 20 calls in one graph, median replay / 20; what the
engine pays). Bytes moved: bias 2·|x|, bias+res 3·|x|, upsample 5·|x| (read x, write 4x); "% copy" is
that rate over the device copy bandwidth measured in the same run. Correct: bias add within 2x torch's
fp16 error vs an fp32 reference (and the out-of-place call equal to the in-place one, x's strides
kept); upsample bit-equal to F.interpolate with the same strides. Exit 1 if any row is wrong.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench import common

ba = importlib.import_module("speedsd.kernels.bias_add")
up = importlib.import_module("speedsd.kernels.upsample")

# (model, N, C, H=W) of the conv outputs: VAE decoder at 512² (mid + up blocks 512, 512, 256, 128)
# and the UNet at 64x64 latents with classifier-free guidance (batch 2)
VAE_BIAS = [("vae", 1, 512, 64), ("vae", 1, 512, 128), ("vae", 1, 512, 256), ("vae", 1, 256, 256),
            ("vae", 1, 256, 512), ("vae", 1, 128, 512)]  # fmt: skip
UNET_BIAS = [("unet", 2, 320, 64), ("unet", 2, 640, 32), ("unet", 2, 1280, 16), ("unet", 2, 1280, 8)]
# the VAE decoder's three upsampler inputs, and 1x256x256²
UPSAMPLE = [("vae", 1, 512, 64), ("vae", 1, 512, 128), ("vae", 1, 512, 256), ("extra", 1, 256, 256)]
SMOKE_BIAS = [("smoke", 1, 16, 8), ("smoke", 2, 12, 5)]  # CPU interpreter dry run
SMOKE_UPSAMPLE = [("smoke", 1, 16, 8), ("smoke", 2, 5, 7)]
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """us per call: CUDA-graph replay on CUDA, wall time on CPU (smoke runs)."""
    if device == "cuda":
        return lambda fn: common.graph_ms(fn) * 1e3
    return lambda fn: common.median_ms(fn, warmup=1, rep=3) * 1e3


def _input(n: int, c: int, h: int, layout: str, device: str, mean: float = 0.5, std: float = 2.0) -> torch.Tensor:
    x = torch.randn(n, c, h, h, device=device) * std + mean
    return x.half().contiguous(memory_format=FORMATS[layout])


def _rates(nbytes: int, ours_us: float, torch_us: float, copy_gbs: float | None) -> dict[str, Any]:
    gbs = nbytes / (ours_us * 1e-6) / 1e9
    return {
        "ours_us": ours_us,
        "torch_us": torch_us,
        "speedup": torch_us / ours_us,
        "ours_gbs": gbs,
        "torch_gbs": nbytes / (torch_us * 1e-6) / 1e9,
        "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None,
        "torch_pct_copy": 100 * nbytes / (torch_us * 1e-6) / 1e9 / copy_gbs if copy_gbs else None,
    }


def bench_bias(
    model: str, n: int, c: int, h: int, layout: str, residual: bool, copy_gbs: float | None, device: str
) -> dict[str, Any]:
    x0 = _input(n, c, h, layout, device)
    b = (torch.randn(c, device=device) * 0.5).half()
    bv = b.view(1, c, 1, 1)
    r = _input(n, c, h, layout, device, mean=-0.3) if residual else None
    # correctness: in place (the timed call), out of place, torch's in-place pair, fp32 reference
    ours = x0.clone()
    ba.bias_add(ours, b, r, out=ours)
    fresh = ba.bias_add(x0, b, r)
    theirs = x0.clone().add_(bv)
    if r is not None:
        theirs.add_(r)
    ref32 = ba.bias_add_ref(x0.float(), b.float(), None if r is None else r.float())
    e_ours, e_torch = common.rel_err(ours, ref32), common.rel_err(theirs, ref32)
    ok = math.isfinite(e_ours) and e_ours <= 2 * e_torch + 1e-6
    ok = ok and torch.equal(fresh, ours) and fresh.stride() == x0.stride()
    # timing on a scratch copy (values drift by b (+ r) a call: irrelevant to the time)
    x = x0.clone()
    if r is None:
        t_ours = _timer(device)(lambda: ba.bias_add(x, b, out=x))
        t_torch = _timer(device)(lambda: x.add_(bv))
    else:
        t_ours = _timer(device)(lambda: ba.bias_add(x, b, r, out=x))
        t_torch = _timer(device)(lambda: x.add_(bv).add_(r))
    nbytes = (3 if residual else 2) * x0.numel() * x0.element_size()
    return {
        "op": "bias+res" if residual else "bias",
        "model": model,
        "shape": f"{n}x{c}x{h}x{h}",
        "layout": layout,
        "mbytes": round(nbytes / 2**20, 2),
        **_rates(nbytes, t_ours, t_torch, copy_gbs),
        "err": e_ours,
        "torch_err": e_torch,
        "correct": bool(ok),
    }


def bench_upsample(
    model: str, n: int, c: int, h: int, layout: str, copy_gbs: float | None, device: str
) -> dict[str, Any]:
    x = _input(n, c, h, layout, device)
    y, ref = up.upsample_nearest2x(x), up.upsample_nearest2x_ref(x)
    ok = torch.equal(y, ref) and y.stride() == ref.stride()
    t_ours = _timer(device)(lambda: up.upsample_nearest2x(x))
    t_torch = _timer(device)(lambda: F.interpolate(x, scale_factor=2.0, mode="nearest"))
    nbytes = 5 * x.numel() * x.element_size()
    return {
        "op": "upsample2x",
        "model": model,
        "shape": f"{n}x{c}x{h}x{h}",
        "layout": layout,
        "mbytes": round(nbytes / 2**20, 2),
        **_rates(nbytes, t_ours, t_torch, copy_gbs),
        "correct": bool(ok),
    }


def run(device: str = "cuda", smoke: bool = False, nchw: bool = False) -> dict[str, Any]:
    """Every row plus a summary. ``smoke``: tiny shapes, both layouts, runnable on CPU under the interpreter."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("speedsd.bench.kernels_epilogues needs a CUDA GPU (or smoke=True, device='cpu')")
    torch.manual_seed(0)
    copy_gbs = common.copy_bandwidth_gbs() if device == "cuda" else None
    layouts = ["channels_last", "nchw"] if smoke or nchw else ["channels_last"]
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for layout in layouts:
        for model, n, c, h in SMOKE_BIAS if smoke else VAE_BIAS + UNET_BIAS:
            for residual in (False, True):
                what = f"bias{'+res' if residual else ''} {n}x{c}x{h}x{h} {layout}"
                r = common.guard(errors, what, bench_bias, model, n, c, h, layout, residual, copy_gbs, device)
                if r is not None:
                    rows.append(r)
                    _print(r)
        for model, n, c, h in SMOKE_UPSAMPLE if smoke else UPSAMPLE:
            r = common.guard(errors, f"upsample {n}x{c}x{h}x{h} {layout}", bench_upsample, model, n, c, h, layout,
                             copy_gbs, device)  # fmt: skip
            if r is not None:
                rows.append(r)
                _print(r)
    summary: dict[str, Any] = {"copy_gbs": copy_gbs, "correct": f"{sum(r['correct'] for r in rows)}/{len(rows)}"}
    for op in ("bias", "bias+res", "upsample2x"):
        for layout in layouts:
            sel = [r for r in rows if r["op"] == op and r["layout"] == layout]
            if sel:
                summary[f"{op} {layout}"] = {
                    "ours_us": sum(r["ours_us"] for r in sel),
                    "torch_us": sum(r["torch_us"] for r in sel),
                    "min_pct_copy": min((r["pct_copy"] for r in sel if r["pct_copy"] is not None), default=None),
                }
    summary["errors"] = len(errors)
    return {"summary": summary, "rows": rows, "errors": errors}


def _print(r: dict[str, Any]) -> None:
    pct = "-" if r["pct_copy"] is None else f"{r['pct_copy']:5.1f}%"
    print(
        f"{r['op']:10s} {r['model']:5s} {r['shape']:>15s} {r['layout']:13s} ours {r['ours_us']:8.1f} us "
        f"torch {r['torch_us']:8.1f} us x{r['speedup']:5.2f} {r['ours_gbs']:6.0f} GB/s {pct} copy ok={r['correct']}",
        flush=True,
    )


def _f(v: Any, nd: int = 1) -> Any:
    return "-" if v is None else round(v, nd) if isinstance(v, float) else v


COLS = ["op", "model", "shape", "layout", "MB", "ours us", "torch us", "speedup", "GB/s", "% copy", "torch % copy"]


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    keys = ["op", "model", "shape", "layout", "mbytes", "ours_us", "torch_us"]
    table = [
        [_f(r[k]) for k in keys]
        + [_f(r["speedup"], 2), _f(r["ours_gbs"], 0), _f(r["pct_copy"]), _f(r["torch_pct_copy"]), r["correct"]]
        for r in res["rows"]
    ]
    sums = [
        f"- {name}: ours {_f(v['ours_us'], 0)} us vs torch {_f(v['torch_us'], 0)} us (sum over shapes), "
        f"min {_f(v['min_pct_copy'])} % of copy bandwidth"
        for name, v in s.items()
        if isinstance(v, dict)
    ]
    return "\n".join(
        [
            "## Conv epilogues (fp16): speedsd bias_add / upsample_nearest2x vs torch (CUDA-graph replay)\n",
            f"Copy bandwidth (same run): {_f(s['copy_gbs'], 0)} GB/s. Correct: {s['correct']}.\n",
            *sums,
            "",
            common.md_table(COLS + ["ok"], table),
        ]
        + [f"\n**ERROR** {e['what']}: {e['error']}" for e in res.get("errors", [])]
    )


def main(argv: list[str] | None = None) -> int:
    ap = common.kernel_bench_args("kernels_epilogues", __doc__)
    ap.add_argument("--nchw", action="store_true", help="NCHW rows as well as channels_last")
    a = ap.parse_args(argv)
    device, smoke = common.device_and_smoke(a.smoke)
    res = run(device, smoke=smoke, nchw=a.nchw)
    ok = not res["errors"] and all(r["correct"] for r in res["rows"])
    return common.publish(a.out, "kernels_epilogues", res, markdown(res), ok)


if __name__ == "__main__":
    raise SystemExit(main())
