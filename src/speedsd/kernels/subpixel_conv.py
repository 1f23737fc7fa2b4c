"""Nearest 2x upsampling + 3x3 conv as four 2x2 convs on the low-resolution input (sub-pixel form).

``conv2d(interpolate(x, scale_factor=2, mode="nearest"), W, bias, padding=1)`` reads every input pixel
at four output phases (a, b) = (output row % 2, output column % 2). At phase (a, b) the 3x3 window over
the upsampled image covers only 2x2 distinct input pixels, so the taps that land on the same input pixel
can be summed beforehand: rows fold per a (a = 0: [r0, r1 + r2]; a = 1: [r0 + r1, r2]), then columns
per b the same way, giving W_ab [Co, Ci, 2, 2]. With W4 = cat(W_00, W_01, W_10, W_11) [4·Co, Ci, 2, 2]
(phase k = 2a + b) and P = conv2d(x, W4, padding=1) [N, 4·Co, H+1, W+1]:

    y[n, c, 2i+a, 2j+b] = P[n, k·Co + c, i+a, j+b] + bias[c]        (i < H, j < W)

exactly in exact arithmetic (the zero padding agrees: x's rows -1 and H are zero exactly where the
upsampled image's padding is). The conv does 4/9 of the FLOPs and the 4x-larger upsampled tensor is
never materialised; ``phase_interleave`` is the one bandwidth-bound pass that scatters P's phases into y
and adds the bias (fp32, one rounding to P's dtype). Above :data:`PHASE_SPLIT_BYTES` of P the four phase
convs run one at a time (W4's row blocks, views), each scattered into y by a one-phase interleave before
the next: the same bytes moved, a quarter of P live.

  * channels_last P ([N, H+1, W+1, 4, C] storage): a program takes one low-res row i, a [BLOCK_W,
    BLOCK_C] tile of (j, c), and all four phases: each phase's tile is a run of BLOCK_C contiguous
    channels per pixel (16-byte loads) stored to y's [N, 2H, 2W, C] storage, again channel runs.
  * NCHW P ([N, 4, C, H+1, W+1] storage): Triton too. A program takes a [BLOCK_R, BLOCK_W] tile of rows
    r = (n, c, i); per a it loads phases (a, 0) and (a, 1), interleaves them (tl.join -> [BLOCK_R,
    BLOCK_W, 2] read as [BLOCK_R, 2·BLOCK_W]: column 2j + b) and stores one contiguous output-row segment.
    P's rows are W+1 long, so its loads are not 16-byte aligned in general; the stores are.

Program bases are int64; offsets inside a tile are int32 (checked in the launcher).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from speedsd.kernels.device import sm_count as _sm_count
from speedsd.kernels.gn_tile_stats import attach
from speedsd.kernels.group_norm_kernels import _merge

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TILE = 1024  # elements of one phase tile; a program moves four (one 4·TILE tile with ``phase``)
# P (all four phases) above this many bytes: the phase convs run one at a time, each scattered into y
# before the next (live: x + y + P/4 instead of x + y + P). SD's VAE decoder at 512²: its last
# upsampler (P 129 MiB; 289 -> 192 MiB live) splits; the one before (P 65 MiB, its output half the
# last one's, never the decoder's peak) and every UNet upsampler up to 1024² images keep one conv.
PHASE_SPLIT_BYTES = 96 * 2**20


def subpixel_upsample_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain torch: nearest 2x upsampling, then the 3x3 conv (``weight`` is the original [Co, Ci, 3, 3])."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def phase_interleave_ref(
    p: torch.Tensor, bias: torch.Tensor | None, *, phase: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain torch (four strided copies): p [N, 4·C, H+1, W+1] -> y [N, C, 2H, 2W] in p's memory format.

    y[n, c, 2i+a, 2j+b] = p[n, (2a+b)·C + c, i+a, j+b] (+ bias[c], added in fp32 (fp64 for fp64 p), one rounding).
    ``phase`` / ``out``: as :func:`phase_interleave` (one phase's p [N, C, H+1, W+1] into y's (a, b) positions).
    """
    N, Cp, H1, W1 = p.shape
    C, H, W = Cp // (4 if phase is None else 1), H1 - 1, W1 - 1
    y = out
    if y is None:
        cl = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        fmt = torch.channels_last if cl else torch.contiguous_format
        y = torch.empty((N, C, 2 * H, 2 * W), dtype=p.dtype, device=p.device, memory_format=fmt)
    y6 = y.unflatten(3, (W, 2)).unflatten(2, (H, 2))  # [N, C, 2H, 2W] -> [N, C, H, 2, W, 2] (a view)
    acc = torch.promote_types(p.dtype, torch.float32)
    for k in range(4) if phase is None else (phase,):
        a, b = divmod(k, 2)
        c0 = k * C if phase is None else 0
        src = p[:, c0 : c0 + C, a : a + H, b : b + W]
        if bias is not None:
            src = src.to(acc) + bias.to(acc).view(1, C, 1, 1)
        y6[:, :, :, a, :, b] = src
    return y


