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

Every path takes an optional pre-add ``add`` [C] or [N, C] (a ResNet block's conv bias + time
embedding): the kernels normalise x + add[n, c] in fp32, for the statistics and the output, without
forming the sum: add is folded into per-channel values (a channel's mean moves by add, its M2 does
not; one-pass-over-the-group kernels centre each channel on mean − add; y = x·scale + (shift +
add·scale)), so nothing is written and no element costs more. ``HAS_ADD`` is a compile-time flag: the
kernels without it compile to the same instructions as before it existed.

``python -m speedsd.bench.kernels_norm_gelu --variants`` times every plan on every SD shape (CUDA-graph
replay) and writes the ``TUNED`` table for this file.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from speedsd.kernels.bias_add import GN_STATS_ATTR, drop_gn_stats
from speedsd.kernels.device import sm_count as _sm_count
from speedsd.kernels.gn_tile_stats import TileStats, affine_act
from speedsd.kernels.group_norm_kernels import _gn_fused_kernel, _gn_rows_kernel
from speedsd.kernels.group_norm_split_kernels import (
    _gn_norm_kernel,
    _gn_rows_cl_norm_kernel,
    _gn_rows_cl_stats_kernel,
    _gn_stats_kernel,
)

PATHS = ("auto", "fused", "loop", "split")
MAX_ROWS_TILE = 49152  # NCHW one-tile (_gn_rows_kernel): padded (RA + RB)·S; 32 warps hold 48 fp32 a thread
MAX_ONE_TILE = 32768  # padded elements of a group block that one program holds in registers (16 warps: ~100 regs)
TILE = 4096  # elements per tile in the streaming (loop / split) kernels
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


