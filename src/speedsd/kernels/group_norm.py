"""Fused GroupNorm (+SiLU) in Triton, and its plain-torch reference. Kernels: group_norm_kernels.py
(helpers, one-launch kernels) and group_norm_split_kernels.py (the two-launch split pairs).

The input is seen as ``[N, C, S]`` (S = product of the spatial dims). Statistics are fp32 two-pass
per register tile, merged over tiles / chunks with Chan's parallel formula; never ``E[x²] − E[x]²``.

Paths, picked by :func:`plan_group_norm` (``path="auto"``; on CUDA a measured :data:`TUNED` entry wins):
  * ``fused``, NCHW: one program per (group, sample) holds the group's CPG contiguous channel rows in
    registers as two power-of-two row blocks (CPG = 10 -> 8 + 2 rows, not 16): x read once, 16-byte
    loads, ONE launch, ~32 values a thread. Up to 48K padded values: every UNet shape up to
    2x1280x32x32 and 2x320x64x64.
  * ``fused``, channels_last: ``GB`` groups per program (rows of >= 64 contiguous bytes) in one tile
    [S, GB·CPG]; UNet 8² shapes.
  * ``loop``: ONE launch, one program per group block, two sweeps (the second re-reads from L2).
    Only when there are >= 2 such programs per SM (large batches).
  * ``split``: big groups with few programs (UNet 64² NCHW beyond 320 channels, channels_last at
    16²-64², every VAE shape). Statistics kernel writes per-chunk (mean, M2) partials; the normalize
    kernel merges its group's partials and writes its chunk, visiting chunks in reverse so it starts
    on what is still in L2. Two launches. NCHW: [BLOCK_S, CPG] tiles per group, ~4 programs per SM.
    channels_last (``grouped``): whole contiguous pixel rows, loaded as [position, group, channel]
    tiles so group sums are plain axis reductions, ~2 programs per SM; CPG is a compile-time
    constant there so the rows vectorise (CPG = 40 -> 16-byte loads).
  * ``rows``, channels_last only (group_norm_rows.py): a statistics launch over [rows, C padded] tiles
    whose last program per sample merges the partials into (mean, variance) per group, then an apply
    launch that streams x once. Picked by the TUNED table where measured faster (the UNet's 64² level).

Every path takes an optional pre-add ``add`` [C] or [N, C] (a ResNet block's conv bias + time
embedding): the kernels normalise x + add[n, c] in fp32, for the statistics and the output, without
forming the sum: add is folded into per-channel values (a channel's mean moves by add, its M2 does
not; one-pass-over-the-group kernels centre each channel on mean − add; y = x·scale + (shift +
add·scale)), so nothing is written and no element costs more. ``HAS_ADD`` is a compile-time flag: the
kernels without it compile to the same instructions as before it existed.

Two sources (``concat=``): GroupNorm of cat([x, x2], dim=1) without forming it (the UNet up path's
ResNet input). Every kernel takes the second source as a compile-time option (DUAL) and reads channel c
from x (c < C1) or x2 (c − C1) with two complementary masked loads; the statistics, the plan and the
output are those of the concatenation (group_norm_kernels.py).

The plans and the measured ``TUNED`` table: group_norm_plan.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton

from speedsd.kernels.bias_add import GN_STATS_ATTR, drop_gn_stats
from speedsd.kernels.device import sm_count as _sm_count
from speedsd.kernels.gn_tile_stats import TileStats, affine_act
from speedsd.kernels.group_norm_kernels import _gn_fused_kernel, _gn_rows_kernel
from speedsd.kernels.group_norm_plan import (  # noqa: F401  (re-exported: the planning API's historic home)
    MAX_ONE_TILE,
    MAX_ROWS_TILE,
    PATHS,
    TILE,
    TUNED,
    GroupNormPlan,
    plan_for,
    plan_group_norm,
)
from speedsd.kernels.group_norm_rows import rows_apply, rows_stats
from speedsd.kernels.group_norm_split_kernels import (
    _gn_norm_kernel,
    _gn_rows_cl_norm_kernel,
    _gn_rows_cl_stats_kernel,
    _gn_stats_kernel,
)

NO_PRODUCE = dict(PRODUCE=False, HAS_B=False, HAS_R=False)  # the statistics kernels' producer mode, off


def group_norm_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch's GroupNorm, then SiLU when asked: the unfused baseline.

    ``add`` [C] or [N, C]: GroupNorm(x + add[n, c]) with add broadcast over the spatial dims; the sum
    is taken in fp32 (fp64 for fp64 x) and rounded to x's dtype first, as an unfused
    ``conv(x) + bias + temb`` in that dtype would be. (The kernels never round the sum.)
    """
    if add is not None:
        acc = torch.promote_types(x.dtype, torch.float32)
        rows = add.shape[0] if add.dim() == 2 else 1
        a = add.to(acc).reshape(rows, x.shape[1], *[1] * (x.dim() - 2))  # [C] | [N, C] -> [N | 1, C, 1...]
        x = (x.to(acc) + a).to(x.dtype)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


