"""LayerNorm and residual-add + LayerNorm kernels on SD-1.4's token shapes: correctness, time, bandwidth.

    python -m speedsd.bench.kernels_layer_norm --out bench/results [--no-sweep] [--smoke]

fp16 UNet transformer tokens (CFG batch 2 at 64x64 latents: 64², 32², 16², 8² positions) and CLIP's
[2, 77, 768]. Two ops per shape, ours vs torch:
  * ``layer_norm``: speedsd.kernels.layer_norm.layer_norm vs F.layer_norm (x read, y written);
  * ``add_layer_norm``: ours (x, delta read; s, y written) vs ``s = x + d + b; F.layer_norm(s)``.
Times are CUDA-graph replay (20 calls in one graph, per call: what the engine pays), in us. "% copy" =
bytes moved by ours / time over the device copy bandwidth measured in the same run. Correct = finite,
y's error vs an fp32 reference <= 2x torch's own fp16 error, and s within 1 ulp of the fp32 sum
rounded once. Unless ``--no-sweep``, every tile (rows x warps) around the heuristic's is also timed:
the best one per row is data for plan_layer_norm. Exit code 1 if any shape is wrong or raised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench import common
from speedsd.kernels import layer_norm as ln

# (label, shape, transformer blocks of that shape in one UNet step; 3 LayerNorms each, 48 in all)
SHAPES = [
    ("unet 64²", (2, 4096, 320), 5),
    ("unet 32²", (2, 1024, 640), 5),
    ("unet 16²", (2, 256, 1280), 5),
    ("unet 8²", (2, 64, 1280), 1),
    ("clip", (2, 77, 768), 0),
]
SMOKE_SHAPES = [("smoke", (2, 16, 96), 1), ("smoke odd", (3, 7, 40), 0)]
OPS = ("layer_norm", "add_layer_norm")


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """us per call: CUDA-graph replay on CUDA, wall time on CPU (smoke runs)."""
    if device == "cuda":
        return lambda fn: common.graph_ms(fn) * 1e3
    return lambda fn: common.median_ms(fn, warmup=1, rep=3) * 1e3


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype at |t| (fp32 values)."""
    fi = torch.finfo(t.dtype)
    _, e = torch.frexp(t.float())  # |t| in [2^(e-1), 2^e)
    return torch.ldexp(torch.full_like(t.float(), fi.eps / 2), e).clamp_min(fi.smallest_normal * fi.eps)


def _inputs(shape: tuple[int, ...], device: str) -> dict[str, torch.Tensor]:
    c = shape[-1]
    h = dict(device=device, dtype=torch.float16)
    return {
        "x": (torch.randn(shape, device=device) * 3 + 2).to(**h),
        "d": (torch.randn(shape, device=device) * 1.5 - 0.5).to(**h),
        "w": (torch.randn(c, device=device) * 0.5 + 1).to(**h),
        "b": (torch.randn(c, device=device) * 0.5 + 0.2).to(**h),
        "db": (torch.randn(c, device=device) * 0.5 + 0.3).to(**h),
    }


def _fns(op: str, t: dict[str, torch.Tensor]) -> tuple[Callable[..., Any], Callable[[], Any]]:
    """(ours(**tile), torch baseline) for one op."""
    x, d, w, b, db = t["x"], t["d"], t["w"], t["b"], t["db"]
    if op == "layer_norm":
        return (lambda **k: ln.layer_norm(x, w, b, 1e-5, **k)), (lambda: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5))
    return (lambda **k: ln.add_layer_norm(x, d, w, b, 1e-5, db, **k)), (
        lambda: ln.add_layer_norm_ref(x, d, w, b, 1e-5, db)
    )