def _channel_block(cpg: int, groups: int, channels_fast: bool, itemsize: int) -> tuple[int, int]:
    """(GB groups per program, BLOCK_C).

    NCHW: one group (its rows are contiguous along S). channels_last: the block of GB·CPG channels is
    each tile row; score = used lanes over all blocks (C / (n_blocks·BLOCK_C)), x 0.75 when a row is
    not a whole number of 16-byte vectors (then loads are narrower), rows of >= 64 B unless GB = G.
    E.g. fp16 C=320: GB=12 (120 ch, BLOCK_C=128, 83 %, 16-B loads); C=1280: GB=3; C=128: GB=8 (100 %).
    """
    p2 = triton.next_power_of_2(cpg)
    if not channels_fast:
        return 1, p2
    best = (-1.0, 1, p2)
    bc = p2
    while bc <= max(p2, 256):
        for gb in range(1, min(bc // cpg, groups) + 1):
            width = gb * cpg
            if triton.next_power_of_2(width) != bc or (width * itemsize < 64 and gb < groups):
                continue
            score = groups * cpg / (triton.cdiv(groups, gb) * bc)
            if (width * itemsize) % 16:
                score *= 0.75
            if score > best[0] + 1e-9:
                best = (score, gb, bc)
        bc *= 2
    return best[1], best[2]


def _row_blocks(cpg: int) -> tuple[int, int]:
    """NCHW one-tile row blocks (RA, RB): RA = largest power of two <= CPG, RB covers the rest (>= 1)."""
    ra = 1 << (cpg.bit_length() - 1)
    return ra, triton.next_power_of_2(max(1, cpg - ra))


@dataclass(frozen=True)
class GroupNormPlan:
    """How :func:`group_norm` runs one shape: path, channel blocking, tiles, launches."""

    path: str  # fused | loop | split
    gb: int  # groups per program
    block_c: int
    block_g: int
    block_s: int
    n_cb: int  # group blocks per sample
    warps: int
    one_tile: bool = False
    chunks: int = 1  # split: chunks of S per group block
    tiles_per_chunk: int = 1
    rows: tuple[int, int] | None = None  # NCHW one-tile: (RA, RB) row blocks of _gn_rows_kernel
    block_k: int = 0  # grouped channels_last split: channels per group padded (tile [BLOCK_S, BLOCK_G, BLOCK_K])

    @property
    def launches(self) -> int:
        return 2 if self.path == "split" else 1

    @property
    def grouped(self) -> bool:
        return self.block_k > 0


# Measured best plan per shape, keyed (n, c, s, groups, channels_last, itemsize) -> plan_group_norm
# keyword arguments. Filled from `python -m speedsd.bench.kernels_norm_gelu --variants` (it writes
# group_norm_tuned.py with this dict); consulted by group_norm(path="auto") on CUDA only.
# measured on the NVIDIA H200 (bench/results/group_norm_variants.md: channels_last fp16 SD-1.4 shapes, graph
# replay); only shapes where the best forced plan beat auto by > 3 %
TUNED: dict[tuple[int, int, int, int, bool, int], dict[str, int | str | bool]] = {
    # warps 4: 81.6 -> 71.3 µs (group_norm_split_sweep.md, a later sweep of this split plan)
    (1, 128, 262144, 32, True, 2): {"grouped": False, "path": "split", "programs": 1056, "tile": 8192, "warps": 4},
    (1, 256, 65536, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (1, 256, 262144, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (1, 512, 4096, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (1, 512, 65536, 32, True, 2): {"grouped": False, "path": "split", "programs": 1056, "tile": 8192},
    (2, 320, 1024, 32, True, 2): {"gb": 1, "path": "fused"},
    (2, 640, 256, 32, True, 2): {"gb": 1, "path": "fused"},
    (2, 640, 1024, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (2, 640, 4096, 32, True, 2): {"grouped": False, "path": "split", "programs": 264, "tile": 8192},
    (2, 1280, 64, 32, True, 2): {"gb": 1, "path": "fused"},
    (2, 1280, 256, 32, True, 2): {"gb": 1, "path": "fused"},
    (2, 1280, 1024, 32, True, 2): {"grouped": False, "path": "split"},
    (2, 1920, 256, 32, True, 2): {"gb": 1, "path": "fused"},
    (2, 1920, 1024, 32, True, 2): {"grouped": False, "path": "split", "tile": 8192},
    (2, 2560, 64, 32, True, 2): {"grouped": True, "path": "split", "tile": 4096},
    (2, 2560, 256, 32, True, 2): {"grouped": True, "path": "split", "tile": 4096},
}


def _warps(elements: int, per_thread: int) -> int:
    return max(4, min(32, triton.next_power_of_2(triton.cdiv(elements, 32 * per_thread))))


@functools.lru_cache(maxsize=4096)
def plan_group_norm(
    n: int,
    c: int,
    s: int,
    num_groups: int,
    channels_last: bool,
    itemsize: int,
    sm_count: int = 132,
    path: str = "auto",
    programs: int | None = None,
    tile: int | None = None,
    warps: int | None = None,
    gb: int | None = None,
    grouped: bool | None = None,
) -> GroupNormPlan:
    """Pick the path and block sizes for x [n, c, s] (s = spatial size). See the module doc.

    Knobs (None = heuristic): ``programs`` split target program count (default 4 per SM); ``tile``
    elements per streaming tile; ``warps``; ``gb`` groups per program (channel blocking);
    ``grouped`` channels_last split over whole pixel rows with 3-D [position, group, channel] tiles.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    cpg = c // num_groups
    channels_fast = channels_last and s > 1
    if gb is None:
        gb, block_c = _channel_block(cpg, num_groups, channels_fast, itemsize)
    else:
        gb = max(1, min(gb, num_groups))
        block_c = triton.next_power_of_2(gb * cpg)
    block_g = max(2, triton.next_power_of_2(gb))
    n_cb = triton.cdiv(num_groups, gb)
    s_p2 = triton.next_power_of_2(s)
    common = dict(gb=gb, block_c=block_c, block_g=block_g, n_cb=n_cb)
    rows = _row_blocks(cpg) if not channels_fast and gb == 1 else None
    if rows is not None:
        fits = sum(rows) * s_p2 <= MAX_ROWS_TILE
    else:
        fits = block_c * s_p2 <= (MAX_ONE_TILE if gb == 1 else MAX_ONE_TILE // 2)  # several groups: more live values
    if path == "auto":
        path = "fused" if fits else "loop" if n * n_cb >= 2 * sm_count else "split"
    if path == "fused" and tile is None:
        if not fits:
            raise ValueError(f"path='fused': the group block ({block_c}·{s_p2} padded) does not fit one register tile")
        if rows is not None:  # ~32 fp32 values a thread
            w = warps or _warps(sum(rows) * s_p2, 32)
            return GroupNormPlan("fused", block_s=s_p2, warps=w, one_tile=True, rows=rows, **common)
        w = warps or (16 if block_c * s_p2 > 8192 else 8 if block_c * s_p2 > 2048 else 4)
        return GroupNormPlan("fused", block_s=s_p2, warps=w, one_tile=True, **common)
    if path == "split" and grouped is None:
        grouped = channels_fast  # predicted: whole contiguous pixel rows beat narrow group-block columns
    if path == "split" and grouped and channels_fast:
        return _plan_grouped_split(n, cpg, s, num_groups, sm_count, programs, tile, warps)
    block_s = min(s_p2, max(1, (tile or TILE) // block_c))
    w = warps or (16 if block_s * block_c >= 16384 else 8 if block_s * block_c >= 4096 else 4)
    n_tiles = triton.cdiv(s, block_s)
    if path in ("fused", "loop"):  # "fused" with a forced tile size: the two-sweep single launch
        return GroupNormPlan(path, block_s=block_s, warps=w, tiles_per_chunk=n_tiles, **common)
    target = programs or 4 * sm_count
    per_chunk = max(1, triton.cdiv(n_tiles * n * n_cb, target))  # tiles per chunk
    max_p = max(1, 2048 // block_g)  # every normalize program merges [BLOCK_P, BLOCK_G] partials
    per_chunk = min(n_tiles, max(per_chunk, triton.cdiv(n_tiles, max_p)))
    chunks = triton.cdiv(n_tiles, per_chunk)
    return GroupNormPlan("split", block_s=block_s, warps=w, chunks=chunks, tiles_per_chunk=per_chunk, **common)


def _plan_grouped_split(
    n: int, cpg: int, s: int, groups: int, sm_count: int, programs: int | None, tile: int | None, warps: int | None
) -> GroupNormPlan:
    block_g = max(2, triton.next_power_of_2(groups))
    block_k = triton.next_power_of_2(cpg)
    row = block_g * block_k  # padded channels of one pixel row
    # default tile: >= 8 pixel rows and >= 4K values, at most 16K values
    rows_per_tile = (tile or min(16384, max(4096, 8 * row))) // row
    block_s = min(triton.next_power_of_2(s), max(1, rows_per_tile))
    n_tiles = triton.cdiv(s, block_s)
    per_chunk = max(1, triton.cdiv(n_tiles * n, programs or 2 * sm_count))
    max_p = max(1, 8192 // block_g)  # every normalize program merges [BLOCK_P, BLOCK_G] partials
    per_chunk = min(n_tiles, max(per_chunk, triton.cdiv(n_tiles, max_p)))
    chunks = triton.cdiv(n_tiles, per_chunk)
    w = warps or (16 if block_s * row >= 16384 else 8 if block_s * row >= 4096 else 4)
    w = max(w, min(16, triton.next_power_of_2(triton.cdiv(triton.next_power_of_2(chunks) * block_g, 32 * 32))))
    return GroupNormPlan(
        "split", gb=groups, block_c=row, block_g=block_g, block_s=block_s, n_cb=1, warps=w, chunks=chunks,
        tiles_per_chunk=per_chunk, block_k=block_k,
    )  # fmt: skip


def plan_for(n: int, c: int, s: int, groups: int, cl: bool, itemsize: int, device: torch.device) -> GroupNormPlan:
    """The plan ``group_norm(path="auto")`` runs: the measured :data:`TUNED` entry on CUDA, else the heuristic."""
    tuned = TUNED.get((n, c, s, groups, cl, itemsize)) if device.type == "cuda" else None
    knobs = dict(tuned) if tuned else {}
    path = str(knobs.pop("path", "auto"))
    return plan_group_norm(n, c, s, groups, cl, itemsize, _sm_count(device), path, **knobs)  # type: ignore[arg-type]


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
    """
    if x.dim() < 2:
        raise ValueError(f"group_norm expects x [N, C, *spatial], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"group_norm supports fp32/fp16/bf16, got {x.dtype}")
    N, C = x.shape[:2]
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the channel count C={C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (C,) or t.device != x.device):
            raise ValueError(f"{name} must be a [{C}] tensor on {x.device}, got {tuple(t.shape)} on {t.device}")
    a, a_sn = _add_rows(add, N, C, x.device) if add is not None else (x, 0)
    unknown = set(knobs) - {"programs", "tile", "warps", "gb", "grouped"}
    if unknown:
        raise TypeError(f"group_norm got unexpected keyword arguments {sorted(unknown)}")
    x, sn, sc, ss = _ncs_strides(x)
    shared = getattr(x, GN_STATS_ATTR, None)  # partials from the producing add (kernels/add_gn_stats.py)
    if isinstance(shared, TileStats) and add is None:  # a conv epilogue's tile partials (kernels/gn_tile_stats.py)
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
    if x.numel() == 0:
        return out
    if C * S >= 2**31:
        raise ValueError(f"one sample has {C * S} elements; the kernels index a sample with int32")
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    cpg = C // num_groups
    aff = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None, SILU=bool(silu))
    if plan.rows is not None and plan.one_tile:
        _gn_rows_kernel[(num_groups, N)](
            x, out, w, b, a, C, S, cpg, eps, a_sn, **aff, RA=plan.rows[0], RB=plan.rows[1], BLOCK_S=plan.block_s,
            num_warps=plan.warps,
        )  # fmt: skip
        return out
    part = shared.take(x, num_groups, plan) if shared is not None and add is None else None
    if plan.path != "split":
        flags = dict(GB=plan.gb, BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, BLOCK_S=plan.block_s)
        _gn_fused_kernel[(plan.n_cb, N)](
            x, out, w, b, a, C, S, sn, sc, ss, plan.tiles_per_chunk, eps, cpg, a_sn, ONE_TILE=plan.one_tile,
            **flags, **aff, num_warps=plan.warps,
        )  # fmt: skip
        return out
    if part is None:
        part = split_partials(x, num_groups, plan, add=a if add is not None else None, add_sn=a_sn)
    P, per_chunk = plan.chunks, plan.tiles_per_chunk
    chunk = per_chunk * plan.block_s
    if plan.grouped:
        _gn_rows_cl_norm_kernel[(P, N)](
            x, out, w, b, a, part, C, S, num_groups, P, chunk, per_chunk, eps, a_sn, **aff, CPG=cpg,
            BLOCK_S=plan.block_s, BLOCK_G=plan.block_g, BLOCK_K=plan.block_k, BLOCK_P=triton.next_power_of_2(P),
            num_warps=plan.warps,
        )  # fmt: skip
        return out
    _gn_norm_kernel[(plan.n_cb, P, N)](
        x, out, w, b, a, part, C, S, sn, sc, ss, plan.n_cb, P, chunk, per_chunk, eps, cpg, a_sn, GB=plan.gb,
        BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, BLOCK_S=plan.block_s, **aff, BLOCK_P=triton.next_power_of_2(P),
        num_warps=plan.warps,
    )  # fmt: skip
    return out


def split_partials(
    x: torch.Tensor, num_groups: int, plan: GroupNormPlan, add: torch.Tensor | None = None, add_sn: int = 0
) -> torch.Tensor:
    """A split plan's statistics launch over a dense x [N, C, *spatial]: per-chunk (mean, M2) partials
    [2, N·n_cb, P, BLOCK_G] (grouped plans: one block of every group) of x + add[n, c] (``add``: rows of C
    values, ``add_sn`` apart; see :func:`_add_rows`)."""
    x, sn, sc, ss = _ncs_strides(x)
    N, C = x.shape[:2]
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
            num_warps=plan.warps,
        )  # fmt: skip
        return part
    _gn_stats_kernel[(plan.n_cb, P, N)](
        x, a, part, x, x, x, C, S, sn, sc, ss, plan.n_cb, P, chunk, per_chunk, C // num_groups, add_sn,
        GB=plan.gb, BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, BLOCK_S=plan.block_s, HAS_ADD=add is not None,
        **NO_PRODUCE, num_warps=plan.warps,
    )  # fmt: skip
    return part
