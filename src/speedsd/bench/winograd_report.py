"""The Winograd study's decisions and written conclusion, computed from its JSON payload (no GPU).

Used by speedsd.bench.winograd_study (at the end of a run, and with --from-json to re-render).
"""

from __future__ import annotations

import statistics
from collections import Counter

from speedsd.kernels import winograd as wg

SENSITIVITY = (2.0, 4.0, 16.0, 32.0)  # error ratios the sensitivity line re-decides the table at


def _key(payload_or_timing: dict | str) -> str:
    timing = payload_or_timing if isinstance(payload_or_timing, str) else payload_or_timing.get("timing", "eager")
    return "graph_ms" if timing == "graph" else "ms"


def _t(row: dict, key: str) -> float:
    v = row.get(key)
    return row["ms"] if v is None else v


def choose(res: dict, max_ratio: float, key: str = "ms") -> str:
    """Fastest of cuDNN channels-last and the Winograd rows with error ≤ max_ratio × cuDNN's."""
    cands = [r for r in res["rows"] if r["method"] == "cudnn-cl" or ("tile" in r and r["err_ratio"] <= max_ratio)]
    best = min(cands, key=lambda r: _t(r, key))
    return "cudnn" if "tile" not in best else f"{best['tile']}:{best['gemm']}"


def _label(res: dict) -> str:
    n, cin, h, _, cout = res["shape"]
    return f"{res['model']} {n}x{cin}x{h}²->{cout}"


def _studied(payload: dict) -> list[dict]:
    return [r for r in payload["results"] if not r["skipped"]]


def _cudnn(res: dict, key: str) -> float:
    return _t(next(r for r in res["rows"] if r["method"] == "cudnn-cl"), key)


def sensitivity(payload: dict, ratios: tuple[float, ...] = SENSITIVITY) -> dict[float, dict]:
    """Per error ratio: how many layers each choice ("cudnn", "F2".."F6") takes, and Σ time vs all-cuDNN."""
    key, out = _key(payload), {}
    for ratio in ratios:
        counts: Counter[str] = Counter()
        total = base = 0.0
        for res in payload["results"]:
            c = choose(res, ratio, key)
            counts["cudnn" if c == "cudnn" else f"F{c.split(':')[0]}"] += 1
            total += min(_t(r, key) for r in res["rows"] if _choice_of(r) == c)
            base += _cudnn(res, key)
        out[ratio] = {"counts": dict(counts), "sum_us": total * 1e3, "cudnn_sum_us": base * 1e3}
    return out


def _choice_of(row: dict) -> str:
    return f"{row['tile']}:{row['gemm']}" if "tile" in row else ("cudnn" if row["method"] == "cudnn-cl" else "")


def sensitivity_line(payload: dict) -> str:
    parts = []
    for ratio, s in sensitivity(payload).items():
        c = s["counts"]
        tiles = ", ".join(f"F{t} {c.get(f'F{t}', 0)}" for t in wg.TILES)
        parts.append(
            f"ratio {ratio:g}: cuDNN {c.get('cudnn', 0)}, {tiles} (Σ {s['sum_us']:.0f} of {s['cudnn_sum_us']:.0f} µs)"
        )
    return "Sensitivity (--max-err-ratio; layers per choice, Σ chosen time over the shapes): " + " | ".join(parts)


def _ratio_stats(rows: list[float]) -> str:
    return f"{statistics.median(rows):.3g}x [{min(rows):.3g}-{max(rows):.3g}]" if rows else "-"


def _max_entry(tile: int, which: int) -> float:
    return max(abs(float(v)) for row in wg.transform_matrices(tile)[which] for v in row)


