"""Cross-attention over a short context (Nk ≤ 128 keys: SD's 77 text tokens) in one Triton pass.

All keys of a head fit one tile, so the softmax needs no running max or rescaling (FlashAttention's
online loop): each program loads K_h and V_h of one (batch, head) once, then streams M_GROUP blocks of
BLOCK_M query rows through them (S = q Kᵀ, exact softmax, P V, one store), for H_GROUP heads in turn.
The work is memory-bound at SD's shapes (q and out are 5.2 MB each at 4096 tokens and CFG batch 2; K and
V 99 KB each), so the kernel's job is to touch q and out once and waste little tensor-core and exp work
on padding:

* keys in two power-of-two chunks N0 + N1 (77 -> 64 + 16, masked to 77) instead of one 128-wide tile:
  the QKᵀ and PV products and the exp2 run on 80 columns, not 128;
* the head dim in chunks D0 + D1 as in flash_attention.split_head_dim (d=40 -> 64, d=80 -> 64 + 16,
  d=160 -> 128 + 64; 32-wide chunks only with ``CrossConfig.chunk32``, see that module's docstring);
* q, k, v and out are read through their strides (the model's head-split views of [B, N, H·D] and
  of the fused cross-K/V GEMM output, no copies); a head-split q gets its output as a view of a
  contiguous [B, Nq, H·D], so the caller's ``transpose(1, 2).flatten(2)`` is free.

Larger contexts, head dims > MAX_HEAD_DIM or tensors no Triton kernel can run on are routed to
flash_attention by :func:`cross_attention` (:func:`cross_attention_supported` says which).

Measured on an H200 (CUDA-graph replay; TUNED_CONFIGS from bench/results/cross_attention_sweep_h200.md, times
from kernels_attention_h200_a76e3b4.md): 8.0 µs vs flash 12.2 and SDPA 13.9 at 4096x77 d40, 4.7 vs 5.4 / 8.0
at 1024x77 d80, 4.7 vs 5.5 / 8.4 at 256x77 d160; the auto-attention table picks it there and for the 8x8
self-attention (64 keys: 4.4 µs, flash 4.4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from speedsd.kernels.device import compile_ahead, sm_count
from speedsd.kernels.flash_attention import flash_attention, split_head_dim
from speedsd.kernels.softmax_attention import (
    LOG2E,
    alloc_out,
    attention_ref,
    check_qkv,
    dot_precision,
    interpreted,
    needs_int64,
    stride_align,
)

MAX_KEYS = 128  # every key of a head in one tile
# fp32 accumulators [BLOCK_M, D0 + D1] + scores [BLOCK_M, N0 + N1] in registers: up to d=160 (128 + 64) ptxas
# fits the heuristic's tiles without spills (tests/kernels/test_cross_attention_aot.py)
MAX_HEAD_DIM = 160


@dataclass(frozen=True)
class CrossConfig:
    block_m: int  # query rows per tile
    num_warps: int
    m_group: int = 1  # query tiles per program (K_h, V_h loaded once for all of them)
    h_group: int = 1  # heads per program, in turn (must divide H)
    num_stages: int = 2  # software pipelining of the query-tile loop
    split_d: bool = True  # head dim as D0 + D1 (two dots) instead of padding to next_pow2(D)
    chunk32: bool = False  # allow 32-wide head-dim chunks (see flash_attention's docstring)


INTERPRETER_CONFIG = CrossConfig(16, 4, m_group=2, h_group=2, num_stages=1)  # small tiles: loops and tails
# Exact (Nq, Nk, D) overrides measured on the GPU (``python -m speedsd.bench.cross_attention_sweep``).
TUNED_CONFIGS: dict[tuple[int, int, int], CrossConfig] = {
    (4096, 77, 40): CrossConfig(
        block_m=64, num_warps=4, m_group=2, h_group=1, num_stages=2, split_d=True, chunk32=False
    ),
    (1024, 77, 80): CrossConfig(
        block_m=128, num_warps=8, m_group=1, h_group=1, num_stages=1, split_d=True, chunk32=False
    ),
    (256, 77, 160): CrossConfig(
        block_m=64, num_warps=4, m_group=1, h_group=1, num_stages=1, split_d=True, chunk32=False
    ),
}


def split_keys(nk: int) -> tuple[int, int]:
    """(N0, N1): power-of-two key chunks (each ≥ 16) covering nk ≤ MAX_KEYS; N1 == 0 for one chunk.
    77 -> (64, 16), 7 -> (16, 0), 100 -> (128, 0): a second chunk only where it saves columns."""
    full = max(16, triton.next_power_of_2(nk))
    if full == nk or full <= 16:
        return full, 0
    n0 = full // 2
    n1 = max(16, triton.next_power_of_2(nk - n0))
    return (full, 0) if n0 + n1 == full else (n0, n1)


def cross_attention_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`cross_attention` runs its own kernel (else it calls flash_attention): 4-d q/k,
    1 ≤ Nk ≤ MAX_KEYS, D ≤ MAX_HEAD_DIM, fp16/bf16/fp32, on CUDA or under TRITON_INTERPRET=1."""
    if q.dim() != 4 or k.dim() != 4:
        return False
    return (
        1 <= k.shape[2] <= MAX_KEYS
        and 0 < q.shape[3] <= MAX_HEAD_DIM
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and (q.is_cuda or interpreted(q.device))
    )


