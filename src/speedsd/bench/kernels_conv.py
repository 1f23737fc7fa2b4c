"""The implicit-GEMM Triton conv and the Gluon 3x3 conv vs cuDNN on SD convs.

    python -m speedsd.bench.kernels_conv --out bench/results [--table src/speedsd/data/conv_table.json]
        [--shapes all|base|vae|unet] [--latent 64] [--only TEXT] [--budget-s 30]

Shapes ("base"): the UNet's 8² and 16² convs at 64x64 latents with classifier-free guidance (batch 2;
M = 128 or 512 output pixels, 1280 output channels), its 4-channel output conv, and the VAE's 3-channel
output conv at 512²; ("vae"): the VAE decoder's ResNet 3x3 convs at 512² output, where on sm_90 the Gluon
conv's variants (kernels/conv_gluon.py VARIANTS, fitted to Co) are timed too; ("unet"): the UNet's 64², 32² and 16²
3x3 convs (and its 8² ones), cuDNN against the Gluon conv's tiles x K splits and the table's implicit-GEMM
config where it names one (the base shapes time the Gluon candidates next to their implicit-GEMM search).
fp16, channels_last, no bias (the engine fuses conv biases downstream: ResNet convs run with
``with_bias=False``).

Search: every tile shape x (warps, stages) with the default K split (the TMA-operand variants first, where the
conv takes them), then the best few over K splits, then the best one with its partials summed by a second kernel
over K splits;
a per-shape time budget bounds the Triton compiles. Clock: CUDA-graph replay (what the engine pays),
with as many weight copies cycled as keep them out of L2 (in a UNet step every conv reads its own
weights from memory). Correct: error vs an fp32 (TF32 off) conv <= 2x torch's fp16 error.
``--table`` records per card the winner among cuDNN / implicit GEMM / Gluon (a kernel only where it is
correct and faster) for ``conv_table``; with ``--shapes`` other than all, the card's other entries are kept.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speedsd import conv_table
from speedsd.bench import common

ci = importlib.import_module("speedsd.kernels.conv_igemm")
cg = importlib.import_module("speedsd.kernels.conv_gluon")
IgemmConfig = ci.IgemmConfig

# (label, (B, C, H, W), N, kernel, stride, padding, calls per UNet step or VAE decode)
SHAPES = [
    ("unet 8² 1280->1280", (2, 1280, 8, 8), 1280, 3, 1, 1, 11),
    ("unet 8² 2560->1280", (2, 2560, 8, 8), 1280, 3, 1, 1, 3),
    ("unet 16²->8² stride 2", (2, 1280, 16, 16), 1280, 3, 2, 1, 1),
    ("unet 16² 1280->1280", (2, 1280, 16, 16), 1280, 3, 1, 1, 6),
    ("unet 32²->16² stride 2", (2, 640, 32, 32), 640, 3, 2, 1, 1),
    ("unet conv_out 320->4", (2, 320, 64, 64), 4, 3, 1, 1, 1),
    ("vae conv_out 128->3", (1, 128, 512, 512), 3, 3, 1, 1, 1),
]
# the VAE decoder's 3x3 stride-1 ResNet convs (SD 1.x/2.x, 512² image); calls per decode (the upsamplers'
# convs run as sub-pixel phase convs on their small input with Flags.subpixel_upsample)
VAE_SHAPES = [
    ("vae 512² 128->128", (1, 128, 512, 512), 128, 3, 1, 1, 5),
    ("vae 512² 256->128", (1, 256, 512, 512), 128, 3, 1, 1, 1),
    ("vae 256² 256->256", (1, 256, 256, 256), 256, 3, 1, 1, 5),
    ("vae 256² 512->256", (1, 512, 256, 256), 256, 3, 1, 1, 1),
    ("vae 128² 512->512", (1, 512, 128, 128), 512, 3, 1, 1, 6),
    ("vae 64² 512->512", (1, 512, 64, 64), 512, 3, 1, 1, 10),
]
VAE_SPLITS = [1, 2]  # thousands of output tiles: K splits only add partial sums
# the UNet's 3x3 stride-1 convs at 64², 32², 16² and 8² (batch 2), where cuDNN's tiles leave SMs idle (80 CTAs or
# fewer on 132 SMs): cuDNN against the Gluon conv's tiles x K splits (--shapes unet: no implicit-GEMM search;
# where the card's conv table names an implicit-GEMM config, that one config is re-timed in the same run)
UNET_GLUON_SHAPES = [
    ("unet 64² 320->320", (2, 320, 64, 64), 320, 3, 1, 1, 7),
    ("unet 64² 640->320", (2, 640, 64, 64), 320, 3, 1, 1, 2),
    ("unet 64² 960->320", (2, 960, 64, 64), 320, 3, 1, 1, 1),
    ("unet 32² 640->640", (2, 640, 32, 32), 640, 3, 1, 1, 6),
    ("unet 32² 320->640", (2, 320, 32, 32), 640, 3, 1, 1, 1),
    ("unet 32² 960->640", (2, 960, 32, 32), 640, 3, 1, 1, 1),
    ("unet 32² 1280->640", (2, 1280, 32, 32), 640, 3, 1, 1, 1),
    ("unet 32² 1920->640", (2, 1920, 32, 32), 640, 3, 1, 1, 1),
    ("unet 16² 1280->1280 (Gluon only)", (2, 1280, 16, 16), 1280, 3, 1, 1, 6),
    ("unet 16² 640->1280", (2, 640, 16, 16), 1280, 3, 1, 1, 1),
    ("unet 16² 1920->1280", (2, 1920, 16, 16), 1280, 3, 1, 1, 1),
    ("unet 16² 2560->1280", (2, 2560, 16, 16), 1280, 3, 1, 1, 2),
    ("unet 8² 1280->1280 (Gluon vs the table)", (2, 1280, 8, 8), 1280, 3, 1, 1, 11),
    ("unet 8² 2560->1280 (Gluon vs the table)", (2, 2560, 8, 8), 1280, 3, 1, 1, 3),
]


def unet_gluon_shapes(latent: int = 64) -> list[tuple]:
    """UNET_GLUON_SHAPES for another latent size (SD 1.x/2.x share these channel counts; 96 for 768² images):
    every level's side scaled by latent / 64, the same channels and calls a step."""
    if latent < 8 or latent % 8:
        raise ValueError(f"latent size must be a multiple of 8 (the UNet's three downsamplings), got {latent}")
    rows = []
    for label, (b, c, h, _), n, k, stride, pad, calls in UNET_GLUON_SHAPES:
        side = h * latent // 64
        rows.append((label.replace(f"{h}²", f"{side}²", 1), (b, c, side, side), n, k, stride, pad, calls))
    return rows


