"""Fused GroupNorm (+SiLU) in Triton, and its plain-torch reference.

The input is seen as ``[N, C, S]`` (S = product of the spatial dims) through its strides, so one set of
kernels serves NCHW (``S`` contiguous) and channels_last (``C`` contiguous). A program owns a *group
block*: ``GB`` whole groups = ``GB·CPG`` adjacent channels (``GB = 1`` for NCHW; for channels_last
several groups so that each row read is >= 64 contiguous bytes) and walks ``[BLOCK_S, BLOCK_C]`` tiles.

Statistics: per tile and channel a two-pass mean / M2 from registers, merged into running per-channel
(count, mean, M2) with Chan's parallel formula, then channels -> groups the same way. Never
``E[x²] − E[x]²``. fp32 throughout.

Three paths, picked by :func:`group_norm` (``path="auto"``):
  * ``fused``: the whole group block fits one register tile (``BLOCK_C·BLOCK_S <= 32768``, half
    that when GB > 1): ONE launch, x read once, every load in flight at once. (UNet 32² NCHW, 16² and 8² shapes.)
  * ``loop``: ONE launch, one program per group block, two sweeps (the second re-reads from L2).
    Only when there are >= 2 such programs per SM (large batches).
  * ``split``: big groups with few group blocks (UNet 64²/32², every VAE shape): a statistics kernel
    with ~4 programs per SM writes partial (mean, M2) per (group, chunk); a normalize kernel merges its
    group's partials and writes its chunk. Two launches; chunks are visited in reverse so the normalize
    sweep starts on the data the statistics sweep left in L2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

PATHS = ("auto", "fused", "loop", "split")
MAX_ONE_TILE = 32768  # padded elements of a group block that one program holds in registers (16 warps: ~100 regs)
TILE = 4096  # elements per tile in the streaming (loop / split) kernels


def group_norm_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """torch's GroupNorm, then SiLU when asked: the unfused baseline."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


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
def _onehot(BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, CPG: tl.constexpr, GB: tl.constexpr, mask_c):
    # [BC, BG]: local channel c belongs to local group j (and is a real channel)
    cl = tl.arange(0, BLOCK_C)
    gj = tl.arange(0, BLOCK_G)
    return ((cl // CPG)[:, None] == gj[None, :]) & (mask_c & (cl < GB * CPG))[:, None]


@triton.jit
def _channels_to_groups(mean_c, m2_c, n_c, onehot, CPG: tl.constexpr):
    # every channel has n_c samples: mean_g = mean over the group's channels of mean_c;
    # M2_g = Σ_c M2_c + n_c·(mean_c − mean_g)²
    mean_g = tl.sum(tl.where(onehot, mean_c[:, None], 0.0), axis=0) / CPG
    d = mean_c - _groups_to_channels(mean_g, onehot)
    m2_g = tl.sum(tl.where(onehot, (m2_c + n_c * d * d)[:, None], 0.0), axis=0)
    return mean_g, m2_g


@triton.jit
def _groups_to_channels(v_g, onehot):
    return tl.sum(tl.where(onehot, v_g[None, :], 0.0), axis=1)


@triton.jit
def _scale_shift(mean_g, m2_g, count_g, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    # y = (x − mean)·rstd·w + b = x·scale + shift, scale = rstd·w, shift = b − mean·scale
    rstd_g = 1.0 / tl.sqrt(m2_g / count_g + eps)
    scale = _groups_to_channels(rstd_g, onehot)
    mean = _groups_to_channels(mean_g, onehot)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=mask_c, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift = shift + tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _apply(x, scale, shift, SILU: tl.constexpr):
    # y = x·scale + shift;  SiLU: y·σ(y) = y / (1 + e^(−y))
    y = x * scale[None, :] + shift[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


# ---- kernels -------------------------------------------------------------------------------------


# One program per (group block cb, sample n). ONE_TILE: the block [S, GB·CPG] is one register tile:
#   load once; per-channel mean/M2 (two-pass in registers); merge to groups; y = x·scale + shift (+SiLU).
# Otherwise sweep 1 accumulates per-channel (count, mean, M2) tile by tile (Chan merge), sweep 2 writes.
@triton.jit
def _gn_fused_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr,
    C, S, sn, sc, ss, n_iter, eps,
    CPG: tl.constexpr, GB: tl.constexpr, ONE_TILE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
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
        x = tl.load(xb + offs, mask=mask, other=0.0).to(tl.float32)
        mean_c, m2_c = _tile_stats(x, mask_s, S * 1.0)
        mean_g, m2_g = _channels_to_groups(mean_c, m2_c, S * 1.0, onehot, CPG)
        scale, shift = _scale_shift(mean_g, m2_g, count_g, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)
        tl.store(yb + offs, _apply(x, scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        n_c = 0.0
        mean_c = tl.zeros([BLOCK_C], tl.float32)
        m2_c = tl.zeros([BLOCK_C], tl.float32)
        for i in range(0, n_iter):
            s = i * BLOCK_S + rs
            mask_s = s < S
            x = tl.load(xb + s[:, None] * ss + col[None, :], mask=mask_s[:, None] & mask_c[None, :], other=0.0)
            ns = tl.minimum(S - i * BLOCK_S, BLOCK_S) * 1.0
            t_mean, t_m2 = _tile_stats(x.to(tl.float32), mask_s, ns)
            n_c, mean_c, m2_c = _merge(n_c, mean_c, m2_c, ns, t_mean, t_m2)
        mean_g, m2_g = _channels_to_groups(mean_c, m2_c, n_c, onehot, CPG)
        scale, shift = _scale_shift(mean_g, m2_g, count_g, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)
        for i in range(0, n_iter):
            s = i * BLOCK_S + rs
            mask = (s < S)[:, None] & mask_c[None, :]
            offs = s[:, None] * ss + col[None, :]
            x = tl.load(xb + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(yb + offs, _apply(x, scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)


# Split path, launch 1 of 2. Program (cb, p, n) covers positions [p·chunk, min(S, (p+1)·chunk)):
#   per-channel (count, mean, M2) over its tiles (Chan merge), then to groups; writes
#   part[0 | 1, n·n_cb + cb, p, j] = mean_j | M2_j for the GB groups j of the block.
@triton.jit
def _gn_stats_kernel(
    x_ptr, part_ptr,
    C, S, sn, sc, ss, n_cb, P, chunk, n_iter,
    CPG: tl.constexpr, GB: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    cb = tl.program_id(0)
    p = tl.program_id(1)
    n = tl.program_id(2)
    cl = tl.arange(0, BLOCK_C)
    c = cb * (GB * CPG) + cl
    mask_c = (cl < GB * CPG) & (c < C)
    rs = tl.arange(0, BLOCK_S)
    xb = x_ptr + n.to(tl.int64) * sn
    col = c * sc
    s0 = p * chunk
    end = tl.minimum(S, s0 + chunk)
    n_c = 0.0
    mean_c = tl.zeros([BLOCK_C], tl.float32)
    m2_c = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask_s = s < end
        x = tl.load(xb + s[:, None] * ss + col[None, :], mask=mask_s[:, None] & mask_c[None, :], other=0.0)
        ns = tl.maximum(tl.minimum(end - (s0 + i * BLOCK_S), BLOCK_S), 0) * 1.0
        t_mean, t_m2 = _tile_stats(x.to(tl.float32), mask_s, ns)
        n_c, mean_c, m2_c = _merge(n_c, mean_c, m2_c, ns, t_mean, t_m2)
    onehot = _onehot(BLOCK_C, BLOCK_G, CPG, GB, mask_c)
    mean_g, m2_g = _channels_to_groups(mean_c, m2_c, n_c, onehot, CPG)
    gj = tl.arange(0, BLOCK_G)
    half = n_cb * tl.num_programs(2) * P * BLOCK_G
    dst = part_ptr + ((n * n_cb + cb) * P + p) * BLOCK_G + gj
    tl.store(dst, mean_g)
    tl.store(dst + half, m2_g)


# Split path, launch 2 of 2. Program (cb, p, n) (visited in reverse order) merges the P partials of
# its groups, with chunk counts n_q = (min(S, (q+1)·chunk) − q·chunk)·CPG:
#   mean = Σ_q n_q·mean_q / (S·CPG);  M2 = Σ_q M2_q + n_q·(mean_q − mean)²
# then writes y = x·scale + shift (+SiLU) over its chunk.
@triton.jit
def _gn_norm_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, part_ptr,
    C, S, sn, sc, ss, n_cb, P, chunk, n_iter, eps,
    CPG: tl.constexpr, GB: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    cb = n_cb - 1 - tl.program_id(0)
    p = P - 1 - tl.program_id(1)
    n = tl.num_programs(2) - 1 - tl.program_id(2)
    cl = tl.arange(0, BLOCK_C)
    c = cb * (GB * CPG) + cl
    mask_c = (cl < GB * CPG) & (c < C)

    q = tl.arange(0, BLOCK_P)
    gj = tl.arange(0, BLOCK_G)
    mask_q = q < P
    n_q = tl.where(mask_q, tl.minimum(S, (q + 1) * chunk) - q * chunk, 0) * 1.0  # positions per chunk
    half = n_cb * tl.num_programs(2) * P * BLOCK_G
    src = part_ptr + (n * n_cb + cb) * P * BLOCK_G + q[:, None] * BLOCK_G + gj[None, :]
    mean_q = tl.load(src, mask=mask_q[:, None], other=0.0)
    m2_q = tl.load(src + half, mask=mask_q[:, None], other=0.0)
    mean_g = tl.sum(n_q[:, None] * mean_q, axis=0) / S
    d = mean_q - mean_g[None, :]
    m2_g = tl.sum(m2_q + (n_q * CPG)[:, None] * d * d, axis=0)
    onehot = _onehot(BLOCK_C, BLOCK_G, CPG, GB, mask_c)
    scale, shift = _scale_shift(mean_g, m2_g, S * CPG * 1.0, eps, onehot, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)

    rs = tl.arange(0, BLOCK_S)
    off_n = n.to(tl.int64) * sn
    col = c * sc
    s0 = p * chunk
    end = tl.minimum(S, s0 + chunk)
    for i in range(0, n_iter):
        s = s0 + i * BLOCK_S + rs
        mask = (s < end)[:, None] & mask_c[None, :]
        offs = off_n + s[:, None] * ss + col[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, _apply(x, scale, shift, SILU).to(y_ptr.dtype.element_ty), mask=mask)


# ---- launcher ------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # CPU interpreter: keep grids small


def _ncs_strides(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x (made dense if needed) and its strides (sn, sc, ss) as a [N, C, S] view."""
    c, s = x.shape[1], math.prod(x.shape[2:])
    if x.is_contiguous():
        return x, c * s, s, 1
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if cl is not None and x.is_contiguous(memory_format=cl):
        return x, s * c, 1, c
    return x.contiguous(), c * s, s, 1


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

    @property
    def launches(self) -> int:
        return 2 if self.path == "split" else 1


@functools.lru_cache(maxsize=1024)
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
) -> GroupNormPlan:
    """Pick the path and block sizes for x [n, c, s] (s = spatial size). See the module doc."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    cpg = c // num_groups
    gb, block_c = _channel_block(cpg, num_groups, channels_last and s > 1, itemsize)
    block_g = max(2, triton.next_power_of_2(gb))
    n_cb = triton.cdiv(num_groups, gb)
    s_p2 = triton.next_power_of_2(s)
    common = dict(gb=gb, block_c=block_c, block_g=block_g, n_cb=n_cb)
    fits = block_c * s_p2 <= (MAX_ONE_TILE if gb == 1 else MAX_ONE_TILE // 2)  # several groups: more live values
    if path == "auto":
        path = "fused" if fits else "loop" if n * n_cb >= 2 * sm_count else "split"
    if path == "fused" and tile is None:
        if not fits:
            raise ValueError(f"path='fused': the group block ({block_c}·{s_p2} padded) does not fit one register tile")
        warps = 16 if block_c * s_p2 > 8192 else 8 if block_c * s_p2 > 2048 else 4
        return GroupNormPlan("fused", block_s=s_p2, warps=warps, one_tile=True, **common)
    block_s = min(s_p2, max(1, (tile or TILE) // block_c))
    warps = 8 if block_s * block_c >= 4096 else 4
    n_tiles = triton.cdiv(s, block_s)
    if path in ("fused", "loop"):  # "fused" with a forced tile size: the two-sweep single launch
        return GroupNormPlan(path, block_s=block_s, warps=warps, tiles_per_chunk=n_tiles, **common)
    target = programs or 4 * sm_count
    per_chunk = max(1, triton.cdiv(n_tiles * n * n_cb, target))  # tiles per chunk
    max_p = max(1, 8192 // block_g)  # the merge holds [BLOCK_P, BLOCK_G] partials in registers
    per_chunk = min(n_tiles, max(per_chunk, triton.cdiv(n_tiles, max_p)))
    chunks = triton.cdiv(n_tiles, per_chunk)
    return GroupNormPlan("split", block_s=block_s, warps=warps, chunks=chunks, tiles_per_chunk=per_chunk, **common)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
    *,
    out: torch.Tensor | None = None,
    path: str = "auto",
    programs: int | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """GroupNorm over x [N, C, *spatial] (+ SiLU), same shape, dtype and memory format as x.

    ``out``: write here (same shape, dtype, device and strides as x). ``path``: "auto" (see the module
    doc and :func:`plan_group_norm`), or force "fused" / "loop" / "split". ``programs``: target program
    count of the split path (default 4 per SM); ``tile``: elements per streaming tile (default 4096).
    The last two exist so the tests can reach multi-chunk, multi-tile cases on small shapes.
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
    x, sn, sc, ss = _ncs_strides(x)
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride() != x.stride():
        raise ValueError("out must match x in shape, dtype, device and strides")
    S = math.prod(x.shape[2:])
    plan = plan_group_norm(
        N, C, max(S, 1), num_groups, sc == 1 and ss != 1, x.element_size(), _sm_count(x.device), path, programs, tile
    )
    if x.numel() == 0:
        return out
    if C * S >= 2**31:
        raise ValueError(f"one sample has {C * S} elements; the kernels index a sample with int32")
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    flags = dict(CPG=C // num_groups, GB=plan.gb, BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, BLOCK_S=plan.block_s)
    aff = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu))
    if plan.path != "split":
        _gn_fused_kernel[(plan.n_cb, N)](
            x, out, w, b, C, S, sn, sc, ss, plan.tiles_per_chunk, eps, ONE_TILE=plan.one_tile, **flags, **aff,
            num_warps=plan.warps,
        )  # fmt: skip
        return out
    P, per_chunk = plan.chunks, plan.tiles_per_chunk
    chunk = per_chunk * plan.block_s
    part = torch.empty((2, N * plan.n_cb, P, plan.block_g), device=x.device, dtype=torch.float32)
    grid = (plan.n_cb, P, N)
    _gn_stats_kernel[grid](x, part, C, S, sn, sc, ss, plan.n_cb, P, chunk, per_chunk, **flags, num_warps=plan.warps)
    _gn_norm_kernel[grid](
        x, out, w, b, part, C, S, sn, sc, ss, plan.n_cb, P, chunk, per_chunk, eps, **flags, **aff,
        BLOCK_P=triton.next_power_of_2(P), num_warps=plan.warps,
    )  # fmt: skip
    return out
