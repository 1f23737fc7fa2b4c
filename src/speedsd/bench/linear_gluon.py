"""The UNet's transformer linears as the Gluon conv's 1x1 mode vs cuBLAS (sm_90).

    python -m speedsd.bench.linear_gluon --out bench/results [--table src/speedsd/data/conv_table.json]
        [--latent 64] [--configs KEY,KEY,...]

Per linear of an SD-1.4 UNet step at CFG batch 2 (M = 2·side² tokens, fp16): cuBLAS as the engine calls it
(F.linear without bias, or the feed-forward's closing r.addmm_(h, Wᵀ)) against every candidate config of
:func:`speedsd.kernels.linear_gluon.linear_gluon` that fits, in CUDA-graph replay with as many weight copies
cycled as keep them out of L2, µs a call. Correct: max abs error against fp64 <= 2x cuBLAS fp16's. ``--table``:
records per shape the fastest correct config where it beats cuBLAS (conv_table.linear_config reads it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speedsd import conv_table
from speedsd.bench import common
from speedsd.kernels.linear_gluon import linear_gluon, linear_gluon_ref, linear_gluon_supported

# (side as a fraction of the latent side, K, N, residual, calls a step): at each transformer level, proj_in,
# the attentions' outputs, the cross-attention's Q and proj_out (K = N = C), the fused QKV (N = 3C), and the
# feed-forward's closing GEMM with its residual (K = 4C)
LEVELS = ((1, 320, 5), (0.5, 640, 5), (0.25, 1280, 5), (0.125, 1280, 1))
CANDIDATES = ("g1x128n128+32k64s4c2e1p", "g1x128n128+32k64s5c2e1p", "g1x64n256+64k64s4c1e2p",
              "g1x64n128+32k64s6c1e1p", "g1x128n256+64k64s3c2e2p", "g1x128n128k64s4c2e1p", "g1x128n256k64s3c2e2p",
              "g1x64n128k64s6c1e1p", "g1x64n256k64s4c1e2p", "g1x128n64+16k64s6c2e1p", "g1x64n64k64s8c1e1p",
              "g1x128n128k64s6c2e1p")  # fmt: skip


def shapes(latent: int) -> list[tuple[int, int, int, bool, int]]:
    """(M, K, N, residual, calls a step) of the UNet step's transformer linears at this latent side."""
    out = []
    for frac, c, blocks in LEVELS:
        m = 2 * int(latent * frac) ** 2
        out += [(m, c, c, False, 5 * blocks), (m, c, 3 * c, False, blocks), (m, 4 * c, c, True, blocks)]
    return out


def _row(m: int, k: int, n: int, residual: bool, calls: int, keys: list[str]) -> dict[str, Any]:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(m + k + n)
    x = (torch.randn(m, k, generator=g) + 0.3).to(dev, torch.float16)
    w0 = torch.randn(n, k, generator=g) / math.sqrt(k)
    ws = [(w0 + 1e-3 * i).to(dev, torch.float16) for i in range(max(2, common.copies_out_of_l2(n * k * 2)))]
    r = (torch.randn(m, n, generator=g) + 0.2).to(dev, torch.float16) if residual else None
    ref = linear_gluon_ref(x.double(), ws[0].double(), None, None if r is None else r.double())
    base = F.linear(x, ws[0]) if r is None else r.clone().addmm_(x, ws[0].t())
    tol = 2 * (base.double() - ref).abs().max().item()
    acc = None if r is None else r.clone()

    def cublas(w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w) if acc is None else acc.addmm_(x, w.t())  # (the engine's in-place accumulate)

    key = conv_table.linear_key(m, k, n, torch.float16)
    row: dict[str, Any] = {"m": m, "k": k, "n": n, "residual": residual, "calls": calls, "key": key,
                           "cublas_max_err": tol / 2, "configs": {}}  # fmt: skip
    row["cublas_us"] = 1e3 * common.cycled_graph_ms(cublas, ws, reps=7)
    for cfg in keys:
        if not linear_gluon_supported(x, ws[0], None, cfg, r):
            continue
        y = linear_gluon(x, ws[0], None, cfg, r)
        err = (y.double() - ref).abs().max().item()  # NaN / an unwritten tile fails the comparison
        us = 1e3 * common.cycled_graph_ms(lambda w, cfg=cfg: linear_gluon(x, w, None, cfg, r), ws, reps=7)
        row["configs"][cfg] = {"us": us, "max_err": err, "ok": bool(err <= tol)}
        print(f"{m}x{k}->{n}{' +r' if residual else ''}", cfg, round(us, 2), f"err {err:.2e} (tol {tol:.2e})",
              flush=True)  # fmt: skip
    good = {c: v["us"] for c, v in row["configs"].items() if v["ok"]}
    row["best"] = min(good, key=good.get) if good else None
    row["best_us"] = good.get(row["best"])
    row["choice"] = row["best"] if row["best"] and good[row["best"]] < 0.97 * row["cublas_us"] else None
    print(f"{m}x{k}->{n}", "cublas", round(row["cublas_us"], 2), "best", row["best"], row["best_us"], flush=True)
    return row