# Gluon tiles for them, (th, tw, bn, bn1, consumer warpgroups, images a tile); stages and epilogue slabs: the most /
# fewest that fit. Two images a tile only where an image fits in one tile (the 8² level: both CFG halves). bn1 > 0:
# tiles of bn + bn1 channels, for channel counts like 320 and 640 that power-of-2 tiles cannot cut into one wave
# (bench/prototypes/conv_wide: 2x320x64² -> 320 22.8 vs cuDNN 27.5 µs as 64 pixels x (256 + 64) channels)
GLUON_TILES = [(8, 16, 128, 0, 1, 1), (16, 16, 128, 0, 2, 1), (8, 16, 256, 0, 2, 1), (8, 8, 128, 0, 1, 1),
               (8, 8, 256, 0, 1, 1), (8, 8, 128, 0, 1, 2), (8, 8, 128, 0, 2, 2), (8, 8, 256, 64, 1, 1),
               (8, 16, 128, 32, 1, 1), (8, 8, 128, 32, 1, 1)]  # fmt: skip
GLUON_SPLITS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16]
SMOKE = [("smoke 4² 32->48", (2, 32, 4, 4), 48, 3, 1, 1, 1), ("smoke N=3", (1, 16, 8, 8), 3, 3, 1, 1, 1)]
# candidates, the likeliest first (the per-shape budget may stop the search early)
TILES_WIDE = [(64, 128), (128, 64), (128, 128), (64, 64), (32, 128)]
TILES_NARROW = [(64, 16), (128, 16), (256, 16)]
LAUNCH = [(4, 4), (8, 4), (4, 3), (8, 3)]
# TMA-operand candidates (3x3 stride 1 pad 1, tiles of whole pixel rows), the likeliest first: (bm, bn, bk) x
# (warps, stages); the H200 probe (bench/results/conv_tma_small_probe_h200.json) ranked m128 n64 k128 w8 p4 first
TILES_TMA = [(128, 64, 128), (128, 64, 64), (128, 128, 64), (64, 64, 128), (64, 64, 64)]
LAUNCH_TMA = [(8, 4), (4, 4), (8, 3), (8, 5)]
SPLITS = [1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20]


