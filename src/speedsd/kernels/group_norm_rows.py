"""The ``rows`` path of :func:`speedsd.kernels.group_norm.group_norm`: channels_last GroupNorm as two
streaming launches over whole pixel rows, the statistics finished inside the first.

x is seen as rows [N, S, C] (channels_last, C = G·CPG contiguous). Launch 1 (statistics), program
(p, n) over the rows of chunk p of sample n, tiles [BLOCK_S, BLOCK_C] of whole rows (BLOCK_C = C padded
to a power of two: 16-byte loads, no per-group masks):

    per channel, shifted sums  S1_c = Σ (x − K_c),  S2_c = Σ (x − K_c)²   (K_c = x[chunk's first row, c])
    accumulated in the tile's own layout and reduced over rows once, then
    mean_c = K_c + S1_c / m,   M2_c = S2_c − S1_c² / m            (m rows; pre-add: mean_c += a[n, c])
    channels -> groups with Chan's formula (each group's channels gathered to a row of a [G, CPG padded]
    tile; a one-hot over the padded row for CPG > 32): part[n, p] = (mean_g, M2_g)

and the program that finishes last for its sample (an arrival count, re-armed to 0) merges the P
partials: stats[n] = (mean_g, var_g), var = M2 / (S·CPG) (eps is the reader's: statistics handed over by
a producer serve any GroupNorm). Launch 2 (apply), program (p, n): rstd = 1 / sqrt(var + eps),
scale_c = rstd_g(c)·w_c, shift_c = b_c − mean_g(c)·scale_c (+ a[n, c]·scale_c), then
y = x·scale + shift (+SiLU) over its chunk's rows: a copy's traffic, no partial merging per program.

The statistics launch takes the split kernels' producer mode (PRODUCE: y = round(x + b[c] + r) is
stored and its statistics taken; kernels/add_gn_stats.py) and both take two sources (DUAL, as in
group_norm_kernels.py). The shifted sums are exact enough in fp32: |x − K| is of the data's spread,
so S2 − S1²/m cancels nothing large (the merge over channels and chunks is Chan's, as elsewhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from speedsd.kernels.device import arrival_counters
from speedsd.kernels.gn_tile_stats import _dense
from speedsd.kernels.group_norm_kernels import (
    _channels_to_groups,
    _channels_to_groups_gathered,
    _load_add,
    _load_in,
    _onehot,
    _plus,
    _row_affine,
    _stream_apply,
)
from speedsd.kernels.group_norm_split_kernels import _add_store


@triton.jit
def _gn_rows_stats_kernel(
    x_ptr, a_ptr, part_ptr, stats_ptr, cnt_ptr, b_ptr, r_ptr, y_ptr,
    C, S, P, chunk, n_iter, a_sn,
    CPG: tl.constexpr, HAS_ADD: tl.constexpr, PRODUCE: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, CPG_P2: tl.constexpr,
    x2_ptr=None, C1=0, sn1=0, sc1=0, ss1=0, sn2=0, sc2=0, ss2=0, DUAL: tl.constexpr = False,
):  # fmt: skip
    p = tl.program_id(0)
    n = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    rs = tl.arange(0, BLOCK_S)
    off_n = n.to(tl.int64) * S * C
    s0 = p * chunk
    bias = 0.0
    if HAS_B:
        bias = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    # the shift K_c: the chunk's first row (as stored, in producer mode)
    k_offs = off_n + s0 * C + c
    k = _load_in(x_ptr + k_offs, mask_c, x_ptr, x2_ptr, n, s0, c, C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)
    k = k.to(tl.float32)
    if PRODUCE:
        if HAS_B:
            k += tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_R:
            k += tl.load(r_ptr + k_offs, mask=mask_c, other=0.0).to(tl.float32)
        k = k.to(y_ptr.dtype.element_ty).to(tl.float32)
    k_row = k
    k = k_row[None, :]  # [1, BC]
    s1 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    s2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask = (s < S)[:, None] & mask_c[None, :]
        offs = off_n + s[:, None] * C + c[None, :]
        x = _load_in(x_ptr + offs, mask, x_ptr, x2_ptr, n, s[:, None], c[None, :],
                     C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)  # fmt: skip
        if PRODUCE:
            x = _add_store(x, bias, r_ptr + offs, y_ptr + offs, mask, HAS_B, HAS_R)
        d = tl.where(mask, x.to(tl.float32) - k, 0.0)
        s1 += d
        s2 += d * d
    m = tl.maximum(tl.minimum(S - s0, chunk), 1) * 1.0  # rows of this chunk
    t1 = tl.sum(s1, axis=0)
    mean_c = k_row + t1 / m
    m2_c = tl.maximum(tl.sum(s2, axis=0) - t1 * t1 / m, 0.0)
    mean_c = _plus(mean_c, _load_add(a_ptr, n * a_sn + c, mask_c, HAS_ADD), HAS_ADD)
    if CPG_P2 <= 32:  # gathered: 2x320x64² 9.4 -> 7.1 µs, 2x960x64² 12.7 -> 7.9; 2x1280x32² 15.2 -> 17.9 (CPG 40)
        mean_g, m2_g = _channels_to_groups_gathered(mean_c, m2_c, m, C, CPG, CPG_P2, BLOCK_G)
    else:  # (bench/results/gn_gather_ab_h200.json)
        mean_g, m2_g = _channels_to_groups(mean_c, m2_c, m, _onehot(BLOCK_C, BLOCK_G, CPG, BLOCK_G, mask_c), CPG)
    g = tl.arange(0, BLOCK_G)
    dst = part_ptr + ((n * P + p) * 2) * BLOCK_G + g
    tl.store(dst, mean_g)
    tl.store(dst + BLOCK_G, m2_g)
    tl.debug_barrier()  # every thread's partial stored before the arrival is published
    done = tl.atomic_add(cnt_ptr + n, 1, sem="acq_rel", scope="gpu")
    if done == P - 1:  # the sample's last program: merge its P partials (Chan), rows q·chunk .. per chunk
        q = tl.arange(0, BLOCK_P)
        mask_q = q < P
        n_q = tl.where(mask_q, tl.minimum(S, (q + 1) * chunk) - q * chunk, 0) * 1.0
        src = part_ptr + ((n * P + q[:, None]) * 2) * BLOCK_G + g[None, :]
        mean_q = tl.load(src, mask=mask_q[:, None], other=0.0, cache_modifier=".cg")
        m2_q = tl.load(src + BLOCK_G, mask=mask_q[:, None], other=0.0, cache_modifier=".cg")
        mean = tl.sum(n_q[:, None] * mean_q, axis=0) / S
        dev = mean_q - mean[None, :]
        m2 = tl.sum(m2_q + (n_q * CPG)[:, None] * dev * dev, axis=0)
        tl.store(stats_ptr + n * 2 * BLOCK_G + g, mean)
        tl.store(stats_ptr + (n * 2 + 1) * BLOCK_G + g, m2 / (S * CPG * 1.0))
        tl.atomic_xchg(cnt_ptr + n, 0)


@triton.jit
def _group_affine(stats_ptr, w_ptr, b_ptr, n, c, mask_c, eps, CPG: tl.constexpr, BLOCK_G: tl.constexpr,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr):  # fmt: skip
    # channel c's group statistics (mean, var) of sample n -> y = x·scale + shift, rstd = 1 / sqrt(var + eps)
    grp = n * 2 * BLOCK_G + c // CPG
    mean = tl.load(stats_ptr + grp, mask=mask_c, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(stats_ptr + grp + BLOCK_G, mask=mask_c, other=0.0) + eps)
    return _row_affine(mean, rstd, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)


@triton.jit
def _gn_rows_apply_kernel(
    x_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, a_ptr,
    C, S, chunk, n_iter, eps, a_sn,
    CPG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
    x2_ptr=None, C1=0, sn1=0, sc1=0, ss1=0, sn2=0, sc2=0, ss2=0, DUAL: tl.constexpr = False,
):  # fmt: skip
    p = tl.program_id(0)
    n = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    scale, shift = _group_affine(stats_ptr, w_ptr, b_ptr, n, c, mask_c, eps, CPG, BLOCK_G, HAS_W, HAS_B)
    shift = _plus(shift, _load_add(a_ptr, n * a_sn + c, mask_c, HAS_ADD) * scale, HAS_ADD)
    _stream_apply(x_ptr, y_ptr, n, n.to(tl.int64) * S * C, p * chunk, n_iter, S, C, c, c, mask_c, scale, shift,
                  x2_ptr, C1, sn1, sc1, ss1, sn2, sc2, ss2, BLOCK_S, SILU, DUAL)  # fmt: skip


def rows_stats(
    x: torch.Tensor,
    num_groups: int,
    chunks: int,
    block_s: int,
    warps: int,
    add: tuple[torch.Tensor, int] | None = None,
    dual: dict[str, object] | None = None,
    produce: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Launch 1 over a channels_last x [N, C, *spatial] (dense; with ``dual`` x is the first source and C
    the concatenation's): stats [N, 2, BLOCK_G] fp32 = (mean_g, var_g). ``add``: (rows [.., C], sample
    stride). ``produce``: (bias, residual, y) — y = x + bias + residual is stored first (x's layout) and
    the statistics are y's. ``chunks`` row chunks a sample, ``block_s`` rows a tile."""
    n, s = x.shape[0], x[0, 0].numel()
    c = x.shape[1] + (dual["x2_ptr"].shape[1] if dual else 0)  # type: ignore[union-attr]
    cpg = c // num_groups
    block_g = max(2, triton.next_power_of_2(num_groups))
    chunk = triton.cdiv(triton.cdiv(s, chunks), block_s) * block_s
    p = triton.cdiv(s, chunk)
    part = torch.empty((n, p, 2, block_g), device=x.device, dtype=torch.float32)
    stats = torch.empty((n, 2, block_g), device=x.device, dtype=torch.float32)
    a, a_sn = add if add is not None else (x, 0)
    b, r, y = produce if produce is not None else (None, None, x)
    _gn_rows_stats_kernel[(p, n)](
        x, a, part, stats, arrival_counters(x.device, n), b if b is not None else x, r if r is not None else x, y,
        c, s, p, chunk, chunk // block_s, a_sn, CPG=cpg, HAS_ADD=add is not None, PRODUCE=produce is not None,
        HAS_B=b is not None, HAS_R=r is not None, BLOCK_S=block_s, BLOCK_C=triton.next_power_of_2(c), BLOCK_G=block_g,
        BLOCK_P=triton.next_power_of_2(p), CPG_P2=triton.next_power_of_2(cpg), **(dual or {}), num_warps=warps,
    )  # fmt: skip
    return stats


