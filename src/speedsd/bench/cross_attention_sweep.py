"""Launch-config sweep of the one-pass cross-attention kernel (kernels/cross_attention.py), SD's cross shapes.

    python -m speedsd.bench.cross_attention_sweep --out DIR            # ~2-4 min on an H100/H200
    python -m speedsd.bench.cross_attention_sweep --out DIR --chunk32  # + 32-wide head-dim chunks (d=40: 32+16)

Per shape (model layout: head-split views of [B, N, H·D]): the CUDA-graph replay time (the engine's clock,
bench/common.graph_ms) of every config of :func:`config_grid`, of the launch heuristic's choice, of flash and
of SDPA, each output checked against the fp32 materialized reference (≤ 2x the fp16 materialized error, the
bar of kernels_attention). Prints the best five per shape and a ``TUNED_CONFIGS`` table to paste into
kernels/cross_attention.py. ``--chunk32`` runs last: 32-wide fp16 head-dim chunks crashed flash on sm_90
(flash_attention's docstring); a CUDA error that poisons the context stops the sweep, keeping what it has.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench.common import graph_ms, md_table, rel_err, write_results
from speedsd.bench.kernels_attention import SHAPES, _err_text, _fatal, make_qkv
from speedsd.kernels.cross_attention import CrossConfig, cross_attention, cross_config
from speedsd.kernels.flash_attention import flash_attention
from speedsd.kernels.softmax_attention import attention_ref

# the 512² UNet's cross-attentions with a tuned config (TUNED_CONFIGS); the table's other cross shapes run the
# launch heuristic
CROSS_SHAPES = [s for s in SHAPES if s[0] in ("cross 4096x77 d40", "cross 1024x77 d80", "cross 256x77 d160")]


def config_grid(heads: int, chunk32: bool = False) -> list[CrossConfig]:
    """Tile rows x warps x (query tiles per program | heads per program) x pipeline stages; ``chunk32``:
    the same grid with 32-wide head-dim chunks (only where they change the split: d=40, d=160)."""
    out = []
    for bm in (32, 64, 128):
        for warps in (4, 8):
            if bm == 32 and warps == 8:
                continue
            for mg, hg, stages in [(1, 1, 1), (1, 2, 1), (1, heads, 2), (2, 1, 2), (2, 1, 3), (4, 1, 2), (4, 1, 3)]:
                if heads % hg == 0:
                    out.append(CrossConfig(bm, warps, m_group=mg, h_group=hg, num_stages=stages, chunk32=chunk32))
    return list(dict.fromkeys(out))  # heads == 2 repeats the hg == 2 configs


def _time(fn) -> tuple[float | None, str | None]:
    try:
        return graph_ms(fn), None
    except Exception as e:
        if _fatal(e):
            raise
        return None, _err_text(e)


def sweep_shape(label: str, B: int, H: int, Nq: int, Nk: int, D: int, chunk32: bool = False) -> list[dict[str, Any]]:
    """Every config of the grid on one shape (``chunk32``: the 32-wide-chunk grid alone; else the plain
    grid plus the baselines): rows of (name, config, graph µs, rel err, ok)."""
    q, k, v = make_qkv(B, H, Nq, Nk, D)
    ref = attention_ref(q.float(), k.float(), v.float())
    bar = 2 * rel_err(attention_ref(q, k, v), ref) + 1e-4  # 2x the fp16 materialized error
    rows: list[dict[str, Any]] = []

    def add(name: str, fn, cfg: CrossConfig | None = None) -> None:
        row: dict[str, Any] = {"shape": label, "name": name, "config": repr(cfg) if cfg else None}
        rows.append(row)
        try:
            row["rel_err"] = rel_err(fn(), ref)
        except Exception as e:  # out of shared memory / registers for this tile
            if _fatal(e):
                raise
            row["error"] = _err_text(e)
            return
        row["ok"] = row["rel_err"] <= bar
        ms, err = _time(fn)
        if ms is None:
            row["error"] = err
        else:
            row["us"] = ms * 1e3

    if not chunk32:
        add("sdpa", lambda: F.scaled_dot_product_attention(q, k, v))
        add("flash", lambda: flash_attention(q, k, v))
        add("cross (heuristic)", lambda: cross_attention(q, k, v), cross_config(q, Nk))
    for cfg in config_grid(H, chunk32):
        add("cross", lambda cfg=cfg: cross_attention(q, k, v, config=cfg), cfg)
    return rows


def _best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grid's correct rows, fastest first."""
    return sorted((r for r in rows if r["name"] == "cross" and r.get("ok") and "us" in r), key=lambda r: r["us"])


