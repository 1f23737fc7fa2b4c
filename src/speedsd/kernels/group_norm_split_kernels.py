"""The split-path Triton kernels of speedsd.kernels.group_norm: a statistics launch writing per-chunk
(mean, M2) partials, then a normalize launch merging them (Chan) and writing its chunk. Two pairs: group
blocks over [N, C, S] strides, and channels_last whole pixel rows. Helpers and the pre-add rule (HAS_ADD):
group_norm_kernels.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from speedsd.kernels.group_norm_kernels import (
    _channels_to_groups,
    _load_add,
    _load_in,
    _merge,
    _onehot,
    _plus,
    _scale_shift,
    _silu_if,
    _stream_apply,
    _tile_stats,
)


@triton.jit
def _add_store(x, bias, r_ptrs, y_ptrs, mask, HAS_B: tl.constexpr, HAS_R: tl.constexpr):
    # producer mode: y = round(x + bias + r) is stored; returns the stored values in fp32, 0 where masked
    v = x.to(tl.float32)
    if HAS_B:
        v += bias
    if HAS_R:
        v += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    v_low = v.to(y_ptrs.dtype.element_ty)
    tl.store(y_ptrs, v_low, mask=mask)
    return tl.where(mask, v_low.to(tl.float32), 0.0)


# Split path, launch 1 of 2. Program (cb, p, n) covers positions [p·chunk, min(S, (p+1)·chunk)):
#   per-channel (count, mean, M2) over its tiles (Chan merge), then to groups; writes
#   part[0 | 1, n·n_cb + cb, p, j] = mean_j | M2_j for the GB groups j of the block. Pre-add: mean_c += a_c.
# PRODUCE (kernels/add_gn_stats.py): x is a block's output before its closing add; each tile first
#   stores y = round(x + b[c] + r) (y, r: x's strides) and the statistics are those of the stored y.
@triton.jit
def _gn_stats_kernel(
    x_ptr, a_ptr, part_ptr, b_ptr, r_ptr, y_ptr,
    C, S, sn, sc, ss, n_cb, P, chunk, n_iter, CPG, a_sn,
    GB: tl.constexpr, HAS_ADD: tl.constexpr,
    PRODUCE: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
    x2_ptr=None, C1=0, sn1=0, sc1=0, ss1=0, sn2=0, sc2=0, ss2=0, DUAL: tl.constexpr = False,
):  # fmt: skip
    cb = tl.program_id(0)
    p = tl.program_id(1)
    n = tl.program_id(2)
    cl = tl.arange(0, BLOCK_C)
    c = cb * (GB * CPG) + cl
    mask_c = (cl < GB * CPG) & (c < C)
    rs = tl.arange(0, BLOCK_S)
    off_n = n.to(tl.int64) * sn
    col = c * sc
    bias = 0.0
    if HAS_B:
        bias = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    s0 = p * chunk  # chunk = n_iter whole tiles: only S bounds a tile (a mask Triton can vectorise)
    n_c = 0.0
    mean_c = tl.zeros([BLOCK_C], tl.float32)
    m2_c = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask_s = s < S
        mask = mask_s[:, None] & mask_c[None, :]
        offs = off_n + s[:, None] * ss + col[None, :]
        x = _load_in(x_ptr + offs, mask, x_ptr, x2_ptr, n, s[:, None], c[None, :],
                     C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)  # fmt: skip
        if PRODUCE:
            x = _add_store(x, bias, r_ptr + offs, y_ptr + offs, mask, HAS_B, HAS_R)
        ns = tl.maximum(tl.minimum(S - (s0 + i * BLOCK_S), BLOCK_S), 0) * 1.0
        t_mean, t_m2 = _tile_stats(x.to(tl.float32), mask_s, ns)
        n_c, mean_c, m2_c = _merge(n_c, mean_c, m2_c, ns, t_mean, t_m2)
    onehot = _onehot(BLOCK_C, BLOCK_G, CPG, GB, mask_c)
    mean_c = _plus(mean_c, _load_add(a_ptr, n * a_sn + c, mask_c, HAS_ADD), HAS_ADD)
    mean_g, m2_g = _channels_to_groups(mean_c, m2_c, n_c, onehot, CPG)
    gj = tl.arange(0, BLOCK_G)
    half = n_cb * tl.num_programs(2) * P * BLOCK_G
    dst = part_ptr + ((n * n_cb + cb) * P + p) * BLOCK_G + gj
    tl.store(dst, mean_g)
    tl.store(dst + half, m2_g)


# Split path, launch 2 of 2. Program (cb, p, n) (visited in reverse order) merges the P partials of
# its groups (_merged_scale_shift), then writes y = x·scale + shift (+SiLU) over its chunk. Pre-add: shift += a·scale.
@triton.jit
def _gn_norm_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, a_ptr, part_ptr,
    C, S, sn, sc, ss, n_cb, P, chunk, n_iter, eps, CPG, a_sn,
    GB: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    x2_ptr=None, C1=0, sn1=0, sc1=0, ss1=0, sn2=0, sc2=0, ss2=0, DUAL: tl.constexpr = False,
):  # fmt: skip
    cb = n_cb - 1 - tl.program_id(0)
    p = P - 1 - tl.program_id(1)
    n = tl.num_programs(2) - 1 - tl.program_id(2)
    cl = tl.arange(0, BLOCK_C)
    c = cb * (GB * CPG) + cl
    mask_c = (cl < GB * CPG) & (c < C)
    scale, shift = _merged_scale_shift(
        part_ptr, w_ptr, b_ptr, (n * n_cb + cb) * P, n_cb * tl.num_programs(2) * P, P, chunk, S, eps, CPG, c,
        mask_c, GB, HAS_W, HAS_B, BLOCK_C, BLOCK_G, BLOCK_P,
    )  # fmt: skip
    shift = _plus(shift, _load_add(a_ptr, n * a_sn + c, mask_c, HAS_ADD) * scale, HAS_ADD)
    _stream_apply(x_ptr, y_ptr, n, n.to(tl.int64) * sn, p * chunk, n_iter, S, ss, c * sc, c, mask_c, scale, shift,
                  x2_ptr, C1, sn1, sc1, ss1, sn2, sc2, ss2, BLOCK_S, SILU, DUAL)  # fmt: skip


@triton.jit
def _merged_scale_shift(
    part_ptr, w_ptr, b_ptr, row0, rows, P, chunk, S, eps, CPG, c, mask_c,
    GB: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # the P partials of one group block (rows row0 .. row0 + P of part[0 | 1], ``rows`` rows a half), with
    # chunk counts n_q = (min(S, (q+1)·chunk) − q·chunk)·CPG merged (Chan), to the channels' y = x·scale + shift:
    #   mean = Σ_q n_q·mean_q / (S·CPG);  M2 = Σ_q M2_q + n_q·(mean_q − mean)²
    q = tl.arange(0, BLOCK_P)
    gj = tl.arange(0, BLOCK_G)
    mask_q = q < P
    n_q = tl.where(mask_q, tl.minimum(S, (q + 1) * chunk) - q * chunk, 0) * 1.0  # positions per chunk
    src = part_ptr + (row0 + q[:, None]) * BLOCK_G + gj[None, :]
    mean_q = tl.load(src, mask=mask_q[:, None], other=0.0)
    m2_q = tl.load(src + rows * BLOCK_G, mask=mask_q[:, None], other=0.0)
    mean_g = tl.sum(n_q[:, None] * mean_q, axis=0) / S
    d = mean_q - mean_g[None, :]
    m2_g = tl.sum(m2_q + (n_q * CPG)[:, None] * d * d, axis=0)
    onehot = _onehot(BLOCK_C, BLOCK_G, CPG, GB, mask_c)
    return _scale_shift(mean_g, m2_g, S * CPG * 1.0, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)


# GroupNorm as a per-(sample, channel) affine for a consumer's prologue (kernels/group_norm_affine.py).
# Program (cb, n): its group block's merged partials (as in _gn_norm_kernel) -> scale[n, c], shift[n, c]
# fp32, y = x·scale + shift. Grouped (whole-row) partials are one block of all G groups (n_cb = 1).
@triton.jit
def _gn_scale_shift_kernel(
    part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, S, n_cb, P, chunk, eps, CPG,
    GB: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    cb = tl.program_id(0)
    n = tl.program_id(1)
    cl = tl.arange(0, BLOCK_C)
    c = cb * (GB * CPG) + cl
    mask_c = (cl < GB * CPG) & (c < C)
    scale, shift = _merged_scale_shift(
        part_ptr, w_ptr, b_ptr, (n * n_cb + cb) * P, n_cb * tl.num_programs(1) * P, P, chunk, S, eps, CPG, c,
        mask_c, GB, HAS_W, HAS_B, BLOCK_C, BLOCK_G, BLOCK_P,
    )  # fmt: skip
    tl.store(scale_ptr + n * C + c, scale, mask=mask_c)
    tl.store(shift_ptr + n * C + c, shift, mask=mask_c)


# channels_last, whole pixel rows: a tile is [BLOCK_S, BLOCK_G, BLOCK_K] = (position, group, channel in
# group), channel c = g·CPG + k, so a tile row is all C contiguous channels of one position and group
# reductions are sums over axes (2, 0). Launch 1 of 2, program (p, n) over positions [p·chunk, ...):
#   per tile per group: mean_t, M2_t (two-pass in registers); Chan merge over tiles;
#   part[0 | 1, n, p, g] = mean_g | M2_g.
# Pre-add: mean_t += Σ_k a[g, k] / CPG and cell (g, k) is centred on mean_t − a[g, k].
# PRODUCE: as in _gn_stats_kernel, the tile's y = round(x + b[c] + r) is stored first.
@triton.jit
def _gn_rows_cl_stats_kernel(
    x_ptr, a_ptr, part_ptr, b_ptr, r_ptr, y_ptr,
    C, S, G, P, chunk, n_iter, a_sn,
    HAS_ADD: tl.constexpr, PRODUCE: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    CPG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
    x2_ptr=None, C1=0, sn1=0, sc1=0, ss1=0, sn2=0, sc2=0, ss2=0, DUAL: tl.constexpr = False,
):  # fmt: skip
    p = tl.program_id(0)
    n = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    k = tl.arange(0, BLOCK_K)
    c = g[:, None] * CPG + k[None, :]  # [BG, BK]
    mask_c = (g < G)[:, None] & (k < CPG)[None, :]
    rs = tl.arange(0, BLOCK_S)
    off_n = n.to(tl.int64) * S * C
    s0 = p * chunk
    a = _load_add(a_ptr, n * a_sn + c, mask_c, HAS_ADD)  # [BG, BK]
    bias = 0.0
    if HAS_B:
        bias = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :, :]
    n_g = 0.0
    mean_g = tl.zeros([BLOCK_G], tl.float32)
    m2_g = tl.zeros([BLOCK_G], tl.float32)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask = (s < S)[:, None, None] & mask_c[None, :, :]
        offs = off_n + s[:, None, None] * C + c[None, :, :]
        x = _load_in(x_ptr + offs, mask, x_ptr, x2_ptr, n, s[:, None, None], c[None, :, :],
                     C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)  # fmt: skip
        if PRODUCE:
            x = _add_store(x, bias, r_ptr + offs, y_ptr + offs, mask, HAS_B, HAS_R)
        x = x.to(tl.float32)
        nt = tl.maximum(tl.minimum(S - (s0 + i * BLOCK_S), BLOCK_S), 0) * CPG * 1.0  # values per group
        t_mean = tl.sum(tl.sum(x, axis=2), axis=0) / tl.maximum(nt, 1.0)
        if HAS_ADD:
            t_mean = t_mean + tl.sum(a, axis=1) / CPG
            d = tl.where(mask, x - (t_mean[:, None] - a)[None, :, :], 0.0)
        else:
            d = tl.where(mask, x - t_mean[None, :, None], 0.0)
        t_m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
        n_g, mean_g, m2_g = _merge(n_g, mean_g, m2_g, nt, t_mean, t_m2)
    dst = part_ptr + (n * P + p) * BLOCK_G + g
    tl.store(dst, mean_g)
    tl.store(dst + tl.num_programs(1) * P * BLOCK_G, m2_g)


# Launch 2 of 2, program (p, n) in reverse order: merge the P partials of every group (as in
# _gn_norm_kernel), scale/shift per [group, channel] cell, then y = x·scale + shift (+SiLU) over its chunk.
# Pre-add: shift += a·scale.
@triton.jit
def _gn_rows_cl_norm_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, a_ptr, part_ptr,
    C, S, G, P, chunk, n_iter, eps, a_sn,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
    CPG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    x2_ptr=None, C1=0, sn1=0, sc1=0, ss1=0, sn2=0, sc2=0, ss2=0, DUAL: tl.constexpr = False,
):  # fmt: skip
    p = P - 1 - tl.program_id(0)
    n = tl.num_programs(1) - 1 - tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    k = tl.arange(0, BLOCK_K)
    c = g[:, None] * CPG + k[None, :]
    mask_c = (g < G)[:, None] & (k < CPG)[None, :]
    q = tl.arange(0, BLOCK_P)
    mask_q = q < P
    n_q = tl.where(mask_q, tl.minimum(S, (q + 1) * chunk) - q * chunk, 0) * 1.0  # positions per chunk
    src = part_ptr + (n * P + q[:, None]) * BLOCK_G + g[None, :]
    mean_q = tl.load(src, mask=mask_q[:, None], other=0.0)
    m2_q = tl.load(src + tl.num_programs(1) * P * BLOCK_G, mask=mask_q[:, None], other=0.0)
    mean_g = tl.sum(n_q[:, None] * mean_q, axis=0) / S
    d = mean_q - mean_g[None, :]
    m2_g = tl.sum(m2_q + (n_q * CPG)[:, None] * d * d, axis=0)
    rstd_g = 1.0 / tl.sqrt(m2_g / (S * CPG * 1.0) + eps)
    scale = tl.zeros([BLOCK_G, BLOCK_K], tl.float32) + rstd_g[:, None]  # [BG, BK]
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=mask_c, other=1.0).to(tl.float32)
    shift = -mean_g[:, None] * scale
    if HAS_B:
        shift = shift + tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    shift = _plus(shift, _load_add(a_ptr, n * a_sn + c, mask_c, HAS_ADD) * scale, HAS_ADD)
    rs = tl.arange(0, BLOCK_S)
    off_n = n.to(tl.int64) * S * C
    s0 = p * chunk
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask = (s < S)[:, None, None] & mask_c[None, :, :]
        offs = off_n + s[:, None, None] * C + c[None, :, :]
        x = _load_in(x_ptr + offs, mask, x_ptr, x2_ptr, n, s[:, None, None], c[None, :, :],
                     C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)  # fmt: skip
        x = x.to(tl.float32)
        y = _silu_if(x * scale[None, :, :] + shift[None, :, :], SILU)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
