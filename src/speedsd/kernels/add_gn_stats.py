"""A block's closing bias + residual add that also writes the NEXT GroupNorm's statistics.

A ResNet block (or a transformer / VAE attention block) ends with y = h + bias[c] + residual, and the
next block starts with GroupNorm(y). On the split path GroupNorm reads y twice: once for per-chunk
(mean, M2) partials, once to normalise. :func:`add_with_group_norm_stats` writes y and, from the
values it already holds in registers, the partials the statistics launch would have written: it is
GroupNorm's own statistics kernel, in its producer mode (``PRODUCE``: each tile first stores
y = round(x + bias + residual), then takes the statistics of the stored values), launched with the
plan GroupNorm will pick for y (:func:`speedsd.kernels.group_norm.plan_for`). The partials ride on y
(``y._speedsd_gn_stats``); :func:`group_norm` uses them instead of launching its statistics kernel
when the plan and group count match, never with a pre-add, and at most once. Same kernel, same
tiles, same values: the normalised output is bit-identical either way.

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

from speedsd.kernels.bias_add import FLOATS, GN_STATS_ATTR, bias_add, bias_add_ref, drop_gn_stats, prepare_operands
from speedsd.kernels.group_norm import GroupNormPlan, plan_for
from speedsd.kernels.group_norm_rows import rows_stats
from speedsd.kernels.group_norm_split_kernels import _gn_rows_cl_stats_kernel, _gn_stats_kernel

__all__ = ["GNStats", "add_with_group_norm_stats", "bias_add_ref", "handover_plan"]

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
    if x.dim() != 4 or num_groups <= 0 or x.shape[1] % num_groups or x.dtype not in FLOATS:
        return bias_add(x, bias, residual, out=out)
    N, C, H, W = x.shape
    S = H * W
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not (x.is_contiguous() or cl) or N * C * S == 0 or C * S >= 2**31:
        return bias_add(x, bias, residual, out=out)
    plan = handover_plan(N, C, S, num_groups, cl, x.element_size(), x.device)
    if plan is None:
        return bias_add(x, bias, residual, out=out)
    x, bias, residual, y, _ = prepare_operands(x, bias, residual, out)
    if plan.path == "rows":  # the rows statistics launch in producer mode (kernels/group_norm_rows.py)
        part = rows_stats(x, num_groups, plan.chunks, plan.block_s, plan.warps, produce=(bias, residual, y))
        setattr(y, ATTR, GNStats(num_groups, plan, _version(y), part))
        return y
    b = bias if bias is not None else x
    r = residual if residual is not None else x
    # GroupNorm's own statistics kernel for this plan, in producer mode (group_norm_split_kernels.py)
    flags = dict(HAS_ADD=False, PRODUCE=True, HAS_B=bias is not None, HAS_R=residual is not None)
    P, per_chunk = plan.chunks, plan.tiles_per_chunk
    chunk = per_chunk * plan.block_s
    cpg = C // num_groups
    if plan.grouped:
        part = torch.empty((2, N, P, plan.block_g), device=x.device, dtype=torch.float32)
        _gn_rows_cl_stats_kernel[(P, N)](
            x, x, part, b, r, y, C, S, num_groups, P, chunk, per_chunk, 0, **flags, CPG=cpg, BLOCK_S=plan.block_s,
            BLOCK_G=plan.block_g, BLOCK_K=plan.block_k, num_warps=plan.warps,
        )  # fmt: skip
    else:
        sn, sc, ss = (C * S, 1, C) if cl else (C * S, S, 1)
        part = torch.empty((2, N * plan.n_cb, P, plan.block_g), device=x.device, dtype=torch.float32)
        _gn_stats_kernel[(plan.n_cb, P, N)](
            x, x, part, b, r, y, C, S, sn, sc, ss, plan.n_cb, P, chunk, per_chunk, cpg, 0, GB=plan.gb, **flags,
            BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, num_warps=plan.warps,
        )  # fmt: skip
    setattr(y, ATTR, GNStats(num_groups, plan, _version(y), part))
    return y


def handover_plan(
    n: int, c: int, s: int, num_groups: int, cl: bool, itemsize: int, device: torch.device
) -> GroupNormPlan | None:
    """The plan GroupNorm(num_groups) picks for an [N, C, S] tensor where a producer can write its statistics
    (the two-launch "split" and "rows" paths), else None (GroupNorm takes its own in one launch)."""
    plan = plan_for(n, c, s, num_groups, cl, itemsize, device)
    return plan if plan.path in ("split", "rows") else None


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version
