"""The GEGLU feed-forward projection on the UNet's shapes: the engine's plan, the Triton TMA kernel, the Gluon
kernel's configs and cuBLAS's GEMM alone.

    (from this folder) PYTHONPATH=<repo>/src:. python kernels_ff.py --out <dir> [--smoke]

Shapes: SD-1's FF1 at each UNet level (batch 2 with classifier-free guidance, 512²): x [M, K] @ W [2F, K]ᵀ
(+ bias) -> value·GELU(gate) [M, F], M = 2·h·w tokens. fp16. Clock: CUDA-graph replay (what the engine pays),
cycling as many weight copies as keep W out of L2 (in a UNet step every layer reads its own weights from
memory). Correct: error vs fp64 <= 2x torch fp16's (NaN-poisoned outputs fail). "cuBLAS GEMM only" is
F.linear without the GEGLU: a reference for the GEMM, not a candidate. On CPU (--smoke) one tiny shape runs the
engine's plan only.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench import common

gg = importlib.import_module("speedsd.kernels.geglu")
fg = importlib.import_module("ff_geglu_gluon")

# (label, M, K, F, calls per UNet step)
SHAPES = [
    ("unet 64² (M 8192)", 8192, 320, 1280, 5),
    ("unet 32² (M 2048)", 2048, 640, 2560, 5),
    ("unet 16² (M 512)", 512, 1280, 5120, 5),
    ("unet 8² mid (M 128)", 128, 1280, 5120, 1),
]
SMOKE = [("smoke", 40, 32, 24, 1)]
# Gluon tiles (bm, bn, consumers) x the stages that fit; then group_m 1 for the first tile
GLUON_TILES = [(128, 64, 1), (128, 128, 2), (256, 64, 2), (64, 128, 1), (128, 32, 1)]
L2_BYTES = 50 * 2**20


def gluon_configs() -> list[Any]:
    """Each GLUON_TILES tile with the fewest and the most ring stages that fit (3..8), group_m 1 once, small
    rings at two programs an SM or one program a tile, and ping-pong configs."""
    out = []
    for bm, bn, c in GLUON_TILES:
        fits = []
        for stages in (3, 4, 5, 6, 8):
            try:
                fits.append(fg.FFGluonConfig(bm, bn, 64, stages, c))
            except ValueError:  # shared memory
                break
        out += fits[:1] + fits[-1:] if len(fits) > 1 else fits
    out.append(fg.FFGluonConfig(128, 64, 64, 4, 1, group_m=1))
    # two programs an SM (or one a tile) where two fit in shared memory: one's epilogue under the other's MMAs
    for bm, bn, c, stages in ((128, 64, 1, 2), (128, 64, 1, 3), (128, 32, 1, 4), (64, 64, 1, 4), (128, 64, 2, 3)):
        for occ in (2, 0):
            out.append(fg.FFGluonConfig(bm, bn, 64, stages, c, occupancy=occ))
    # ping-pong: two consumer warpgroups on alternate tiles (one's epilogue under the other's MMAs)
    for bm, bn, stages in ((128, 64, 2), (128, 64, 3), (128, 32, 4), (64, 128, 2), (64, 64, 4)):
        out.append(fg.FFGluonConfig(bm, bn, 64, stages, 1, pingpong=True))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_shape(row: tuple, device: str, smoke: bool) -> dict[str, Any]:
    label, m, k, f, calls = row
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(m, k, generator=g) + 0.5).to(device, dtype)
    w0 = torch.randn(2 * f, k, generator=g) * k**-0.5
    copies = max(1, min(8, math.ceil(3 * L2_BYTES / (w0.numel() * 2)))) if device == "cuda" else 1
    ws = [(w0 + 1e-3 * i).to(device, dtype) for i in range(copies)]
    b = (torch.randn(2 * f, generator=g) * 0.1).to(device, dtype)
    ref = gg.feed_forward_geglu_ref(x.double(), ws[0].double(), b.double())
    torch_err = _rel(gg.feed_forward_geglu_ref(x, ws[0], b), ref)
    out = torch.empty(m, f, device=device, dtype=dtype)
    state = {"i": 0}

    def timed(fn: Any) -> float:
        def call() -> None:
            fn(ws[state["i"] % copies])
            state["i"] += 1

        return common.median_ms(call, warmup=1, rep=2) if smoke else common.graph_ms(call, calls=2 * copies, reps=5)

    cands: dict[str, Any] = {"engine plan": lambda w, o: gg.feed_forward_geglu(x, w, b, out=o)}
    if not smoke:
        cands["triton tma"] = lambda w, o: gg.feed_forward_geglu(x, w, b, out=o, config="tma")
        for cfg in gluon_configs():
            cands[str(cfg)] = lambda w, o, cfg=cfg: fg.feed_forward_geglu_gluon(x, w, b, o, 0, cfg)
    res: dict[str, Any] = {"label": label, "M": m, "K": k, "F": f, "calls": calls, "weight_copies": copies,
                           "torch_rel_err": torch_err, "candidates": {}}  # fmt: skip
    for name, fn in cands.items():
        try:
            poisoned = torch.full_like(out, float("nan"))
            fn(ws[0], poisoned)
            err = _rel(poisoned, ref)
            ms = timed(lambda w, fn=fn: fn(w, out))
        except Exception as e:  # noqa: BLE001 - report the candidate and go on
            print(f"  {label} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        ok = err <= 2 * torch_err + 1e-7  # NaN (an unwritten output) fails
        res["candidates"][name] = {"ms": ms, "rel_err": err, "ok": ok}
    if not smoke:
        res["cublas_gemm_only_ms"] = timed(lambda w: F.linear(x, w, b))
    good = {n: c["ms"] for n, c in res["candidates"].items() if c["ok"]}
    res["best"] = min(good, key=good.get) if good else None
    gl = {n: t for n, t in good.items() if n.startswith("ff")}
    res["best_gluon"] = min(gl, key=gl.get) if gl else None
    return res


def main(argv: list[str] | None = None) -> int:
    ap = common.kernel_bench_args("kernels_ff", __doc__)
    args = ap.parse_args(argv)
    device, smoke = common.device_and_smoke(args.smoke)
    rows = []
    for row in SMOKE if smoke else SHAPES:
        r = bench_shape(row, device, smoke)
        rows.append(r)
        c = r["candidates"]
        print(
            f"{r['label']}: best {r['best']} " + ", ".join(f"{n} {v['ms'] * 1e3:.1f}" for n, v in c.items()), flush=True
        )
    md_rows = []
    for r in rows:
        c, flops = r["candidates"], 4 * r["M"] * r["K"] * r["F"]
        us = {n: v["ms"] * 1e3 for n, v in c.items()}
        bg = r["best_gluon"]
        md_rows.append([r["label"], r["calls"], us.get("engine plan", float("nan")), us.get("triton tma", float("nan")),
                        bg or "-", us.get(bg, float("nan")) if bg else float("nan"),
                        flops / us[bg] / 1e6 if bg else float("nan"), r.get("cublas_gemm_only_ms", float("nan")) * 1e3,
                        r["best"], all(v["ok"] for v in c.values())])  # fmt: skip
    header = ["shape", "calls", "engine µs", "Triton TMA µs", "best Gluon", "Gluon µs", "Gluon TFLOP/s",
              "cuBLAS GEMM only µs", "fastest correct", "all correct"]  # fmt: skip
    md = "## GEGLU feed-forward (FF1) on the UNet's shapes (fp16, graph replay, weights cycled out of L2)\n\n"
    md += common.md_table(header, md_rows)
    ok = all(v["ok"] for r in rows for v in r["candidates"].values())
    return common.publish(args.out, "kernels_ff", {"rows": rows}, md, ok)


if __name__ == "__main__":
    raise SystemExit(main())