def heuristic_config(B: int, H: int, Nq: int, D: int, dtype: torch.dtype, sms: int) -> CrossConfig:
    """The GPU launch heuristic: 128-row tiles for heads padded to ≤ 64 (64 rows for wider heads), halved
    while the tiles cannot cover the GPU once; then 2 or 4 tiles per program while at least two programs
    per SM remain; 8 warps for 128-row tiles and heads padded past 128. fp32 (FMA dots, whole K/V tiles
    in registers): 16-row tiles and 8 warps, the only tiling ptxas fits without spills up to d=160."""
    if dtype == torch.float32:
        return CrossConfig(16, 8)
    d0, d1 = split_head_dim(D)
    bm = 128 if d0 + d1 <= 64 else 64
    while bm > 32 and triton.cdiv(Nq, bm) * B * H < sms:
        bm //= 2
    tiles = triton.cdiv(Nq, bm)
    mg = 1
    while mg < 4 and tiles % (2 * mg) == 0 and (tiles // (2 * mg)) * B * H >= 2 * sms:
        mg *= 2
    warps = 8 if bm == 128 or d0 + d1 > 128 else 4
    return CrossConfig(bm, warps, m_group=mg)


def cross_config(q: torch.Tensor, nk: int) -> CrossConfig:
    """The config a launch uses: the interpreter's, a measured TUNED_CONFIGS entry, else the heuristic;
    h_group falls back to 1 where it does not divide the heads."""
    B, H, Nq, D = q.shape
    if interpreted(q.device):
        cfg = INTERPRETER_CONFIG
    elif (Nq, nk, D) in TUNED_CONFIGS:
        cfg = TUNED_CONFIGS[(Nq, nk, D)]
    else:
        cfg = heuristic_config(B, H, Nq, D, q.dtype, sm_count(q.device))
    return cfg if H % cfg.h_group == 0 else dataclasses.replace(cfg, h_group=1)


@triton.jit
def _tile(base, rows, rmask, cols, cmask, s_row, s_col, ALIGN: tl.constexpr):
    # the [rows, cols] tile at base + (rows·s_row)·ALIGN + cols·s_col, zero outside the masks
    ptrs = base + (rows[:, None] * s_row) * ALIGN + cols[None, :] * s_col
    return tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)