def run(chunk32: bool = False) -> dict[str, Any]:
    """Every shape's plain grid, then (``chunk32``) the 32-wide-chunk grids of d=40 and d=160."""
    assert torch.cuda.is_available(), "this sweep needs a CUDA GPU"
    res: dict[str, Any] = {"shapes": {s[0]: {"key": s[3:], "rows": []} for s in CROSS_SHAPES}}
    t0 = time.time()
    passes = [(s, False) for s in CROSS_SHAPES] + [(s, True) for s in CROSS_SHAPES if chunk32 and s[5] in (40, 160)]
    for s, c32 in passes:
        print(f"cross sweep: {s[0]}{' chunk32' if c32 else ''} (t = {time.time() - t0:.0f} s)", flush=True)
        try:
            res["shapes"][s[0]]["rows"] += sweep_shape(*s, chunk32=c32)
        except Exception as e:  # a poisoned CUDA context: nothing after works
            res["fatal"] = f"{s[0]}: {_err_text(e)}"
            break
        torch.cuda.empty_cache()
    for s in res["shapes"].values():
        good = _best(s["rows"])
        s["best"] = good[0]["config"] if good else None
    print(f"cross sweep: done in {time.time() - t0:.0f} s", flush=True)
    return res


def _why(row: dict[str, Any]) -> str:
    return row["error"] if "error" in row else f"rel err {row['rel_err']:.2g}"


def markdown(res: dict[str, Any]) -> str:
    parts = ["# One-pass cross-attention: launch-config sweep (fp16, µs per call, CUDA-graph replay)"]
    if "fatal" in res:
        parts.append(f"**Stopped by a fatal CUDA error at {res['fatal']}**; rows above it are valid.")
    tuned = []
    for label, s in res["shapes"].items():
        rows = s["rows"]
        base = [r for r in rows if r["name"] != "cross"]
        good = _best(rows)
        bad = [r for r in rows if r["name"] == "cross" and (not r.get("ok", True) or "error" in r)]
        body = [[r["name"], r["config"] or "", r.get("us", "—"), r.get("rel_err", "—"), r.get("ok", "—")] for r in base]
        body += [["cross", r["config"], r["us"], r["rel_err"], True] for r in good[:5]]
        parts += [f"## {label}", md_table(["variant", "config", "µs", "rel err", "ok"], body)]
        if bad:
            why = [f"{r['config']}: {_why(r)}" for r in bad[:6]]
            parts.append(f"{len(bad)} configs failed or were wrong: " + "; ".join(why))
        if s["best"] is not None:
            tuned.append(f"    {tuple(s['key'])}: {s['best']},")
    parts.append("```python\nTUNED_CONFIGS = {\n" + "\n".join(tuned) + "\n}\n```")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results", help="directory for cross_attention_sweep.{json,md}")
    ap.add_argument("--chunk32", action="store_true", help="also 32-wide head-dim chunks (run last)")
    args = ap.parse_args(argv)
    res = run(chunk32=args.chunk32)
    md = markdown(res)
    write_results(args.out, "cross_attention_sweep", res, md)
    print(md)


if __name__ == "__main__":
    main()
