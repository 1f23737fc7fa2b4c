"""Triton kernels of speedsd.kernels.group_norm (the launcher, plans and the design notes live there):
the device helpers and the one-launch kernels; the split (stats + normalize) pairs are in
group_norm_split_kernels.py.

Every kernel sees x as [N, C, S] through strides (sn, sc, ss) or, for the NCHW / channels_last
specialisations, through its dense layout. Statistics in fp32, two-pass per register tile, tiles and
chunks merged with Chan's formula; never E[x²] − E[x]².

Pre-add (HAS_ADD): every kernel normalises v = x + a[n, c], a at a_ptr + n·a_sn + c, in fp32 — folded
into per-channel values so no element costs more than without it: a channel's mean moves by a_c and
its M2 does not (per-channel statistics); the one-pass-over-the-group kernels centre each element on
mean_v − a_c; and the output v·scale + shift = x·scale + (shift + a·scale).

Two sources (DUAL, a compile-time flag: without it every kernel compiles as before it existed): the input
is cat([x, x2], dim=1), never formed. x holds channels [0, C1) with [N, C1, S] strides (sn1, sc1, ss1), x2
the rest with (sn2, sc2, ss2); every load of the input is two complementary masked loads (_load_cat), so
a group may straddle C1. The kernels' own (sn, sc, ss) and dense offsets are then the output's.
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
def _channels_to_groups_gathered(mean_c, m2_c, n_c, C, CPG: tl.constexpr, CPG_P2: tl.constexpr, BLOCK_G: tl.constexpr):
    # _channels_to_groups without the [BLOCK_C, BLOCK_G] one-hot: group g's channels g·CPG + j (j < CPG, < C)
    # gathered to row g of a [BLOCK_G, CPG_P2] tile (CPG_P2 = CPG padded to a power of two), then per row
    #   mean_g = Σ_j mean_c / CPG,   M2_g = Σ_j M2_c + n_c·(mean_c − mean_g)²
    i = tl.arange(0, BLOCK_G * CPG_P2)
    c = (i // CPG_P2) * CPG + i % CPG_P2
    ok = tl.reshape((i % CPG_P2 < CPG) & (c < C), [BLOCK_G, CPG_P2])
    src = tl.minimum(c, mean_c.shape[0] - 1)
    mean_t = tl.reshape(tl.gather(mean_c, src, 0), [BLOCK_G, CPG_P2])
    m2_t = tl.reshape(tl.gather(m2_c, src, 0), [BLOCK_G, CPG_P2])
    mean_g = tl.sum(tl.where(ok, mean_t, 0.0), axis=1) / CPG
    d = mean_t - mean_g[:, None]
    m2_g = tl.sum(tl.where(ok, m2_t + n_c * d * d, 0.0), axis=1)
    return mean_g, m2_g


@triton.jit
def _groups_to_channels(v_g, onehot):
    return tl.sum(tl.where(onehot, v_g[None, :], 0.0), axis=1)


@triton.jit
def _scale_shift(mean_g, m2_g, count_g, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    # y = (x − mean)·rstd·w + b = x·scale + shift, scale = rstd·w, shift = b − mean·scale
    rstd_g = 1.0 / tl.sqrt(m2_g / count_g + eps)
    rstd = _groups_to_channels(rstd_g, onehot)
    mean = _groups_to_channels(mean_g, onehot)
    return _row_affine(mean, rstd, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)


@triton.jit
def _silu_if(y, SILU: tl.constexpr):
    # SiLU: y·σ(y) = y / (1 + e^(−y))
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _load_add(a_ptr, offs, mask, HAS_ADD: tl.constexpr):
    # the pre-add a[n, c] in fp32 (a constant, unused, without one)
    a = 0.0
    if HAS_ADD:
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return a


@triton.jit
def _plus(v, a, HAS_ADD: tl.constexpr):
    # v + a with a pre-add; v untouched without one
    if HAS_ADD:
        v = v + a
    return v


@triton.jit
def _load_cat(x_ptr, x2_ptr, n, s, c, mask, C1, sn1, sc1, ss1, sn2, sc2, ss2):
    # element (n, c, s) of cat([x, x2], dim=1): x's channel c for c < C1, else x2's channel c − C1; one
    # masked load per source, each masking the other's channels off (s, c broadcast to mask's shape)
    n = n.to(tl.int64)
    first = c < C1
    v1 = tl.load(x_ptr + n * sn1 + s * ss1 + c * sc1, mask=mask & first, other=0.0)
    v2 = tl.load(x2_ptr + n * sn2 + s * ss2 + (c - C1) * sc2, mask=mask & (c >= C1), other=0.0)
    return tl.where(first, v1, v2)


@triton.jit
def _load_in(ptrs, mask, x_ptr, x2_ptr, n, s, c, C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL: tl.constexpr):
    # the kernel's input: one source at ptrs, or (DUAL) element (n, c, s) of cat([x, x2], dim=1)
    if DUAL:
        v = _load_cat(x_ptr, x2_ptr, n, s, c, mask, C1, sn1, sc1, ss1, sn2, sc2, ss2)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v


@triton.jit
def _load_fused_in(ptrs, mask, x_ptr, x2_ptr, n, s, c, C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL: tl.constexpr,
                   SPLIT: tl.constexpr, MN):  # fmt: skip
    # _load_in, or (SPLIT > 1) the sum of SPLIT fp32 partials MN elements apart, added in split order
    if SPLIT > 1:
        v = tl.load(ptrs, mask=mask, other=0.0)
        for k in tl.static_range(1, SPLIT):
            v += tl.load(ptrs + k * MN, mask=mask, other=0.0)
    else:
        v = _load_in(ptrs, mask, x_ptr, x2_ptr, n, s, c, C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)
    return v


@triton.jit
def _apply(x, scale, shift, SILU: tl.constexpr):
    # y = x·scale + shift (per column), then SiLU if asked
    return _silu_if(x * scale[None, :] + shift[None, :], SILU)


@triton.jit
def _stream_apply(x_ptr, y_ptr, n, off_n, s0, n_iter, S, ss, col, c, mask_c, scale, shift,
                  x2_ptr, C1, sn1, sc1, ss1, sn2, sc2, ss2,
                  BLOCK_S: tl.constexpr, SILU: tl.constexpr, DUAL: tl.constexpr):  # fmt: skip
    # y = x·scale + shift (+SiLU) over positions s0 .. s0 + n_iter·BLOCK_S (< S) of sample n, columns col
    # (x and y strided alike: element off_n + s·ss + col; DUAL: x is cat([x, x2], dim=1))
    rs = tl.arange(0, BLOCK_S)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask = (s < S)[:, None] & mask_c[None, :]
        offs = off_n + s[:, None] * ss + col[None, :]
        x = _load_in(x_ptr + offs, mask, x_ptr, x2_ptr, n, s[:, None], c[None, :],
                     C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)  # fmt: skip
        tl.store(y_ptr + offs, _apply(x.to(tl.float32), scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)


# ---- kernels -------------------------------------------------------------------------------------


# One program per (group block cb, sample n). ONE_TILE: the block [S, GB·CPG] is one register tile:
#   load once; per-channel mean/M2 (two-pass in registers); merge to groups; y = x·scale + shift (+SiLU).
# Otherwise sweep 1 accumulates per-channel (count, mean, M2) tile by tile (Chan merge), sweep 2 writes.
# Pre-add: mean_c += a_c before the merge to groups; shift += a·scale.
# SPLIT > 1: x is a K-split conv's fp32 partials, SPLIT slices MN elements apart (each [N, C, S] with x's
# strides); the input is their sum in split order, never written (group_norm_partials).
@triton.jit
def _gn_fused_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, a_ptr,
    C, S, sn, sc, ss, n_iter, eps, CPG, a_sn,
    GB: tl.constexpr, ONE_TILE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
    x2_ptr=None, C1=0, sn1=0, sc1=0, ss1=0, sn2=0, sc2=0, ss2=0, DUAL: tl.constexpr = False,
    MN=0, SPLIT: tl.constexpr = 1,
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
        x = _load_fused_in(xb + offs, mask, x_ptr, x2_ptr, n, rs[:, None], c[None, :], C1, sn1, sc1, ss1, sn2, sc2, ss2,
                           DUAL, SPLIT, MN)  # fmt: skip
        x = x.to(tl.float32)
        mean_c, m2_c = _tile_stats(x, mask_s, S * 1.0)
        a = _load_add(a_ptr, n * a_sn + c, mask_c, HAS_ADD)  # [BC]
        mean_g, m2_g = _channels_to_groups(_plus(mean_c, a, HAS_ADD), m2_c, S * 1.0, onehot, CPG)
        scale, shift = _scale_shift(mean_g, m2_g, count_g, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)
        shift = _plus(shift, a * scale, HAS_ADD)
        tl.store(yb + offs, _apply(x, scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        n_c = 0.0
        mean_c = tl.zeros([BLOCK_C], tl.float32)
        m2_c = tl.zeros([BLOCK_C], tl.float32)
        for i in range(0, n_iter):
            s = i * BLOCK_S + rs
            mask_s = s < S
            mask = mask_s[:, None] & mask_c[None, :]
            x = _load_fused_in(xb + s[:, None] * ss + col[None, :], mask, x_ptr, x2_ptr, n, s[:, None], c[None, :],
                               C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL, SPLIT, MN)  # fmt: skip
            ns = tl.minimum(S - i * BLOCK_S, BLOCK_S) * 1.0
            t_mean, t_m2 = _tile_stats(x.to(tl.float32), mask_s, ns)
            n_c, mean_c, m2_c = _merge(n_c, mean_c, m2_c, ns, t_mean, t_m2)
        a = _load_add(a_ptr, n * a_sn + c, mask_c, HAS_ADD)
        mean_g, m2_g = _channels_to_groups(_plus(mean_c, a, HAS_ADD), m2_c, n_c, onehot, CPG)
        scale, shift = _scale_shift(mean_g, m2_g, count_g, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)
        shift = _plus(shift, a * scale, HAS_ADD)
        for i in range(0, n_iter):
            s = i * BLOCK_S + rs
            mask = (s < S)[:, None] & mask_c[None, :]
            offs = s[:, None] * ss + col[None, :]
            x = _load_fused_in(
                xb + offs, mask, x_ptr, x2_ptr, n, s[:, None], c[None, :], C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL,
                SPLIT, MN,
            )  # fmt: skip
            x = x.to(tl.float32)
            tl.store(yb + offs, _apply(x, scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)


# NCHW one-tile, one program per (group g, sample n). The group is CPG contiguous channel rows of S
# values; they are held as two power-of-two row blocks, A = rows [0, RA) and B = rows [RA, RA + RB)
# (masked to < CPG), so CPG = 10 costs 8 + 2 rows instead of 16. Two-pass in registers:
#   mean = Σx / (CPG·S);  M2 = Σ (x − mean)²;  y = x·scale_c + shift_c  (+SiLU)
# Pre-add: mean += Σ_c a_c / CPG; row c is centred on mean − a_c; shift_c = b_c − (mean − a_c)·scale_c.
@triton.jit
def _gn_rows_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, a_ptr,
    C, S, CPG, eps, a_sn,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
    RA: tl.constexpr, RB: tl.constexpr, BLOCK_S: tl.constexpr,
    x2_ptr=None, C1=0, sn1=0, sc1=0, ss1=0, sn2=0, sc2=0, ss2=0, DUAL: tl.constexpr = False,
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
    xa = _load_in(x_ptr + offs_a, mask_a, x_ptr, x2_ptr, n, s[None, :], (c0 + ra)[:, None],
                  C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL).to(tl.float32)  # fmt: skip
    xb = _load_in(x_ptr + offs_b, mask_b, x_ptr, x2_ptr, n, s[None, :], (c0 + rb)[:, None],
                  C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL).to(tl.float32)  # fmt: skip
    count = CPG * S * 1.0
    mean = (tl.sum(tl.sum(xa, axis=1), axis=0) + tl.sum(tl.sum(xb, axis=1), axis=0)) / count
    if HAS_ADD:  # the rows' centres mean − a_c: [R]
        a_a = tl.load(a_ptr + n * a_sn + c0 + ra, mask=ra < CPG, other=0.0).to(tl.float32)
        a_b = tl.load(a_ptr + n * a_sn + c0 + rb, mask=rb < CPG, other=0.0).to(tl.float32)
        mean = mean + (tl.sum(a_a, axis=0) + tl.sum(a_b, axis=0)) / CPG
        mean_a = mean - a_a
        mean_b = mean - a_b
        da = tl.where(mask_a, xa - mean_a[:, None], 0.0)
        db = tl.where(mask_b, xb - mean_b[:, None], 0.0)
    else:
        mean_a = mean
        mean_b = mean
        da = tl.where(mask_a, xa - mean, 0.0)
        db = tl.where(mask_b, xb - mean, 0.0)
    m2 = tl.sum(tl.sum(da * da, axis=1), axis=0) + tl.sum(tl.sum(db * db, axis=1), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    scale_a, shift_a = _row_affine(mean_a, rstd, w_ptr, b_ptr, c0 + ra, ra < CPG, HAS_W, HAS_B)
    scale_b, shift_b = _row_affine(mean_b, rstd, w_ptr, b_ptr, c0 + rb, rb < CPG, HAS_W, HAS_B)
    ya = _silu_if(xa * scale_a[:, None] + shift_a[:, None], SILU)
    yb = _silu_if(xb * scale_b[:, None] + shift_b[:, None], SILU)
    tl.store(y_ptr + offs_a, ya.to(y_ptr.dtype.element_ty), mask=mask_a)
    tl.store(y_ptr + offs_b, yb.to(y_ptr.dtype.element_ty), mask=mask_b)


@triton.jit
def _row_affine(mean, rstd, w_ptr, b_ptr, c, mask_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    # per channel row: scale = rstd·w_c, shift = b_c − mean·scale (mean: one value or one per row)
    scale = tl.zeros(c.shape, tl.float32) + rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=mask_c, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift = shift + tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    return scale, shift