def run(latent: int, keys: list[str]) -> dict[str, Any]:
    rows, errors = [], []
    for m, k, n, residual, calls in shapes(latent):
        row = common.guard(errors, f"{m}x{k}->{n}", _row, m, k, n, residual, calls, keys)
        if row is not None:
            rows.append(row)
        torch.cuda.empty_cache()
    saved = sum((r["cublas_us"] - r["best_us"]) * r["calls"] for r in rows if r["choice"])
    return {"latent": latent, "rows": rows, "errors": errors, "saved_us_per_step": saved}


def markdown(res: dict[str, Any]) -> str:
    table = [[f"{r['m']}x{r['k']}->{r['n']}" + (" + r" if r["residual"] else ""), r["calls"], r["cublas_us"],
              f"{r['best_us']:.2f} ({r['best']})" if r["best"] else "-", r["choice"] or "cuBLAS"]
             for r in res["rows"]]  # fmt: skip
    every = [[f"{r['m']}x{r['k']}->{r['n']}", c, v["us"], f"{v['max_err']:.2e}", v["ok"]]
             for r in res["rows"] for c, v in r["configs"].items()]  # fmt: skip
    return "\n".join(
        [f"## Transformer linears (latent {res['latent']}², CFG batch 2): the Gluon 1x1 conv vs cuBLAS (CUDA-graph "
         "replay, weights cycled out of L2, µs a call; a choice must be 3 % faster)\n",
         common.md_table(["M x K -> N", "calls a step", "cuBLAS µs", "best Gluon µs (config)", "choice"], table),
         f"\nSaved by the choices: {res['saved_us_per_step']:.1f} µs a step.\n",
         "\n### Every candidate\n", common.md_table(["shape", "config", "µs", "max err", "ok"], every)]
        + [f"\n**ERROR** {e['what']}: {e['error']}" for e in res["errors"]]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = common.kernel_bench_args("linear_gluon", __doc__)
    ap.add_argument("--table", default=None, help="record the measured choices in this conv table (this card)")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 512² images, 96: 768²)")
    ap.add_argument("--configs", default=",".join(CANDIDATES), help="comma-separated Gluon config keys")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("linear_gluon needs an sm_90 GPU (the Gluon conv does not run on CPU)")
    res = run(a.latent, [k for k in a.configs.split(",") if k])
    ok = not res["errors"] and all(r["best"] is not None for r in res["rows"])
    if a.table and not res["errors"]:
        card = torch.cuda.get_device_name()
        entries = {r["key"]: {"best": "gluon", "config": r["choice"], "linear": True,
                              "graph_ms": {"cublas": r["cublas_us"] / 1e3, "gluon": r["best_us"] / 1e3},
                              "measured_at": common.git_commit()}
                   for r in res["rows"] if r["choice"]}  # fmt: skip
        conv_table.merge_into(Path(a.table), card, entries, keep=True)
    name = "linear_gluon" + ("" if a.latent == 64 else f"_latent{a.latent}")
    return common.publish(a.out, name, res, markdown(res), ok)


if __name__ == "__main__":
    raise SystemExit(main())
