"""Upsamplers as one Gluon sub-pixel launch vs the engine's cuDNN phase conv + interleave (sm_90).

    python -m speedsd.bench.subpixel_gluon --out bench/results [--table src/speedsd/data/conv_table.json]
        [--latent 64] [--shapes unet|vae|all] [--configs KEY,KEY,...]

Inside the denoising loop the UNet's 16² and 32² upsamplers (at 64² latents; 24² and 48² at 96²) run in sub-pixel
form (kernels/subpixel_conv.py): nearest 2x + 3x3 conv as four 2x2 phase convs on the small input; so do the VAE
decoder's three (64², 128², 256² inputs at 512² images), whose interleave also writes the next GroupNorm's
statistics. The engine runs that as cuDNN's conv of the folded weight into 4·Co channels [N, 4·Co, H+1, W+1]
(the VAE's largest phase by phase), then a Triton interleave adding the bias.
:func:`speedsd.kernels.subpixel_conv_gluon.subpixel_conv_gluon` is one launch: each (tile, phase, channel block)
unit of the Gluon conv stores its tile straight into the interleaved output (the VAE's: with GroupNorm(32)
statistics). Per shape (fp16 channels_last; the UNet at CFG batch 2, the VAE at batch 1), CUDA-graph replay with
as many weight copies cycled as keep them out of L2, µs a call: the engine's pair, its conv alone, and every
candidate config. Correct: max abs error against fp64 upsample + conv <= 2x the engine pair's. ``--table``:
records per shape the fastest correct candidate where it beats the pair (conv_table.subpixel_config reads it: the
key is the phase conv's, k2 into 4·Co channels).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speedsd import conv_table
from speedsd.bench import common
from speedsd.kernels.subpixel_conv import subpixel_upsample_conv, subpixel_upsample_conv_ref
from speedsd.kernels.subpixel_conv_gluon import subpixel_conv_gluon, subpixel_conv_gluon_supported
from speedsd.kernels.subpixel_weight import subpixel_weight

CL = torch.channels_last
# (batch, C = Co, input side as a multiple of the latent side, GroupNorm groups of the next reader or None):
# the UNet's 16²-level and 32²-level upsamplers (CFG batch 2), the VAE decoder's three (batch 1)
SHAPES = {
    "unet": [(2, 1280, 0.25, None), (2, 640, 0.5, None)],
    "vae": [(1, 512, 1, 32), (1, 512, 2, 32), (1, 256, 4, 32)],
}
CANDIDATES = ("g8x8n256+64k64s4c1e2p", "g8x8n256+64k64s4c1e4p", "g8x8n128+32k64s5c1e1p", "g8x8n128k64s4c1e1p",
              "g8x8n128k64s5c1e2p", "g8x16n128k64s4c2e1p", "g8x8b2n128k64s4c2e1p", "g8x16n256k64s4c2e2p",
              "g8x8n64+16k64s6c1e1p", "g16x16n128k64s4c2e2p", "g16x16n128k64s4c2e4p")  # fmt: skip


def _shape_row(n: int, c: int, side: int, groups: int | None, keys: list[str]) -> dict[str, Any]:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(c + side)
    x = (torch.randn(n, c, side, side, generator=g) + 0.3).to(dev, torch.float16).contiguous(memory_format=CL)
    w0 = torch.randn(c, c, 3, 3, generator=g) / math.sqrt(9 * c)
    bias = (torch.randn(c, generator=g) * 0.3).to(dev, torch.float16)
    copies = max(2, common.copies_out_of_l2(16 * c * c * 2))  # W4: 4·Co x C x 2 x 2 halves
    ws = [(w0 + 1e-3 * i).to(dev, torch.float16).contiguous(memory_format=CL) for i in range(copies)]
    w4s = [subpixel_weight(w) for w in ws]
    ref = subpixel_upsample_conv_ref(x.double(), ws[0].double(), bias.double())
    engine = subpixel_upsample_conv(x, w4s[0], bias, stats_groups=groups)
    tol = 2 * (engine.double() - ref).abs().max().item()
    del engine

    def time_us(fn) -> float:
        return 1e3 * common.cycled_graph_ms(fn, w4s, reps=7)

    key2 = conv_table.shape_key(tuple(x.shape), 4 * c, 2, 1, 1, torch.float16)  # the phase conv's
    row: dict[str, Any] = {"shape": f"{n}x{c}x{side}²->{c}", "stats_groups": groups, "key": key2,
                           "engine_max_err": tol / 2, "configs": {}}  # fmt: skip
    row["engine_us"] = time_us(lambda w4: subpixel_upsample_conv(x, w4, bias, stats_groups=groups))
    row["engine_conv_us"] = time_us(lambda w4: F.conv2d(x, w4, None, padding=1))
    for key in keys:
        if not subpixel_conv_gluon_supported(x, w4s[0], bias, key, groups):
            continue
        out = torch.full((n, c, 2 * side, 2 * side), float("nan"), device=dev, dtype=torch.float16)
        y = subpixel_conv_gluon(x, w4s[0], bias, key, out=out.contiguous(memory_format=CL), stats_groups=groups)
        err = (y.double() - ref).abs().max().item()  # NaN (an unwritten output) fails the comparison
        ok = bool(err <= tol)
        del y, out
        us = time_us(lambda w4, key=key: subpixel_conv_gluon(x, w4, bias, key, stats_groups=groups))
        row["configs"][key] = {"us": us, "max_err": err, "ok": ok}
        print(row["shape"], key, round(us, 2), f"err {err:.2e} (tol {tol:.2e})", ok, flush=True)
    good = {k: v["us"] for k, v in row["configs"].items() if v["ok"]}
    row["best"] = min(good, key=good.get) if good else None
    row["best_us"] = good.get(row["best"])
    row["choice"] = row["best"] if row["best"] and good[row["best"]] < row["engine_us"] else None
    print(row["shape"], "engine", round(row["engine_us"], 2), "best", row["best"], row["best_us"], flush=True)
    return row


def run(latent: int, keys: list[str], shapes: str = "all") -> dict[str, Any]:
    rows, errors = [], []
    torch.backends.cudnn.allow_tf32 = False
    for n, c, scale, groups in [s for k, v in SHAPES.items() if shapes in (k, "all") for s in v]:
        side = int(latent * scale)
        row = common.guard(errors, f"{n}x{c} at {side}²", _shape_row, n, c, side, groups, keys)
        if row is not None:
            rows.append(row)
        torch.cuda.empty_cache()
    return {"latent": latent, "rows": rows, "errors": errors}


def markdown(res: dict[str, Any]) -> str:
    table = [[r["shape"], r["engine_us"], r["engine_conv_us"],
              f"{r['best_us']:.1f} ({r['best']})" if r["best"] else "-", r["choice"] or "engine"]
             for r in res["rows"]]  # fmt: skip
    every = [[r["shape"], k, v["us"], f"{v['max_err']:.2e}", v["ok"]]
             for r in res["rows"] for k, v in r["configs"].items()]  # fmt: skip
    return "\n".join(
        [f"## Upsamplers (latent {res['latent']}²): one Gluon sub-pixel launch vs cuDNN phase conv + interleave "
         "(CUDA-graph replay, weights cycled out of L2, µs; batch 1 rows: the VAE's, with GroupNorm(32) statistics)\n",
         common.md_table(["shape", "engine pair µs", "its conv µs", "best Gluon µs (config)", "choice"], table),
         "\n### Every candidate\n", common.md_table(["shape", "config", "µs", "max err", "ok"], every)]
        + [f"\n**ERROR** {e['what']}: {e['error']}" for e in res["errors"]]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = common.kernel_bench_args("subpixel_gluon", __doc__)
    ap.add_argument("--table", default=None, help="record the measured choices in this conv table (this card)")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 512² images, 96: 768²)")
    ap.add_argument("--configs", default=",".join(CANDIDATES), help="comma-separated Gluon config keys")
    ap.add_argument("--shapes", choices=[*SHAPES, "all"], default="all", help="the UNet's, the VAE's or both")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("subpixel_gluon needs an sm_90 GPU (the Gluon conv does not run on CPU)")
    res = run(a.latent, [k for k in a.configs.split(",") if k], a.shapes)
    ok = not res["errors"] and all(r["best"] is not None for r in res["rows"])
    if a.table and ok:
        card = torch.cuda.get_device_name()
        entries = {r["key"]: {"best": "gluon", "config": r["choice"], "gluon_config": r["choice"],
                              "graph_ms": {"cudnn+interleave": r["engine_us"] / 1e3, "gluon": r["best_us"] / 1e3},
                              "measured_at": common.git_commit(), "subpixel": True}
                   for r in res["rows"] if r["choice"]}  # fmt: skip
        conv_table.merge_into(Path(a.table), card, entries, keep=True)
    name = "subpixel_gluon" + ("" if a.latent == 64 else f"_latent{a.latent}")
    name += "" if a.shapes == "all" else f"_{a.shapes}"
    return common.publish(a.out, name, res, markdown(res), ok)


if __name__ == "__main__":
    raise SystemExit(main())
