"""GroupNorm folded into a per-(sample, channel) affine, for a consumer that applies it in its prologue.

GroupNorm(x)·γ + β = x·scale + shift per sample n and channel c, with

    scale[n, c] = γ_c · rstd[n, g(c)],   shift[n, c] = β_c − mean[n, g(c)] · scale[n, c]

A kernel that reads x anyway (the narrow output conv, kernels/narrow_conv.py) can apply this on the fly,
so the normalised tensor is never written nor read. :func:`group_norm_scale_shift` takes the statistics
the way :func:`speedsd.kernels.group_norm.group_norm` does on its split path: the producing add's partials
when they ride on x (kernels/add_gn_stats.py), else one statistics launch; then one small launch merges
the partials (Chan) into scale and shift. Only for split plans: the one-launch plans hold a group in
registers and never write statistics (the caller normalises x itself then).
"""

from __future__ import annotations

import math

import torch
import triton

from speedsd.kernels.bias_add import GN_STATS_ATTR
from speedsd.kernels.gn_tile_stats import TileStats, _dense
from speedsd.kernels.group_norm import _ncs_strides, plan_for, split_partials
from speedsd.kernels.group_norm_rows import rows_scale_shift, rows_stats
from speedsd.kernels.group_norm_split_kernels import _gn_scale_shift_kernel


def group_norm_scale_shift_ref(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) fp32 [N, C] from torch's statistics (fp32, fp64 for fp64 x)."""
    n, c = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    var, mean = torch.var_mean(x.to(acc).reshape(n, num_groups, -1), dim=-1, unbiased=False)  # [N, G]
    rstd = torch.rsqrt(var + eps).repeat_interleave(c // num_groups, dim=1)  # [N, G] -> [N, C]
    mean = mean.repeat_interleave(c // num_groups, dim=1)
    scale = rstd * (weight.to(acc) if weight is not None else 1.0)
    shift = (bias.to(acc) if bias is not None else 0.0) - mean * scale
    return scale, shift


def group_norm_scale_shift(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) fp32 [N, C] with GroupNorm(x)·weight + bias = x·scale + shift (module doc), from the
    Triton statistics; None where GroupNorm's plan for x is not a split plan (or x is not dense)."""
    if x.dim() < 3 or x.shape[1] % num_groups or x.numel() == 0:
        raise ValueError(f"group_norm_scale_shift expects x [N, C, *spatial] with C divisible by {num_groups}, "
                         f"got {tuple(x.shape)}")  # fmt: skip
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    dense, _, sc, ss = _ncs_strides(x)
    if dense is not x or c * s >= 2**31:
        return None
    tiles = getattr(x, GN_STATS_ATTR, None)  # a conv epilogue's tile partials (kernels/gn_tile_stats.py)
    if isinstance(tiles, TileStats):
        folded = tiles.scale_shift(x, num_groups, weight, bias, eps)
        if folded is not None:
            return folded
    plan = plan_for(n, c, s, num_groups, sc == 1 and ss != 1, x.element_size(), x.device)
    if plan.path not in ("split", "rows"):
        return None
    shared = getattr(x, GN_STATS_ATTR, None)  # the producing add's partials, if they are still valid
    part = shared.take(x, num_groups, plan) if shared is not None else None
    if plan.path == "rows":
        if part is None:
            part = rows_stats(x, num_groups, plan.chunks, plan.block_s, plan.warps)
        return rows_scale_shift(part, num_groups, c, weight, bias, eps)
    if part is None:
        part = split_partials(x, num_groups, plan)
    # grouped (whole-row) partials are one block of all the groups
    gb, n_cb, block_c = (
        (num_groups, 1, triton.next_power_of_2(c)) if plan.grouped else (plan.gb, plan.n_cb, plan.block_c)
    )
    scale = torch.empty((n, c), device=x.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    _gn_scale_shift_kernel[(n_cb, n)](
        part, _dense(weight, scale), _dense(bias, scale), scale, shift, c, s,
        n_cb, plan.chunks, plan.tiles_per_chunk * plan.block_s, eps, c // num_groups, GB=gb,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=block_c, BLOCK_G=plan.block_g,
        BLOCK_P=triton.next_power_of_2(plan.chunks), num_warps=4,
    )  # fmt: skip
    return scale, shift