def _check(op: str, t: dict[str, torch.Tensor], ours: Any, theirs: Any) -> dict[str, Any]:
    """Errors of y (ours and torch's) vs fp32, s's ulp distance, and the verdict."""
    f = {k: v.float() for k, v in t.items()}
    if op == "layer_norm":
        y, y_t, s32, s = ours, theirs, f["x"], None
    else:
        (s, y), (_, y_t) = ours, theirs
        s32 = f["x"] + f["d"] + f["db"]
    ref = ln.layer_norm_ref(s32, f["w"], f["b"], 1e-5)
    e_ours, e_torch = common.rel_err(y, ref), common.rel_err(y_t, ref)
    ok = math.isfinite(e_ours) and e_ours <= 2 * e_torch + 1e-6
    s_ulps = None
    if s is not None:
        want = s32.to(s.dtype)
        s_ulps = float(((s.float() - want.float()).abs() / _ulp(want)).nan_to_num(float("inf")).max())
        ok = ok and s_ulps <= 1
    return {"err": e_ours, "torch_err": e_torch, "s_max_ulps": s_ulps, "correct": bool(ok)}


def _sweep(
    op: str, ours: Callable[..., Any], plan: ln.LayerNormPlan, y0: torch.Tensor, timer: Callable, smoke: bool
) -> dict[str, Any]:
    """Time tiles around the heuristic's: rows x {/2, x1, x2}, warps x {/2, x1, x2}."""
    rows = sorted({r for r in (plan.rows // 2, plan.rows, plan.rows * 2) if 1 <= r and r * plan.block_c <= 16384})
    warps = sorted({w for w in (plan.warps // 2, plan.warps, plan.warps * 2) if 1 <= w <= 32})
    if smoke:
        rows, warps = rows[:2], warps[:1]
    res: dict[str, Any] = {}
    for r in rows:
        for w in warps:
            key = f"rows{r}/w{w}"
            out = ours(rows=r, warps=w)
            y = out if op == "layer_norm" else out[1]
            if common.rel_err(y, y0) > 1e-3:
                res[key] = float("nan")  # a tile that computes something else: a bug, flagged
                continue
            res[key] = timer(lambda r=r, w=w: ours(rows=r, warps=w))
    return res


def bench_shape(label: str, shape: tuple[int, ...], op: str, device: str, copy_gbs: float | None, sweep: bool):
    torch.manual_seed(0)
    t = _inputs(shape, device)
    ours, theirs = _fns(op, t)
    timer = _timer(device)
    c, n_rows = shape[-1], math.prod(shape[:-1])
    tensors = 2 if op == "layer_norm" else 4
    plan = ln.plan_layer_norm(n_rows, c, 2, tensors, ln._sm_count(torch.device(device)))
    out = ours()
    row = {"label": label, "op": op, "shape": "x".join(map(str, shape)), **_check(op, t, out, theirs())}
    t_ours, t_torch = timer(ours), timer(theirs)
    nbytes = tensors * math.prod(shape) * 2
    gbs = nbytes / (t_ours * 1e-6) / 1e9
    row.update(
        plan=f"rows{plan.rows}/w{plan.warps}",
        programs=plan.programs(n_rows),
        mbytes=round(nbytes / 2**20, 2),
        ours_us=t_ours,
        torch_us=t_torch,
        speedup=t_torch / t_ours,
        ours_gbs=gbs,
        pct_copy=100 * gbs / copy_gbs if copy_gbs else None,
    )
    if sweep:
        y0 = out if op == "layer_norm" else out[1]
        tiles = _sweep(op, ours, plan, y0, timer, device != "cuda")
        finite = {k: v for k, v in tiles.items() if v == v}
        row["tiles_us"] = tiles
        row["best_tile"] = min(finite, key=finite.get) if finite else None
        row["best_tile_us"] = min(finite.values()) if finite else None
        row["correct"] = row["correct"] and len(finite) == len(tiles)
    return row


def run(device: str, smoke: bool, sweep: bool = True) -> dict[str, Any]:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("speedsd.bench.kernels_layer_norm needs a CUDA GPU (or smoke on CPU)")
    copy_gbs = common.copy_bandwidth_gbs() if device == "cuda" else None
    rows, errors = [], []
    blocks = {}
    for label, shape, n_blocks in SMOKE_SHAPES if smoke else SHAPES:
        blocks[label] = n_blocks
        for op in OPS:
            r = common.guard(errors, f"{op} {shape}", bench_shape, label, shape, op, device, copy_gbs, sweep)
            if r is None:
                continue
            rows.append(r)
            print(f"{op:15s} {r['shape']:>12s} ours {r['ours_us']:8.2f} us torch {r['torch_us']:8.2f} us "
                  f"x{r['speedup']:5.2f} ok={r['correct']}", flush=True)  # fmt: skip
    # one UNet step's transformer norms: per block one layer_norm + two add_layer_norm (the lead's rewrite)
    step = {"ours_us": 0.0, "torch_us": 0.0}
    for r in rows:
        k = blocks[r["label"]] * (1 if r["op"] == "layer_norm" else 2)
        step["ours_us"] += k * r["ours_us"]
        step["torch_us"] += k * r["torch_us"]
    summary = {
        "copy_gbs": copy_gbs,
        "correct": f"{sum(r['correct'] for r in rows)}/{len(rows)}",
        "geomean_speedup": math.exp(sum(math.log(r["speedup"]) for r in rows) / len(rows)) if rows else None,
        "unet_step_ours_us": step["ours_us"],
        "unet_step_torch_us": step["torch_us"],
        "errors": len(errors),
    }
    return {"summary": summary, "rows": rows, "errors": errors}


def _f(v: Any, nd: int = 1) -> Any:
    return "-" if v is None else round(v, nd) if isinstance(v, float) else v


COLS = ["op", "shape", "MB", "plan", "programs", "ours us", "torch us", "speedup", "GB/s", "% copy"]
COLS += ["best tile", "best tile us", "err", "torch err", "s ulps", "ok"]


def _row(r: dict[str, Any]) -> list[Any]:
    keys = ["op", "shape", "mbytes", "plan", "programs", "ours_us", "torch_us", "speedup", "ours_gbs", "pct_copy"]
    errs = [f"{r['err']:.2e}", f"{r['torch_err']:.2e}", _f(r["s_max_ulps"])]
    return [_f(r[k], 2) for k in keys] + [r.get("best_tile", "-"), _f(r.get("best_tile_us"), 2)] + errs + [r["correct"]]


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [
        "## LayerNorm and residual-add + LayerNorm (fp16): speedsd vs torch, CUDA-graph replay\n",
        f"Copy bandwidth (same run): {_f(s['copy_gbs'], 0)} GB/s. Correct: {s['correct']}. "
        f"Geomean speedup x{_f(s['geomean_speedup'], 2)}. One UNet step's transformer norms "
        f"(16 blocks x (layer_norm + 2 add_layer_norm)): ours {_f(s['unet_step_ours_us'])} us vs torch "
        f"{_f(s['unet_step_torch_us'])} us (torch = F.layer_norm, and x + d + b then F.layer_norm).\n",
        "torch's add_layer_norm row is two elementwise adds and F.layer_norm; ours moves x, delta, s, y "
        "once. err: ||y - y_fp32|| / ||y_fp32||; s ulps: max distance of s from the fp32 sum rounded once.\n",
        common.md_table(COLS, [_row(r) for r in res["rows"]]),
    ]
    return "\n".join(lines + [f"\n**ERROR** {e['what']}: {e['error']}" for e in res["errors"]])


def main(argv: list[str] | None = None) -> int:
    ap = common.kernel_bench_args("kernels_layer_norm", __doc__)
    ap.add_argument("--no-sweep", action="store_true", help="only the heuristic's tile")
    a = ap.parse_args(argv)
    device, smoke = common.device_and_smoke(a.smoke)
    res = run(device, smoke=smoke, sweep=not a.no_sweep)
    ok = not res["errors"] and all(r["correct"] for r in res["rows"])
    return common.publish(a.out, "kernels_layer_norm", res, markdown(res), ok)


if __name__ == "__main__":
    raise SystemExit(main())
