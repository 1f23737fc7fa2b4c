"""Attention kernels on the SD shapes (bench/attention_shapes.py): ours (flash, partially fused softmax, and
the Gluon and one-pass cross kernels where they apply) vs materialized softmax and every SDPA backend; correctness,
median time, TFLOP/s, peak memory.

    python -m speedsd.bench.kernels_attention --out DIR            # ~1-2 min on an H100
    python -m speedsd.bench.kernels_attention --out DIR --sweep    # + flash block-size sweep (~4 min)

The sweep prints a ``TUNED_CONFIGS`` table to paste into speedsd/kernels/flash_attention.py.
:func:`best_attention_table` gives, per shape, the fastest of {flash, partial, sdpa, gluon, cross}: the data
behind ``Flags(attention="auto")``. On the shapes the Gluon kernel takes (gluon_shape: the d=40 and d=80
self-attention) every variant reads fused-QKV views, the only layout it takes (sm_90 only).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench.attention_shapes import LONG_SHAPES, SHAPES
from speedsd.bench.common import do_bench_ms, graph_ms, md_table, rel_err, write_results
from speedsd.kernels import attention_gluon as ag
from speedsd.kernels.cross_attention import cross_attention, cross_attention_supported
from speedsd.kernels.flash_attention import MAX_FLASH_HEAD_DIM, FlashConfig, flash_attention, flash_config
from speedsd.kernels.softmax_attention import attention_partial_softmax, attention_ref

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
OURS = ("flash", "partial", "gluon", "cross")
CANDIDATES = ("flash", "partial", "sdpa", "gluon", "cross")  # what the auto-attention table chooses from


def make_qkv(B: int, H: int, Nq: int, Nk: int, D: int, device: str = "cuda", dtype=torch.float16, fused: bool = False):
    """Head-split views of [B, N, H·D] projections, as the model produces them; ``fused`` (Nq == Nk):
    the same values as views of one [B, N, 3·H·D] (the model's fused QKV projection)."""
    g = torch.Generator(device=device).manual_seed(0)

    def proj(n: int, std: float) -> torch.Tensor:
        return torch.randn(B, n, H * D, device=device, dtype=dtype, generator=g) * std + 0.3  # [B, N, H·D]

    ts = [proj(Nq, 1.5), proj(Nk, 1.5), proj(Nk, 1.0)]
    if fused:
        assert Nq == Nk, "fused QKV is self-attention"
        ts = torch.cat(ts, dim=-1).chunk(3, dim=-1)  # 3 x [B, N, H·D] -> [B, N, 3·H·D] -> 3 column blocks
    return tuple(t.unflatten(-1, (H, D)).transpose(1, 2) for t in ts)  # -> [B, H, N, D] views


def gluon_shape(Nq: int, Nk: int, D: int) -> bool:
    """A shape the Gluon kernel takes (given fused-QKV fp16 views on an sm_90 GPU)."""
    return ag.shape_supported(Nq, Nk, D)


def _gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = ag.attention_gluon(q, k, v)
    if out is None:  # never time the SDPA fallback as "gluon"
        raise RuntimeError("attention_gluon declined these inputs (layout, dtype, shape or device)")
    return out


def _cross(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not cross_attention_supported(q, k):  # never time the flash fallback as "cross"
        raise RuntimeError("cross_attention does not take these inputs (Nk > 128, head dim or device)")
    return cross_attention(q, k, v)


def variants(long: bool = False) -> dict[str, Callable[..., torch.Tensor]]:
    """name -> fn(q, k, v). SDPA backends are pinned with sdpa_kernel around the call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pinned(name: str) -> Callable[..., torch.Tensor]:
        backend = getattr(SDPBackend, name)

        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return fn

    out: dict[str, Callable[..., torch.Tensor]] = {
        "flash": flash_attention,
        "partial": attention_partial_softmax,
        "sdpa": F.scaled_dot_product_attention,  # torch's default dispatch (what Flags(attention="sdpa") runs)
        "gluon": _gluon,  # kept by bench_shape only where attention_gluon_supported
        "cross": _cross,  # kept by bench_shape only where cross_attention_supported (Nk <= 128)
    }
    if not long:
        out["math"] = attention_ref  # materialized softmax, the paper's baseline
    for b in SDPA_BACKENDS:
        if not (long and b == "MATH"):
            out[f"sdpa_{b.split('_')[0].lower()}"] = pinned(b)
    return out


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _fatal(e: BaseException) -> bool:
    """A CUDA error that poisons the context (illegal address, launch failure): nothing after works."""
    msg = str(e)
    return "illegal memory access" in msg or "unspecified launch failure" in msg or "misaligned address" in msg


def bench_shape(
    label: str, B: int, H: int, Nq: int, Nk: int, D: int, names: tuple[str, ...] | None = None, long: bool = False
) -> list[dict[str, Any]]:
    """Every variant on one shape: first all correctness checks (each in its own try), then timings
    (do_bench with L2 flush, CUDA-graph replay, peak memory), each variant's failure kept in its row.
    On shapes the Gluon kernel takes, every variant reads fused-QKV views (``layout`` in the rows)."""
    fused = gluon_shape(Nq, Nk, D)
    q, k, v = make_qkv(B, H, Nq, Nk, D, fused=fused)
    flops = 4 * B * H * Nq * Nk * D
    ref = None if long else attention_ref(q.float(), k.float(), v.float())  # fp32 materialized reference
    fns = {n: f for n, f in variants(long).items() if names is None or n in names}
    if not (fused and ag.attention_gluon_supported(q, k)):
        fns.pop("gluon", None)
    if not cross_attention_supported(q, k):
        fns.pop("cross", None)
    rows: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():  # phase 1: correctness
        row: dict[str, Any] = {"shape": label, "B": B, "H": H, "Nq": Nq, "Nk": Nk, "D": D, "variant": name}
        if fused:
            row["layout"] = "fused qkv"
        rows[name] = row
        try:
            out = fn(q, k, v)
            torch.cuda.synchronize()
            row["rel_err"] = rel_err(out, ref) if ref is not None else None
            del out
        except Exception as e:  # an SDPA backend that does not take this shape/layout, or our kernel failing
            row["error"] = _err_text(e)
            if _fatal(e):
                raise
            continue
        if name == "flash" and D > MAX_FLASH_HEAD_DIM:
            row["note"] = "routes to partial (D > 256)"
    for name, fn in fns.items():  # phase 2: timings
        row = rows[name]
        if "error" in row:
            continue
        try:
            row["ms"] = do_bench_ms(lambda fn=fn: fn(q, k, v))
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            row["peak_mib"] = _peak_mib(lambda fn=fn: fn(q, k, v))
        except Exception as e:
            row.pop("ms", None)
            row["error"] = "timing: " + _err_text(e)
            if _fatal(e):
                raise
            continue
        try:
            row["graph_ms"] = graph_ms(lambda fn=fn: fn(q, k, v), calls=4 if long else 20)
        except Exception as e:  # a backend that cannot be captured: keep the do_bench number
            row["graph_error"] = _err_text(e)
            if _fatal(e):
                raise
    out_rows = list(rows.values())
    if ref is not None:
        fp16_err = rows.get("math", {}).get("rel_err")
        for r in out_rows:
            if r.get("rel_err") is not None and fp16_err is not None:
                r["ok"] = bool(r["rel_err"] <= 2 * fp16_err + 1e-4)  # same bar as the CPU tests
    return out_rows


def _best(rows: list[dict[str, Any]], pool: tuple[str, ...], clock: str = "ms") -> dict[str, Any] | None:
    """The fastest correct row of ``pool`` by ``clock`` ("ms": do_bench; "graph": CUDA-graph replay
    where every candidate has it, else do_bench)."""
    cands = [r for r in rows if r["variant"] in pool and "ms" in r and r.get("ok", True)]
    if not cands:
        return None
    key = "graph_ms" if clock == "graph" and all("graph_ms" in r for r in cands) else "ms"
    return min(cands, key=lambda r: r[key])


def best_attention_table(rows: list[dict[str, Any]] | None = None, device: str = "cuda") -> dict[str, dict[str, Any]]:
    """Per shape, the fastest correct one of {flash, partial, sdpa, gluon, cross} (gluon, cross: only
    measured on the shapes they take); measures them if ``rows`` is None.

    Timed by CUDA-graph replay, the engine's clock: do_bench includes the Python launch (which made the
    Triton kernels lose every small shape), and the graph includes what a launch costs inside a graph
    (cuDNN's SDPA puts a memset node and ~5 µs of idle GPU before each call on the H100:
    bench/results/gap_pairs_h100.txt). Keys are shape labels; values hold q/k shapes, dtype, the
    winner and each candidate's do_bench ms and graph-replay ms."""
    assert device == "cuda", "attention timings need a CUDA device"
    if rows is None:
        rows = [r for s in SHAPES for r in bench_shape(*s, names=CANDIDATES)]
    table: dict[str, dict[str, Any]] = {}
    for label, B, H, Nq, Nk, D in SHAPES + LONG_SHAPES:
        mine = [r for r in rows if r["shape"] == label]
        # D > 256: "flash" is the partial kernel behind one more Python call; a coin flip between the two
        pool = ("partial", "sdpa") if D > MAX_FLASH_HEAD_DIM else CANDIDATES
        best = _best(mine, pool, clock="graph")
        if best is None:
            continue
        cands = [r for r in mine if r["variant"] in CANDIDATES]
        table[label] = {
            "q_shape": [B, H, Nq, D],
            "k_shape": [B, H, Nk, D],
            "dtype": "float16",
            "best": best["variant"],
            "ms": {r["variant"]: r["ms"] for r in cands if "ms" in r},
            "graph_ms": {r["variant"]: r["graph_ms"] for r in cands if "graph_ms" in r},
        }
    return table


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per shape: flash vs the best SDPA backend and vs materialized; partial vs materialized."""
    out = {}
    for label, *_ in SHAPES + LONG_SHAPES:
        mine = [r for r in rows if r["shape"] == label]
        by = {r["variant"]: r for r in mine if "ms" in r}
        sd = _best(mine, tuple(n for n in by if n.startswith("sdpa")))
        s: dict[str, Any] = {"best_sdpa": sd["variant"] if sd else None}
        if "flash" in by and sd:
            s["flash_vs_best_sdpa"] = sd["ms"] / by["flash"]["ms"]  # >= 0.9 is the target
        if "math" in by:
            for ours in OURS:
                if ours in by:
                    s[f"{ours}_speedup_vs_math"] = by["math"]["ms"] / by[ours]["ms"]
                    s[f"{ours}_mem_vs_math"] = by[ours]["peak_mib"] / max(by["math"]["peak_mib"], 1e-9)
        s["all_ok"] = all(r.get("ok", True) for r in mine if r["variant"] in OURS)
        out[label] = s
    return out


def _sweep_shape(B: int, H: int, Nq: int, Nk: int, D: int, grid: list[FlashConfig]) -> dict[str, Any]:
    q, k, v = make_qkv(B, H, Nq, Nk, D)
    ref = attention_ref(q.float(), k.float(), v.float())
    timings = []
    for cfg in grid:
        if not cfg.split_d and (D & (D - 1) == 0 or D > 64):
            continue  # same kernel for power-of-two D; padding d=80/160 to 128/256 spills
        if cfg.block_n == 32 and D <= 128 or cfg.block_n > max(16, 1 << (Nk - 1).bit_length()):
            continue
        if D > 128 and cfg.block_m * cfg.block_n > 8192:
            continue
        try:
            if rel_err(flash_attention(q, k, v, config=cfg), ref) > 5e-3:
                continue
            timings.append((do_bench_ms(lambda cfg=cfg: flash_attention(q, k, v, config=cfg), 10, 50), cfg))
        except Exception:  # out of shared memory / registers for this tile
            continue
    timings.sort(key=lambda t: t[0])
    return {
        "key": (Nq, Nk, D),
        "default": repr(flash_config(q, Nk)),
        "default_ms": do_bench_ms(lambda: flash_attention(q, k, v)),
        "top": [(ms, repr(c)) for ms, c in timings[:5]],
        "best": timings[0][1] if timings else None,
    }


def sweep(shapes: list[tuple[str, int, int, int, int, int]] | None = None) -> dict[str, Any]:
    """Time flash_attention over a grid of block configs per shape (self-attention, cross d=40)."""
    grid = [
        FlashConfig(bm, bn, w, st, split)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for st in (2, 3)
        for split in (True, False)
    ]
    shapes = shapes or [s for s in SHAPES if s[5] <= 256 and s[3] >= 256 and (s[3] == s[4] or s[5] == 40)]
    result: dict[str, Any] = {}
    for label, B, H, Nq, Nk, D in shapes:
        result[label] = _sweep_shape(B, H, Nq, Nk, D, grid)
        torch.cuda.empty_cache()
    return result


def run(device: str = "cuda", long: bool = True, labels: list[str] | None = None) -> dict[str, Any]:
    """Correctness then timing on every shape (``labels``: only these); returns rows, per-shape summary and
    the best table.

    A shape whose setup fails is recorded and skipped; a CUDA error that poisons the context (illegal
    memory access) stops the run but keeps every row measured before it (``fatal`` says where)."""
    assert device == "cuda" and torch.cuda.is_available(), "this bench needs a CUDA GPU"
    known = [s[0] for s in SHAPES + LONG_SHAPES]
    unknown = sorted(set(labels or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown attention shape(s) {unknown}; known: {known}")
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    fatal = None
    t0 = time.time()
    todo = [(s, False) for s in SHAPES] + ([(s, True) for s in LONG_SHAPES] if long or labels else [])
    for s, is_long in [(s, x) for s, x in todo if labels is None or s[0] in labels]:
        print(f"attention bench: {s[0]} (t = {time.time() - t0:.0f} s)", flush=True)
        try:
            rows += bench_shape(*s, long=is_long)
            torch.cuda.empty_cache()
        except Exception as e:
            err = _err_text(e)
            rows.append({"shape": s[0], "variant": "*", "error": err})
            print(f"attention bench: {s[0]} failed: {err}", flush=True)
            if _fatal(e):
                fatal = f"{s[0]}: {err}"
                break
    res: dict[str, Any] = {"rows": rows, "summary": summarize(rows), "best_attention": best_attention_table(rows)}
    print(f"attention bench: done in {time.time() - t0:.0f} s", flush=True)
    if fatal:
        res["fatal"] = fatal
    return res


def markdown(res: dict[str, Any]) -> str:
    hdr = ["shape", "variant", "µs (do_bench)", "µs (graph)", "TFLOP/s", "peak MiB", "rel err", "ok"]
    body = []
    for r in res["rows"]:
        if "error" in r:
            body.append([r["shape"], r["variant"], "—", "—", "—", "—", r["error"][:60], "skip"])
        else:
            err = "—" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
            name = r["variant"] + (" (→ partial)" if "note" in r else "")
            graph = r["graph_ms"] * 1e3 if "graph_ms" in r else "—"
            body.append([r["shape"], name, r["ms"] * 1e3, graph, r["tflops"], r["peak_mib"], err, r.get("ok", "—")])
    summ = [
        [
            k,
            v.get("best_sdpa"),
            v.get("flash_vs_best_sdpa", "—"),
            v.get("flash_speedup_vs_math", "—"),
            v.get("partial_speedup_vs_math", "—"),
            v.get("partial_mem_vs_math", "—"),
            v.get("all_ok"),
        ]
        for k, v in res["summary"].items()
    ]
    cands = CANDIDATES
    best = [
        [k, v["best"]] + [v["ms"][n] * 1e3 if n in v["ms"] else "—" for n in cands]
        for k, v in res["best_attention"].items()
    ]
    parts = [
        "# Attention kernels, fp16, SD-1.4 shapes (model layout: head-split views of [B, N, H·D])",
        "µs (do_bench): triton do_bench median, L2 flushed, Python launch included; µs (graph): per call in a "
        "CUDA graph of 20 back-to-back calls (what the engine's graph replay pays).",
    ]
    if "fatal" in res:
        parts.append(f"**Run stopped by a fatal CUDA error at {res['fatal']}**; rows above it are valid.")
    parts += [
        md_table(hdr, body),
        "## Summary (targets: flash ≥ 0.9x best SDPA, ≥ 5x materialized; partial faster and leaner than materialized)",
        md_table(
            ["shape", "best sdpa", "flash / best sdpa", "flash x math", "partial x math", "partial mem / math", "ok"],
            summ,
        ),
        "## Fastest of {" + ", ".join(cands) + "} (µs, do_bench)",
        md_table(["shape", "best"] + [f"{n} µs" for n in cands], best),
    ]
    if "sweep" in res:
        lines = ["## Flash block-size sweep (best 5 per shape, ms)"]
        for label, s in res["sweep"].items():
            lines.append(f"- {label}: default {s['default']} {s['default_ms']:.4f} ms; top: {s['top']}")
        lines.append("\nTUNED_CONFIGS = {")
        lines += [f"    {s['key']}: {s['best']!r}," for s in res["sweep"].values() if s["best"] is not None]
        lines.append("}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def table_from_results(path: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """(card, table) rebuilt from a committed results JSON (``kernels.json`` or
    ``kernels_attention.json``): the choice re-made on its measured rows, no new timing."""
    data = json.loads(Path(path).read_text())
    res = data.get("attention", data)
    table = best_attention_table(res["rows"])
    env = data.get("environment", {})
    for entry in table.values():
        entry["measured_at"] = env.get("commit")
    return env["card"], table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results", help="directory for kernels_attention.{json,md}")
    ap.add_argument("--sweep", action="store_true", help="also sweep flash block sizes (~4 min more)")
    ap.add_argument("--no-long", action="store_true", help="skip the 16384-token shape")
    ap.add_argument(
        "--table-from", default=None, metavar="RESULTS_JSON",
        help="no timing: rebuild that card's auto-attention table (src/speedsd/data/attention_table.json) "
        "from a results JSON's measured rows",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.table_from:
        from speedsd.attention_table import TABLE_PATH, merge_into

        card, table = table_from_results(Path(args.table_from))
        merge_into(TABLE_PATH, card, table)
        print(card, {k: v["best"] for k, v in table.items()})
        return
    res = run(long=not args.no_long)
    if args.sweep:
        res["sweep"] = sweep()
    md = markdown(res)
    write_results(args.out, "kernels_attention", res, md)
    print(md)


if __name__ == "__main__":
    main()
