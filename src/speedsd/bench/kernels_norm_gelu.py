"""GroupNorm(+SiLU) and GEGLU kernels on SD-1.4's shapes: correctness, time, bandwidth, vs PyTorch.

    python -m speedsd.bench.kernels_norm_gelu --out bench/results

GroupNorm: every distinct GroupNorm input of the UNet (CFG batch 2, 64x64 latents, incl. the concat-skip
channel counts) and of the VAE decoder at 512² (up to 1x128x512x512), NCHW and channels_last, fp16,
32 groups, with SiLU; ours (speedsd.kernels.group_norm) vs F.group_norm + F.silu. GB/s counts x read
once + y written once; "% copy" is that over the device copy bandwidth measured in the same run.
GEGLU: the UNet's 4 feed-forward shapes, fused GEMM+GEGLU vs F.linear + chunk/gelu/mul and vs F.linear +
our elementwise GEGLU kernel, with TFLOP/s of the [M, K] x [K, 2F] GEMM.
Correct = finite and error vs an fp32 reference <= 2x torch's own fp16 error.

Two clocks per GroupNorm row: do_bench (events around each call, L2 flushed; includes any GPU idle
time while the CPU launches, ~15-25 us per Triton launch) and CUDA-graph replay (20 calls captured in
one graph, replay time / 20: what the engine sees; x stays in L2 when it fits). Targets are judged on
the graph clock.

    python -m speedsd.bench.kernels_norm_gelu --variants --out DIR

times every forced GroupNorm plan (path x tile x programs x warps x channel blocking) on every shape
with the graph clock, and writes group_norm_variants.{json,md} plus group_norm_tuned.py: the
``TUNED`` dict for speedsd/kernels/group_norm_plan.py (best plan per shape).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench import common

gn = importlib.import_module("speedsd.kernels.group_norm")
gg = importlib.import_module("speedsd.kernels.geglu")

GROUPS = 32
# (C, H=W) of every GroupNorm in the SD-1.4 UNet at 64x64 latents (resnet norm1/norm2 incl. concat-skip
# inputs, transformer norms, conv_norm_out), batch 2 for classifier-free guidance
UNET_GN = [
    (320, 64), (640, 64), (960, 64),
    (320, 32), (640, 32), (960, 32), (1280, 32), (1920, 32),
    (640, 16), (1280, 16), (1920, 16), (2560, 16),
    (1280, 8), (2560, 8),
]  # fmt: skip
# VAE decoder 64² latent -> 512² image (mid block and up blocks 512, 512, 256, 128), batch 1
VAE_GN = [(512, 64), (512, 128), (512, 256), (256, 256), (256, 512), (128, 512)]
# UNet transformer feed-forwards: (M = 2·tokens, K = inner dim, F = 4·K)
FF_SHAPES = [(2 * 4096, 320, 1280), (2 * 1024, 640, 2560), (2 * 256, 1280, 5120), (2 * 64, 1280, 5120)]
SMOKE_GN = [("smoke", 1, 64, 8), ("smoke", 2, 96, 16)]  # (label, N, C, H): CPU interpreter dry run
SMOKE_FF = [(37, 32, 48)]


def groupnorm_shapes() -> list[tuple[str, int, int, int]]:
    """(model, N, C, H=W) of every distinct GroupNorm input."""
    return [("unet", 2, c, h) for c, h in UNET_GN] + [("vae", 1, c, h) for c, h in VAE_GN]


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        return common.do_bench_ms
    return lambda fn: common.median_ms(fn, warmup=1, rep=3)


def graph_us(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Per-call time in us of ``fn`` replayed from one CUDA graph holding ``calls`` calls (median replay)."""
    return common.graph_ms(fn, calls=calls, reps=replays) * 1e3


def _graph_timer(device: str) -> Callable[[Callable[[], object]], float]:
    """us per call: graph replay on CUDA, wall time on CPU (smoke runs)."""
    if device == "cuda":
        return graph_us
    return lambda fn: common.median_ms(fn, warmup=1, rep=3) * 1e3


