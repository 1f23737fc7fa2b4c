"""Gluon (TMA + wgmma, warp-specialized) 3x3 stride-1 pad-1 conv for Hopper (sm_90): the VAE decoder's big convs
and the UNet's 64², 32², 16² and 8² convs, where the per-card conv table (conv_table.py) found it fastest.

y = conv3x3(x, w) (+ bias) (+ residual), fp16 channels_last in and out, fp32 accumulation; optionally the
epilogue also writes the next GroupNorm's partial statistics (``stats_groups``, kernels/gn_tile_stats.py; per
channel in a tile of bn + bn1 channels, whose groups of 10 or 20 straddle its slabs).
One TMA producer warp feeds a ring of (input box, weight block) slots to one ('ws') or two ('ws2') consumer
warpgroups issuing async wgmma; persistent (one program per SM walking the tiles) or one tile per program
('_np'). Kernel and its math: kernels/conv_gluon_kernels.py. Shapes a tile can take, for convs whose tiles
would leave SMs idle:
- K splits (``split``): each (tile, split) unit stores an fp32 partial; conv_igemm.sum_partials sums them
  (+ bias, + a residual) into the output, or :func:`conv3x3_gluon_partials` hands them to a reader that sums
  them itself (kernels/group_norm_partials.py);
- two images a tile (``tb``): the 8² level's CFG halves in one 128-row tile;
- tiles of bn + bn1 channels (``bn1``): 320 channels as 256 + 64, 640 as 4 x (128 + 32), one wave of units.
The same kernel's sub-pixel mode (``taps=4``; entry point kernels/subpixel_conv_gluon.py) runs an upsampler's
four phase convs in one launch, storing into the interleaved output.
H200 measurements (bench/results/SUMMARY.md has the history): the VAE's 512 at 64² 27.8 vs cuDNN 31.1 µs
(kernels_conv_vae_h200.md); 2x1280x16² 28.0 vs 33.4 (3 splits), 2x320x64² -> 320 22.9 vs 27.5 (256 + 64),
2x640x32² -> 640 24.3 vs 33.4 (128 + 32) (kernels_conv_unet_wide_h200.md, weights cycled out of L2).

:func:`conv3x3_gluon` raises ValueError for anything its kernel cannot take (device, dtype, layout, channel
counts, alignment); :func:`conv_gluon_supported` answers the same question with False.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F

from speedsd.kernels.bias_add import drop_gn_stats
from speedsd.kernels.conv_gluon_config import (  # noqa: F401 - the configs are part of this module's API
    DEFAULT_VARIANT,
    PRODUCER_REGS,
    SMEM_LIMIT,
    VARIANTS,
    GluonConvConfig,
    resolve,
    variant,
)
from speedsd.kernels.conv_igemm import nhwc_view, sum_partials, weight_matrix
from speedsd.kernels.device import compile_ahead, is_sm90, sm_count
from speedsd.kernels.gn_tile_stats import attach


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    """The Gluon kernel module, or None where this Triton has no Gluon/Hopper API."""
    try:
        from speedsd.kernels import conv_gluon_kernels
    except ImportError:
        return None
    return conv_gluon_kernels


def _device_ok(device: torch.device) -> bool:
    """A Hopper (sm_90: H100/H200) CUDA device and a Triton with Gluon (TMA and wgmma are sm_90a only)."""
    return is_sm90(device) and _kernels() is not None


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0  # TMA: 16-byte aligned global addresses


def _problem(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: GluonConvConfig, taps: int = 9
) -> str | None:
    """Why the kernel cannot compute conv3x3(x, weight) + bias with cfg (taps = 4: the sub-pixel conv from the
    folded weight4 [4·Co, C, 2, 2]); None when it can."""
    k, per = (3, 1) if taps == 9 else (2, 4)
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], k, k) or weight.shape[0] % per:
        what = "[Co, C, 3, 3]" if taps == 9 else "weight4 [4·Co, C, 2, 2]"
        return f"expects x [N, C, H, W] and {what}, got {tuple(x.shape)}, {tuple(weight.shape)}"
    n, c, h, w = x.shape
    co = weight.shape[0] // per
    if taps == 4 and cfg.split > 1:
        return f"config {cfg}: the sub-pixel conv takes no K split (its partials would need interleaving)"
    if x.dtype != torch.float16 or weight.dtype != torch.float16:
        return f"needs fp16 x and weight, got {x.dtype}, {weight.dtype}"
    if bias is not None and (
        bias.shape != (co,) or bias.dtype not in (torch.float16, torch.float32) or not bias.is_contiguous()
    ):
        return f"bias must be a contiguous fp16/fp32 [{co}] tensor, got {tuple(bias.shape)} {bias.dtype}"
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        return "x, weight and bias must be on one device"
    if min(n, c, h, w, co) < 1:
        return f"empty conv: x {tuple(x.shape)}, Co={co}"
    if c % cfg.bk or co % cfg.width:
        return f"config {cfg}: C={c} must be a multiple of {cfg.bk} and Co={co} of {cfg.width}"
    if n % cfg.tb:
        return f"config {cfg}: N={n} must be a multiple of its {cfg.tb} images a tile"
    if cfg.split > taps * (c // cfg.bk):
        return f"config {cfg}: {cfg.split} K splits need {taps}·C / {cfg.bk} >= {cfg.split} K steps, C={c}"
    if not x.is_contiguous(memory_format=torch.channels_last):
        return "needs a channels_last x (its [N, H, W, C] view is the TMA tensor)"
    if not weight.is_contiguous(memory_format=torch.channels_last):
        return "needs a channels_last weight (read in place as [Co, 9·C])"
    if not (_aligned(x) and _aligned(weight)):
        return "x and weight must start at 16-byte aligned addresses (TMA)"
    if n * h * w * per > 2**31 - 1 or 9 * c >= 2**31:
        return f"too large for 32-bit tile coordinates: x {tuple(x.shape)}"
    if not _device_ok(x.device):
        return f"needs an sm_90 (H100/H200) CUDA device and a Triton with Gluon, got {x.device}"
    return None


def conv_gluon_supported(
    x: torch.Tensor,
    conv: torch.nn.Conv2d,
    bias: torch.Tensor | None = None,
    config: GluonConvConfig | str | None = None,
) -> bool:
    """Whether conv3x3_gluon(x, conv.weight, bias, config) runs: conv is a 3x3 stride-1 pad-1 conv (no
    dilation, one group) and :func:`conv3x3_gluon` would not raise. ``bias``: what the caller will pass
    (None when it adds conv.bias itself)."""
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    if geometry != ((3, 3), (1, 1), (1, 1), (1, 1), 1) or conv.padding_mode != "zeros":
        return False
    try:
        cfg = resolve(config, conv.out_channels)
    except ValueError:
        return False
    return _problem(x, conv.weight, bias, cfg) is None


def conv3x3_gluon(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GluonConvConfig | str | None = None,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    stats_groups: int | None = None,
) -> torch.Tensor:
    """conv2d(x, weight, bias, stride=1, padding=1) (+ residual) -> fp16 [N, Co, H, W] channels_last (``out``
    if given).

    x: fp16 [N, C, H, W] channels_last; weight: fp16 [Co, C, 3, 3] channels_last; bias: None or [Co] fp16/fp32
    (added in fp32 before the fp16 store); residual: None or an fp16 channels_last tensor like the output, added
    in fp32 too. ``stats_groups``: the output's next reader is GroupNorm(stats_groups): the epilogue also
    writes its per-tile statistics, handed over on the output (kernels/gn_tile_stats.py). config: a
    GluonConvConfig, its ``str`` key, or a VARIANTS name fitted to Co (None: 'ws2'). C must be a multiple of
    config.bk, Co of its width bn + bn1 (and of stats_groups; without bn1, bn / epi_split a multiple of
    Co / stats_groups).
    """
    cfg = resolve(config, weight.shape[0] if weight.dim() == 4 else 0)
    why = _problem(x, weight, bias, cfg) or conv_gluon_epilogue_problem(x, weight, residual, stats_groups, cfg)
    if why is not None:
        raise ValueError(f"conv3x3_gluon: {why}")
    n, _, h, w = x.shape
    co = weight.shape[0]
    out = _output(out, (n, co, h, w), x)
    if residual is not None and residual.data_ptr() == out.data_ptr():
        raise ValueError("out must not be the residual (tiles read it while others write)")
    part = _stats_part(x, co, stats_groups, cfg) if stats_groups else None
    drop_gn_stats(out)
    if cfg.split > 1:  # fp32 partials, summed (+ bias, residual) into out by a second kernel
        sum_partials(_partials(x, weight, cfg), bias, out, residual)
        return out
    _launch(x, weight, bias, out, cfg, residual, part)
    return out if part is None else attach(out, part, stats_groups, per_channel=cfg.bn1 > 0)


def _output(out: torch.Tensor | None, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """``out`` checked (a 16-byte aligned channels_last tensor of ``shape`` in x's dtype and device), or a new one."""
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if (
        out.shape != shape
        or out.dtype != x.dtype
        or out.device != x.device
        or not out.is_contiguous(memory_format=torch.channels_last)
        or not _aligned(out)
    ):
        raise ValueError(f"out must be a 16-byte aligned channels_last {x.dtype} {list(shape)} on {x.device}")
    return out


def _stats_part(x: torch.Tensor, co: int, groups: int, cfg: GluonConvConfig, phases: int = 1) -> torch.Tensor:
    """The epilogue's GroupNorm(groups) partials (mean, M2, count) for input x: one part per tile, (sub-pixel)
    phase and warp, of each group [3, N, G, P], or of each channel [3, N, P, Co] in a bn + bn1 tile."""
    n, _, h, w = x.shape
    parts = phases * -(-h // cfg.th) * -(-w // cfg.tw) * cfg.warps
    dims = (parts, co) if cfg.bn1 else (groups, parts)
    return torch.empty((3, n, *dims), device=x.device, dtype=torch.float32)


def _partials(x: torch.Tensor, weight: torch.Tensor, cfg: GluonConvConfig) -> torch.Tensor:
    """The K split's fp32 partials of conv2d(x, weight) as [split, N·H·W, Co] (unit s of every tile in slice s)."""
    n, _, h, w = x.shape
    co = weight.shape[0]
    parts = torch.empty((cfg.split, n, h, w, co), device=x.device, dtype=torch.float32)
    _launch(x, weight, None, parts, cfg)
    return parts.view(cfg.split, n * h * w, co)


def conv3x3_gluon_partials(x: torch.Tensor, weight: torch.Tensor, config: GluonConvConfig | str) -> torch.Tensor:
    """A K-split config's fp32 partials of conv2d(x, weight, padding=1), not summed: [split, N·H·W, Co], the
    output's channels_last order (their sum is the conv; kernels/group_norm_partials.py normalises it)."""
    cfg = resolve(config, weight.shape[0] if weight.dim() == 4 else 0)
    why = _problem(x, weight, None, cfg) or (None if cfg.split > 1 else f"config {cfg} has no K split")
    if why is not None:
        raise ValueError(f"conv3x3_gluon_partials: {why}")
    return _partials(x, weight, cfg)


@functools.lru_cache(maxsize=8)
def _identity(width: int, bk: int, device: torch.device) -> torch.Tensor:
    """fp16 eye(width, ⌈width / bk⌉·bk): the B (and B1) operands of the residual's K steps, a tile of width
    channels (kernels/conv_gluon_kernels.py)."""
    return torch.eye(width, -(-width // bk) * bk, dtype=torch.float16, device=device)


def conv_gluon_epilogue_problem(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, groups: int | None, cfg: GluonConvConfig
) -> str | None:
    """Why conv3x3_gluon's epilogue cannot add ``residual`` (fp16 channels_last, like the output) or write
    GroupNorm(groups) statistics with cfg; None when it can. x and weight as :func:`conv3x3_gluon` accepts."""
    n, _, h, w = x.shape
    co = weight.shape[0]
    if residual is not None and (
        residual.shape != (n, co, h, w)
        or residual.dtype != torch.float16
        or residual.device != x.device
        or not residual.is_contiguous(memory_format=torch.channels_last)
    ):
        return f"residual must be an fp16 channels_last [{n}, {co}, {h}, {w}] tensor on {x.device}"
    if residual is not None and n * h * w * co >= 2**31:
        return "the residual is indexed with int32: N·H·W·Co must stay below 2^31"
    return None if groups is None else _stats_problem(co, groups, cfg)


def _stats_problem(co: int, groups: int, cfg: GluonConvConfig) -> str | None:
    """Why cfg's epilogue cannot write GroupNorm(groups) statistics of a Co-channel output; None when it can."""
    if cfg.tb > 1:
        return f"config {cfg}: a tile of {cfg.tb} images writes no statistics (they are per image)"
    if cfg.split > 1:
        return f"config {cfg}: a K split sums its partials in a second kernel, which writes no statistics"
    if groups <= 0 or co % groups:
        return f"stats_groups={groups} must divide Co={co}"
    slab = cfg.bn // cfg.epi_split  # (a bn + bn1 tile writes per-channel statistics: any group size)
    if not cfg.bn1 and slab % (co // groups):
        return f"stats_groups={groups} must divide Co={co} in groups that tile the {slab}-channel slabs"
    return None


def _launch_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    cfg: GluonConvConfig,
    sms: int,
    residual: torch.Tensor | None = None,
    part: torch.Tensor | None = None,
    taps: int = 9,
) -> tuple[tuple[int], tuple, dict]:
    """(grid, positional args, constexprs + num_warps) of conv3x3_kernel; CPU tensors work too (the AOT
    compile builds its signature from them). With cfg.split > 1, y is the fp32 partials [split, N, H, W, Co]
    and bias must be None (the sum adds it). ``taps`` = 4: the sub-pixel conv, weight the folded weight4
    [4·Co, C, 2, 2], y the upsampled output [N, Co, 2H, 2W] (no residual or split)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    n, c, h, w = x.shape
    phases = 1 if taps == 9 else 4
    co = weight.shape[0] // phases
    if cfg.split > 1 and (y.shape != (cfg.split, n, h, w, co) or y.dtype != torch.float32 or bias is not None):
        raise ValueError(f"a {cfg.split}-way K split writes fp32 partials [split, N, H, W, Co], without bias")
    if taps == 4 and (y.shape != (n, co, 2 * h, 2 * w) or residual is not None or cfg.split > 1):
        raise ValueError("the sub-pixel conv writes y [N, Co, 2H, 2W], without residual or K split")
    x_nhwc, w_mat = nhwc_view(x), weight_matrix(weight)  # [N, H, W, C], [Co, 9·C] (sub-pixel: [4·Co, 4·C])
    # y: [N, H, W, Co]; the partials [split, N, H, W, Co] as [split·N, H, W, Co]; sub-pixel: [N, 2H, 2W, Co] as
    # [N, H, 2, W, 2·Co] (output row 2i + a, and column 2j + c_ at channels c_·Co ..)
    if taps == 4:
        y_nhwc = y.as_strided((n, h, 2, w, 2 * co), (4 * h * w * co, 4 * w * co, 2 * w * co, 2 * co, 1))
    else:
        y_nhwc = nhwc_view(y) if cfg.split == 1 else y.view(cfg.split * n, h, w, co)
    out_box = [cfg.tb, cfg.th, cfg.tw] if taps == 9 else [cfg.tb, cfg.th, 1, cfg.tw]

    def desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
        dt = gl.float32 if t.dtype == torch.float32 else gl.float16
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dt))

    xd = desc(x_nhwc, [cfg.tb, cfg.th, cfg.tw, cfg.bk])
    wd = desc(w_mat, [cfg.bn, cfg.bk])
    yd = desc(y_nhwc, [*out_box, cfg.bn // cfg.epi_split])
    n_th, n_tw, n_nb = -(-h // cfg.th), -(-w // cfg.tw), co // cfg.width
    num_units = n // cfg.tb * n_th * n_tw * cfg.split * phases * n_nb  # (tile, K split, phase) triples
    grid = (min(sms, num_units) if cfg.persistent else num_units,)
    w1d, y1d = wd, yd  # the tile's last bn1 channels (stand-ins without)
    if cfg.bn1:
        w1d = desc(w_mat, [cfg.bn1, cfg.bk])
        y1d = desc(y_nhwc, [*out_box, cfg.bn1])
    # the residual: ⌈width / BK⌉ more K steps of [TB, TH, TW, BK] boxes of it times [BN, BK] (and [BN1, BK])
    # blocks of an identity
    rd, idd, i1d = xd, wd, w1d  # (stand-ins: not read without HAS_RES)
    if residual is not None:
        eye = _identity(cfg.width, cfg.bk, x.device)
        rd = desc(nhwc_view(residual), [cfg.tb, cfg.th, cfg.tw, cfg.bk])
        idd = desc(eye, [cfg.bn, cfg.bk])
        i1d = desc(eye, [cfg.bn1, cfg.bk]) if cfg.bn1 else idd
    # y stands in for the pointers an epilogue does not read; part: [3, N, G, tiles·warps], or per channel
    # [3, N, tiles·warps, Co] (CPG = 0) in a bn + bn1 tile
    ptrs = (y if bias is None else bias, y if part is None else part)
    third, cpg = (0, 1) if part is None else (part[0].numel(), 0 if cfg.bn1 else co // part.shape[2])
    args = (xd, wd, yd, rd, idd, i1d, w1d, y1d, *ptrs, third, c, h, w, co, n, n_th, n_tw, cfg.split, n_nb,
            num_units)  # fmt: skip
    const = dict(STAGES=cfg.stages, HAS_BIAS=bias is not None, HAS_RES=residual is not None, STATS=part is not None,
                 CPG=cpg, EPI_SPLIT=cfg.epi_split, BN1=cfg.bn1, TAPS=taps, PRODUCER_REGS=PRODUCER_REGS,
                 num_warps=cfg.warps)  # fmt: skip
    return grid, args, const


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, cfg,
            residual: torch.Tensor | None = None, part: torch.Tensor | None = None, taps: int = 9) -> None:  # fmt: skip
    kern = _kernels()
    assert kern is not None
    grid, args, const = _launch_args(x, weight, bias, y, cfg, sm_count(x.device), residual, part, taps)
    with torch.cuda.device(x.device):
        kern.conv3x3_kernel[grid](*args, **const)


def conv3x3_gluon_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: conv2d(x, weight, bias, padding=1) in fp32 (fp64 stays fp64), any device or layout."""
    acc = torch.promote_types(x.dtype, torch.float32)
    b = None if bias is None else bias.to(acc)
    return F.conv2d(x.to(acc), weight.to(acc), b, padding=1)


def compile_sm90(
    config: GluonConvConfig,
    bias_dtype: torch.dtype | None = None,
    capability: int = 90,
    residual: bool = False,
    stats_cpg: int | None = None,
    taps: int = 9,
):
    """Compile the kernel ahead of time for ``capability`` without a GPU (the tests' ptxas check; in a process
    without TRITON_INTERPRET=1). Sizes are not specialized, so small CPU stand-ins give the launch's signature;
    the pointer gets the 16-byte divisibility a GPU launch specialises."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    kern = _kernels()
    if kern is None:
        raise RuntimeError("this Triton has no Gluon Hopper API")
    cl = torch.channels_last
    c, co = max(2, -(-config.split // 9)) * config.bk, 2 * config.width
    nb = config.tb
    x = torch.empty((nb, c, 16, 16), dtype=torch.float16).contiguous(memory_format=cl)
    wt = torch.empty((co, c, 3, 3), dtype=torch.float16).contiguous(memory_format=cl)
    y = torch.empty((nb, co, 16, 16), dtype=torch.float16).contiguous(memory_format=cl)
    if taps == 4:  # the sub-pixel conv: weight4 [4·Co, C, 2, 2], y [N, Co, 2H, 2W]
        wt = torch.empty((4 * co, c, 2, 2), dtype=torch.float16).contiguous(memory_format=cl)
        y = torch.empty((nb, co, 32, 32), dtype=torch.float16).contiguous(memory_format=cl)
    if config.split > 1:  # the kernel writes the fp32 partials (the sum kernel adds any bias)
        y, bias_dtype = torch.empty((config.split, nb, 16, 16, co), dtype=torch.float32), None
    bias = None if bias_dtype is None else torch.empty(co, dtype=bias_dtype)
    res = torch.empty_like(y) if residual else None
    part = None
    if stats_cpg is not None:  # (a bn + bn1 tile's statistics are per channel)
        part = torch.empty((3, nb, 4, co) if config.bn1 else (3, nb, co // stats_cpg, 4), dtype=torch.float32)
    _, args, const = _launch_args(x, wt, bias, y, config, 132, res, part, taps)
    fn = kern.conv3x3_kernel
    names = fn.arg_names
    sig = {names[i]: mangle_type(a) for i, a in enumerate(args)}
    sig.update({k: "constexpr" for k in const})
    constexprs = {(names.index(k),): v for k, v in const.items()}
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in ("bias_ptr", "part_ptr")}
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return compile_ahead(src, capability, num_warps=config.warps)