# One program per (query-tile group pm, batch b · head group g); c = scale·log2(e). For each head h of
# the group, K_h and V_h [Nk, D] are loaded once (keys [0, N0) and [N0, N0 + N1), head dim [0, D0) and
# [D0, D0 + D1), zero past Nk and D); then for each query tile r = pm·M_GROUP + i (rows ≥ Nq masked):
#   S = Q_r K_hᵀ  (fp32, up to four dots),   S = −inf on keys ≥ Nk
#   m = max_n S,   P = 2^((S − m)·c),   l = Σ_n P            (exact: every key is in S)
#   O_r = (P V_h) / l                                         (P rounded to the input dtype for the dot)
# The max is subtracted in raw score units, then scaled: s − m is exact near the max. Row offsets are
# int64 when OFF64 (a [B·H] slice spans ≥ 2^31 elements); batch and head offsets always are.
@triton.jit
def _cross_attn_kernel(
    Q, K, V, O,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, Nq, Nk, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr,
    EVEN_N: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, M_GROUP: tl.constexpr,
    H_GROUP: tl.constexpr, OFF64: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    groups = H // H_GROUP
    b = (pid_bg // groups).to(tl.int64)
    h0 = (pid_bg % groups) * H_GROUP
    offs_d0 = tl.arange(0, D0)
    dmask0 = offs_d0 < HEAD_DIM
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        dmask1 = offs_d1 < HEAD_DIM
    offs_n0 = tl.arange(0, N0)
    nmask0 = offs_n0 < Nk
    if N1 > 0:
        offs_n1 = N0 + tl.arange(0, N1)
        nmask1 = offs_n1 < Nk
    out_ty = O.dtype.element_ty

    for hi in range(H_GROUP):
        h = (h0 + hi).to(tl.int64)
        k_base = K + (b * skb + h * skh) * ALIGN
        v_base = V + (b * svb + h * svh) * ALIGN
        # K_h, V_h tiles [keys, head dim], loaded once per head
        k00 = _tile(k_base, offs_n0, nmask0, offs_d0, dmask0, skn, skd, ALIGN)
        v00 = _tile(v_base, offs_n0, nmask0, offs_d0, dmask0, svn, svd, ALIGN)
        if D1 > 0:
            k01 = _tile(k_base, offs_n0, nmask0, offs_d1, dmask1, skn, skd, ALIGN)
            v01 = _tile(v_base, offs_n0, nmask0, offs_d1, dmask1, svn, svd, ALIGN)
        if N1 > 0:
            k10 = _tile(k_base, offs_n1, nmask1, offs_d0, dmask0, skn, skd, ALIGN)
            v10 = _tile(v_base, offs_n1, nmask1, offs_d0, dmask0, svn, svd, ALIGN)
            if D1 > 0:
                k11 = _tile(k_base, offs_n1, nmask1, offs_d1, dmask1, skn, skd, ALIGN)
                v11 = _tile(v_base, offs_n1, nmask1, offs_d1, dmask1, svn, svd, ALIGN)
        q_base = Q + (b * sqb + h * sqh) * ALIGN
        o_base = O + (b * sob + h * soh) * ALIGN

        for mi in tl.range(0, M_GROUP, num_stages=STAGES):
            offs_m = (pid_m * M_GROUP + mi) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Nq
            if OFF64:
                offs_m = offs_m.to(tl.int64)
            q_rows = q_base + (offs_m[:, None] * sqm) * ALIGN  # [BM, 1]
            q0 = tl.load(q_rows + offs_d0[None, :] * sqd, mask=mask_m[:, None] & dmask0[None, :], other=0.0)
            s0 = tl.dot(q0, tl.trans(k00), input_precision=PREC)  # [BM, N0]
            if D1 > 0:
                q1 = tl.load(q_rows + offs_d1[None, :] * sqd, mask=mask_m[:, None] & dmask1[None, :], other=0.0)
                s0 = tl.dot(q1, tl.trans(k01), s0, input_precision=PREC)
            if N1 > 0:
                s1 = tl.dot(q0, tl.trans(k10), input_precision=PREC)  # [BM, N1]
                if D1 > 0:
                    s1 = tl.dot(q1, tl.trans(k11), s1, input_precision=PREC)
                if not EVEN_N:
                    s1 = tl.where(nmask1[None, :], s1, float("-inf"))
                m = tl.maximum(tl.max(s0, 1), tl.max(s1, 1))
            else:
                if not EVEN_N:
                    s0 = tl.where(nmask0[None, :], s0, float("-inf"))
                m = tl.max(s0, 1)
            p0 = tl.math.exp2((s0 - m[:, None]) * qk_scale)
            l_i = tl.sum(p0, 1)
            p0 = p0.to(v00.dtype)
            acc0 = tl.dot(p0, v00, input_precision=PREC)  # [BM, D0]
            if D1 > 0:
                acc1 = tl.dot(p0, v01, input_precision=PREC)  # [BM, D1]
            if N1 > 0:
                p1 = tl.math.exp2((s1 - m[:, None]) * qk_scale)
                l_i += tl.sum(p1, 1)
                p1 = p1.to(v10.dtype)
                acc0 = tl.dot(p1, v10, acc0, input_precision=PREC)
                if D1 > 0:
                    acc1 = tl.dot(p1, v11, acc1, input_precision=PREC)
            inv_l = 1.0 / l_i
            o_rows = o_base + (offs_m[:, None] * som) * ALIGN
            tl.store(o_rows + offs_d0[None, :] * sod, (acc0 * inv_l[:, None]).to(out_ty),
                     mask=mask_m[:, None] & dmask0[None, :])  # fmt: skip
            if D1 > 0:
                tl.store(o_rows + offs_d1[None, :] * sod, (acc1 * inv_l[:, None]).to(out_ty),
                         mask=mask_m[:, None] & dmask1[None, :])  # fmt: skip


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: CrossConfig | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ·scale) v for q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D] in q's dtype.

    Any strides (no copies); the output is laid out like q (a head-split q gets a view of a contiguous
    [B, Nq, H·D]) unless ``out`` is given. Problems :func:`cross_attention_supported` rejects go to
    flash_attention. ``config`` overrides the launch heuristic (bench sweeps); its h_group must divide H.
    Raises ValueError (TypeError for dtypes) on input no attention could take."""
    scale = check_qkv(q, k, v, scale)
    if not cross_attention_supported(q, k):
        return flash_attention(q, k, v, scale=scale, out=out)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = alloc_out(q, out)
    if out.numel() == 0:
        return out
    cfg = config or cross_config(q, Nk)
    if H % cfg.h_group:
        raise ValueError(f"h_group {cfg.h_group} does not divide the {H} heads")
    d0, d1 = split_head_dim(D, cfg.split_d, cfg.chunk32)
    n0, n1 = split_keys(Nk)
    align = stride_align(q.element_size(), q, k, v, out)
    rows = cfg.block_m * cfg.m_group
    grid = (triton.cdiv(Nq, rows), B * (H // cfg.h_group))
    _cross_attn_kernel[grid](
        q, k, v, out,
        *(x // align for x in q.stride()[:3]), q.stride(3),
        *(x // align for x in k.stride()[:3]), k.stride(3),
        *(x // align for x in v.stride()[:3]), v.stride(3),
        *(x // align for x in out.stride()[:3]), out.stride(3),
        H, Nq, Nk, scale * LOG2E,
        HEAD_DIM=D, D0=d0, D1=d1, N0=n0, N1=n1, EVEN_N=Nk == n0 + n1, ALIGN=align,
        BLOCK_M=cfg.block_m, M_GROUP=cfg.m_group, H_GROUP=cfg.h_group,
        OFF64=needs_int64(((q, Nq, rows), (out, Nq, rows), (k, Nk, n0 + n1), (v, Nk, n0 + n1))),
        PREC=dot_precision(q.dtype), STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


def cross_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain torch: materialized softmax(q kᵀ·scale) v in fp32 (fp64 stays fp64), result in q's dtype."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    return attention_ref(q.to(wide), k.to(wide), v.to(wide), scale).to(q.dtype)


def compile_sm90(D: int, nk: int, config: CrossConfig, dtype: torch.dtype = torch.float16, capability: int = 90):
    """Compile the kernel ahead of time for ``capability`` without a GPU (the tests' ptxas check; in a process
    without TRITON_INTERPRET=1), specialised as a launch on the model's layout is: unit head-dim strides,
    16-byte-aligned rows and 16-divisible batch strides. Returns Triton's CompiledKernel."""
    from triton.compiler import ASTSource

    fn = _cross_attn_kernel
    names = fn.arg_names
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    d0, d1 = split_head_dim(D, config.split_d, config.chunk32)
    n0, n1 = split_keys(nk)
    const = {name: 1 for name in ("sqd", "skd", "svd", "sod")}
    const.update(
        HEAD_DIM=D, D0=d0, D1=d1, N0=n0, N1=n1, EVEN_N=nk == n0 + n1, ALIGN=16 // dtype.itemsize,
        BLOCK_M=config.block_m, M_GROUP=config.m_group, H_GROUP=config.h_group, OFF64=False,
        PREC=dot_precision(dtype), STAGES=config.num_stages,
    )  # fmt: skip
    sig = {n: "constexpr" if n in const else f"*{ty}" if n in "QKVO" else "fp32" if n == "qk_scale" else "i32"
           for n in names}  # fmt: skip
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ("Q", "K", "V", "O", "sqb", "skb", "svb", "sob")}
    src = ASTSource(fn, sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return compile_ahead(src, capability, num_warps=config.num_warps, num_stages=config.num_stages)
