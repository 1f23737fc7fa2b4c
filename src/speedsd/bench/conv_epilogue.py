"""The Gluon conv with a fused epilogue vs the engine's unfused pair, on the VAE decoder's 3x3 convs and the
UNet's 64² / 32² conv2 (sm_90).

    python -m speedsd.bench.conv_epilogue --out bench/results [--table src/speedsd/data/conv_table.json]
                                          [--shapes vae|unet|all]

A ResNet block's convs feed a GroupNorm(32)+SiLU. Per shape (fp16 channels_last; the VAE at batch 1, the UNet
at its CFG batch 2), what runs from conv input to normalised output, CUDA-graph replay (``common.graph_ms``):

  conv1 (no residual)   unfused: the engine's conv (conv table: cuDNN or the plain Gluon conv) without bias,
                        then GroupNorm with the bias as pre-add (statistics launch + normalize launch)
                        fused:   the Gluon conv adding the bias and writing tile statistics, then the
                        merge + apply launches (kernels/gn_tile_stats.py)
  conv2 (residual)      unfused: the engine's conv, then bias + residual + statistics in one pass
                        (kernels/add_gn_stats.py), then GroupNorm's normalize launch
                        fused:   the Gluon conv adding bias and residual and writing tile statistics,
                        then merge + apply

Fused runs every candidate Gluon config (CANDIDATES that fit Co, and the plain conv's from the conv table);
the fastest is reported. ``--table``: records per shape and kind ("stats": conv1, "residual": conv2) that config
when it beat the unfused pair, else none (conv_table.record_epilogues; ops.conv_epilogue_op reads it).
Correct: each normalised output against fp32 GroupNorm(+SiLU) of the fp32 conv (+ bias + residual): every
fused candidate's max abs error <= 2x the unfused pair's + 1e-3. Exit 1 if any row is wrong or errs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speedsd import conv_table
from speedsd.bench import common
from speedsd.kernels import conv_gluon as cg
from speedsd.kernels.add_gn_stats import add_with_group_norm_stats
from speedsd.kernels.group_norm import group_norm

CL = torch.channels_last
GROUPS = 32
# (N, Cin, Cout, H = W): the VAE decoder's 3x3 convs at 512² (calls per decode as conv1 / conv2), and the UNet's
# conv2 at 64² and 32² latents (5 calls a step each; 320 and 640 channels: groups of 10 and 20)
SHAPES = {
    "vae": [(1, 512, 512, 64), (1, 512, 512, 128), (1, 512, 256, 256), (1, 256, 256, 256), (1, 256, 128, 512),
            (1, 128, 128, 512)],
    "unet": [(2, 320, 320, 64), (2, 640, 640, 32)],
}  # fmt: skip
CANDIDATES = ("g16x16n128k64s4c2e2p", "g16x16n128k64s4c2e4p", "g8x16n256k64s4c2e2p", "g8x16n128k64s4c1e1p",
              "g8x16n128k64s4c1e2p", "g8x8n256+64k64s4c1e2p", "g8x8n256+64k64s4c1e4p", "g8x8n128+32k64s5c1e1p",
              "g8x16n128+32k64s4c2e1p")  # fmt: skip


def _tensors(n: int, cin: int, cout: int, hw: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(cin + cout + hw)

    def t(*shape: int, scale: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale + mean).half().to(device)

    return {
        "x": t(n, cin, hw, hw, scale=1.0, mean=0.2).contiguous(memory_format=CL),
        "w": t(cout, cin, 3, 3, scale=(9 * cin) ** -0.5).contiguous(memory_format=CL),
        "b": t(cout, scale=0.3, mean=0.1),
        "r": t(n, cout, hw, hw, scale=1.0, mean=-0.3).contiguous(memory_format=CL),
        "gw": t(cout, scale=0.2, mean=1.0),
        "gb": t(cout, scale=0.2),
    }


def _engine_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    cfg = conv_table.choose(tuple(x.shape), w.shape[0], 3, 1, 1, x.dtype, x.device)
    if isinstance(cfg, cg.GluonConvConfig):
        return cg.conv3x3_gluon(x, w, None, cfg)
    return F.conv2d(x, w, None, padding=1)


def _add_stats(h: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return add_with_group_norm_stats(h, b, r, GROUPS, out=h)  # in place, as the engine's closing add


def _candidates(shape: tuple[int, ...], cout: int, x: torch.Tensor) -> list[cg.GluonConvConfig]:
    plain = conv_table.choose(shape, cout, 3, 1, 1, x.dtype, x.device)  # the plain conv's own winner, if Gluon
    keys = [str(plain)] if isinstance(plain, cg.GluonConvConfig) else []
    keys += [k for k in CANDIDATES if k not in keys]
    cfgs = map(cg.GluonConvConfig.parse, keys)
    # (a bn + bn1 tile writes per-channel statistics: any group size)
    return [c for c in cfgs if cout % c.width == 0 and (c.bn1 or (c.bn // c.epi_split) % (cout // GROUPS) == 0)]


def _shape_row(n: int, cin: int, cout: int, hw: int, device: str) -> dict[str, Any]:
    t = _tensors(n, cin, cout, hw, device)
    x, w, b, r, gw, gb = (t[k] for k in ("x", "w", "b", "r", "gw", "gb"))
    key = conv_table.shape_key(tuple(x.shape), cout, 3, 1, 1, x.dtype)

    def gn(y: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm(y, GROUPS, gw, gb, 1e-6, silu=True, add=add, out=y)

    ref1 = F.conv2d(x.float(), w.float(), b.float(), padding=1)
    want = {k: F.silu(F.group_norm(ref, GROUPS, gw.float(), gb.float(), 1e-6)) for k, ref in
            (("stats", ref1), ("residual", ref1 + r.float()))}  # fmt: skip
    del ref1
    unfused = {
        "stats": lambda: gn(_engine_conv(x, w), add=b),
        "residual": lambda: gn(_add_stats(_engine_conv(x, w), b, r)),
    }
    row: dict[str, Any] = {"shape": f"{n}x{cin}x{hw}²->{cout}", "key": key, "ok": True}
    row["cudnn_us"] = 1e3 * common.graph_ms(lambda: F.conv2d(x, w, None, padding=1))
    for kind in ("stats", "residual"):
        res = r if kind == "residual" else None
        err0 = float((unfused[kind]().float() - want[kind]).abs().max())
        row[f"{kind}_unfused_us"], row[f"{kind}_unfused_max_err"] = 1e3 * common.graph_ms(unfused[kind]), err0
        fused = {}
        for c in _candidates(tuple(x.shape), cout, x):

            def fn(c=c, res=res):
                return gn(cg.conv3x3_gluon(x, w, b, c, residual=res, stats_groups=GROUPS))

            err = float((fn().float() - want[kind]).abs().max())
            row["ok"] &= err <= 2 * err0 + 1e-3
            fused[str(c)] = {"us": 1e3 * common.graph_ms(fn), "max_err": err}
        best = min(fused, key=lambda k: fused[k]["us"])
        row[f"{kind}_fused"] = fused
        row[f"{kind}_best"], row[f"{kind}_best_us"] = best, fused[best]["us"]
        row[f"{kind}_saved_us"] = row[f"{kind}_unfused_us"] - fused[best]["us"]
        row[f"{kind}_choice"] = best if row[f"{kind}_saved_us"] > 0 else None
    return row


def run(device: str, shapes: str = "all") -> dict[str, Any]:
    rows, errors = [], []
    for n, cin, cout, hw in [s for k, v in SHAPES.items() if shapes in (k, "all") for s in v]:
        row = common.guard(errors, f"{n}x{cin}->{cout} at {hw}²", _shape_row, n, cin, cout, hw, device)
        if row is not None:
            rows.append(row)
            print(row, flush=True)
    return {"rows": rows, "errors": errors}


def markdown(res: dict[str, Any]) -> str:
    cols = ["shape", "cuDNN conv µs", "conv1 unfused µs", "conv1 fused µs (best config)", "saved",
            "conv2 unfused µs", "conv2 fused µs (best config)", "saved", "ok"]  # fmt: skip
    table = [
        [r["shape"], r["cudnn_us"], r["stats_unfused_us"], f"{r['stats_best_us']:.1f} ({r['stats_best']})",
         r["stats_saved_us"], r["residual_unfused_us"], f"{r['residual_best_us']:.1f} ({r['residual_best']})",
         r["residual_saved_us"], r["ok"]]
        for r in res["rows"]
    ]  # fmt: skip
    every = [[r["shape"], kind, k, v["us"], f"{v['max_err']:.2e}"]
             for r in res["rows"] for kind in ("stats", "residual") for k, v in r[f"{kind}_fused"].items()]  # fmt: skip
    return "\n".join(
        ["## Conv + GroupNorm(32)+SiLU, from conv input to normalised output: the engine's unfused pair vs the Gluon "
         "conv's fused epilogue (CUDA-graph replay, µs)\n",
         "conv1: bias + statistics epilogue (unfused: conv, GroupNorm with the bias as pre-add); conv2: bias + "
         "residual + statistics (unfused: conv, the closing add writing statistics, normalize).\n",
         common.md_table(cols, table),
         "\n### Every fused candidate (µs; max abs error of the normalised output vs fp32)\n",
         common.md_table(["shape", "epilogue", "config", "µs", "max err"], every)]
        + [f"\n**ERROR** {e['what']}: {e['error']}" for e in res["errors"]]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = common.kernel_bench_args("conv_epilogue", __doc__)
    ap.add_argument("--table", default=None, help="record the measured choices in this conv table (this card)")
    ap.add_argument("--shapes", choices=[*SHAPES, "all"], default="all", help="the VAE's, the UNet's or both")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("conv_epilogue needs an sm_90 GPU (the Gluon conv does not run on CPU)")
    res = run("cuda", a.shapes)
    ok = not res["errors"] and all(r["ok"] for r in res["rows"])
    if a.table and ok:
        choices = {
            r["key"]: {"epilogue": {k: r[f"{k}_choice"] for k in conv_table.EPILOGUE_KINDS},
                       "epilogue_us": {k: {"unfused": r[f"{k}_unfused_us"], "fused": r[f"{k}_best_us"]}
                                       for k in conv_table.EPILOGUE_KINDS},
                       "epilogue_measured_at": common.git_commit()}
            for r in res["rows"]
        }  # fmt: skip
        conv_table.record_epilogues(Path(a.table), torch.cuda.get_device_name(), choices)
    return common.publish(a.out, "conv_epilogue", res, markdown(res), ok)


if __name__ == "__main__":
    raise SystemExit(main())
