"""Triton kernels of speedsd.kernels.group_norm (the launcher, plans and the design notes live there).

Every kernel sees x as [N, C, S] through strides (sn, sc, ss) or, for the NCHW / channels_last
specialisations, through its dense layout. Statistics in fp32, two-pass per register tile, tiles and
chunks merged with Chan's formula; never E[x²] − E[x]².
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---- device helpers ------------------------------------------------------------------------------


@triton.jit
def _tile_stats(x, mask_s, ns):
    # x [BS, BC] fp32 (0 where masked), ns = valid rows: per column mean and M2 = Σ (x − mean)²
    mean = tl.sum(x, axis=0) / tl.maximum(ns, 1.0)
    d = tl.where(mask_s[:, None], x - mean[None, :], 0.0)
    return mean, tl.sum(d * d, axis=0)


@triton.jit
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # Chan et al.: n = n_a + n_b; δ = mean_b − mean_a; mean = mean_a + δ·n_b/n; M2 = M2_a + M2_b + δ²·n_a·n_b/n
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def _onehot(BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, CPG, GB: tl.constexpr, mask_c):
    # [BC, BG]: local channel c belongs to local group j (and is a real channel)
    cl = tl.arange(0, BLOCK_C)
    gj = tl.arange(0, BLOCK_G)
    return ((cl // CPG)[:, None] == gj[None, :]) & (mask_c & (cl < GB * CPG))[:, None]


@triton.jit
def _channels_to_groups(mean_c, m2_c, n_c, onehot, CPG):
    # every channel has n_c samples: mean_g = mean over the group's channels of mean_c;
    # M2_g = Σ_c M2_c + n_c·(mean_c − mean_g)²
    mean_g = tl.sum(tl.where(onehot, mean_c[:, None], 0.0), axis=0) / CPG
    d = mean_c - _groups_to_channels(mean_g, onehot)
    m2_g = tl.sum(tl.where(onehot, (m2_c + n_c * d * d)[:, None], 0.0), axis=0)
    return mean_g, m2_g


@triton.jit
def _groups_to_channels(v_g, onehot):
    return tl.sum(tl.where(onehot, v_g[None, :], 0.0), axis=1)


@triton.jit
def _scale_shift(mean_g, m2_g, count_g, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    # y = (x − mean)·rstd·w + b = x·scale + shift, scale = rstd·w, shift = b − mean·scale
    rstd_g = 1.0 / tl.sqrt(m2_g / count_g + eps)
    scale = _groups_to_channels(rstd_g, onehot)
    mean = _groups_to_channels(mean_g, onehot)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=mask_c, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift = shift + tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _silu_if(y, SILU: tl.constexpr):
    # SiLU: y·σ(y) = y / (1 + e^(−y))
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _apply(x, scale, shift, SILU: tl.constexpr):
    # y = x·scale + shift (per column), then SiLU if asked
    return _silu_if(x * scale[None, :] + shift[None, :], SILU)


# ---- kernels -------------------------------------------------------------------------------------


# One program per (group block cb, sample n). ONE_TILE: the block [S, GB·CPG] is one register tile:
#   load once; per-channel mean/M2 (two-pass in registers); merge to groups; y = x·scale + shift (+SiLU).
# Otherwise sweep 1 accumulates per-channel (count, mean, M2) tile by tile (Chan merge), sweep 2 writes.
@triton.jit
def _gn_fused_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr,
    C, S, sn, sc, ss, n_iter, eps, CPG,
    GB: tl.constexpr, ONE_TILE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    cb = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    cl = tl.arange(0, BLOCK_C)
    c = cb * (GB * CPG) + cl
    mask_c = (cl < GB * CPG) & (c < C)
    rs = tl.arange(0, BLOCK_S)
    xb = x_ptr + n * sn
    yb = y_ptr + n * sn
    col = c * sc
    onehot = _onehot(BLOCK_C, BLOCK_G, CPG, GB, mask_c)
    count_g = S * CPG * 1.0
    if ONE_TILE:
        mask_s = rs < S
        mask = mask_s[:, None] & mask_c[None, :]
        offs = rs[:, None] * ss + col[None, :]
        x = tl.load(xb + offs, mask=mask, other=0.0).to(tl.float32)
        mean_c, m2_c = _tile_stats(x, mask_s, S * 1.0)
        mean_g, m2_g = _channels_to_groups(mean_c, m2_c, S * 1.0, onehot, CPG)
        scale, shift = _scale_shift(mean_g, m2_g, count_g, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)
        tl.store(yb + offs, _apply(x, scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        n_c = 0.0
        mean_c = tl.zeros([BLOCK_C], tl.float32)
        m2_c = tl.zeros([BLOCK_C], tl.float32)
        for i in range(0, n_iter):
            s = i * BLOCK_S + rs
            mask_s = s < S
            x = tl.load(xb + s[:, None] * ss + col[None, :], mask=mask_s[:, None] & mask_c[None, :], other=0.0)
            ns = tl.minimum(S - i * BLOCK_S, BLOCK_S) * 1.0
            t_mean, t_m2 = _tile_stats(x.to(tl.float32), mask_s, ns)
            n_c, mean_c, m2_c = _merge(n_c, mean_c, m2_c, ns, t_mean, t_m2)
        mean_g, m2_g = _channels_to_groups(mean_c, m2_c, n_c, onehot, CPG)
        scale, shift = _scale_shift(mean_g, m2_g, count_g, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)
        for i in range(0, n_iter):
            s = i * BLOCK_S + rs
            mask = (s < S)[:, None] & mask_c[None, :]
            offs = s[:, None] * ss + col[None, :]
            x = tl.load(xb + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(yb + offs, _apply(x, scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)


# NCHW one-tile, one program per (group g, sample n). The group is CPG contiguous channel rows of S
# values; they are held as two power-of-two row blocks, A = rows [0, RA) and B = rows [RA, RA + RB)
# (masked to < CPG), so CPG = 10 costs 8 + 2 rows instead of 16. Two-pass in registers:
#   mean = Σx / (CPG·S);  M2 = Σ (x − mean)²;  y = x·scale_c + shift_c  (+SiLU)
@triton.jit
def _gn_rows_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr,
    C, S, CPG, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    RA: tl.constexpr, RB: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    c0 = g * CPG
    base = (n * C + c0) * S
    s = tl.arange(0, BLOCK_S)
    mask_s = s < S
    ra = tl.arange(0, RA)
    rb = RA + tl.arange(0, RB)
    mask_a = (ra < CPG)[:, None] & mask_s[None, :]
    mask_b = (rb < CPG)[:, None] & mask_s[None, :]
    offs_a = base + ra[:, None] * S + s[None, :]
    offs_b = base + rb[:, None] * S + s[None, :]
    xa = tl.load(x_ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)
    xb = tl.load(x_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)
    count = CPG * S * 1.0
    mean = (tl.sum(tl.sum(xa, axis=1), axis=0) + tl.sum(tl.sum(xb, axis=1), axis=0)) / count
    da = tl.where(mask_a, xa - mean, 0.0)
    db = tl.where(mask_b, xb - mean, 0.0)
    m2 = tl.sum(tl.sum(da * da, axis=1), axis=0) + tl.sum(tl.sum(db * db, axis=1), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    scale_a, shift_a = _row_affine(mean, rstd, w_ptr, b_ptr, c0 + ra, ra < CPG, HAS_W, HAS_B)
    scale_b, shift_b = _row_affine(mean, rstd, w_ptr, b_ptr, c0 + rb, rb < CPG, HAS_W, HAS_B)
    ya = _silu_if(xa * scale_a[:, None] + shift_a[:, None], SILU)
    yb = _silu_if(xb * scale_b[:, None] + shift_b[:, None], SILU)
    tl.store(y_ptr + offs_a, ya.to(y_ptr.dtype.element_ty), mask=mask_a)
    tl.store(y_ptr + offs_b, yb.to(y_ptr.dtype.element_ty), mask=mask_b)


@triton.jit
def _row_affine(mean, rstd, w_ptr, b_ptr, c, mask_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    # per channel row: scale = rstd·w_c, shift = b_c − mean·scale
    scale = tl.zeros(c.shape, tl.float32) + rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=mask_c, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift = shift + tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    return scale, shift


# Split path, launch 1 of 2. Program (cb, p, n) covers positions [p·chunk, min(S, (p+1)·chunk)):
#   per-channel (count, mean, M2) over its tiles (Chan merge), then to groups; writes
#   part[0 | 1, n·n_cb + cb, p, j] = mean_j | M2_j for the GB groups j of the block.
@triton.jit
def _gn_stats_kernel(
    x_ptr, part_ptr,
    C, S, sn, sc, ss, n_cb, P, chunk, n_iter, CPG,
    GB: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    cb = tl.program_id(0)
    p = tl.program_id(1)
    n = tl.program_id(2)
    cl = tl.arange(0, BLOCK_C)
    c = cb * (GB * CPG) + cl
    mask_c = (cl < GB * CPG) & (c < C)
    rs = tl.arange(0, BLOCK_S)
    xb = x_ptr + n.to(tl.int64) * sn
    col = c * sc
    s0 = p * chunk  # chunk = n_iter whole tiles: only S bounds a tile (a mask Triton can vectorise)
    n_c = 0.0
    mean_c = tl.zeros([BLOCK_C], tl.float32)
    m2_c = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask_s = s < S
        x = tl.load(xb + s[:, None] * ss + col[None, :], mask=mask_s[:, None] & mask_c[None, :], other=0.0)
        ns = tl.maximum(tl.minimum(S - (s0 + i * BLOCK_S), BLOCK_S), 0) * 1.0
        t_mean, t_m2 = _tile_stats(x.to(tl.float32), mask_s, ns)
        n_c, mean_c, m2_c = _merge(n_c, mean_c, m2_c, ns, t_mean, t_m2)
    onehot = _onehot(BLOCK_C, BLOCK_G, CPG, GB, mask_c)
    mean_g, m2_g = _channels_to_groups(mean_c, m2_c, n_c, onehot, CPG)
    gj = tl.arange(0, BLOCK_G)
    half = n_cb * tl.num_programs(2) * P * BLOCK_G
    dst = part_ptr + ((n * n_cb + cb) * P + p) * BLOCK_G + gj
    tl.store(dst, mean_g)
    tl.store(dst + half, m2_g)


# Split path, launch 2 of 2. Program (cb, p, n) (visited in reverse order) merges the P partials of
# its groups, with chunk counts n_q = (min(S, (q+1)·chunk) − q·chunk)·CPG:
#   mean = Σ_q n_q·mean_q / (S·CPG);  M2 = Σ_q M2_q + n_q·(mean_q − mean)²
# then writes y = x·scale + shift (+SiLU) over its chunk.
@triton.jit
def _gn_norm_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, part_ptr,
    C, S, sn, sc, ss, n_cb, P, chunk, n_iter, eps, CPG,
    GB: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    cb = n_cb - 1 - tl.program_id(0)
    p = P - 1 - tl.program_id(1)
    n = tl.num_programs(2) - 1 - tl.program_id(2)
    cl = tl.arange(0, BLOCK_C)
    c = cb * (GB * CPG) + cl
    mask_c = (cl < GB * CPG) & (c < C)

    q = tl.arange(0, BLOCK_P)
    gj = tl.arange(0, BLOCK_G)
    mask_q = q < P
    n_q = tl.where(mask_q, tl.minimum(S, (q + 1) * chunk) - q * chunk, 0) * 1.0  # positions per chunk
    half = n_cb * tl.num_programs(2) * P * BLOCK_G
    src = part_ptr + (n * n_cb + cb) * P * BLOCK_G + q[:, None] * BLOCK_G + gj[None, :]
    mean_q = tl.load(src, mask=mask_q[:, None], other=0.0)
    m2_q = tl.load(src + half, mask=mask_q[:, None], other=0.0)
    mean_g = tl.sum(n_q[:, None] * mean_q, axis=0) / S
    d = mean_q - mean_g[None, :]
    m2_g = tl.sum(m2_q + (n_q * CPG)[:, None] * d * d, axis=0)
    onehot = _onehot(BLOCK_C, BLOCK_G, CPG, GB, mask_c)
    scale, shift = _scale_shift(mean_g, m2_g, S * CPG * 1.0, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)

    rs = tl.arange(0, BLOCK_S)
    off_n = n.to(tl.int64) * sn
    col = c * sc
    s0 = p * chunk
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask = (s < S)[:, None] & mask_c[None, :]
        offs = off_n + s[:, None] * ss + col[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, _apply(x, scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)


# channels_last, whole pixel rows: a tile is [BLOCK_S, BLOCK_G, BLOCK_K] = (position, group, channel in
# group), channel c = g·CPG + k, so a tile row is all C contiguous channels of one position and group
# reductions are sums over axes (2, 0). Launch 1 of 2, program (p, n) over positions [p·chunk, ...):
#   per tile per group: mean_t, M2_t (two-pass in registers); Chan merge over tiles;
#   part[0 | 1, n, p, g] = mean_g | M2_g.
@triton.jit
def _gn_rows_cl_stats_kernel(
    x_ptr, part_ptr,
    C, S, G, P, chunk, n_iter,
    CPG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    n = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    k = tl.arange(0, BLOCK_K)
    c = g[:, None] * CPG + k[None, :]  # [BG, BK]
    mask_c = (g < G)[:, None] & (k < CPG)[None, :]
    rs = tl.arange(0, BLOCK_S)
    xb = x_ptr + n.to(tl.int64) * S * C
    s0 = p * chunk
    n_g = 0.0
    mean_g = tl.zeros([BLOCK_G], tl.float32)
    m2_g = tl.zeros([BLOCK_G], tl.float32)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask = (s < S)[:, None, None] & mask_c[None, :, :]
        x = tl.load(xb + s[:, None, None] * C + c[None, :, :], mask=mask, other=0.0).to(tl.float32)
        nt = tl.maximum(tl.minimum(S - (s0 + i * BLOCK_S), BLOCK_S), 0) * CPG * 1.0  # values per group
        t_mean = tl.sum(tl.sum(x, axis=2), axis=0) / tl.maximum(nt, 1.0)
        d = tl.where(mask, x - t_mean[None, :, None], 0.0)
        t_m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
        n_g, mean_g, m2_g = _merge(n_g, mean_g, m2_g, nt, t_mean, t_m2)
    dst = part_ptr + (n * P + p) * BLOCK_G + g
    tl.store(dst, mean_g)
    tl.store(dst + tl.num_programs(1) * P * BLOCK_G, m2_g)


# Launch 2 of 2, program (p, n) in reverse order: merge the P partials of every group (as in
# _gn_norm_kernel), scale/shift per [group, channel] cell, then y = x·scale + shift (+SiLU) over its chunk.
@triton.jit
def _gn_rows_cl_norm_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, part_ptr,
    C, S, G, P, chunk, n_iter, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    CPG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
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
    rs = tl.arange(0, BLOCK_S)
    off_n = n.to(tl.int64) * S * C
    s0 = p * chunk
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask = (s < S)[:, None, None] & mask_c[None, :, :]
        offs = off_n + s[:, None, None] * C + c[None, :, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _silu_if(x * scale[None, :, :] + shift[None, :, :], SILU)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