# channels_last: p [N, H+1, W+1, 4, C] storage, y [N, 2H, 2W, C]; program (row = n·H + i, block of (j, c)):
#   y[n, 2i+a, 2j+b, c] = p[n, i+a, j+b, 2a+b, c] (+ bias[c], fp32 sum, one rounding)   for a, b in {0, 1}
# (output row n·2H + 2i + a = 2·row + a). Each p element is read once, by exactly one program.
# PHASE = k >= 0: p is phase k = 2a+b alone, [N, H+1, W+1, C] storage, and only that (a, b) is written
# (PHASE = -1 compiles to the four-phase code above: the `if` and the offsets are compile-time).
# STATS: the next GroupNorm's partials of the stored values (kernels/gn_tile_stats.py), groups of CPG channels
# inside the channel block: per phase tile per group (count, mean, M2 around the tile mean), merged over the
# program's phases (Chan), at part[0 | 1 | 2, n, g, p_off + i·n_wb + wb] = mean | M2 | count (third = N·G·P).
@triton.jit
def _interleave_cl_kernel(
    p_ptr, b_ptr, y_ptr, part_ptr, H, W, C, n_cb, P, p_off,
    HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, PHASE: tl.constexpr,
    STATS: tl.constexpr, CPG: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    n = row // H
    i = row % H
    wb = tl.program_id(1) // n_cb
    cb = tl.program_id(1) % n_cb
    j = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (j < W)[:, None] & (c < C)[None, :]
    p0 = p_ptr + (n * (H + 1) + i) * (W + 1) * (4 * C if PHASE < 0 else C)  # p[n, i, 0, 0, 0]
    PC = 4 * C if PHASE < 0 else C  # channels of one p pixel
    y0 = y_ptr + 2 * row * (2 * W * C)  # y[n, 2i, 0, 0]
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    GB: tl.constexpr = BLOCK_C // CPG  # (STATS: whole groups in a channel block, C % BLOCK_C == 0)
    n_g = 0.0
    mean_g = tl.zeros([GB], tl.float32)
    m2_g = tl.zeros([GB], tl.float32)
    for a in tl.static_range(2):
        for b in tl.static_range(2):
            if PHASE < 0 or PHASE == 2 * a + b:
                k = 2 * a + b if PHASE < 0 else 0  # the phase's channel block in a p pixel (compile-time)
                src = a * (W + 1) * PC + (j + b)[:, None] * PC + (k * C + c)[None, :]
                v = tl.load(p0 + src, mask=mask)
                if HAS_BIAS:
                    v = (v.to(tl.float32) + bias).to(y_ptr.dtype.element_ty)
                dst = a * (2 * W * C) + (2 * j + b)[:, None] * C + c[None, :]
                tl.store(y0 + dst, v, mask=mask)
                if STATS:
                    nt = tl.minimum(W - wb * BLOCK_W, BLOCK_W) * CPG * 1.0  # values of a group in the tile
                    v3 = tl.reshape(tl.where(mask, v.to(tl.float32), 0.0), [BLOCK_W, GB, CPG])
                    t_mean = tl.sum(tl.sum(v3, axis=2), axis=0) / nt
                    d = tl.where(tl.reshape(mask, [BLOCK_W, GB, CPG]), v3 - t_mean[None, :, None], 0.0)
                    n_g, mean_g, m2_g = _merge(n_g, mean_g, m2_g, nt, t_mean, tl.sum(tl.sum(d * d, axis=2), axis=0))
    if STATS:
        G = n_cb * GB
        n_wb = tl.num_programs(1) // n_cb
        dst = part_ptr + (n * G + cb * GB + tl.arange(0, GB)) * P + p_off + i * n_wb + wb
        third = (tl.num_programs(0) // H) * G * P
        tl.store(dst, mean_g)
        tl.store(dst + third, m2_g)
        tl.store(dst + 2 * third, tl.zeros([GB], tl.float32) + n_g)


# NCHW: p [N, 4, C, H+1, W+1] storage, y [N, C, 2H, 2W]; rows r = (n·C + c)·H + i (R = N·C·H); program
# (block of rows, block of j):
#   y[n, c, 2i+a, 2j+b] = p[n, 2a+b, c, i+a, j+b] (+ bias[c], fp32 sum, one rounding)
# Per a the b = 0 and b = 1 tiles [BR, BW] are joined to [BR, BW, 2] and read as [BR, 2·BW] (column
# 2j + b): one contiguous segment of output row (n, c, 2i + a). Row bases are int64 vectors; ``plane`` =
# C·(H+1)·(W+1) is one phase's channels (passed in: an int64 argument once it exceeds int32).
# PHASE = k = 2a+b >= 0: p is phase k alone, [N, C, H+1, W+1]; its [BR, BW] tile is stored to columns
# 2j + b of output rows 2i + a (every other element: the other phase of the row fills the gaps).
@triton.jit
def _interleave_nchw_kernel(
    p_ptr, b_ptr, y_ptr, R, C, H, W, plane,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, PHASE: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] int64
    j0 = tl.program_id(1) * BLOCK_W
    j = j0 + tl.arange(0, BLOCK_W)
    jj = 2 * j0 + tl.arange(0, 2 * BLOCK_W)
    rmask = r < R
    i = r % H
    nc = r // H  # n·C + c
    c = nc % C
    p_row = ((nc + (nc // C) * (3 * C)) * (H + 1) + i) * (W + 1)  # p[n, 0, c, i, 0]: channel n·4C + c
    y_row = (nc * (2 * H) + 2 * i) * (2 * W)  # y[n, c, 2i, 0]
    mask = rmask[:, None] & (j < W)[None, :]
    mask2 = rmask[:, None] & (jj < 2 * W)[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=rmask, other=0.0).to(tl.float32)[:, None]
    if PHASE < 0:  # (p_row and mask2 are dead code otherwise)
        row0 = p_row  # phase (a, 0), row i + a: a = 0 here; a = 1 is 2·plane + (W + 1) further
        for a in tl.static_range(2):
            v0 = tl.load(p_ptr + row0[:, None] + j[None, :], mask=mask)
            v1 = tl.load(p_ptr + (row0 + plane)[:, None] + (j + 1)[None, :], mask=mask)  # phase (a, 1), column j + 1
            v = tl.reshape(tl.join(v0, v1), (BLOCK_R, 2 * BLOCK_W))  # [BR, BW] x 2 -> [BR, BW, 2] -> [BR, 2·BW]
            if HAS_BIAS:
                v = (v.to(tl.float32) + bias).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + (y_row + a * (2 * W))[:, None] + jj[None, :], v, mask=mask2)
            row0 = row0 + plane + plane + (W + 1)  # int64 + int32 adds: no int32 product of plane
    else:
        a: tl.constexpr = PHASE // 2
        b: tl.constexpr = PHASE % 2
        src = (nc * (H + 1) + i + a) * (W + 1) + b  # p[n, c, i + a, b]
        v = tl.load(p_ptr + src[:, None] + j[None, :], mask=mask)
        if HAS_BIAS:
            v = (v.to(tl.float32) + bias).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + (y_row + a * (2 * W) + b)[:, None] + (2 * j)[None, :], v, mask=mask)


# ---- launchers -----------------------------------------------------------------------------------


def _check_int32(span: int) -> None:
    if span >= 2**31:
        raise ValueError(f"a tile spans {span} elements; offsets inside a tile are int32")


def _shrink(block: int, programs: int, target: int) -> int:
    """Halve ``block`` (a power of 2) while the grid has fewer than ``target`` programs."""
    while block > 1 and programs < target:
        block //= 2
        programs *= 2
    return block


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _cl_blocks(n: int, h: int, w: int, c: int, phase: int | None, device: torch.device) -> tuple[int, int, int]:
    """channels_last launch: (block_w, block_c, channel blocks); a program moves 4·TILE elements either way."""
    tile = TILE if phase is None else 4 * TILE
    block_c = min(triton.next_power_of_2(c), 128)
    n_cb = triton.cdiv(c, block_c)
    block_w = max(1, min(triton.next_power_of_2(w), tile // block_c))
    return _shrink(block_w, n * h * n_cb * triton.cdiv(w, block_w), 4 * _sm_count(device)), block_c, n_cb


def stats_parts(p_shape: tuple[int, ...], c: int, groups: int, phase: int | None, device: torch.device) -> int | None:
    """GroupNorm(groups) partials one channels_last interleave call writes (h·n_wb), or None where it cannot write
    them (groups that straddle its channel blocks). p_shape: the call's p [N, (4·)C, H+1, W+1]."""
    n, _, h1, w1 = p_shape
    block_w, block_c, _ = _cl_blocks(n, h1 - 1, w1 - 1, c, phase, device)
    if groups <= 0 or c % groups or c % block_c or block_c % (c // groups):
        return None
    return (h1 - 1) * triton.cdiv(w1 - 1, block_w)


def phase_interleave(
    p: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    phase: int | None = None,
    out: torch.Tensor | None = None,
    part: torch.Tensor | None = None,
    part_offset: int = 0,
) -> torch.Tensor:
    """P [N, 4·C, H+1, W+1] (the sub-pixel conv output) -> y [N, C, 2H, 2W] in p's memory format.

    y[n, c, 2i+a, 2j+b] = P[n, (2a+b)·C + c, i+a, j+b] (+ bias[c]: fp32 sum, one rounding to p.dtype).
    p: fp32/fp16/bf16, channels_last or NCHW-contiguous (anything else is copied to NCHW first).
    bias: [C], any float dtype, on p's device, or None (then y is a bit-exact copy).
    ``phase`` k = 2a + b: p is phase k's conv output alone, [N, C, H+1, W+1], and only y's (a, b)
    positions are written (four calls fill y: the same values as one call on their concatenation).
    ``out``: write into this y ([N, C, 2H, 2W], p's dtype and device, NCHW-contiguous or channels_last;
    its layout then rules and p is brought to it) and return it.
    ``part``: fp32 [3, N, G, P] (channels_last only, :func:`stats_parts` not None): also write the GroupNorm(G)
    partials of the values stored, at parts part_offset .. part_offset + stats_parts(...) (kernels/gn_tile_stats.py).
    """
    per = 4 if phase is None else 1
    what = "p [N, 4·C, H+1, W+1]" if phase is None else f"phase {phase}'s p [N, C, H+1, W+1]"
    if phase is not None and phase not in range(4):
        raise ValueError(f"phase must be 0..3 (2a + b) or None, got {phase!r}")
    if p.dim() != 4:
        raise ValueError(f"phase_interleave expects {what}, got shape {tuple(p.shape)}")
    if p.dtype not in FLOATS:
        raise ValueError(f"phase_interleave supports fp32/fp16/bf16 p, got {p.dtype}")
    N, Cp, H1, W1 = p.shape
    if Cp % per or Cp == 0 or H1 < 1 or W1 < 1:
        raise ValueError(f"p must have {'4·' if per == 4 else ''}C > 0 channels and H+1, W+1 >= 1, got shape "
                         f"{tuple(p.shape)}")  # fmt: skip
    C, H, W = Cp // per, H1 - 1, W1 - 1
    if bias is not None and (bias.shape != (C,) or bias.device != p.device or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float [{C}] tensor on {p.device}, got {tuple(bias.shape)} {bias.dtype} "
                         f"on {bias.device}")  # fmt: skip
    if out is None:
        cl = _is_channels_last(p)
        fmt = torch.channels_last if cl else torch.contiguous_format
        y = torch.empty((N, C, 2 * H, 2 * W), dtype=p.dtype, device=p.device, memory_format=fmt)
    else:
        dense = out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)
        if out.shape != (N, C, 2 * H, 2 * W) or out.dtype != p.dtype or out.device != p.device or not dense:
            raise ValueError(f"out must be a dense [{N}, {C}, {2 * H}, {2 * W}] {p.dtype} tensor on {p.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")  # fmt: skip
        cl, y = _is_channels_last(out), out
    if cl and not p.is_contiguous(memory_format=torch.channels_last):
        p = p.contiguous(memory_format=torch.channels_last)
    elif not cl and not p.is_contiguous():
        p = p.contiguous()
    if y.numel() == 0:
        return y
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    has_bias = bias is not None
    b_arg = bias if has_bias else p
    target = 4 * _sm_count(p.device)
    k, tile = (-1, TILE) if phase is None else (phase, 4 * TILE)  # a program moves 4·TILE elements either way
    if part is not None:
        parts = stats_parts(tuple(p.shape), C, part.shape[2], phase, p.device) if cl else None
        if parts is None or part.dtype != torch.float32 or part.shape[:2] != (3, N) or not part.is_contiguous():
            raise ValueError(f"part: an fp32 [3, {N}, G, P] tensor, channels_last p, groups inside 128-channel blocks")
        if not 0 <= part_offset <= part.shape[3] - parts:
            raise ValueError(f"part_offset {part_offset} + {parts} parts exceed P = {part.shape[3]}")
    if cl:
        block_w, block_c, n_cb = _cl_blocks(N, H, W, C, phase, p.device)
        _check_int32(16 * (W + 1) * C)  # also the masked lanes past W (block_w <= 2W)
        warps = max(1, min(4, block_w * block_c // 256))
        grid = (N * H, triton.cdiv(W, block_w) * n_cb)
        stats = dict(STATS=part is not None, CPG=C // part.shape[2] if part is not None else 1)
        _interleave_cl_kernel[grid](p, b_arg, y, part if part is not None else p, H, W, C, n_cb,
                                    part.shape[3] if part is not None else 0, part_offset, HAS_BIAS=has_bias,
                                    BLOCK_W=block_w, BLOCK_C=block_c, PHASE=k, **stats, num_warps=warps)  # fmt: skip
    else:
        R = N * C * H
        block_w = min(triton.next_power_of_2(W), 256)
        block_r = max(1, min(triton.next_power_of_2(R), tile // block_w))
        block_r = _shrink(block_r, triton.cdiv(R, block_r) * triton.cdiv(W, block_w), target)
        _check_int32(4 * W + 2 * block_w)
        warps = max(1, min(4, block_r * block_w // 256))
        grid = (triton.cdiv(R, block_r), triton.cdiv(W, block_w))
        _interleave_nchw_kernel[grid](p, b_arg, y, R, C, H, W, C * H1 * W1, HAS_BIAS=has_bias, BLOCK_R=block_r,
                                      BLOCK_W=block_w, PHASE=k, num_warps=warps)  # fmt: skip
    return y


def splits_by_phase(x: torch.Tensor, out_channels: int) -> bool:
    """Whether :func:`subpixel_upsample_conv` runs the phase convs one at a time for x [N, Ci, H, W]:
    x is channels_last and the four-phase output P [N, 4·Co, H+1, W+1] would exceed
    :data:`PHASE_SPLIT_BYTES`. (channels_last: a phase writes whole pixels, runs of Co channels, so y
    takes the same full sectors as from one launch. NCHW: a phase fills every other element of y's
    rows, half of each sector per launch; it stays one conv unless asked, ``by_phase=True``.)"""
    n, _, h, w = x.shape
    p_bytes = n * 4 * out_channels * (h + 1) * (w + 1) * x.element_size()
    return _is_channels_last(x) and p_bytes > PHASE_SPLIT_BYTES


def subpixel_upsample_conv(
    x: torch.Tensor,
    weight4: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    by_phase: bool | None = None,
    interleave: Callable[..., torch.Tensor] = phase_interleave,
    stats_groups: int | None = None,
) -> torch.Tensor:
    """conv2d(interpolate(x, 2, "nearest"), W, bias, padding=1) from W4 = subpixel_weight(W) (its own module).

    x [N, Ci, H, W] fp32/fp16/bf16; weight4 [4·Co, Ci, 2, 2] in x's dtype; bias [Co] or None.
    Returns [N, Co, 2H, 2W] in the conv output's memory format (channels_last for channels_last x).
    ``by_phase``: run phase k's conv (weight4's rows k·Co..(k+1)·Co, a view) and scatter it into y
    before the next one, so one phase's output is live at a time, not all four; None: when
    :func:`splits_by_phase` says so. Each output value is the same dot product and the same one-rounding
    bias add either way. ``interleave``: :func:`phase_interleave`, or :func:`phase_interleave_ref` where
    Triton cannot run. ``stats_groups``: y's next reader is GroupNorm(stats_groups): the (Triton, channels_last)
    interleave also writes its partials, handed over on y (kernels/gn_tile_stats.py); silently none where it
    cannot (NCHW, groups straddling its channel blocks, the reference interleave).
    """
    if x.dim() != 4:
        raise ValueError(f"subpixel_upsample_conv expects x [N, Ci, H, W], got shape {tuple(x.shape)}")
    if (
        weight4.dim() != 4
        or tuple(weight4.shape[2:]) != (2, 2)
        or weight4.shape[0] % 4
        or weight4.shape[1] != x.shape[1]
    ):
        raise ValueError(
            f"weight4 must be [4·Co, {x.shape[1]}, 2, 2] (from subpixel_weight), got {tuple(weight4.shape)}"
        )
    if weight4.dtype != x.dtype or weight4.device != x.device:
        raise ValueError(f"weight4 must match x's dtype and device ({x.dtype}, {x.device}), got "
                         f"{weight4.dtype}, {weight4.device}")  # fmt: skip
    co = weight4.shape[0] // 4
    split = splits_by_phase(x, co) if by_phase is None else by_phase
    n, _, h, w = x.shape
    parts = None
    if stats_groups and interleave is phase_interleave and _is_channels_last(x):
        parts = stats_parts((n, co * (1 if split else 4), h + 1, w + 1), co, stats_groups, 0 if split else None,
                            x.device)  # fmt: skip
    part = None if parts is None else torch.empty((3, n, stats_groups, parts * (4 if split else 1)),
                                                  device=x.device, dtype=torch.float32)  # fmt: skip
    stats = {} if part is None else {"part": part}
    if not split:
        p = F.conv2d(x, weight4, None, padding=1)  # [N, Ci, H, W] -> [N, 4·Co, H+1, W+1]
        y = interleave(p, bias, **stats)
    else:  # phase k's conv [N, Ci, H, W] -> [N, Co, H+1, W+1]: freed when interleave returns, before the next
        y = interleave(F.conv2d(x, weight4[:co], None, padding=1), bias, phase=0, **stats)
        for k in range(1, 4):
            if part is not None:
                stats["part_offset"] = k * parts
            y = interleave(F.conv2d(x, weight4[k * co : (k + 1) * co], None, padding=1), bias, phase=k, out=y, **stats)
    return y if part is None else attach(y, part, stats_groups)