# ---- launcher ------------------------------------------------------------------------------------


def _ncs_strides(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x (made dense if needed) and its strides (sn, sc, ss) as a [N, C, S] view."""
    c, s = x.shape[1], math.prod(x.shape[2:])
    if x.is_contiguous():
        return x, c * s, s, 1
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if cl is not None and x.is_contiguous(memory_format=cl):
        return x, s * c, 1, c
    return x.contiguous(), c * s, s, 1


def _add_rows(add: torch.Tensor, n: int, c: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The pre-add as rows of C contiguous values and its sample stride (0 for a [C] add: no copy)."""
    if not add.is_floating_point() or add.device != device or add.shape not in ((c,), (n, c)):
        raise ValueError(f"add must be a float [{c}] or [{n}, {c}] tensor on {device}, got {add.dtype} "
                         f"{tuple(add.shape)} on {add.device}")  # fmt: skip
    if add.dim() == 1:
        return add.contiguous(), 0
    if add.stride(1) != 1:
        add = add.contiguous()
    return add, add.stride(0)  # an expanded [N, C] (stride 0) stays one row


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
    *,
    add: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    concat: torch.Tensor | None = None,
    path: str = "auto",
    **knobs: int | bool | None,
) -> torch.Tensor:
    """GroupNorm over x [N, C, *spatial] (+ SiLU), same shape, dtype and memory format as x.

    ``add``: None, or a float [C] / [N, C] tensor on x's device: normalise x + add[n, c] (broadcast
    over the spatial dims, in fp32; the sum is never written; see the module doc).
    ``out``: write here (same shape, dtype, device and strides as x), x itself included (in place: every
    path loads an element before storing it and never after; statistics come from an earlier sweep or
    launch or a hand-over read first; programs own disjoint elements). ``path``: "auto" (the measured
    :data:`TUNED` plan for this shape on CUDA, else :func:`plan_group_norm`'s heuristic), or force
    "fused" / "loop" / "split". ``knobs``: :func:`plan_group_norm`'s ``programs``, ``tile``, ``warps``,
    ``gb``, ``grouped`` (tests reach multi-chunk, multi-tile cases on small shapes; the bench sweeps them).
    ``concat``: a second source [N, C2, *spatial] (x's dtype, device, batch and spatial size): normalise
    cat([x, concat], dim=1) [N, C + C2, *spatial] without forming it (groups may straddle the two; same plan
    and values as for the concatenation). The output is then new (or ``out``: dense, that shape; never a
    source), channels_last when both sources are, else contiguous; ``add``, ``weight``, ``bias`` have C + C2
    entries; statistics handed over on x are not used.
    """
    if x.dim() < 2:
        raise ValueError(f"group_norm expects x [N, C, *spatial], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"group_norm supports fp32/fp16/bf16, got {x.dtype}")
    N, C = x.shape[0], x.shape[1] + (concat.shape[1] if concat is not None and concat.dim() > 1 else 0)
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the channel count C={C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (C,) or t.device != x.device):
            raise ValueError(f"{name} must be a [{C}] tensor on {x.device}, got {tuple(t.shape)} on {t.device}")
    a, a_sn = _add_rows(add, N, C, x.device) if add is not None else (x, 0)
    unknown = set(knobs) - {"programs", "tile", "warps", "gb", "grouped", "chunks", "apply_chunks", "apply_tile",
                            "apply_warps"}  # fmt: skip
    if unknown:
        raise TypeError(f"group_norm got unexpected keyword arguments {sorted(unknown)}")
    dual: dict[str, object] = {}  # the kernels' second-source arguments (none: one source)
    if concat is not None:
        x, concat, out = _concat_sources(x, concat, out)
        if min(x.shape[1], concat.shape[1]) == 1:
            # a one-channel source is dense in both layouts: its loads compile to another register layout
            # than the concatenation's, which rounds differently on the GPU. Form the concatenation.
            x, concat = torch.cat([x, concat], dim=1, out=torch.empty_like(out)), None  # (out's layout)
    if concat is not None:
        dual = _dual_args(x, concat)
        _, sn, sc, ss = _ncs_strides(out)  # the kernels' own strides are the output's
        shared = None
    else:
        x, sn, sc, ss = _ncs_strides(x)
        shared = getattr(x, GN_STATS_ATTR, None)  # partials from the producing add (kernels/add_gn_stats.py)
        if isinstance(shared, TileStats) and add is None:  # a conv epilogue's tile partials (gn_tile_stats.py)
            folded = shared.scale_shift(x, num_groups, weight, bias, eps)
            if folded is not None:
                return affine_act(x, *folded, silu=silu, out=out)
            shared = None
        if out is None:
            out = torch.empty_like(x)
        elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride() != x.stride():
            raise ValueError("out must match x in shape, dtype, device and strides")
        else:
            drop_gn_stats(out)
    S = max(math.prod(x.shape[2:]), 1)
    cl = sc == 1 and ss != 1
    if path == "auto" and not knobs:
        plan = plan_for(N, C, S, num_groups, cl, x.element_size(), x.device)
    else:
        plan = plan_group_norm(N, C, S, num_groups, cl, x.element_size(), _sm_count(x.device), path, **knobs)
    if out.numel() == 0:
        return out
    if C * S >= 2**31:
        raise ValueError(f"one sample has {C * S} elements; the kernels index a sample with int32")
    part = shared.take(x, num_groups, plan) if shared is not None and add is None else None  # a hand-over
    if plan.path == "rows":  # kernels/group_norm_rows.py
        opts = dict(add=(a, a_sn) if add is not None else None, dual=dual or None)
        if part is None:
            part = rows_stats(x, num_groups, plan.chunks, plan.block_s, plan.warps, **opts)
        return rows_apply(x, out, part, num_groups, weight, bias, eps, silu, *plan.apply, **opts)
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    cpg = C // num_groups
    aff = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None, SILU=bool(silu))
    if plan.rows is not None and plan.one_tile:
        _gn_rows_kernel[(num_groups, N)](
            x, out, w, b, a, C, S, cpg, eps, a_sn, **aff, RA=plan.rows[0], RB=plan.rows[1], BLOCK_S=plan.block_s,
            **dual, num_warps=plan.warps,
        )  # fmt: skip
        return out
    if plan.path != "split":
        flags = dict(GB=plan.gb, BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, BLOCK_S=plan.block_s)
        _gn_fused_kernel[(plan.n_cb, N)](
            x, out, w, b, a, C, S, sn, sc, ss, plan.tiles_per_chunk, eps, cpg, a_sn, ONE_TILE=plan.one_tile,
            **flags, **aff, **dual, num_warps=plan.warps,
        )  # fmt: skip
        return out
    if part is None:
        part = split_partials(x, num_groups, plan, add=a if add is not None else None, add_sn=a_sn, concat=concat)
    P, per_chunk = plan.chunks, plan.tiles_per_chunk
    chunk = per_chunk * plan.block_s
    if plan.grouped:
        _gn_rows_cl_norm_kernel[(P, N)](
            x, out, w, b, a, part, C, S, num_groups, P, chunk, per_chunk, eps, a_sn, **aff, CPG=cpg,
            BLOCK_S=plan.block_s, BLOCK_G=plan.block_g, BLOCK_K=plan.block_k, BLOCK_P=triton.next_power_of_2(P),
            **dual, num_warps=plan.warps,
        )  # fmt: skip
        return out
    _gn_norm_kernel[(plan.n_cb, P, N)](
        x, out, w, b, a, part, C, S, sn, sc, ss, plan.n_cb, P, chunk, per_chunk, eps, cpg, a_sn, GB=plan.gb,
        BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, BLOCK_S=plan.block_s, **aff, BLOCK_P=triton.next_power_of_2(P),
        **dual, num_warps=plan.warps,
    )  # fmt: skip
    return out


