"""GroupNorm from a producer's per-tile statistics: the Gluon conv's epilogue hands them over.

A conv whose output feeds a GroupNorm holds every output value in registers once. Its epilogue
(kernels/conv_gluon_kernels.py, ``STATS``) writes, per output tile of th x tw pixels and per group j of
CPG channels, the tile's (mean_j, M2_j) of the stored fp16 values:

    part[0 | 1, n, j, t] = mean | M2,   t = ty·n_tw + tx,   tile t = rows [ty·th, ..) x cols [tx·tw, ..)
                                                             clipped to the image (its count: pixels · CPG)

Here one small launch merges them per (sample, group) (Chan: mean = Σ c_t·mean_t / Σ c_t,
M2 = Σ M2_t + c_t·(mean_t − mean)²) into GroupNorm's per-channel affine,

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

__all__ = ["TileStats", "affine_act", "affine_act_ref", "tile_stats_ref"]


@dataclass(frozen=True)
class TileStats:
    """Per-tile partials ``part`` fp32 [2, N, G, n_th·n_tw] of a [N, C, h, w] tensor in th x tw tiles, valid
    for ``groups`` while the tensor is at ``version`` (None: an inference tensor)."""

    groups: int
    th: int
    tw: int
    version: int | None
    part: torch.Tensor

    def take(self, x: torch.Tensor, groups: int, plan: object) -> None:
        """No split-path partials here (the GNStats protocol of kernels/add_gn_stats.py): drop them, None."""
        if getattr(x, GN_STATS_ATTR, None) is self:
            drop_gn_stats(x)

    def scale_shift(
        self, x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """GroupNorm(groups)'s fp32 [N, C] (scale, shift) for x from these partials, or None when they are not
        x's (other group count, x changed since). Consumed: one GroupNorm uses them at most once."""
        if getattr(x, GN_STATS_ATTR, None) is self:
            drop_gn_stats(x)
        n, c, h, w = x.shape
        t = triton.cdiv(h, self.th) * triton.cdiv(w, self.tw)
        if self.groups != groups or self.version != _version(x) or self.part.shape != (2, n, groups, t):
            return None
        scale = torch.empty((n, c), device=x.device, dtype=torch.float32)
        shift = torch.empty_like(scale)
        _tile_merge_kernel[(groups, n)](
            self.part, _dense(weight, scale), _dense(bias, scale), scale, shift,
            n, c, h, w, t, triton.cdiv(w, self.tw), eps, TH=self.th, TW=self.tw, CPG=c // groups,
            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_T=min(1024, triton.next_power_of_2(t)),
            BLOCK_C=triton.next_power_of_2(c // groups), num_warps=4,
        )  # fmt: skip
        return scale, shift


def attach(y: torch.Tensor, part: torch.Tensor, groups: int, th: int, tw: int) -> torch.Tensor:
    """Hand ``part`` (the producer's tile partials of y) over to the GroupNorm that reads y next."""
    setattr(y, GN_STATS_ATTR, TileStats(groups, th, tw, _version(y), part))
    return y


def _dense(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t is not None else placeholder  # the placeholder is never read


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def tile_stats_ref(y: torch.Tensor, groups: int, th: int, tw: int) -> torch.Tensor:
    """What the producer writes: fp32 [2, N, G, n_th·n_tw] per-tile (mean, M2) of y [N, C, H, W] (in fp64)."""
    n, c, h, w = y.shape
    n_th, n_tw = triton.cdiv(h, th), triton.cdiv(w, tw)
    part = torch.empty((2, n, groups, n_th * n_tw), dtype=torch.float64)
    yg = y.double().cpu().reshape(n, groups, c // groups, h, w)  # [N, C, H, W] -> [N, G, CPG, H, W]
    for ty in range(n_th):
        for tx in range(n_tw):
            tile = yg[..., ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw].reshape(n, groups, -1)
            mean = tile.mean(-1)
            part[0, :, :, ty * n_tw + tx] = mean
            part[1, :, :, ty * n_tw + tx] = ((tile - mean[..., None]) ** 2).sum(-1)
    return part.float().to(y.device)


# Merge, program (g, n): the tiles' partials of group g in sample n, in BLOCK_T chunks, two passes
# (the mean first, then M2 around it), each tile weighted by its count c_t = rows_t · cols_t · CPG:
#   mean = Σ_t c_t·mean_t / (H·W·CPG),   M2 = Σ_t M2_t + c_t·(mean_t − mean)²,   rstd = 1 / sqrt(M2 / (H·W·CPG) + eps)
# then scale[n, c] = γ_c·rstd and shift[n, c] = β_c − mean·scale[n, c] for the group's CPG channels.
@triton.jit
def _tile_merge_kernel(
    part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, N, C, H, W, T, n_tw, eps,
    TH: tl.constexpr, TW: tl.constexpr, CPG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    n = tl.program_id(1)
    G = tl.num_programs(0)
    row = part_ptr + (n * G + g) * T
    half = N * G * T
    total = (H * W * CPG) * 1.0
    acc = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        cnt = _tile_count(t, T, n_tw, H, W, TH, TW, CPG)
        acc += cnt * tl.load(row + t, mask=t < T, other=0.0)
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        cnt = _tile_count(t, T, n_tw, H, W, TH, TW, CPG)
        d = tl.load(row + t, mask=t < T, other=0.0) - mean
        acc += tl.load(row + half + t, mask=t < T, other=0.0) + cnt * d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / total + eps)
    k = tl.arange(0, BLOCK_C)
    c = g * CPG + k
    mask = k < CPG
    scale = tl.zeros([BLOCK_C], tl.float32) + rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(scale_ptr + n * C + c, scale, mask=mask)
    tl.store(shift_ptr + n * C + c, shift, mask=mask)


@triton.jit
def _tile_count(t, T, n_tw, H, W, TH: tl.constexpr, TW: tl.constexpr, CPG: tl.constexpr):
    # values of one group in tile t (0 past the last tile): its pixels clipped to the image, times CPG
    rows = tl.minimum(H - (t // n_tw) * TH, TH)
    cols = tl.minimum(W - (t % n_tw) * TW, TW)
    return tl.where(t < T, rows * cols * CPG, 0) * 1.0


def affine_act_ref(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
    """act(x·scale[n, c] + shift[n, c]) in fp32 (fp64 stays fp64), cast back to x's dtype; x [N, C, *spatial]."""
    acc = torch.promote_types(x.dtype, torch.float32)
    view = (*scale.shape, *([1] * (x.dim() - 2)))  # [N, C] -> [N, C, 1, ...]
    y = x.to(acc) * scale.to(acc).view(view) + shift.to(acc).view(view)
    return (torch.nn.functional.silu(y) if silu else y).to(x.dtype)


# Apply, program (p, n): positions [p·BLOCK_S, ...) of sample n, all C channels of a channels_last row:
#   y[n, s, c] = act(x[n, s, c]·scale[n, c] + shift[n, c]),   act = SiLU or identity, in fp32
@triton.jit
def _affine_act_kernel(
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
    _affine_act_kernel[(triton.cdiv(s, block_s), n)](
        x, out, scale, shift, c, s, SILU=bool(silu), BLOCK_S=block_s, BLOCK_C=block_c,
        num_warps=8 if block_s * block_c >= 8192 else 4,
    )  # fmt: skip
    return out
