"""The Gluon conv with a fused epilogue vs the engine's unfused pair, on the VAE decoder's 3x3 convs (sm_90).

    python -m speedsd.bench.conv_epilogue --out bench/results

A ResNet block's convs feed a GroupNorm(32)+SiLU. Per VAE shape (fp16 channels_last, batch 1), what runs
from conv input to normalised output, CUDA-graph replay (``common.graph_ms``):

  conv1 (no residual)   unfused: the engine's conv (conv table: cuDNN or the plain Gluon conv) without bias,
                        then GroupNorm with the bias as pre-add (statistics launch + normalize launch)
                        fused:   the Gluon conv adding the bias and writing tile statistics, then the
                        merge + apply launches (kernels/gn_tile_stats.py)
  conv2 (residual)      unfused: the engine's conv, then bias + residual + statistics in one pass
                        (kernels/add_gn_stats.py), then GroupNorm's normalize launch
                        fused:   the Gluon conv adding bias and residual and writing tile statistics,
                        then merge + apply

plus the conv alone: cuDNN and the Gluon conv as the table stores it and with the fused epilogue's slabs.
Correct: each fused normalised output against fp32 GroupNorm(+SiLU) of the fp32 conv (+ bias + residual):
error <= 2x the unfused pair's + 1e-3 (max abs). Exit 1 if any row is wrong or errs.
"""

from __future__ import annotations

import dataclasses
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
# (Cin, Cout, H = W): the VAE decoder's 3x3 convs at 512² (calls per decode as conv1 / conv2)
SHAPES = [(512, 512, 64), (512, 512, 128), (512, 256, 256), (256, 256, 256), (256, 128, 512), (128, 128, 512)]
SLABS = (2, 4, 8)


def _tensors(cin: int, cout: int, hw: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(cin + cout + hw)

    def t(*shape: int, scale: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale + mean).half().to(device)

    return {
        "x": t(1, cin, hw, hw, scale=1.0, mean=0.2).contiguous(memory_format=CL),
        "w": t(cout, cin, 3, 3, scale=(9 * cin) ** -0.5).contiguous(memory_format=CL),
        "b": t(cout, scale=0.3, mean=0.1),
        "r": t(1, cout, hw, hw, scale=1.0, mean=-0.3).contiguous(memory_format=CL),
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


def _shape_row(cin: int, cout: int, hw: int, device: str) -> dict[str, Any]:
    t = _tensors(cin, cout, hw, device)
    x, w, b, r, gw, gb = (t[k] for k in ("x", "w", "b", "r", "gw", "gb"))
    key = conv_table.shape_key(tuple(x.shape), cout, 3, 1, 1, x.dtype)
    cfg = conv_table.gluon_epilogue_config(tuple(x.shape), cout, x.dtype, x.device) or cg.resolve(None, cout)

    def gn(y: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm(y, GROUPS, gw, gb, 1e-6, silu=True, add=add, out=y)

    pairs = {
        "conv1_unfused": lambda: gn(_engine_conv(x, w), add=b),
        "conv1_fused": lambda: gn(cg.conv3x3_gluon(x, w, b, cfg, stats_groups=GROUPS)),
        "conv2_unfused": lambda: gn(_add_stats(_engine_conv(x, w), b, r)),
        "conv2_fused": lambda: gn(cg.conv3x3_gluon(x, w, b, cfg, residual=r, stats_groups=GROUPS)),
    }
    row: dict[str, Any] = {"shape": f"1x{cin}x{hw}²->{cout}", "key": key, "gluon_config": str(cfg)}
    ref1 = F.conv2d(x.float(), w.float(), b.float(), padding=1)
    for name, fn in pairs.items():
        ref = ref1 + r.float() if name.startswith("conv2") else ref1
        want = F.silu(F.group_norm(ref, GROUPS, gw.float(), gb.float(), 1e-6))
        row[f"{name}_max_err"] = float((fn().float() - want).abs().max())
        row[f"{name}_us"] = 1e3 * common.graph_ms(fn)
    row["cudnn_us"] = 1e3 * common.graph_ms(lambda: F.conv2d(x, w, None, padding=1))
    part = torch.empty(3, 1, GROUPS, 4096 * 8, device=device)  # room for every tiling's (tile, warp) partials
    for slabs in SLABS:
        c = dataclasses.replace(cfg, epi_split=max(1, min(slabs, cfg.bn // 16)))
        row[f"gluon_e{c.epi_split}_us"] = 1e3 * common.graph_ms(lambda c=c: cg.conv3x3_gluon(x, w, b, c))
        try:  # (fewer slabs may not fit the statistics' scratch in shared memory)
            ms = common.graph_ms(lambda c=c: cg._launch(x, w, b, torch.empty_like(r), c, r, part))
        except Exception as e:  # noqa: BLE001 - recorded in the row
            ms = float("nan")
            row[f"gluon_res_stats_e{c.epi_split}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        row[f"gluon_res_stats_e{c.epi_split}_us"] = 1e3 * ms
    for k in ("conv1", "conv2"):
        row[f"{k}_saved_us"] = row[f"{k}_unfused_us"] - row[f"{k}_fused_us"]
        row[f"{k}_ok"] = row[f"{k}_fused_max_err"] <= 2 * row[f"{k}_unfused_max_err"] + 1e-3
    return row


def run(device: str) -> dict[str, Any]:
    rows, errors = [], []
    for cin, cout, hw in SHAPES:
        row = common.guard(errors, f"{cin}->{cout} at {hw}²", _shape_row, cin, cout, hw, device)
        if row is not None:
            rows.append(row)
            print(row, flush=True)
    return {"rows": rows, "errors": errors}


def markdown(res: dict[str, Any]) -> str:
    cols = ["shape", "Gluon config", "conv1 unfused µs", "conv1 fused µs", "saved", "conv2 unfused µs",
            "conv2 fused µs", "saved", "cuDNN µs", "max err (unfused / fused)", "ok"]  # fmt: skip
    table = [
        [r["shape"], r["gluon_config"], r["conv1_unfused_us"], r["conv1_fused_us"], r["conv1_saved_us"],
         r["conv2_unfused_us"], r["conv2_fused_us"], r["conv2_saved_us"], r["cudnn_us"],
         f"{r['conv2_unfused_max_err']:.2e} / {r['conv2_fused_max_err']:.2e}", r["conv1_ok"] and r["conv2_ok"]]
        for r in res["rows"]
    ]  # fmt: skip
    slab_cols = ["shape"] + [k for k in (res["rows"][0] if res["rows"] else {}) if k.startswith("gluon_")]
    slabs = [[r["shape"]] + [r.get(k, "") for k in slab_cols[1:]] for r in res["rows"]]
    return "\n".join(
        ["## Conv + GroupNorm(32)+SiLU, from conv input to normalised output: unfused vs the Gluon conv's fused "
         "epilogue (CUDA-graph replay, µs)\n", common.md_table(cols, table),
         "\n### The conv alone by epilogue slabs (µs; res_stats: residual + statistics epilogue)\n",
         common.md_table(slab_cols, slabs)]
        + [f"\n**ERROR** {e['what']}: {e['error']}" for e in res["errors"]]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = common.kernel_bench_args("conv_epilogue", __doc__).parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("conv_epilogue needs an sm_90 GPU (the Gluon conv does not run on CPU)")
    res = run("cuda")
    ok = not res["errors"] and all(r["conv1_ok"] and r["conv2_ok"] for r in res["rows"])
    return common.publish(a.out, "conv_epilogue", res, markdown(res), ok)


if __name__ == "__main__":
    raise SystemExit(main())