def rows_apply(
    x: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    chunks: int,
    block_s: int,
    warps: int,
    add: tuple[torch.Tensor, int] | None = None,
    dual: dict[str, object] | None = None,
) -> torch.Tensor:
    """Launch 2: out = x·scale + shift (+SiLU) from :func:`rows_stats`' stats (out: dense channels_last)."""
    n, s, c = out.shape[0], out[0, 0].numel(), out.shape[1]
    chunk = triton.cdiv(triton.cdiv(s, chunks), block_s) * block_s
    a, a_sn = add if add is not None else (x, 0)
    _gn_rows_apply_kernel[(triton.cdiv(s, chunk), n)](
        x, out, stats, _dense(weight, x), _dense(bias, x), a, c, s, chunk,
        chunk // block_s, eps, a_sn, CPG=c // num_groups, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_ADD=add is not None, SILU=bool(silu), BLOCK_S=block_s, BLOCK_C=triton.next_power_of_2(c),
        BLOCK_G=stats.shape[-1], **(dual or {}), num_warps=warps,
    )  # fmt: skip
    return out


# GroupNorm as a per-(sample, channel) affine for a consumer's prologue (kernels/group_norm_affine.py), from
# the rows statistics: program n writes scale[n, c] = w_c / sqrt(var_g(c) + eps), shift[n, c] = b_c − mean_g(c)·scale.
@triton.jit
def _gn_rows_scale_shift_kernel(
    stats_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, eps,
    CPG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    scale, shift = _group_affine(stats_ptr, w_ptr, b_ptr, n, c, mask_c, eps, CPG, BLOCK_G, HAS_W, HAS_B)
    tl.store(scale_ptr + n * C + c, scale, mask=mask_c)
    tl.store(shift_ptr + n * C + c, shift, mask=mask_c)


def rows_scale_shift(
    stats: torch.Tensor, num_groups: int, c: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [N, C] fp32 with GroupNorm(x) = x·scale + shift, from :func:`rows_stats`' stats."""
    n = stats.shape[0]
    scale = torch.empty((n, c), device=stats.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    _gn_rows_scale_shift_kernel[(n,)](
        stats, _dense(weight, stats), _dense(bias, stats), scale, shift, c, eps,
        CPG=c // num_groups, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=triton.next_power_of_2(c),
        BLOCK_G=stats.shape[-1], num_warps=4,
    )  # fmt: skip
    return scale, shift