def _configs(n: int, c: int, m: int, taps: int, device: torch.device) -> list[IgemmConfig]:
    tiles = TILES_NARROW if n <= 16 else TILES_WIDE
    out = []
    base = ci.default_config(m, n, c, taps, device)
    for bm, bn in tiles:
        tiles_mn = math.ceil(m / bm) * math.ceil(n / bn)
        for bk in (128, 64, 32, 16):
            if c % bk or (bk < 64 and c % 64 == 0):  # narrow K-blocks only where C needs them
                continue
            split = max(1, min(base.split * base.block_m * base.block_n // (bm * bn), taps * c // bk // 4, 16))
            split = split if tiles_mn < 2 * 132 else 1
            out.extend(IgemmConfig(bm, bn, bk, split, warps, stages) for warps, stages in LAUNCH)
    return out


def _tma_configs(x: torch.Tensor, w: torch.Tensor, n: int, stride: int, pad: int) -> list[IgemmConfig]:
    """The TMA-operand candidates the kernel takes for this conv (none where ci.tma_problem refuses it)."""
    b, c, h, wd = x.shape
    out = []
    for bm, bn, bk in TILES_TMA:
        if c % bk or n % bn:
            continue
        split = ci.fill_split(b * h * wd // bm * (n // bn), 9 * c // bk, 132)
        for warps, stages in LAUNCH_TMA:
            cfg = IgemmConfig(bm, bn, bk, split, warps, stages, tma=True)
            if ci.tma_problem(x, w, stride, pad, cfg) is None:
                out.append(cfg)
    return out


def _time_conv(fn_for_weight: Any, weights: list[torch.Tensor], smoke: bool) -> float:
    """Per-call ms, cycling through ``weights`` call by call (graph replay on a GPU)."""
    if smoke:
        cycle = itertools.cycle(weights)
        return common.median_ms(lambda: fn_for_weight(next(cycle)), warmup=1, rep=2)
    return common.cycled_graph_ms(fn_for_weight, weights, reps=5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gluon_split_configs(shape: tuple[int, ...], co: int, sms: int = 132) -> list[Any]:
    """GLUON_TILES that fit Co, each with the most ring stages and fewest epilogue slabs that fit shared memory,
    over the K splits that leave each split >= 1 K step and (for splits > 1) <= 2.2 waves of units."""
    n, c, h, w = shape
    out = []
    for th, tw, bn, bn1, consumers, tb in GLUON_TILES:
        width = bn + bn1
        if co % width or c % 64 or n % tb or (tb > 1 and (h > th or w > tw)):
            continue
        tiles = n // tb * math.ceil(h / th) * math.ceil(w / tw) * (co // width)
        for split in GLUON_SPLITS:
            if split > 9 * c // 64 or (split > 1 and tiles * split > 2.2 * sms):
                continue
            for stages, epi in [(st, e) for st in (5, 4, 3) for e in (1, 2, 4)]:
                try:
                    out.append(cg.GluonConvConfig(th=th, tw=tw, bn=bn, bk=64, stages=stages, consumers=consumers,
                                                  epi_split=epi, split=split, tb=tb, bn1=bn1))  # fmt: skip
                    break
                except ValueError:  # shared memory: fewer stages or more slabs
                    continue
    return out


def bench_gluon(
    x: torch.Tensor, weights: list[torch.Tensor], ref: torch.Tensor, torch_err: float, configs: list[Any] | None = None
) -> dict[str, Any]:
    """Every Gluon variant fitted to Co (or ``configs``): checked on a NaN-poisoned output (error <= 2x torch
    fp16's), timed like the other candidates; the fastest correct one."""
    n = weights[0].shape[0]
    res: dict[str, Any] = {"gluon_config": None, "gluon_ms": float("nan"), "gluon_ok": False, "gluon_all": {}}
    named = [(name, cg.variant(name, n)) for name in cg.VARIANTS] if configs is None else [("-", c) for c in configs]
    for name, cfg in named:
        if str(cfg) in res["gluon_all"]:
            continue
        try:
            out = torch.full_like(ref, float("nan"), dtype=x.dtype, memory_format=torch.channels_last)
            err = _rel(cg.conv3x3_gluon(x, weights[0], None, cfg, out=out), ref)
            ms = _time_conv(lambda w, cfg=cfg: cg.conv3x3_gluon(x, w, None, cfg), weights, False)
        except Exception as e:  # noqa: BLE001 - report the variant and go on
            print(f"  gluon {name} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        ok = err <= 2 * torch_err + 1e-7  # NaN (an unwritten output) fails
        res["gluon_all"][str(cfg)] = {"variant": name, "ms": ms, "rel_err": err, "ok": ok}
        if ok and not ms >= res["gluon_ms"]:
            res.update(gluon_config=str(cfg), gluon_ms=ms, gluon_ok=True, gluon_rel_err=err)
    return res


def bench_shape(
    row: tuple,
    device: str,
    smoke: bool,
    budget_s: float,
    splits: list[int] = SPLITS,
    gluon: str | None = None,
    igemm: bool = True,
) -> dict[str, Any]:
    """cuDNN and (``igemm``) the implicit-GEMM search on one shape; with ``gluon`` (sm_90 GPU, 3x3 stride 1 pad
    1 only) the Gluon conv too: "variants" (VARIANTS fitted to Co) or "splits" (gluon_split_configs)."""
    label, shape, n, k, stride, pad, calls = row
    dev = torch.device(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape, generator=g) + 0.5).to(dev, dtype).contiguous(memory_format=torch.channels_last)
    w0 = torch.randn(n, shape[1], k, k, generator=g) / math.sqrt(shape[1] * k * k)
    copies = common.copies_out_of_l2(w0.numel() * 2) if device == "cuda" else 1
    weights = [(w0 + 1e-3 * i).to(dev, dtype).contiguous(memory_format=torch.channels_last) for i in range(copies)]
    prev_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref = F.conv2d(x.float(), weights[0].float(), None, stride, pad)
    finally:
        torch.backends.cudnn.allow_tf32 = prev_tf32
    torch_err = _rel(F.conv2d(x, weights[0], None, stride, pad), ref)
    cudnn_ms = _time_conv(lambda w: F.conv2d(x, w, None, stride, pad), weights, smoke)
    b, c, h, wd = shape
    m = b * ci.output_size(h, k, stride, pad) * ci.output_size(wd, k, stride, pad)
    results: dict[str, float] = {}
    t0 = time.monotonic()

    def run(cfg: IgemmConfig, budgeted: bool = False) -> None:
        if cfg.key() in results or (budgeted and time.monotonic() - t0 > budget_s):  # compiles bounded
            return
        try:
            results[cfg.key()] = _time_conv(lambda w: ci.conv2d_igemm(x, w, None, stride, pad, cfg), weights, smoke)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a big tile: skip that config
            print(f"  {label} {cfg.key()}: {type(e).__name__}: {str(e)[:100]}", flush=True)

    if igemm:
        cands = _tma_configs(x, weights[0], n, stride, pad) + _configs(n, c, m, k * k, dev)
    else:  # no search: the card's table's implicit-GEMM config (where it names one), re-timed in this run
        current = conv_table.choose(shape, n, k, stride, pad, dtype, dev)
        cands = [current] if isinstance(current, IgemmConfig) else []
    for cfg in cands[:4] if smoke else cands:
        run(cfg, budgeted=igemm)  # (the search's compiles are bounded; the table's one config always runs)
    ranked = sorted(results, key=results.get)[:3] if igemm else []
    for key in ranked:  # the best tile shapes over K splits (split is a launch argument: no recompile)
        for split in splits[:3] if smoke else splits:
            run(dataclasses.replace(IgemmConfig.parse(key), split=split))
    best = min(results, key=results.get) if results else None
    two: dict[str, float] = {}  # the best tile shape with its partials summed by a second kernel, over K splits
    if igemm and best is not None and IgemmConfig.parse(best).split > 1:
        for split in splits[:3] if smoke else splits:
            key = dataclasses.replace(IgemmConfig.parse(best), split=split, last_sums=False).key()
            run(IgemmConfig.parse(key))
            if key in results:
                two[key] = results.pop(key)
    tol = 2 * torch_err + (1e-5 if dtype == torch.float32 else 1e-7)

    def rel_err(key: str) -> float:
        return _rel(ci.conv2d_igemm(x, weights[0], None, stride, pad, IgemmConfig.parse(key)), ref)

    err = rel_err(best) if best is not None else None
    ok = err <= tol if err is not None else not igemm  # (an unsearched row that timed nothing: nothing wrong)
    two_key = min(two, key=two.get) if two else None
    two_err = rel_err(two_key) if two_key else None
    best_ms = results.get(best, float("nan")) if best else float("nan")
    extra = {}
    if gluon and not smoke and (k, stride, pad) == (3, 1, 1) and cg._device_ok(dev):
        t1 = time.monotonic()
        extra = bench_gluon(x, weights, ref, torch_err, gluon_split_configs(shape, n) if gluon == "splits" else None)
        extra["gluon_search_s"] = time.monotonic() - t1
    return {
        "label": label, "x_shape": list(shape), "n": n, "kernel": k, "stride": stride, "padding": pad,
        "calls": calls, "weight_copies": copies, "cudnn_ms": cudnn_ms, "best_config": best, "best_ms": best_ms,
        "two_kernel_config": two_key, "two_kernel_sum_ms": two.get(two_key), "two_kernel_rel_err": two_err,
        "two_kernel_ok": two_err is not None and two_err <= tol, "two_kernel_ms": two,
        "configs_timed": len(results) + len(two), "search_s": time.monotonic() - t0,
        "rel_err": err, "torch_rel_err": torch_err,
        "ok": ok, "tflops_cudnn": 2 * m * n * c * k * k / cudnn_ms / 1e9,
        "all_ms": dict(sorted(results.items(), key=lambda kv: kv[1])[:12]), **extra,
    }  # fmt: skip


def _igemm_choice(r: dict[str, Any]) -> tuple[str | None, float]:
    """The implicit-GEMM config a result row measured fastest, and its ms: the best one-launch config, or the
    best two-kernel config (partials summed by a second kernel) where that measured faster and is correct.
    Rows before the two-kernel split sweep name only the best one-launch config's two-kernel time."""
    best, ms = r["best_config"], r["best_ms"]
    two = r.get("two_kernel_sum_ms")
    if best is None or two is None or two >= ms or not r.get("two_kernel_ok", r["ok"]):
        return best, ms
    key = r.get("two_kernel_config") or dataclasses.replace(IgemmConfig.parse(best), last_sums=False).key()
    return key, two


def table_entries(rows: list[dict[str, Any]], dtype: torch.dtype, commit: str | None = None) -> dict[str, Any]:
    from speedsd.conv_table import shape_key

    out = {}
    for r in rows:
        igemm_config, igemm_ms = _igemm_choice(r)
        ms, correct = {"cudnn": r["cudnn_ms"]}, {"cudnn": True}
        if r["best_config"] is not None:  # (a --shapes unet row did not search the implicit GEMM)
            ms["igemm"], correct["igemm"] = igemm_ms, r["ok"]
        if r.get("gluon_config") is not None:
            ms["gluon"], correct["gluon"] = r["gluon_ms"], r["gluon_ok"]
        best = min((c for c in ms if correct[c]), key=ms.get)  # a tie goes to cuDNN
        key = shape_key(tuple(r["x_shape"]), r["n"], r["kernel"], r["stride"], r["padding"], dtype)
        out[key] = {
            "best": best, "config": r["gluon_config"] if best == "gluon" else igemm_config,
            "graph_ms": ms, "measured_at": commit or common.git_commit(),
        }  # fmt: skip
        if "gluon" in ms:
            out[key]["gluon_config"] = r["gluon_config"]
    return out


def table_from_results(path: Path) -> tuple[str, dict[str, Any]]:
    """(card, table entries) re-chosen from a committed results JSON's measured rows (no new timing)."""
    data = json.loads(Path(path).read_text())
    env = data["environment"]
    return env["card"], table_entries(data["rows"], torch.float16, commit=env.get("commit"))


def main(argv: list[str] | None = None) -> int:
    ap = common.kernel_bench_args("kernels_conv", __doc__)
    ap.add_argument("--table", default=None, help="merge this card's winners into this conv_table JSON")
    ap.add_argument("--budget-s", type=float, default=30.0, help="implicit-GEMM search time per shape")
    shapes_help = "base: the UNet/output-head convs; vae: the VAE decoder's 3x3 convs (+ Gluon on sm_90); unet: "
    shapes_help += "cuDNN vs the Gluon conv's tiles and K splits on the UNet's 64², 32², 16² and 8² convs"
    ap.add_argument("--shapes", choices=("all", "base", "vae", "unet"), default="all", help=shapes_help)
    ap.add_argument("--only", default=None, metavar="TEXT", help="only the shapes whose label contains TEXT")
    ap.add_argument("--latent", type=int, default=64, help="--shapes unet: the UNet's latent size (96: 768² images)")
    ap.add_argument(
        "--table-from",
        default=None,
        metavar="RESULTS_JSON",
        help="no timing: re-choose a results JSON's card entries into --table from its measured rows",
    )
    args = ap.parse_args(argv)
    if args.table_from:
        from speedsd.conv_table import merge_into

        card, table = table_from_results(Path(args.table_from))
        merge_into(Path(args.table or "src/speedsd/data/conv_table.json"), card, table, keep=True)
        print(card, {k: (v["best"], v["config"]) for k, v in table.items()})
        return 0
    device, smoke = common.device_and_smoke(args.smoke)
    plan = [(row, SPLITS, "splits", True) for row in SHAPES] if args.shapes in ("all", "base") else []
    plan += [(row, VAE_SPLITS, "variants", True) for row in VAE_SHAPES] if args.shapes in ("all", "vae") else []
    base = {(row[1], row[2]) for row in SHAPES}  # (all: the base rows time these shapes' Gluon splits already)
    unet = [row for row in unet_gluon_shapes(args.latent) if args.shapes == "unet" or (row[1], row[2]) not in base]
    plan += [(row, SPLITS, "splits", False) for row in unet] if args.shapes in ("all", "unet") else []
    plan = [p for p in plan if args.only is None or args.only in p[0][0]]
    rows = []
    for row, splits, gluon, igemm in [(row, SPLITS, None, True) for row in SMOKE] if smoke else plan:
        r = bench_shape(row, device, smoke, args.budget_s, splits, gluon, igemm)
        rows.append(r)
        g = f", gluon {r['gluon_config']} {r['gluon_ms'] * 1e3:.1f} us ok={r['gluon_ok']}" if "gluon_ok" in r else ""
        print(f"{r['label']}: cuDNN {r['cudnn_ms'] * 1e3:.1f} us, best {r['best_config']} "
              f"{r['best_ms'] * 1e3:.1f} us ({r['configs_timed']} configs, {r['search_s']:.0f} s) ok={r['ok']}{g}",
              flush=True)  # fmt: skip
    entries = list(table_entries(rows, torch.float16).values())  # rows' order
    md_rows = [
        [r["label"], r["calls"], r["cudnn_ms"] * 1e3, r["tflops_cudnn"], r["best_config"], r["best_ms"] * 1e3,
         (r["two_kernel_sum_ms"] or float("nan")) * 1e3, r["cudnn_ms"] / r["best_ms"],
         r.get("gluon_config") or "-", r.get("gluon_ms", float("nan")) * 1e3, e["best"],
         (r["cudnn_ms"] - e["graph_ms"][e["best"]]) * 1e3 * r["calls"], r["rel_err"], r.get("gluon_rel_err"),
         r["torch_rel_err"], r["ok"] and r.get("gluon_ok", True)]
        for r, e in zip(rows, entries)
    ]  # fmt: skip
    header = ["conv", "calls", "cuDNN µs", "cuDNN TFLOP/s", "Triton config", "Triton µs", "2-kernel sum µs", "speedup",
              "Gluon config", "Gluon µs", "winner", "saved µs (x calls)", "rel err", "Gluon rel err",
              "torch fp16 rel err", "ok"]  # fmt: skip
    md = "## Implicit-GEMM Triton conv and Gluon conv vs cuDNN (fp16 channels_last, graph replay, weights cycled out "
    md += "of L2)\n\n" + common.md_table(header, md_rows)
    if args.table and not smoke:
        from speedsd.conv_table import merge_into

        table = table_entries(rows, torch.float16)
        merge_into(Path(args.table), torch.cuda.get_device_name(), table, keep=args.shapes != "all" or bool(args.only))
    ok = all(r["ok"] and r.get("gluon_ok", True) for r in rows)  # a Gluon row: some variant correct
    return common.publish(args.out, "kernels_conv", {"rows": rows}, md, ok)


if __name__ == "__main__":
    raise SystemExit(main())