def _concat_sources(
    x: torch.Tensor, x2: torch.Tensor, out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, x2, out) for normalising cat([x, x2], dim=1): the sources dense in one layout (channels_last when
    both are, copied only if they are not dense in it) and the output, new in that layout or ``out`` checked."""
    rest = x.shape[:1] + x.shape[2:]  # batch and spatial size
    if x2.dtype != x.dtype or x2.device != x.device or x2.dim() != x.dim() or x2.shape[:1] + x2.shape[2:] != rest:
        raise ValueError(f"concat must be a {x.dtype} tensor on {x.device} of x's batch and spatial size "
                         f"{tuple(rest)}, got {x2.dtype} {tuple(x2.shape)} on {x2.device}")  # fmt: skip
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    both = (x, x2)
    in_cl = cl is not None and all(t.is_contiguous(memory_format=cl) for t in both)
    fmt = cl if in_cl and not all(t.is_contiguous() for t in both) else torch.contiguous_format
    x, x2 = x.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt)
    shape = (x.shape[0], x.shape[1] + x2.shape[1], *x.shape[2:])
    if out is None:
        return x, x2, torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    dense = out.is_contiguous() or (cl is not None and out.is_contiguous(memory_format=cl))
    if out.shape != shape or out.dtype != x.dtype or out.device != x.device or not dense:
        raise ValueError(f"out must be a dense {tuple(shape)} {x.dtype} tensor on {x.device}")
    end = out.data_ptr() + out.numel() * out.element_size()
    if any(t.data_ptr() < end and out.data_ptr() < t.data_ptr() + t.numel() * t.element_size() for t in (x, x2)):
        raise ValueError("out must not overlap x or concat")  # (all three dense: spans are their extents)
    drop_gn_stats(out)
    return x, x2, out


def _dual_args(x: torch.Tensor, x2: torch.Tensor) -> dict[str, object]:
    """The kernels' second-source arguments for cat([x, x2], dim=1) (dense sources; group_norm_kernels.py)."""
    _, sn1, sc1, ss1 = _ncs_strides(x)
    x2, sn2, sc2, ss2 = _ncs_strides(x2)
    return dict(x2_ptr=x2, C1=x.shape[1], sn1=sn1, sc1=sc1, ss1=ss1, sn2=sn2, sc2=sc2, ss2=ss2, DUAL=True)


