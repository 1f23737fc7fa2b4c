"""A block's closing bias + residual add that also writes the NEXT GroupNorm's statistics.

A ResNet block (or a transformer / VAE attention block) ends with y = h + bias[c] + residual, and the
next block starts with GroupNorm(y). On the split path GroupNorm reads y twice: once for per-chunk
(mean, M2) partials, once to normalise. :func:`add_with_group_norm_stats` writes y and, from the
values it already holds in registers, the partials the statistics launch would have written, in the
same layout and chunking (it plans with :func:`speedsd.kernels.group_norm.plan_for`, the plan
GroupNorm will pick for y). They ride on y (``y._speedsd_gn_stats``); :func:`group_norm` uses them
instead of launching its statistics kernel when the plan and group count match, never with a
pre-add, and at most once. Statistics come from the stored (rounded) y, tile by tile as the
statistics kernel computes them, so the normalised output is bit-identical either way.

Staleness: our Triton launchers that write into a tensor in place drop its statistics; a torch
in-place op is caught by the version counter, except on inference tensors (the engine runs under
``torch.inference_mode``), which have none. So the contract, which the models keep, is: the output
of a block that hands statistics over is not modified in place before the next block normalises it.

When GroupNorm would not take the split path for y (one-launch plans), this is plain
:func:`speedsd.kernels.bias_add.bias_add`. The reference is ``bias_add_ref``: statistics are an
internal hand-over, not an output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from speedsd.kernels.bias_add import GN_STATS_ATTR, bias_add, bias_add_ref, drop_gn_stats
from speedsd.kernels.group_norm import GroupNormPlan, plan_for
from speedsd.kernels.group_norm_kernels import _channels_to_groups, _merge, _onehot, _tile_stats

__all__ = ["GNStats", "add_with_group_norm_stats", "bias_add_ref"]

ATTR = GN_STATS_ATTR  # group_norm() looks for this attribute


@dataclass(frozen=True)
class GNStats:
    """Split-path partials of one tensor: valid for ``groups`` and ``plan`` while the tensor is at
    ``version`` (None: an inference tensor, which has no version counter)."""

    groups: int
    plan: GroupNormPlan
    version: int | None
    part: torch.Tensor

    def take(self, x: torch.Tensor, groups: int, plan: GroupNormPlan) -> torch.Tensor | None:
        """The partials for this (groups, plan) if still valid, else None. Consumed: the attribute is
        removed, so one GroupNorm uses them at most once."""
        if getattr(x, ATTR, None) is self:
            drop_gn_stats(x)
        if self.groups != groups or self.plan != plan or self.version != _version(x):
            return None
        return self.part


# Program (cb, p, n) over positions [p·chunk, ...) and the block's GB groups (the split statistics
# kernel's grid): per tile y = round(x + b[c] + r) is stored, then per-channel (count, mean, M2) of the
# stored values (two-pass in registers, Chan merge over tiles), to groups; part as _gn_stats_kernel.
@triton.jit
def _add_stats_kernel(
    x_ptr, b_ptr, r_ptr, y_ptr, part_ptr,
    C, S, sn, sc, ss, n_cb, P, chunk, n_iter, CPG,
    GB: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    cb = tl.program_id(0)
    p = tl.program_id(1)
    n = tl.program_id(2)
    cl = tl.arange(0, BLOCK_C)
    c = cb * (GB * CPG) + cl
    mask_c = (cl < GB * CPG) & (c < C)
    rs = tl.arange(0, BLOCK_S)
    base = n.to(tl.int64) * sn
    col = c * sc
    bias = tl.zeros([BLOCK_C], tl.float32)
    if HAS_B:
        bias = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    s0 = p * chunk
    n_c = 0.0
    mean_c = tl.zeros([BLOCK_C], tl.float32)
    m2_c = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask_s = s < S
        mask = mask_s[:, None] & mask_c[None, :]
        offs = base + s[:, None] * ss + col[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        if HAS_R:
            v += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v_low = v.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, v_low, mask=mask)
        v = tl.where(mask, v_low.to(tl.float32), 0.0)
        ns = tl.maximum(tl.minimum(S - (s0 + i * BLOCK_S), BLOCK_S), 0) * 1.0
        t_mean, t_m2 = _tile_stats(v, mask_s, ns)
        n_c, mean_c, m2_c = _merge(n_c, mean_c, m2_c, ns, t_mean, t_m2)
    onehot = _onehot(BLOCK_C, BLOCK_G, CPG, GB, mask_c)
    mean_g, m2_g = _channels_to_groups(mean_c, m2_c, n_c, onehot, CPG)
    gj = tl.arange(0, BLOCK_G)
    half = n_cb * tl.num_programs(2) * P * BLOCK_G
    dst = part_ptr + ((n * n_cb + cb) * P + p) * BLOCK_G + gj
    tl.store(dst, mean_g)
    tl.store(dst + half, m2_g)


# channels_last whole pixel rows, tile [BLOCK_S, BLOCK_G, BLOCK_K] (the grouped statistics kernel's
# grid (p, n)): y = round(x + b[c] + r) stored; per tile per group mean_t, M2_t of the stored values;
# Chan merge over tiles; part[0 | 1, n, p, g] as _gn_rows_cl_stats_kernel.
@triton.jit
def _add_rows_cl_stats_kernel(
    x_ptr, b_ptr, r_ptr, y_ptr, part_ptr,
    C, S, G, P, chunk, n_iter,
    HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    CPG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    n = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    k = tl.arange(0, BLOCK_K)
    c = g[:, None] * CPG + k[None, :]  # [BG, BK]
    mask_c = (g < G)[:, None] & (k < CPG)[None, :]
    rs = tl.arange(0, BLOCK_S)
    base = n.to(tl.int64) * S * C
    bias = tl.zeros([BLOCK_G, BLOCK_K], tl.float32)
    if HAS_B:
        bias = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    s0 = p * chunk
    n_g = 0.0
    mean_g = tl.zeros([BLOCK_G], tl.float32)
    m2_g = tl.zeros([BLOCK_G], tl.float32)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask = (s < S)[:, None, None] & mask_c[None, :, :]
        offs = base + s[:, None, None] * C + c[None, :, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :, :]
        if HAS_R:
            v += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v_low = v.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, v_low, mask=mask)
        v = tl.where(mask, v_low.to(tl.float32), 0.0)
        nt = tl.maximum(tl.minimum(S - (s0 + i * BLOCK_S), BLOCK_S), 0) * CPG * 1.0  # values per group
        t_mean = tl.sum(tl.sum(v, axis=2), axis=0) / tl.maximum(nt, 1.0)
        d = tl.where(mask, v - t_mean[None, :, None], 0.0)
        t_m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
        n_g, mean_g, m2_g = _merge(n_g, mean_g, m2_g, nt, t_mean, t_m2)
    dst = part_ptr + (n * P + p) * BLOCK_G + g
    tl.store(dst, mean_g)
    tl.store(dst + tl.num_programs(1) * P * BLOCK_G, m2_g)


def add_with_group_norm_stats(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    num_groups: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x + bias[c] (+ residual) like :func:`bias_add` for a 4-D x [N, C, H, W], plus the split-path
    GroupNorm(num_groups) statistics of y handed to the GroupNorm that reads y next (module doc).
    ``out``: x itself (in place) or a tensor like x."""
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if x.dim() != 4 or num_groups <= 0 or x.shape[1] % num_groups or x.dtype not in floats:
        return bias_add(x, bias, residual, out=out)
    N, C, H, W = x.shape
    S = H * W
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not (x.is_contiguous() or cl) or N * C * S == 0 or C * S >= 2**31:
        return bias_add(x, bias, residual, out=out)
    plan = plan_for(N, C, S, num_groups, cl, x.element_size(), x.device)
    if plan.path != "split":
        return bias_add(x, bias, residual, out=out)
    fmt = torch.channels_last if cl else torch.contiguous_format
    if bias is not None and (bias.shape != (C,) or bias.device != x.device):
        raise ValueError(f"bias must be a [{C}] tensor on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}")
        if residual.stride() != x.stride():
            residual = residual.contiguous(memory_format=fmt)
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride() != x.stride():
        raise ValueError("out must match x in shape, dtype, device and strides")
    y = out
    drop_gn_stats(y)
    b = bias.contiguous() if bias is not None else x
    r = residual if residual is not None else x
    flags = dict(HAS_B=bias is not None, HAS_R=residual is not None)
    P, per_chunk = plan.chunks, plan.tiles_per_chunk
    chunk = per_chunk * plan.block_s
    cpg = C // num_groups
    if plan.grouped:
        part = torch.empty((2, N, P, plan.block_g), device=x.device, dtype=torch.float32)
        _add_rows_cl_stats_kernel[(P, N)](
            x, b, r, y, part, C, S, num_groups, P, chunk, per_chunk, **flags, CPG=cpg, BLOCK_S=plan.block_s,
            BLOCK_G=plan.block_g, BLOCK_K=plan.block_k, num_warps=plan.warps,
        )  # fmt: skip
    else:
        sn, sc, ss = (C * S, 1, C) if cl else (C * S, S, 1)
        part = torch.empty((2, N * plan.n_cb, P, plan.block_g), device=x.device, dtype=torch.float32)
        _add_stats_kernel[(plan.n_cb, P, N)](
            x, b, r, y, part, C, S, sn, sc, ss, plan.n_cb, P, chunk, per_chunk, cpg, GB=plan.gb, **flags,
            BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, num_warps=plan.warps,
        )  # fmt: skip
    setattr(y, ATTR, GNStats(num_groups, plan, _version(y), part))
    return y


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version
