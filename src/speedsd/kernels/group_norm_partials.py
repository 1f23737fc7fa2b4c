"""GroupNorm(+SiLU) of a K-split conv's output, read straight from its fp32 partials.

A 3x3 conv whose K reduction is split over programs (kernels/conv_gluon.py, ``GluonConvConfig.split``) stores
S fp32 partials and sums them in a second launch; in a ResNet block the next reader of conv1's output is
norm2, GroupNorm(x + add[n, c]) + SiLU, and nothing else. Where GroupNorm runs that tensor in ONE launch
(the "fused" plan: one program per group block and sample, the UNet's 16² and 8² levels), that launch can
read the partials instead: the fused kernel's loads sum the S slices in split order (``SPLIT``), exactly the
sum the second launch would form, but in fp32 and never rounded to fp16 or written. One launch and one
write + read of the conv output fewer per block.

    y = SiLU(GroupNorm(Σ_s parts[s] + add))    parts fp32 [S, N·H·W, C] (channels_last order), y fp16 [N, C, H, W]

:func:`group_norm_partials` returns None where the plan GroupNorm would pick for the summed tensor is not
that one-launch channels_last plan; the caller then sums and normalises as before.
"""

from __future__ import annotations

import torch

from speedsd.kernels.device import sm_count
from speedsd.kernels.group_norm import _add_rows, group_norm_ref, plan_for
from speedsd.kernels.group_norm_kernels import _gn_fused_kernel
from speedsd.kernels.group_norm_plan import GroupNormPlan, plan_group_norm

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def group_norm_partials_ref(
    parts: torch.Tensor,
    shape: tuple[int, int, int, int],
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch, fp32 (fp64 stays fp64): GroupNorm(Σ_s parts[s] + add) (+ SiLU) as [N, C, H, W]."""
    n, c, h, w = shape
    acc = torch.promote_types(parts.dtype, torch.float32)
    x = parts.to(acc).sum(0).view(n, h, w, c).permute(0, 3, 1, 2)  # [N·H·W, C] -> [N, C, H, W]
    f = lambda t: None if t is None else t.to(acc)  # noqa: E731
    return group_norm_ref(x, num_groups, f(weight), f(bias), eps, silu, f(add))


def partials_plan(
    n: int,
    c: int,
    s: int,
    num_groups: int,
    dtype: torch.dtype,
    device: torch.device,
    splits: int = 1,
    **knobs: int | bool | None,
) -> GroupNormPlan | None:
    """The plan GroupNorm would run on the summed channels_last tensor of ``dtype`` (``knobs``: forced, as
    :func:`speedsd.kernels.group_norm.group_norm` takes them), if it is the one-launch kernel and ``splits``
    partials of it stay within int32 offsets; else None."""
    if num_groups <= 0 or c % num_groups or splits * n * s * c >= 2**31:
        return None
    itemsize = dtype.itemsize
    if knobs:
        sms = sm_count(device) if device.type == "cuda" else 132
        plan = plan_group_norm(n, c, s, num_groups, True, itemsize, sms, "fused", **knobs)
    else:
        plan = plan_for(n, c, s, num_groups, True, itemsize, device)
    return plan if plan.path == "fused" and not (plan.rows is not None and plan.one_tile) else None


def group_norm_partials(
    parts: torch.Tensor,
    shape: tuple[int, int, int, int],
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
    *,
    add: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
    **knobs: int | bool | None,
) -> torch.Tensor | None:
    """GroupNorm(Σ_s parts[s] + add[n, c]) (+ SiLU) -> a new channels_last [N, C, H, W] tensor of ``dtype``.

    parts: contiguous fp32 [S, N·H·W, C], the partials of a channels_last [N, C, H, W] output (``shape``);
    weight / bias: [C] or None; add: None or a float [C] / [N, C] tensor (as group_norm's). None where
    :func:`partials_plan` says no (not the one-launch plan, or partials too large for int32 offsets)."""
    n, c, h, w = shape
    s = h * w
    if parts.dim() != 3 or parts.dtype != torch.float32 or not parts.is_contiguous() or parts.shape[1:] != (n * s, c):
        raise ValueError(f"parts must be contiguous fp32 [S, {n * s}, {c}], got {tuple(parts.shape)} {parts.dtype}")
    if dtype not in FLOATS:
        raise ValueError(f"dtype must be one of {FLOATS}, got {dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.device != parts.device):
            raise ValueError(f"{name} must be a [{c}] tensor on {parts.device}")
    plan = partials_plan(n, c, s, num_groups, dtype, parts.device, parts.shape[0], **knobs)
    if plan is None:
        return None
    a, a_sn = _add_rows(add, n, c, parts.device) if add is not None else (parts, 0)
    out = torch.empty(shape, dtype=dtype, device=parts.device, memory_format=torch.channels_last)
    w_, b_ = (weight.contiguous() if weight is not None else parts), (bias.contiguous() if bias is not None else parts)
    aff = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None, SILU=bool(silu))
    _gn_fused_kernel[(plan.n_cb, n)](
        parts, out, w_, b_, a, c, s, s * c, 1, c, plan.tiles_per_chunk, eps, c // num_groups, a_sn,
        ONE_TILE=plan.one_tile, GB=plan.gb, BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, BLOCK_S=plan.block_s, **aff,
        MN=n * s * c, SPLIT=parts.shape[0], num_warps=plan.warps,
    )  # fmt: skip
    return out