def split_partials(
    x: torch.Tensor,
    num_groups: int,
    plan: GroupNormPlan,
    add: torch.Tensor | None = None,
    add_sn: int = 0,
    concat: torch.Tensor | None = None,
) -> torch.Tensor:
    """A split plan's statistics launch over a dense x [N, C, *spatial]: per-chunk (mean, M2) partials
    [2, N·n_cb, P, BLOCK_G] (grouped plans: one block of every group) of x + add[n, c] (``add``: rows of C
    values, ``add_sn`` apart; see :func:`_add_rows`). ``concat``: of cat([x, concat], dim=1) instead (a
    second source of x's dtype, batch and spatial size)."""
    x, sn, sc, ss = _ncs_strides(x)
    dual = _dual_args(x, concat) if concat is not None else {}
    N, C = x.shape[0], x.shape[1] + (concat.shape[1] if concat is not None else 0)
    S = max(math.prod(x.shape[2:]), 1)
    P, per_chunk = plan.chunks, plan.tiles_per_chunk
    chunk = per_chunk * plan.block_s
    a = add if add is not None else x
    part = torch.empty((2, N * plan.n_cb, P, plan.block_g), device=x.device, dtype=torch.float32)
    if plan.grouped:
        # CPG is a compile-time constant here: Triton then proves g·CPG alignment and vectorises the rows
        _gn_rows_cl_stats_kernel[(P, N)](
            x, a, part, x, x, x, C, S, num_groups, P, chunk, per_chunk, add_sn, HAS_ADD=add is not None,
            **NO_PRODUCE, CPG=C // num_groups, BLOCK_S=plan.block_s, BLOCK_G=plan.block_g, BLOCK_K=plan.block_k,
            **dual, num_warps=plan.warps,
        )  # fmt: skip
        return part
    _gn_stats_kernel[(plan.n_cb, P, N)](
        x, a, part, x, x, x, C, S, sn, sc, ss, plan.n_cb, P, chunk, per_chunk, C // num_groups, add_sn,
        GB=plan.gb, BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, BLOCK_S=plan.block_s, HAS_ADD=add is not None,
        **NO_PRODUCE, **dual, num_warps=plan.warps,
    )  # fmt: skip
    return part