def _ok(ours: torch.Tensor, torch_out: torch.Tensor, ref32: torch.Tensor) -> tuple[bool, float, float]:
    e_ours, e_torch = common.rel_err(ours, ref32), common.rel_err(torch_out, ref32)
    return bool(math.isfinite(e_ours) and e_ours <= 2 * e_torch + 1e-6), e_ours, e_torch


def bench_group_norm(
    model: str, n: int, c: int, h: int, layout: str, copy_gbs: float | None, device: str
) -> dict[str, Any]:
    timer = _timer(device)
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(n, c, h, h, device=device) * 2 + 0.5).to(torch.float16).contiguous(memory_format=mf)
    w = (torch.randn(c, device=device) * 0.5 + 1).half()
    b = (torch.randn(c, device=device) * 0.5).half()
    plan = gn.plan_group_norm(
        n, c, h * h, GROUPS, layout == "channels_last", 2, gn._sm_count(torch.device(device))
    )  # what auto picks
    out = torch.empty_like(x)

    def ours() -> torch.Tensor:
        return gn.group_norm(x, GROUPS, w, b, 1e-5, True, out=out)

    def ref() -> torch.Tensor:
        return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))

    y = ours().clone()
    ok, e_ours, e_torch = _ok(y, ref(), gn.group_norm_ref(x.float(), GROUPS, w.float(), b.float(), 1e-5, True))
    ok = ok and y.is_contiguous(memory_format=mf)
    t_ours, t_ref = timer(ours), timer(ref)
    g_ours, g_ref = _graph_timer(device)(ours), _graph_timer(device)(ref)
    nbytes = 2 * x.numel() * x.element_size()
    paths_us = {}  # every path that can run this shape, forced: data for the auto heuristic
    for p in ("fused", "loop", "split"):
        if p == "fused" and plan.path != "fused" and not _fits(n, c, h, layout):
            continue
        if p == "loop" and h * h * c * n * 2 > 32 * 2**20 and device == "cuda":
            continue  # one program per group streaming 32+ MB: slow and uninformative
        if p == plan.path:
            paths_us[p] = t_ours * 1e3
            continue
        y_p = gn.group_norm(x, GROUPS, w, b, 1e-5, True, path=p)
        if common.rel_err(y_p, y) > 1e-2:
            paths_us[p] = float("nan")  # would be a bug: flagged in the table
            ok = False
            continue
        paths_us[p] = timer(lambda p=p: gn.group_norm(x, GROUPS, w, b, 1e-5, True, out=out, path=p)) * 1e3
    gbs = nbytes / (t_ours * 1e-3) / 1e9
    return {
        "op": "group_norm+silu",
        "model": model,
        "shape": f"{n}x{c}x{h}x{h}",
        "layout": layout,
        "mbytes": round(nbytes / 2**20, 2),
        "path": plan.path,
        "launches": plan.launches,
        "groups_per_program": plan.gb,
        "ours_us": t_ours * 1e3,
        "torch_us": t_ref * 1e3,
        "speedup": t_ref / t_ours,
        "paths_us": paths_us,
        "best_path": min(paths_us, key=lambda k: paths_us[k] if paths_us[k] == paths_us[k] else float("inf")),
        "ours_gbs": gbs,
        "torch_gbs": nbytes / (t_ref * 1e-3) / 1e9,
        "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None,
        "ours_graph_us": g_ours,
        "torch_graph_us": g_ref,
        "graph_speedup": g_ref / g_ours,
        "graph_gbs": nbytes / (g_ours * 1e-6) / 1e9,
        "graph_pct_copy": 100 * nbytes / (g_ours * 1e-6) / 1e9 / copy_gbs if copy_gbs else None,
        "err": e_ours,
        "torch_err": e_torch,
        "correct": ok,
    }


def _fits(n: int, c: int, h: int, layout: str) -> bool:
    try:
        gn.plan_group_norm(n, c, h * h, GROUPS, layout == "channels_last", 2, path="fused")
        return True
    except ValueError:
        return False


