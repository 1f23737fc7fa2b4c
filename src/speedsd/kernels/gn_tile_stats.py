"""GroupNorm from a producer's partial statistics: the Gluon conv's epilogue and the sub-pixel interleave hand
them over.

A kernel whose output feeds a GroupNorm holds every output value in registers once. The Gluon conv's
epilogue (kernels/conv_gluon_kernels.py, ``STATS``) writes, per output tile of th x tw pixels, per warp's rows
and per group j of CPG channels, the (mean, M2, count) of the stored fp16 values; the sub-pixel interleave
(kernels/subpixel_conv.py) per program:

    part[0 | 1 | 2, n, j, p] = mean | M2 | count of part p of group j in sample n
    (conv: p = (ty·n_tw + tx)·warps + w, the rows of warp w in tile (ty, tx) inside the image)

Here one small launch merges them per (sample, group) (Chan: mean = Σ c_p·mean_p / Σ c_p,
M2 = Σ M2_p + c_p·(mean_p − mean)²) into GroupNorm's per-channel affine,

    scale[n, c] = γ_c · rstd[n, g(c)],   shift[n, c] = β_c − mean[n, g(c)] · scale[n, c],

and a second applies y = act(x·scale + shift) in one read and one write: GroupNorm's statistics pass
over x is gone. The statistics ride on the conv's output as :class:`TileStats` (the same hand-over
attribute as kernels/add_gn_stats.py, with its staleness contract); :func:`group_norm` and
:func:`group_norm_scale_shift` take them when the group count matches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from speedsd.kernels.bias_add import GN_STATS_ATTR, drop_gn_stats

__all__ = ["TileStats", "affine_act", "affine_act_ref", "chan_stats_ref", "tile_stats_ref"]


@dataclass(frozen=True)
class TileStats:
    """Partials ``part`` fp32 [3, N, G, P]: (mean, M2, count) of P disjoint parts of each group of a tensor (any
    partition; a part may be empty), valid for ``groups`` while the tensor is at ``version`` (None: an
    inference tensor). ``per_channel``: part is [3, N, P, C] instead, P parts of each channel (a group's are its
    P·C/G channel parts; the Gluon conv's tiles of bn + bn1 channels, whose groups straddle its slabs)."""

    groups: int
    version: int | None
    part: torch.Tensor
    per_channel: bool = False

    def _release(self, x: torch.Tensor) -> None:
        if getattr(x, GN_STATS_ATTR, None) is self:  # consumed: one GroupNorm uses them at most once
            drop_gn_stats(x)

    def take(self, x: torch.Tensor, groups: int, plan: object) -> None:
        """No split-path partials here (the GNStats protocol of kernels/add_gn_stats.py): drop them, None."""
        self._release(x)

    def scale_shift(
        self, x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """GroupNorm(groups)'s fp32 [N, C] (scale, shift) for x from these partials, or None when they are not
        x's (other group count, x changed since). Consumed: one GroupNorm uses them at most once."""
        self._release(x)
        n, c = x.shape[:2]
        part, cpg = self.part, c // groups
        if self.groups != groups or self.version != _version(x) or part.dim() != 4 or not part.is_contiguous():
            return None
        if self.per_channel:  # [3, N, P, C]: group g's partials are (p, k) -> part[:, n, p, g·CPG + k]
            if part.shape[:2] != (3, n) or part.shape[3] != c:
                return None
            p, k, s_p, s_k = part.shape[2], cpg, c, 1
        else:  # [3, N, G, P]: (p, 0) -> part[:, n, g, p]
            if part.shape[:3] != (3, n, groups):
                return None
            p, k, s_p, s_k = part.shape[3], 1, 1, part.shape[3]
        scale = torch.empty((n, c), device=x.device, dtype=torch.float32)
        shift = torch.empty_like(scale)
        block_k = triton.next_power_of_2(k)
        block_p = min(8192 // block_k, triton.next_power_of_2(p))  # the VAE's up to 8192 parts in one sweep
        _gn_tile_merge_kernel[(groups, n)](
            part, _dense(weight, scale), _dense(bias, scale), scale, shift, c, p, k, part[0, 0].numel(), s_p, s_k,
            part[0].numel(), eps, CPG=cpg, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_P=block_p,
            BLOCK_K=block_k, BLOCK_C=triton.next_power_of_2(cpg), num_warps=8 if block_p * block_k >= 4096 else 4,
        )  # fmt: skip
        return scale, shift


def attach(y: torch.Tensor, part: torch.Tensor, groups: int, per_channel: bool = False) -> torch.Tensor:
    """Hand ``part`` (the producer's partials of y, [3, N, groups, P]; ``per_channel``: [3, N, P, C]) over to the
    GroupNorm that reads y next."""
    setattr(y, GN_STATS_ATTR, TileStats(groups, _version(y), part, per_channel))
    return y


def _dense(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t is not None else placeholder  # the placeholder is never read


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def tile_stats_ref(y: torch.Tensor, groups: int, th: int, tw: int, per_tile: int = 1) -> torch.Tensor:
    """What the Gluon conv writes: fp32 [3, N, G, n_th·n_tw·per_tile], the (mean, M2, count) in fp64 of each group
    over row set w < per_tile of each th x tw tile t (at t·per_tile + w): the tile's pixels m = i·tw + j with
    (m // 16) % per_tile == w (its warps), those inside the image."""
    n, c, h, w = y.shape
    n_th, n_tw = triton.cdiv(h, th), triton.cdiv(w, tw)
    yp = torch.zeros((n, c, n_th * th, n_tw * tw), dtype=torch.float64)
    yp[:, :, :h, :w] = y.double().cpu()
    ok = torch.zeros((n_th * th, n_tw * tw), dtype=torch.float64)
    ok[:h, :w] = 1.0
    # [N, C, n_th·th, n_tw·tw] -> [N, G, CPG, n_th, th, n_tw, tw] -> [N, G, n_th, n_tw, th·tw, CPG]
    tiles = yp.reshape(n, groups, c // groups, n_th, th, n_tw, tw).permute(0, 1, 3, 5, 4, 6, 2)
    tiles = tiles.reshape(n, groups, n_th * n_tw, th * tw, c // groups)
    okt = ok.reshape(n_th, th, n_tw, tw).permute(0, 2, 1, 3).reshape(n_th * n_tw, th * tw, 1)
    row_set = (torch.arange(th * tw) // 16) % per_tile
    part = torch.zeros((3, n, groups, n_th * n_tw, per_tile), dtype=torch.float64)
    for r in range(per_tile):
        v, m = tiles[:, :, :, row_set == r], okt[:, row_set == r].expand(-1, -1, c // groups)
        cnt = m.sum((1, 2))  # [T]
        mean = (v * m).sum((3, 4)) / cnt.clamp_min(1)
        part[0, ..., r], part[2, ..., r] = mean, cnt
        part[1, ..., r] = (((v - mean[..., None, None]) * m) ** 2).sum((3, 4))
    return part.reshape(3, n, groups, -1).float().to(y.device)


def chan_stats_ref(y: torch.Tensor, th: int, tw: int, per_tile: int = 1) -> torch.Tensor:
    """What the Gluon conv writes per channel (a tile of bn + bn1 channels): fp32 [3, N, n_th·n_tw·per_tile, C],
    :func:`tile_stats_ref` with one channel a group, the part axis before the channel axis."""
    return tile_stats_ref(y, y.shape[1], th, tw, per_tile).permute(0, 1, 3, 2).contiguous()


# Merge, program (g, n): the P·K partials (mean_i, M2_i, count_i) of group g in sample n, i = (p, k) at
# part[·, n] + p·s_p + (g·K + k)·s_k (K = 1: a partial per group and part; K = CPG: per channel and part), in
# [BLOCK_P, BLOCK_K] chunks, two passes (the mean first, then M2 around it):
#   mean = Σ_i c_i·mean_i / Σ_i c_i,   M2 = Σ_i M2_i + c_i·(mean_i − mean)²,   rstd = 1 / sqrt(M2 / Σ_i c_i + eps)
# then scale[n, c] = γ_c·rstd and shift[n, c] = β_c − mean·scale[n, c] for the group's CPG channels.
@triton.jit
def _gn_tile_merge_kernel(
    part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, P, K, s_n, s_p, s_k, third, eps,
    CPG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    n = tl.program_id(1)
    row = part_ptr + n * s_n + g * K * s_k
    k = tl.arange(0, BLOCK_K)[None, :]
    s1 = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
    s0 = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        mask = (p < P) & (k < K)
        offs = p * s_p + k * s_k
        cnt = tl.load(row + 2 * third + offs, mask=mask, other=0.0)
        s1 += cnt * tl.load(row + offs, mask=mask, other=0.0)
        s0 += cnt
    total = tl.sum(tl.sum(s0, axis=1), axis=0)
    mean = tl.sum(tl.sum(s1, axis=1), axis=0) / total
    acc = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        mask = (p < P) & (k < K)
        offs = p * s_p + k * s_k
        cnt = tl.load(row + 2 * third + offs, mask=mask, other=0.0)
        d = tl.load(row + offs, mask=mask, other=0.0) - mean
        acc += tl.load(row + third + offs, mask=mask, other=0.0) + cnt * d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / total + eps)
    kc = tl.arange(0, BLOCK_C)
    c = g * CPG + kc
    mask_c = kc < CPG
    scale = tl.zeros([BLOCK_C], tl.float32) + rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=mask_c, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(scale_ptr + n * C + c, scale, mask=mask_c)
    tl.store(shift_ptr + n * C + c, shift, mask=mask_c)


def affine_act_ref(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
    """act(x·scale[n, c] + shift[n, c]) in fp32 (fp64 stays fp64), cast back to x's dtype; x [N, C, *spatial]."""
    acc = torch.promote_types(x.dtype, torch.float32)
    view = (*scale.shape, *([1] * (x.dim() - 2)))  # [N, C] -> [N, C, 1, ...]
    y = x.to(acc) * scale.to(acc).view(view) + shift.to(acc).view(view)
    return (torch.nn.functional.silu(y) if silu else y).to(x.dtype)


# Apply, program (p, n): positions [p·BLOCK_S, ...) of sample n, all C channels of a channels_last row:
#   y[n, s, c] = act(x[n, s, c]·scale[n, c] + shift[n, c]),   act = SiLU or identity, in fp32
@triton.jit
def _gn_affine_act_kernel(
    x_ptr, y_ptr, scale_ptr, shift_ptr, C, S,
    SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    n = tl.program_id(1)
    s = p * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    scale = tl.load(scale_ptr + n * C + c, mask=mask_c, other=0.0)[None, :]
    shift = tl.load(shift_ptr + n * C + c, mask=mask_c, other=0.0)[None, :]
    mask = (s < S)[:, None] & mask_c[None, :]
    offs = n.to(tl.int64) * S * C + s[:, None] * C + c[None, :]
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale + shift
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def affine_act(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """act(x·scale[n, c] + shift[n, c]) for a channels_last x [N, C, H, W] (fp16/bf16/fp32); scale, shift fp32
    [N, C]. ``out``: a tensor like x, x itself included (each element is read before it is written)."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"affine_act expects a channels_last x [N, C, H, W], got {tuple(x.shape)} {x.stride()}")
    n, c, h, w = x.shape
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (n, c) or t.dtype != torch.float32 or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be a contiguous fp32 [{n}, {c}] tensor on {x.device}")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride() != x.stride() or out.device != x.device:
        raise ValueError("out must match x in shape, dtype, device and strides")
    else:
        drop_gn_stats(out)
    s = h * w
    if x.numel() == 0:
        return out
    if c * s >= 2**31:
        raise ValueError(f"one sample has {c * s} elements; the kernel indexes a sample with int32")
    block_c = triton.next_power_of_2(c)
    block_s = max(1, min(triton.next_power_of_2(s), 8192 // block_c))  # ~8K values a program
    _gn_affine_act_kernel[(triton.cdiv(s, block_s), n)](
        x, out, scale, shift, c, s, SILU=bool(silu), BLOCK_S=block_s, BLOCK_C=block_c,
        num_warps=8 if block_s * block_c >= 8192 else 4,
    )  # fmt: skip
    return out
