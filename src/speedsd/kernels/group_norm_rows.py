"""The ``rows`` path of :func:`speedsd.kernels.group_norm.group_norm`: channels_last GroupNorm as two
streaming launches over whole pixel rows; each reader of the first's chunk partials merges them.

x is seen as rows [N, S, C] (channels_last, C = G·CPG contiguous). Launch 1 (statistics), program
(p, n) over the rows of chunk p of sample n, tiles [BLOCK_S, BLOCK_C] of whole rows (BLOCK_C = C padded
to a power of two: 16-byte loads, no per-group masks):

    per channel, shifted sums  S1_c = Σ (x − K_c),  S2_c = Σ (x − K_c)²   (K_c = x[chunk's first row, c])
    accumulated in the tile's own layout and reduced over rows once, then
    mean_c = K_c + S1_c / m,   M2_c = S2_c − S1_c² / m            (m rows; pre-add: mean_c += a[n, c])
    channels -> groups with Chan's formula (each group's channels gathered to a row of a [G, CPG padded]
    tile; a one-hot over the padded row for CPG > 32): part[n, p] = (mean_g, M2_g, m)

with no merge and no arrival count in this launch: each program of a reader merges
the P partials itself (Chan over chunks: mean = Σ m_q·mean_q / S, M2 = Σ M2_q + m_q·CPG·(mean_q − mean)²,
var = M2 / (S·CPG), S = Σ m_q), as its first loads. A last-arriving program doing that merge (an
atomic count, a fence) cost ~2.3 µs a launch on the H100 (bench/results/gn_stats_probe_h100.json); the
partials are P·G·3 fp32 (24 KB at 64 chunks, 32 groups), read from L2. eps is the reader's: statistics
handed over by a producer serve any GroupNorm. Launch 2 (apply), program (p, n): the merge, rstd =
1 / sqrt(var + eps), scale_c = rstd_g(c)·w_c, shift_c = b_c − mean_g(c)·scale_c (+ a[n, c]·scale_c), then
y = x·scale + shift (+SiLU) over its chunk's rows: a copy's traffic. Both launches load each tile one
ahead of its math (the apply's first before the merge), so a program waits on memory about once: on the
H200, GroupNorm+SiLU at 2x320x64² 11.8 -> 10.9 µs a call (bench/results/gn_rows_pair_h200.txt).

The statistics launch takes the split kernels' producer mode (PRODUCE: y = round(x + b[c] + r) is
stored and its statistics taken; kernels/add_gn_stats.py) and both take two sources (DUAL, as in
group_norm_kernels.py). The shifted sums are exact enough in fp32: |x − K| is of the data's spread,
so S2 − S1²/m cancels nothing large (the merge over channels and chunks is Chan's, as elsewhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from speedsd.kernels.gn_tile_stats import _dense
from speedsd.kernels.group_norm_kernels import (
    _apply,
    _channels_to_groups,
    _channels_to_groups_gathered,
    _load_add,
    _load_in,
    _onehot,
    _plus,
    _row_affine,
)
from speedsd.kernels.group_norm_split_kernels import _add_store


@triton.jit
def _rows_tile(x_ptr, x2_ptr, n, off_n, s, end, C, c, mask_c, C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL: tl.constexpr):
    # rows s (< end) of sample n, all C channels: (mask, offsets, the tile; DUAL: of cat([x, x2], dim=1))
    mask = (s < end)[:, None] & mask_c[None, :]
    offs = off_n + s[:, None] * C + c[None, :]
    x = _load_in(x_ptr + offs, mask, x_ptr, x2_ptr, n, s[:, None], c[None, :], C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)
    return mask, offs, x


@triton.jit
def _gn_rows_stats_kernel(
    x_ptr, a_ptr, part_ptr, b_ptr, r_ptr, y_ptr,
    C, S, P, chunk, n_iter, a_sn,
    CPG: tl.constexpr, HAS_ADD: tl.constexpr, PRODUCE: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, CPG_P2: tl.constexpr,
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
    if PRODUCE:  # (y's store and the residual's loads: a second tile in flight would spill)
        for i in range(0, n_iter):
            s = s0 + i * BLOCK_S + rs
            mask, offs, x = _rows_tile(x_ptr, x2_ptr, n, off_n, s, S, C, c, mask_c, C1, sn1, sc1, ss1, sn2, sc2, ss2,
                                       DUAL)  # fmt: skip
            x = _add_store(x, bias, r_ptr + offs, y_ptr + offs, mask, HAS_B, HAS_R)
            d = tl.where(mask, x.to(tl.float32) - k, 0.0)
            s1 += d
            s2 += d * d
    else:  # each tile's load issues before the previous tile's sums (a two-deep software pipeline by hand)
        end = tl.minimum(S, s0 + n_iter * BLOCK_S)
        s = s0 + rs
        mask, _, x = _rows_tile(x_ptr, x2_ptr, n, off_n, s, end, C, c, mask_c, C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)
        for _ in range(0, n_iter):
            s_next = s + BLOCK_S
            mask_next, _, x_next = _rows_tile(x_ptr, x2_ptr, n, off_n, s_next, end, C, c, mask_c,
                                              C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)  # fmt: skip
            d = tl.where(mask, x.to(tl.float32) - k, 0.0)
            s1 += d
            s2 += d * d
            s, mask, x = s_next, mask_next, x_next
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
    dst = part_ptr + ((n * P + p) * 3) * BLOCK_G + g
    tl.store(dst, mean_g)
    tl.store(dst + BLOCK_G, m2_g)
    tl.store(dst + 2 * BLOCK_G, tl.full([BLOCK_G], 0.0, tl.float32) + m)


@triton.jit
def _group_affine(part_ptr, P, w_ptr, b_ptr, n, c, mask_c, eps, CPG: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_P: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):  # fmt: skip
    # sample n's P chunk partials (mean_q, M2_q, m_q) merged (Chan) -> channel c's group (mean, var) ->
    # y = x·scale + shift, rstd = 1 / sqrt(var + eps)
    q = tl.arange(0, BLOCK_P)
    mask_q = q < P
    g = tl.arange(0, BLOCK_G)
    row = part_ptr + ((n * P + q) * 3) * BLOCK_G  # [BP]
    mean_q = tl.load(row[:, None] + g[None, :], mask=mask_q[:, None], other=0.0)  # [BP, BG]
    m2_q = tl.load(row[:, None] + BLOCK_G + g[None, :], mask=mask_q[:, None], other=0.0)
    m_q = tl.load(row + 2 * BLOCK_G, mask=mask_q, other=0.0)  # rows of chunk q
    s = tl.sum(m_q, axis=0)
    mean_g = tl.sum(m_q[:, None] * mean_q, axis=0) / s
    dev = mean_q - mean_g[None, :]
    var_g = tl.sum(m2_q + (m_q * CPG)[:, None] * dev * dev, axis=0) / (s * CPG)
    grp = tl.minimum(c // CPG, BLOCK_G - 1)
    mean = tl.gather(mean_g, grp, 0)
    rstd = 1.0 / tl.sqrt(tl.gather(var_g, grp, 0) + eps)
    return _row_affine(mean, rstd, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)


@triton.jit
def _gn_rows_apply_kernel(
    x_ptr, y_ptr, part_ptr, w_ptr, b_ptr, a_ptr,
    C, S, P, chunk, n_iter, eps, a_sn,
    CPG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    x2_ptr=None, C1=0, sn1=0, sc1=0, ss1=0, sn2=0, sc2=0, ss2=0, DUAL: tl.constexpr = False,
):  # fmt: skip
    p = tl.program_id(0)
    n = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    off_n = n.to(tl.int64) * S * C
    # the first tile's load issues before the partials' merge waits on L2, then each tile's load before
    # the previous tile's math and store (a two-deep software pipeline by hand)
    end = tl.minimum(S, p * chunk + n_iter * BLOCK_S)
    s = p * chunk + tl.arange(0, BLOCK_S)
    mask, offs, x = _rows_tile(x_ptr, x2_ptr, n, off_n, s, end, C, c, mask_c, C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)
    scale, shift = _group_affine(part_ptr, P, w_ptr, b_ptr, n, c, mask_c, eps, CPG, BLOCK_G, BLOCK_P, HAS_W, HAS_B)
    shift = _plus(shift, _load_add(a_ptr, n * a_sn + c, mask_c, HAS_ADD) * scale, HAS_ADD)
    for _ in range(0, n_iter):
        s = s + BLOCK_S
        mask_next, offs_next, x_next = _rows_tile(x_ptr, x2_ptr, n, off_n, s, end, C, c, mask_c,
                                                  C1, sn1, sc1, ss1, sn2, sc2, ss2, DUAL)  # fmt: skip
        tl.store(y_ptr + offs, _apply(x.to(tl.float32), scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)
        mask, offs, x = mask_next, offs_next, x_next


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
    the concatenation's): the chunk partials part [N, P, 3, BLOCK_G] fp32 = (mean_g, M2_g, rows) that
    :func:`rows_apply` / :func:`rows_scale_shift` merge. ``add``: (rows [.., C], sample
    stride). ``produce``: (bias, residual, y) — y = x + bias + residual is stored first (x's layout) and
    the statistics are y's. ``chunks`` row chunks a sample, ``block_s`` rows a tile."""
    n, s = x.shape[0], x[0, 0].numel()
    c = x.shape[1] + (dual["x2_ptr"].shape[1] if dual else 0)  # type: ignore[union-attr]
    cpg = c // num_groups
    block_g = max(2, triton.next_power_of_2(num_groups))
    chunk = triton.cdiv(triton.cdiv(s, chunks), block_s) * block_s
    p = triton.cdiv(s, chunk)
    part = torch.empty((n, p, 3, block_g), device=x.device, dtype=torch.float32)
    a, a_sn = add if add is not None else (x, 0)
    b, r, y = produce if produce is not None else (None, None, x)
    _gn_rows_stats_kernel[(p, n)](
        x, a, part, b if b is not None else x, r if r is not None else x, y,
        c, s, p, chunk, chunk // block_s, a_sn, CPG=cpg, HAS_ADD=add is not None, PRODUCE=produce is not None,
        HAS_B=b is not None, HAS_R=r is not None, BLOCK_S=block_s, BLOCK_C=triton.next_power_of_2(c), BLOCK_G=block_g,
        CPG_P2=triton.next_power_of_2(cpg), **(dual or {}), num_warps=warps,
    )  # fmt: skip
    return part