def bench_feed_forward(m: int, k: int, f: int, device: str) -> dict[str, Any]:
    timer = _timer(device)
    x = (torch.randn(m, k, device=device) + 0.1).half()
    w = (torch.randn(2 * f, k, device=device) * k**-0.5).half()
    b = (torch.randn(2 * f, device=device) * 0.1).half()
    out = torch.empty(m, f, device=device, dtype=torch.float16)
    y = gg.feed_forward_geglu(x, w, b, out=out).clone()  # autotunes on the first call (CUDA)
    ref32 = gg.feed_forward_geglu_ref(x.float(), w.float(), b.float())
    ok, e_ours, e_torch = _ok(y, gg.feed_forward_geglu_ref(x, w, b), ref32)
    y_h = gg.feed_forward_geglu(x, w, b, config="heuristic")
    ok_h = common.rel_err(y_h, ref32) <= 2 * e_torch + 1e-6
    y_e = gg.geglu(F.linear(x, w, b))
    ok_e = common.rel_err(y_e, ref32) <= 2 * e_torch + 1e-6
    t = {
        "ours_us": timer(lambda: gg.feed_forward_geglu(x, w, b, out=out)),
        "ours_heuristic_us": timer(lambda: gg.feed_forward_geglu(x, w, b, out=out, config="heuristic")),
        "torch_us": timer(lambda: gg.feed_forward_geglu_ref(x, w, b)),
        "cublas_plus_our_geglu_us": timer(lambda: gg.geglu(F.linear(x, w, b))),
        "cublas_gemm_only_us": timer(lambda: F.linear(x, w, b)),
    }
    t = {key: v * 1e3 for key, v in t.items()}
    flop = 2 * m * k * 2 * f
    best = None
    if device == "cuda" and hasattr(gg._ff_geglu_tuned, "best_config"):
        best = str(gg._ff_geglu_tuned.best_config)
    return {
        "op": "ff_geglu",
        "shape": f"M={m} K={k} F={f}",
        **t,
        "speedup": t["torch_us"] / t["ours_us"],
        "ours_tflops": flop / (t["ours_us"] * 1e-6) / 1e12,
        "torch_tflops": flop / (t["torch_us"] * 1e-6) / 1e12,
        "autotuned_config": best,
        "err": e_ours,
        "torch_err": e_torch,
        "correct": bool(ok and ok_h and ok_e),
    }


def bench_elementwise(m: int, f: int, device: str, copy_gbs: float | None) -> list[dict[str, Any]]:
    """GELU on [m, f] and GEGLU on [m, 2f] (after a GEMM that is not timed) vs PyTorch."""
    timer = _timer(device)
    rows = []
    h = (torch.randn(m, 2 * f, device=device) * 2).half()
    g = h[:, f:].contiguous()
    for name, ours, ref, nbytes in [
        ("gelu", lambda: gg.gelu(g), lambda: F.gelu(g), 2 * g.numel() * 2),
        ("geglu", lambda: gg.geglu(h), lambda: gg.geglu_ref(h), (h.numel() + m * f) * 2),
    ]:
        ok, e_ours, e_torch = _ok(ours(), ref(), (gg.gelu_ref if name == "gelu" else gg.geglu_ref)(
            (g if name == "gelu" else h).float()
        ))  # fmt: skip
        t_o, t_r = timer(ours), timer(ref)
        gbs = nbytes / (t_o * 1e-3) / 1e9
        rows.append(
            {
                "op": name,
                "shape": f"{m}x{2 * f if name == 'geglu' else f}",
                "ours_us": t_o * 1e3,
                "torch_us": t_r * 1e3,
                "speedup": t_r / t_o,
                "ours_gbs": gbs,
                "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None,
                "err": e_ours,
                "torch_err": e_torch,
                "correct": ok,
            }
        )
    return rows