def conclusion(payload: dict) -> str:
    """The written conclusion, every number computed from the payload."""
    key, timing, max_ratio = _key(payload), payload.get("timing", "eager"), payload["max_err_ratio"]
    studied = _studied(payload)
    n = len(studied)
    lines = [
        "## Conclusion",
        "",
        f"Card: {payload['card']}. Times: {timing} ({'CUDA-graph replay, no host launch cost' if key == 'graph_ms' else 'do_bench, L2 flushed, host launch cost included'}); "  # noqa: E501
        f"Winograd measured on {n} of {len(payload['results'])} shapes (the rest have Cin or Cout < {16}). "
        "Every number is from winograd_study.json.",
        "",
    ]
    # speed, before the error rule
    fastest = Counter(r["fastest_winograd"].split(":")[0] for r in studied if r["fastest_winograd"])
    wins: dict[int, list[tuple[float, str]]] = {t: [] for t in wg.TILES}
    for res in studied:
        cd = _cudnn(res, key)
        for tile in wg.TILES:
            rows = [r for r in res["rows"] if r.get("tile") == tile]
            if rows and (best := min(rows, key=lambda r: _t(r, key))) and _t(best, key) < cd:
                wins[tile].append(
                    (
                        cd / _t(best, key),
                        f"{_label(res)} {best['method']} {_t(best, key) * 1e3:.0f} vs {cd * 1e3:.0f} µs",
                    )
                )
    any_win = {lab.split(" F")[0] for t in wg.TILES for _, lab in wins[t]}
    lines.append(
        f"- Speed before the error rule: the fastest Winograd tile is F(2,3) on {fastest.get('F2', 0)}, F(4,3) on "
        f"{fastest.get('F4', 0)}, F(6,3) on {fastest.get('F6', 0)} of {n} layers; some Winograd variant beats cuDNN "
        f"channels-last on {len(any_win)}/{n}."
    )
    for tile in wg.TILES:
        top = sorted(wins[tile], reverse=True)[:4]
        lines.append(
            f"  - F({tile},3) beats cuDNN on {len(wins[tile])}/{n}"
            + (": best " + "; ".join(f"{lab} ({s:.2f}x)" for s, lab in top) if top else "")
        )
    # among the layers where Winograd can win at all, which tile is fastest
    won = Counter(r["fastest_winograd"].split(":")[0] for r in studied if _label(r) in any_win)
    most = max(wg.TILES, key=lambda t: (won.get(f"F{t}", 0), len(wins[t])))
    verdict = "cannot be judged" if not any_win else ("holds" if most == 4 else "does not hold")
    lines.append(
        f"- The paper's 4x4 choice (F(4,3)) {verdict} on this card for speed: on the "
        f"{len(any_win)} layers where Winograd beats cuDNN the fastest tile is F(2,3) on {won.get('F2', 0)}, F(4,3) "
        f"on {won.get('F4', 0)}, F(6,3) on {won.get('F6', 0)}. Bigger tiles pay where there are many tiles (large "
        "H·W) and enough channels for the T batched GEMMs to run near tensor-core rate; where every Winograd variant "
        "loses to cuDNN, F(2,3) (the least transform work) is merely the least slow."
    )
    # error
    err_parts = []
    for tile in wg.TILES:
        per_gemm = []
        for gemm in wg.ALL_GEMMS:
            vals = [
                r["err_ratio"] for res in studied for r in res["rows"] if r.get("tile") == tile and r["gemm"] == gemm
            ]
            if vals:
                per_gemm.append(f"{gemm} {_ratio_stats(vals)}")
        err_parts.append(f"F({tile},3): " + ", ".join(per_gemm))
    lines.append(
        "- Error vs fp64 as a multiple of cuDNN's fp16 error (median [min-max] over the layers): "
        + "; ".join(err_parts)
        + ". The error grows with the tile because the transforms' entries do (max |Bᵀ| "
        + ", ".join(f"{_max_entry(t, 2):.3g}" for t in wg.TILES)
        + "; max |Aᵀ| "
        + ", ".join(f"{_max_entry(t, 0):.3g}" for t in wg.TILES)
        + " for F(2,3), F(4,3), F(6,3)): U and V are rounded to fp16 before the GEMM and the output transform "
        "amplifies that rounding; bmm also stores M in fp16 (triton keeps it fp32), hence its higher ratio."
    )
    split_rows = [r for res in studied for r in res["rows"] if r.get("gemm") in wg.SPLIT_GEMMS]
    if split_rows:
        n_ok = sum(r["err_ratio"] <= max_ratio for r in split_rows)
        n_fast = sum(
            1
            for res in studied
            for r in res["rows"]
            if r.get("gemm") in wg.SPLIT_GEMMS and _t(r, key) < _cudnn(res, key)
        )
        lines.append(
            f"- Error-compensated variants (U, V as fp16 hi + lo, 3x the reduction, fp32 M): {n_ok}/{len(split_rows)} "
            f"rows within {max_ratio:g}x cuDNN's error; {n_fast} rows faster than cuDNN."
        )
    # why
    tf = [r["tflops"] for res in studied for r in res["rows"] if r["method"] == "cudnn-cl"]
    floor = min(_t(r, key) for res in studied for r in res["rows"] if "tile" in r)
    extra4 = [
        r["extra_bytes"] / 2**20 for res in studied for r in res["rows"] if r.get("tile") == 4 and r["gemm"] == "bmm"
    ]
    below = sum(_cudnn(res, key) < floor for res in studied)
    lines.append(
        f"- Why cuDNN wins on {n - len(any_win)}/{n}: its channels-last implicit GEMM runs these convs at a median "
        f"{statistics.median(tf):.0f} TFLOP/s (max {max(tf):.0f}) of direct-conv FLOPs (eager timing), so "
        "Winograd's 2.25/4/5.06x fewer multiplies must also pay for writing and re-reading V and M through HBM "
        f"(F(4,3) with bmm: median {statistics.median(extra4) if extra4 else 0:.0f} MiB a call) and two transform "
        f"kernels. The fastest Winograd call on any layer takes {floor * 1e3:.0f} µs ({timing}); cuDNN's whole conv "
        f"is faster than that on {below}/{n} layers."
    )
    # the engine
    picked = [f"{_label(r)} -> {r['choice']}" for r in payload["results"] if r["choice"] != "cudnn"]
    lines.append(
        f"- What the engine uses (error <= {max_ratio:g}x cuDNN's, fastest by {timing} time): cuDNN on "
        f"{len(payload['results']) - len(picked)}/{len(payload['results'])} shapes"
        + (", Winograd on " + "; ".join(picked) if picked else "")
        + " (src/speedsd/data/winograd_table.json, under this card's name)."
    )
    return "\n".join(lines)
