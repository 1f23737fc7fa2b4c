"""GroupNorm(+SiLU) plan sweep: every forced plan on every SD shape, timed by CUDA-graph replay.

Run through ``python -m speedsd.bench.kernels_norm_gelu --variants --out DIR`` (or this module's
``main``). Writes ``group_norm_variants.{json,md}`` (every variant's time, the best per shape, the
auto plan's rank) and ``group_norm_tuned.py``: the ``TUNED`` dict to paste into
speedsd/kernels/group_norm_plan.py so ``path="auto"`` runs the measured winner on that card.
"""

from __future__ import annotations

import argparse
import importlib
import math
import pprint
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench import common
from speedsd.bench.kernels_norm_gelu import GROUPS, SMOKE_GN, _graph_timer, groupnorm_shapes

gn = importlib.import_module("speedsd.kernels.group_norm")

Knobs = dict[str, Any]


def variants(n: int, c: int, s: int, channels_last: bool, sm: int) -> list[Knobs]:
    """Candidate plan knobs for one shape (duplicates of the same plan are dropped by the caller)."""
    out: list[Knobs] = [{"path": "auto"}]
    try:
        fused = gn.plan_group_norm(n, c, s, GROUPS, channels_last, 2, sm, "fused")
        out += [{"path": "fused"}] + [{"path": "fused", "warps": w} for w in (fused.warps // 2, fused.warps * 2)]
        if channels_last:
            out.append({"path": "fused", "gb": 1})
    except ValueError:
        if channels_last:  # one group a program may still fit one tile
            try:
                gn.plan_group_norm(n, c, s, GROUPS, True, 2, sm, "fused", gb=1)
                out.append({"path": "fused", "gb": 1})
            except ValueError:
                pass
    if channels_last:
        for programs in (sm, 2 * sm, 4 * sm):
            out.append({"path": "split", "grouped": True, "programs": programs})
        out += [{"path": "split", "grouped": True, "tile": 16384}, {"path": "split", "grouped": True, "tile": 4096}]
        out += [{"path": "split", "grouped": False}, {"path": "split", "grouped": False, "tile": 8192}]
        # group-block split with bigger tiles / fewer programs: the winners on the VAE's big shapes
        out += [{"path": "split", "grouped": False, "tile": 16384}]
        out += [{"path": "split", "grouped": False, "tile": 8192, "programs": p} for p in (sm, 2 * sm, 8 * sm)]
    else:
        out += [
            {"path": "split"},
            {"path": "split", "tile": 8192, "programs": 2 * sm},
            {"path": "split", "tile": 16384, "programs": sm},
            {"path": "split", "tile": 8192, "programs": 4 * sm},
        ]
        if n * c * s * 2 <= 32 * 2**20:
            out.append({"path": "loop", "tile": 8192})
    return [v for v in out if v.get("warps", 4) >= 4 and v.get("warps", 4) <= 32]


def _label(knobs: Knobs) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items())


def sweep_shape(model: str, n: int, c: int, h: int, layout: str, device: str) -> dict[str, Any]:
    cl = layout == "channels_last"
    mf = torch.channels_last if cl else torch.contiguous_format
    x = (torch.randn(n, c, h, h, device=device) * 2 + 0.5).to(torch.float16).contiguous(memory_format=mf)
    w = (torch.randn(c, device=device) * 0.5 + 1).half()
    b = (torch.randn(c, device=device) * 0.5).half()
    ref32 = gn.group_norm_ref(x.float(), GROUPS, w.float(), b.float(), 1e-5, True)
    e_torch = common.rel_err(F.silu(F.group_norm(x, GROUPS, w, b, 1e-5)), ref32)
    sm = gn._sm_count(torch.device(device))
    timer = _graph_timer(device)
    out = torch.empty_like(x)
    rows, seen = [], set()
    for knobs in variants(n, c, h * h, cl, sm):
        kw = {k: v for k, v in knobs.items() if k != "path"}
        try:
            plan = gn.plan_group_norm(n, c, h * h, GROUPS, cl, 2, sm, knobs["path"], **kw)
        except ValueError as e:
            rows.append({"variant": _label(knobs), "error": str(e)})
            continue
        if plan in seen and knobs["path"] != "auto":
            continue
        seen.add(plan)
        row: dict[str, Any] = {"variant": _label(knobs), "knobs": knobs, "plan": repr(plan)}
        try:
            y = gn.group_norm(x, GROUPS, w, b, 1e-5, True, out=out, **knobs)
            err = common.rel_err(y, ref32)
            row["err"], row["correct"] = err, bool(math.isfinite(err) and err <= 2 * e_torch + 1e-6)
            row["graph_us"] = timer(lambda kn=knobs: gn.group_norm(x, GROUPS, w, b, 1e-5, True, out=out, **kn))
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the sweep
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"  ERROR {model} {n}x{c}x{h}x{h} {layout} {_label(knobs)}: {row['error']}", flush=True)
        rows.append(row)
    torch_us = timer(lambda: F.silu(F.group_norm(x, GROUPS, w, b, 1e-5)))
    ok = [r for r in rows if r.get("correct")]
    best = min(ok, key=lambda r: r["graph_us"]) if ok else None
    auto = next((r for r in rows if r["variant"] == "path=auto"), None)
    res = {
        "model": model,
        "shape": f"{n}x{c}x{h}x{h}",
        "layout": layout,
        "key": (n, c, h * h, GROUPS, cl, 2),
        "mbytes": round(2 * x.numel() * 2 / 2**20, 2),
        "torch_graph_us": torch_us,
        "variants": rows,
        "best": best and best["variant"],
        "best_knobs": best and best["knobs"],
        "best_us": best and best["graph_us"],
        "auto_us": auto and auto.get("graph_us"),
    }
    print(
        f"GNV {res['shape']:>15s} {layout:13s} auto {_f(res['auto_us'])} us best {_f(res['best_us'])} us "
        f"[{res['best']}] torch {torch_us:.1f} us ({len(rows)} variants)",
        flush=True,
    )
    return res


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def tuned_source(results: list[dict[str, Any]], card: str) -> str:
    """Python source of the TUNED dict: the best plan per shape where it beats auto by > 3 %."""
    table = {}
    for r in results:
        if r["best_knobs"] is None or r["auto_us"] is None or r["best_us"] > 0.97 * r["auto_us"]:
            continue
        table[tuple(r["key"])] = r["best_knobs"]
    body = pprint.pformat(table, width=110, sort_dicts=True)
    return (
        f"# measured on {card} by speedsd.bench.kernels_norm_gelu --variants (graph replay, fp16, SiLU)\n"
        f"# only shapes where the best forced plan beats auto by > 3 %\n"
        f"TUNED: dict[tuple[int, int, int, int, bool, int], dict[str, int | str | bool]] = {body}\n"
    )