def rows_apply(
    x: torch.Tensor,
    out: torch.Tensor,
    part: torch.Tensor,
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
    """Launch 2: out = x·scale + shift (+SiLU) from :func:`rows_stats`' partials (out: dense channels_last)."""
    n, s, c = out.shape[0], out[0, 0].numel(), out.shape[1]
    chunk = triton.cdiv(triton.cdiv(s, chunks), block_s) * block_s
    a, a_sn = add if add is not None else (x, 0)
    _gn_rows_apply_kernel[(triton.cdiv(s, chunk), n)](
        x, out, part, _dense(weight, x), _dense(bias, x), a, c, s, part.shape[1], chunk,
        chunk // block_s, eps, a_sn, CPG=c // num_groups, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_ADD=add is not None, SILU=bool(silu), BLOCK_S=block_s, BLOCK_C=triton.next_power_of_2(c),
        BLOCK_G=part.shape[-1], BLOCK_P=triton.next_power_of_2(part.shape[1]), **(dual or {}), num_warps=warps,
    )  # fmt: skip
    return out


# GroupNorm as a per-(sample, channel) affine for a consumer's prologue (kernels/group_norm_affine.py), from
# the rows statistics: program n writes scale[n, c] = w_c / sqrt(var_g(c) + eps), shift[n, c] = b_c − mean_g(c)·scale.
@triton.jit
def _gn_rows_scale_shift_kernel(
    part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, P, eps,
    CPG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    scale, shift = _group_affine(part_ptr, P, w_ptr, b_ptr, n, c, mask_c, eps, CPG, BLOCK_G, BLOCK_P, HAS_W, HAS_B)
    tl.store(scale_ptr + n * C + c, scale, mask=mask_c)
    tl.store(shift_ptr + n * C + c, shift, mask=mask_c)


def rows_scale_shift(
    part: torch.Tensor, num_groups: int, c: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [N, C] fp32 with GroupNorm(x) = x·scale + shift, from :func:`rows_stats`' partials."""
    n = part.shape[0]
    scale = torch.empty((n, c), device=part.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    _gn_rows_scale_shift_kernel[(n,)](
        part, _dense(weight, part), _dense(bias, part), scale, shift, c, part.shape[1], eps,
        CPG=c // num_groups, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=triton.next_power_of_2(c),
        BLOCK_G=part.shape[-1], BLOCK_P=triton.next_power_of_2(part.shape[1]), num_warps=4,
    )  # fmt: skip
    return scale, shift