def _geomean(v: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def run(device: str = "cuda", smoke: bool = False) -> dict[str, Any]:
    """All rows plus a summary. ``smoke``: tiny shapes, runnable on CPU under TRITON_INTERPRET=1."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("speedsd.bench.kernels_norm_gelu needs a CUDA GPU (or smoke=True, device='cpu')")
    torch.manual_seed(0)
    copy_gbs = common.copy_bandwidth_gbs() if device == "cuda" else None
    gn_rows, errors = [], []
    for model, n, c, h in SMOKE_GN if smoke else groupnorm_shapes():
        for layout in ("nchw", "channels_last"):
            r = common.guard(errors, f"group_norm {n}x{c}x{h}x{h} {layout}", bench_group_norm, model, n, c, h, layout,
                             copy_gbs, device)  # fmt: skip
            if r is None:
                continue
            gn_rows.append(r)
            print(
                f"GN {r['model']:5s} {r['shape']:>15s} {layout:13s} {r['path']:5s} ours {r['ours_us']:8.1f} us "
                f"torch {r['torch_us']:8.1f} us  x{r['speedup']:5.1f} | graph ours {r['ours_graph_us']:7.1f} us "
                f"torch {r['torch_graph_us']:7.1f} us x{r['graph_speedup']:5.1f} {r['graph_gbs']:6.0f} GB/s "
                f"ok={r['correct']}",
                flush=True,
            )
    ff_rows = []
    for m, k, f in SMOKE_FF if smoke else FF_SHAPES:
        r = common.guard(errors, f"ff_geglu M={m} K={k} F={f}", bench_feed_forward, m, k, f, device)
        if r is not None:
            ff_rows.append(r)
            print(f"FF {r['shape']:>22s} ours {r['ours_us']:7.1f} us torch {r['torch_us']:7.1f} us ok={r['correct']}")
    ew_rows = common.guard(
        errors, "elementwise", bench_elementwise, *((37, 24) if smoke else (8192, 1280)), device, copy_gbs
    )
    ew_rows = ew_rows or []
    big = [r for r in gn_rows if r["mbytes"] >= 4]
    summary = {
        "copy_gbs": copy_gbs,
        "gn_correct": f"{sum(r['correct'] for r in gn_rows)}/{len(gn_rows)}",
        "gn_geomean_speedup": _geomean([r["speedup"] for r in gn_rows]),
        "gn_total_us_ours": sum(r["ours_us"] for r in gn_rows),
        "gn_total_us_torch": sum(r["torch_us"] for r in gn_rows),
        "gn_auto_is_best": f"{sum(r['best_path'] == r['path'] for r in gn_rows)}/{len(gn_rows)}",
        "gn_min_pct_copy_ge_4MB": min((r["pct_copy"] for r in big if r["pct_copy"] is not None), default=None),
        "gn_median_pct_copy_ge_4MB": (sorted(r["pct_copy"] for r in big)[len(big) // 2] if big and copy_gbs else None),
        "gn_graph_geomean_speedup": _geomean([r["graph_speedup"] for r in gn_rows]),
        "gn_graph_total_us_ours": sum(r["ours_graph_us"] for r in gn_rows),
        "gn_graph_total_us_torch": sum(r["torch_graph_us"] for r in gn_rows),
        "gn_graph_min_pct_copy_ge_4MB": min((r["graph_pct_copy"] for r in big if copy_gbs), default=None),
        "gn_graph_median_pct_copy_ge_4MB": (
            sorted(r["graph_pct_copy"] for r in big)[len(big) // 2] if big and copy_gbs else None
        ),
        "ff_correct": f"{sum(r['correct'] for r in ff_rows)}/{len(ff_rows)}",
        "ff_geomean_speedup": _geomean([r["speedup"] for r in ff_rows]),
        "errors": len(errors),
    }
    return {
        "summary": summary,
        "group_norm": gn_rows,
        "feed_forward": ff_rows,
        "elementwise": ew_rows,
        "errors": errors,
    }


def _f(v: Any, nd: int = 1) -> Any:
    return "-" if v is None else round(v, nd) if isinstance(v, float) else v


GN_COLS = ["model", "shape", "layout", "MB", "path", "ours us", "torch us", "speedup", "GB/s", "% copy"]
GN_GRAPH_COLS = ["graph ours us", "graph torch us", "graph speedup", "graph % copy"]
FF_COLS = ["shape", "ours us", "heuristic us", "torch us", "cuBLAS+our geglu us", "GEMM only us", "speedup"]
EW_COLS = ["op", "shape", "ours us", "torch us", "speedup", "GB/s", "% copy"]


def _gn_row(r: dict[str, Any]) -> list[Any]:
    keys = ["model", "shape", "layout", "mbytes", "path", "ours_us", "torch_us", "speedup", "ours_gbs", "pct_copy"]
    paths = " / ".join(str(_f(r["paths_us"].get(p))) for p in ("fused", "loop", "split"))
    graph = [_f(r[k]) for k in ("ours_graph_us", "torch_graph_us", "graph_speedup", "graph_pct_copy")]
    return [_f(r[k]) for k in keys] + graph + [paths, r["correct"]]


def _ff_row(r: dict[str, Any]) -> list[Any]:
    keys = ["shape", "ours_us", "ours_heuristic_us", "torch_us", "cublas_plus_our_geglu_us", "cublas_gemm_only_us"]
    return [_f(r[k]) for k in keys] + [_f(r["speedup"], 2), _f(r["ours_tflops"], 0), r["correct"]]


def _ew_row(r: dict[str, Any]) -> list[Any]:
    keys = ["op", "shape", "ours_us", "torch_us", "speedup", "ours_gbs", "pct_copy"]
    return [_f(r[k]) for k in keys] + [r["correct"]]


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    return "\n".join(
        [
            "## GroupNorm + SiLU (fp16, 32 groups): speedsd vs F.group_norm + F.silu\n",
            f"Copy bandwidth (same run): {_f(s['copy_gbs'], 0)} GB/s. Correct: {s['gn_correct']}. "
            f"Geomean speedup x{_f(s['gn_geomean_speedup'])}; sum over shapes {_f(s['gn_total_us_ours'], 0)} us "
            f"vs {_f(s['gn_total_us_torch'], 0)} us. Auto path = fastest forced path on {s['gn_auto_is_best']}. "
            f"% of copy bandwidth on shapes >= 4 MB: min {_f(s['gn_min_pct_copy_ge_4MB'])}, "
            f"median {_f(s['gn_median_pct_copy_ge_4MB'])}.\n",
            f"**CUDA-graph replay** (the engine's clock): geomean speedup x{_f(s['gn_graph_geomean_speedup'])}; "
            f"sum {_f(s['gn_graph_total_us_ours'], 0)} us vs {_f(s['gn_graph_total_us_torch'], 0)} us; % of copy "
            f"bandwidth on shapes >= 4 MB: min {_f(s['gn_graph_min_pct_copy_ge_4MB'])}, "
            f"median {_f(s['gn_graph_median_pct_copy_ge_4MB'])}.\n",
            common.md_table(
                GN_COLS + GN_GRAPH_COLS + ["fused / loop / split us", "ok"], [_gn_row(r) for r in res["group_norm"]]
            ),
            "\n## GEGLU feed-forward (fp16): fused GEMM+GEGLU vs F.linear + chunk/gelu/mul\n",
            f"Correct: {s['ff_correct']}. Geomean speedup x{_f(s['ff_geomean_speedup'])}.\n",
            common.md_table(FF_COLS + ["TFLOP/s", "ok"], [_ff_row(r) for r in res["feed_forward"]]),
            "\n## Elementwise kernels (fp16)\n",
            common.md_table(EW_COLS + ["ok"], [_ew_row(r) for r in res["elementwise"]]),
        ]
        + [f"\n**ERROR** {e['what']}: {e['error']}" for e in res.get("errors", [])]
    )


def main(argv: list[str] | None = None) -> int:
    ap = common.kernel_bench_args("kernels_norm_gelu", __doc__)
    ap.add_argument("--variants", action="store_true", help="GroupNorm plan sweep only (group_norm_variants.*)")
    a = ap.parse_args(argv)
    if a.variants:
        return importlib.import_module("speedsd.bench.group_norm_variants").run_variants(a.out, a.smoke)
    device, smoke = common.device_and_smoke(a.smoke)
    res = run(device, smoke=smoke)
    bad = [r for key in ("group_norm", "feed_forward", "elementwise") for r in res[key] if not r["correct"]]
    return common.publish(a.out, "kernels_norm_gelu", res, markdown(res), not bad and not res["errors"])


if __name__ == "__main__":
    raise SystemExit(main())
