"""The UNet's linears: torch's cuBLAS(Lt) choice vs every algorithm cuBLASLt's heuristic offers (CUDA GPUs).

    python -m speedsd.bench.gemm_algos --out bench/results [--table src/speedsd/data/gemm_table.json]
        [--model random:sd1.4] [--size 512]

Records the linear problems of one UNet step at CFG batch 2 (:func:`speedsd.ops.linear_op` and
``linear_accumulate_op`` with ``gemm_algos`` on collect every call's problem), then
per problem times torch's call and each heuristic algorithm (:mod:`speedsd.cublaslt`) in CUDA-graph replay with
as many weight copies cycled as keep them out of L2, µs a call. Correct: max abs error against fp64 <= 2x
torch's (+ 1e-3). ``--table``: records per card the fastest correct algorithm where it beats torch by >= 3 %
(:mod:`speedsd.gemm_table`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speedsd import cublaslt, gemm_table, ops
from speedsd.bench import common

MARGIN = 0.97  # an algorithm is recorded where it takes <= this fraction of torch's time


def collect(model: str, size: int) -> dict[cublaslt.Problem, int]:
    """The linear problems of one eager UNet step (CFG batch 2) with the default flags, and their calls a step."""
    import speedsd

    pipe = speedsd.load(model)
    latent = size // pipe.vae_scale
    x = torch.randn(2, pipe.latent_channels, latent, latent, device=pipe.device)
    emb = pipe.encode_text(["", "a photograph of an astronaut riding a horse"])
    counts: dict[cublaslt.Problem, int] = {}

    class Counting(set):
        def add(self, p: cublaslt.Problem) -> None:
            counts[p] = counts.get(p, 0) + 1

    # every linear's problem is collected before its table lookup: the step may run the table's entries
    try:
        ops._seen_linears = Counting()
        with torch.inference_mode():
            pipe.unet_step(x, torch.tensor(500), emb, eager=True)
    finally:
        ops._seen_linears = None
    del pipe
    torch.cuda.empty_cache()
    return counts


@dataclass
class Operands:
    """One problem's inputs on the GPU (non-zero mean; ``ws``: weight copies cycled out of L2), its fp64
    reference, the error bound a candidate must meet (2x torch's + 1e-3) and torch's call on weight w."""

    x: torch.Tensor
    ws: list[torch.Tensor]
    bias: torch.Tensor | None
    r0: torch.Tensor | None  # accumulate: the residual the product lands on
    ref: torch.Tensor
    tol: float
    torch_call: Callable[[torch.Tensor], torch.Tensor]


def operands(p: cublaslt.Problem) -> Operands:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(p.m + p.k + p.n)
    xs = (torch.randn(p.m, p.ldx, generator=g) + 0.3).to(dev, p.dtype)
    x = xs[:, : p.k]
    w0 = torch.randn(p.n, p.ldw, generator=g) / p.k**0.5
    ws = [(w0 + 1e-3 * i).to(dev, p.dtype)[:, : p.k] for i in range(max(2, common.copies_out_of_l2(p.n * p.ldw * 2)))]
    bias = (torch.randn(p.n, generator=g) * 0.3).to(dev, p.dtype) if p.bias else None
    r0 = (torch.randn(p.m, p.n, generator=g) + 0.2).to(dev, p.dtype) if p.accumulate else None
    ref = F.linear(x.double(), ws[0].double(), None if bias is None else bias.double())
    ref = ref if r0 is None else ref + r0.double()
    acc = None if r0 is None else r0.clone()

    def torch_call(w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, bias) if acc is None else acc.addmm_(x, w.t())  # (the engine's in-place accumulate)

    base = F.linear(x, ws[0], bias) if r0 is None else r0.clone().addmm_(x, ws[0].t())
    tol = 2 * (base.double() - ref).abs().max().item() + 1e-3
    return Operands(x, ws, bias, r0, ref, tol, torch_call)


def _row(p: cublaslt.Problem, calls: int) -> dict[str, Any]:
    dev = torch.device("cuda")
    o = operands(p)
    x, ws, bias, r0, ref, tol = o.x, o.ws, o.bias, o.r0, o.ref, o.tol
    row: dict[str, Any] = {"key": gemm_table.problem_key(p), "calls": calls, "torch_max_err": (tol - 1e-3) / 2,
                           "torch_us": 1e3 * common.cycled_graph_ms(o.torch_call, ws, reps=7), "algos": []}  # fmt: skip
    plan = cublaslt.Plan(p, dev.index or 0)
    out = torch.empty(p.m, p.n, device=dev, dtype=p.dtype)
    for rank, (algo, config, waves) in enumerate(plan.heuristics()):
        plan.algo = algo
        if r0 is None:
            out.fill_(float("nan"))
        else:
            out.copy_(r0)
        plan.run(x, ws[0], bias, out)
        err = (out.double() - ref).abs().max().item()  # NaN (an unwritten output) fails the comparison
        us = 1e3 * common.cycled_graph_ms(lambda w, plan=plan: plan.run(x, w, bias, out), ws, reps=7)
        row["algos"].append({"rank": rank, "config": config, "waves": round(waves, 3), "us": us, "max_err": err,
                             "ok": bool(err <= tol)})  # fmt: skip
    good = [a for a in row["algos"] if a["ok"]]
    best = min(good, key=lambda a: a["us"]) if good else None
    row["best"] = best
    row["choice"] = best if best and best["us"] <= MARGIN * row["torch_us"] else None
    print(row["key"], calls, "torch", round(row["torch_us"], 2), "best", best and round(best["us"], 2),
          "rank", best and best["rank"], flush=True)  # fmt: skip
    return row


def run(model: str, size: int) -> dict[str, Any]:
    rows, errors = [], []
    for p, calls in sorted(collect(model, size).items(), key=lambda kv: -kv[1]):
        row = common.guard(errors, gemm_table.problem_key(p), _row, p, calls)
        if row is not None:
            rows.append(row)
        torch.cuda.empty_cache()
    saved = sum((r["torch_us"] - r["choice"]["us"]) * r["calls"] for r in rows if r["choice"])
    total = sum(r["torch_us"] * r["calls"] for r in rows)
    return {"model": model, "size": size, "rows": rows, "errors": errors, "torch_us_per_step": total,
            "saved_us_per_step": saved}  # fmt: skip


def markdown(res: dict[str, Any]) -> str:
    table = [[r["key"], r["calls"], r["torch_us"], f"{r['best']['us']:.2f} (rank {r['best']['rank']})" if r["best"]
              else "-", "cuBLASLt" if r["choice"] else "torch"] for r in res["rows"]]  # fmt: skip
    return "\n".join(
        [f"## UNet linears ({res['model']}, {res['size']}², CFG batch 2): torch vs cuBLASLt's heuristic algorithms "
         "(CUDA-graph replay, weights cycled out of L2, µs a call; a choice must take <= 97 % of torch's time)\n",
         common.md_table(["problem", "calls a step", "torch µs", "best algorithm µs", "choice"], table),
         f"\ntorch's linears: {res['torch_us_per_step']:.1f} µs a step; the choices save "
         f"{res['saved_us_per_step']:.1f} µs a step."]
        + [f"\n**ERROR** {e['what']}: {e['error']}" for e in res["errors"]]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = common.kernel_bench_args("gemm_algos", __doc__)
    ap.add_argument("--table", default=None, help="record the measured choices in this GEMM table (this card)")
    ap.add_argument("--model", default="random:sd1.4")
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemm_algos needs a CUDA GPU (cuBLASLt)")
    res = run(a.model, a.size)
    if a.table and not res["errors"]:
        entries = {r["key"]: {"config": r["choice"]["config"], "rank": r["choice"]["rank"],
                              "graph_us": {"torch": r["torch_us"], "cublaslt": r["choice"]["us"]},
                              "measured_at": common.git_commit()}
                   for r in res["rows"] if r["choice"]}  # fmt: skip
        gemm_table.merge_into(Path(a.table), torch.cuda.get_device_name(), entries, keep=True)
    return common.publish(a.out, "gemm_algos", res, markdown(res), not res["errors"])


if __name__ == "__main__":
    raise SystemExit(main())