def markdown(results: list[dict[str, Any]], card: str) -> str:
    head = ["shape", "layout", "MB", "torch us", "auto us", "best us", "best/auto", "best x torch", "best variant"]
    rows = []
    for r in results:
        a, bst = r["auto_us"], r["best_us"]
        rows.append(
            [r["shape"], r["layout"], r["mbytes"], r["torch_graph_us"], a if a is not None else "-",
             bst if bst is not None else "-", (bst / a) if a and bst else "-",
             (r["torch_graph_us"] / bst) if bst else "-", r["best"] or "-"]
        )  # fmt: skip
    ratio = [r["torch_graph_us"] / r["best_us"] for r in results if r["best_us"]]
    auto = [r["torch_graph_us"] / r["auto_us"] for r in results if r["auto_us"]]
    geo = lambda v: math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")  # noqa: E731
    lines = [
        f"## GroupNorm+SiLU plan sweep on {card} (CUDA-graph replay, fp16, 32 groups)\n",
        f"Geomean speedup vs torch: auto x{geo(auto):.2f}, best-per-shape x{geo(ratio):.2f}.\n",
        common.md_table(head, rows),
        "\n### All variants\n",
    ]
    for r in results:
        v = [[x["variant"], x.get("graph_us", "-"), x.get("correct", "-"), x.get("error", "")] for x in r["variants"]]
        lines += [f"\n**{r['shape']} {r['layout']}**\n", common.md_table(["variant", "graph us", "ok", "error"], v)]
    return "\n".join(lines)


def run_variants(out_dir: str, smoke: bool = False, layouts: tuple[str, ...] = ("nchw", "channels_last")) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    shapes = SMOKE_GN if smoke or device == "cpu" else groupnorm_shapes()
    results = [sweep_shape(m, n, c, h, lay, device) for m, n, c, h in shapes for lay in layouts]
    card = common.environment()["card"]
    common.write_results(out_dir, "group_norm_variants", {"results": results}, markdown(results, card))
    src = tuned_source(results, card)
    Path(out_dir, "group_norm_tuned.py").write_text(src)
    print(markdown(results, card).split("\n### All variants")[0])
    print(src)
    bad = [v for r in results for v in r["variants"] if v.get("correct") is False or "error" in v]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m speedsd.bench.group_norm_variants", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--layouts", default="nchw,channels_last", help="comma-separated: nchw, channels_last")
    a = ap.parse_args(argv)
    return run_variants(a.out, a.smoke, tuple(a.layouts.split(",")))


if __name__ == "__main__":
    raise SystemExit(main())
