"""Attention with the paper's partially fused softmax, and the materialized-softmax reference.

softmax(Q Kᵀ·scale) V in two kernels, the paper's split (arXiv 2304.11267, sec. 3.3):

* kernel A (``_scores_kernel``) computes the score matrix once and writes it, and — because each
  program walks whole row segments — also produces each row segment's max and sum of exp on the
  fly (online softmax statistics), so S is never re-read to get them. The paper runs a separate
  row-reduction kernel that reads S again; fusing it saves one full read of S.
* kernel B (``_pv_kernel``) merges the statistics of the row segments, then computes
  O = (exp(S − m) / l) V tile by tile: it reads S once, forms exp(S − m) in registers, multiplies by V
  with fp32 accumulation and divides by l in the epilogue. P = softmax(S) never exists in memory.

Choices:

* S and the row statistics are in natural units; kernel B forms exp2((S − m)·log2(e)): S − m is
  exact near the max and only then scaled (scaling S first would round every logit to the ulp of
  S·log2(e), ~1e-5 relative error at logits ~300 in fp32). Storing S·log2(e) instead would save
  nothing and costs precision (a fp16 value 1.44x larger can land in the next binade).
* S is stored in fp16 for fp16 inputs (half the bytes of fp32: S traffic is this algorithm's whole
  cost, and torch's materialized fp16 attention rounds S to fp16 too), in fp32 otherwise (bf16's
  8-bit mantissa would cost ~4 % error on exp(S) at |S| ≈ 10; fp32 inputs want fp32). The row
  statistics are computed from the *rounded* stored values, so the exps kernel B recomputes sum to l.
* Row segments ("splits"): when B·H·⌈Nq/BLOCK_M⌉ programs cannot fill the GPU (the VAE's single
  head), kernel A also splits the columns and writes per-segment (m, l); kernel B merges them:
  m = maxⱼ mⱼ, l = Σⱼ lⱼ·2^((mⱼ − m)·log2(e)). Statistics are [B·H, splits, 2, Nq] fp32 (tiny).
* Kernel B tiles D (BLOCK_DV ≤ 128) so a 512-wide head (VAE) fits in registers; programs of one row
  block and different D blocks are adjacent in the grid so they share S through L2.

Peak extra memory: S (B·H·Nq·Nk·2 bytes for fp16) versus S, S·scale and P for the materialized path.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from speedsd.kernels.device import sm_count

LOG2E = 1.4426950408889634


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, upcast: bool = False
) -> torch.Tensor:
    """Materialized softmax: S = q kᵀ·scale, P = softmax(S), P v. q [B,H,Nq,D], k/v [B,H,Nk,D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if upcast:
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
        return torch.matmul(s.softmax(dim=-1).to(v.dtype), v)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    return torch.matmul(s.softmax(dim=-1), v)


# ---- launcher helpers shared with flash_attention.py -------------------------------------------


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> float:
    """Shape/dtype checks for q [B,H,Nq,D], k/v [B,H,Nk,D]; returns the softmax scale (> 0)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-d q/k/v [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q/k/v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[2] == 0:
        raise ValueError("attention over zero keys")
    if B * H > 65535:
        raise ValueError(f"B·H = {B * H} exceeds the CUDA grid limit of 65535 programs on that axis")
    scale = D**-0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return scale


def alloc_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Output [B, H, Nq, D] in q's dtype. A q that is a head-split view of [B, N, H·D] (stride over H
    smaller than over N) gets an output with the same layout, so the model's following
    ``.transpose(1, 2).flatten(2)`` is a free view — as F.scaled_dot_product_attention does."""
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype}"
            )
        return out
    B, H, N, D = q.shape
    if q.stride(1) < q.stride(2):
        return torch.empty(B, N, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)  # [B, N, H, D] -> [B, H, N, D]
    return torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)


def stride_align(elem_bytes: int, *tensors: torch.Tensor) -> int:
    """Largest power of two (≤ 16 bytes' worth of elements) dividing every non-last stride and the
    storage offset of every tensor. Kernels receive those strides divided by it and multiply back by
    the constexpr, which tells Triton's alignment analysis that rows start 16-byte aligned (e.g. a
    d=40 head split from [B, N, H·40]) so K/V/S tiles load with vector instructions."""
    cap = max(1, 16 // elem_bytes)
    g = 0
    for t in tensors:
        for s in t.stride()[:-1]:
            g = math.gcd(g, s)
        g = math.gcd(g, t.storage_offset())
    a = 1
    while a < cap and g % (2 * a) == 0:
        a *= 2
    return a


def needs_int64(views: tuple[tuple[torch.Tensor, int, int], ...]) -> bool:
    """True when a kernel's int32 row offsets could overflow: for each (t [B, H, N, D], rows, block),
    the largest in-slice offset (rows rounded up to the block, plus the head dim) is ≥ 2^31 elements.
    (Batch/head offsets are int64 in the kernels already.)"""
    for t, rows, block in views:
        span = (triton.cdiv(rows, block) * block) * abs(t.stride(2)) + t.shape[3] * abs(t.stride(3))
        if span >= 2**31:
            return True
    return False


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: true fp32 for fp32 inputs (not TF32's 10-bit mantissa); fp16/bf16 as is."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreted(device: torch.device) -> bool:
    return device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1"


# ---- kernel A: scores + per-segment row statistics ---------------------------------------------


# Per program (row block rm, column segment sp, batch·head bh):
#   for each column block n in the segment:
#     S[r, n] = round_to_S_dtype( Σ_d Q[r, d] K[n, d] · scale )      (fp32 accumulate)
#     (from the rounded value; c = log2(e))
#     m_new = max(m, maxₙ S);  l = l·2^((m − m_new)·c) + Σₙ 2^((S − m_new)·c);  m = m_new
#   stats[bh, sp, 0, r] = m (natural units),  stats[bh, sp, 1, r] = l
@triton.jit
def _scores_kernel(
    Q, K, S, STATS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    H, Nq, Nk, ld_s, cols_per_split, n_splits, scale,
    HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + (b * sqb + h * sqh) * ALIGN
    k_base = K + (b * skb + h * skh) * ALIGN
    s_base = S + pid_bh.to(tl.int64) * Nq * ld_s

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < Nq
    q_rows = q_base + (offs_m[:, None] * sqm) * ALIGN  # [BM, 1] row starts
    k_rows = k_base + (offs_n[:, None] * skn) * ALIGN  # [BN, 1] row starts of the first block
    s_ptrs = s_base + offs_m[:, None].to(tl.int64) * ld_s + offs_n[None, :]  # int64: Nq·ld_s can pass 2^31

    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, Nk)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HEAD_DIM <= BLOCK_K:  # one D chunk: Q stays in registers for the whole segment
        q = tl.load(q_rows + offs_k[None, :] * sqd, mask=mask_m[:, None] & (offs_k[None, :] < HEAD_DIM), other=0.0)
    for n0 in range(start, end, BLOCK_N):
        mask_n = (n0 + offs_n) < end
        if HEAD_DIM <= BLOCK_K:
            kt = tl.load(
                k_rows + n0 * skn * ALIGN + offs_k[None, :] * skd,
                mask=mask_n[:, None] & (offs_k[None, :] < HEAD_DIM),
                other=0.0,
            )
            acc = tl.dot(q, tl.trans(kt), input_precision=PREC)
        else:  # K-loop over D chunks (the VAE's 512-wide head)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for d0 in range(0, HEAD_DIM, BLOCK_K):
                mask_d = (d0 + offs_k[None, :]) < HEAD_DIM
                qc = tl.load(q_rows + (d0 + offs_k[None, :]) * sqd, mask=mask_m[:, None] & mask_d, other=0.0)
                kc = tl.load(
                    k_rows + n0 * skn * ALIGN + (d0 + offs_k[None, :]) * skd,
                    mask=mask_n[:, None] & mask_d,
                    other=0.0,
                )
                acc = tl.dot(qc, tl.trans(kc), acc, input_precision=PREC)
        s = (acc * scale).to(S.dtype.element_ty)
        # Columns in [Nk, ld_s) are row padding: storing them (as 0) keeps the store mask a multiple of
        # 16 wide, so it vectorizes; a block never straddles two segments (cols_per_split % BLOCK_N == 0).
        tl.store(s_ptrs + n0, s, mask=mask_m[:, None] & ((n0 + offs_n) < ld_s)[None, :])
        # stats in natural units: s − m is exact near the max, only then scaled by log2(e) (scaling s
        # first would round every logit to the ulp of s·log2(e): ~1e-5 relative error at logits ~300)
        s32 = tl.where(mask_n[None, :], s.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s32, 1))
        l_i = l_i * tl.math.exp2((m_i - m_new) * 1.4426950408889634) + tl.sum(
            tl.math.exp2((s32 - m_new[:, None]) * 1.4426950408889634), 1
        )
        m_i = m_new
    st = STATS + (pid_bh.to(tl.int64) * n_splits + pid_s) * 2 * Nq + offs_m
    tl.store(st, m_i, mask=mask_m)
    tl.store(st + Nq, l_i, mask=mask_m)


# ---- kernel B: O = (exp(S − m) / l) V ----------------------------------------------------------


# Per program (D block dd, row block rm, batch·head bh):
#   m = maxⱼ mⱼ;  l = Σⱼ lⱼ·2^((mⱼ − m)·c), c = log2(e)         (merge the column segments)
#   acc[r, d] = Σₙ 2^((S[r, n] − m[r])·c) · V[n, d]             (fp32; P is only ever a register tile)
#   O[r, d] = acc[r, d] / l[r]
@triton.jit
def _pv_kernel(
    S, STATS, V, O,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, Nq, Nk, ld_s, n_splits,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Nq
    mask_d = offs_d < HEAD_DIM

    st = STATS + pid_bh.to(tl.int64) * n_splits * 2 * Nq + offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for j in range(0, n_splits):
        m_i = tl.maximum(m_i, tl.load(st + j * 2 * Nq, mask=mask_m, other=0.0))
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j in range(0, n_splits):
        mj = tl.load(st + j * 2 * Nq, mask=mask_m, other=0.0)
        lj = tl.load(st + j * 2 * Nq + Nq, mask=mask_m, other=1.0)
        l_i += tl.where(mj > float("-inf"), lj * tl.math.exp2((mj - m_i) * 1.4426950408889634), 0.0)

    s_ptrs = S + pid_bh.to(tl.int64) * Nq * ld_s + offs_m[:, None].to(tl.int64) * ld_s + offs_n[None, :]
    v_ptrs = V + (b * svb + h * svh) * ALIGN + (offs_n[:, None] * svn) * ALIGN + offs_d[None, :] * svd
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        mask_n = (n0 + offs_n) < Nk
        # Load up to the 16-aligned row pitch (vectorizable mask), then drop the padding columns.
        s = tl.load(s_ptrs + n0, mask=mask_m[:, None] & ((n0 + offs_n) < ld_s)[None, :], other=float("-inf"))
        s = tl.where(mask_n[None, :], s.to(tl.float32), float("-inf"))
        p = tl.math.exp2((s - m_i[:, None]) * 1.4426950408889634)
        vt = tl.load(v_ptrs + n0 * svn * ALIGN, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision=PREC)
    out = acc / l_i[:, None]
    o_ptrs = O + (b * sob + h * soh) * ALIGN + (offs_m[:, None] * som) * ALIGN + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ---- launcher ----------------------------------------------------------------------------------


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of S: fp16 for fp16 inputs, fp32 for bf16/fp32 (see the module docstring)."""
    return torch.float16 if dtype == torch.float16 else torch.float32


def _scores_config(q: torch.Tensor, Nk: int, splits: int | None = None) -> dict[str, int]:
    """Kernel A's tiles and column-segment width ``cols``; ``splits`` asks for that many segments
    (tests: the multi-segment path on any device), else enough to cover the GPU about twice."""
    B, H, Nq, D = q.shape
    if interpreted(q.device) or q.dtype == torch.float32:  # (fp32 on GPU: FMA dots, small tiles)
        bm, bn, bk, warps, stages = 32, 32, min(64, max(16, triton.next_power_of_2(D))), 4, 1
    elif D <= 128:  # (≥ 64: no 32-wide fp16 wgmma operands, see flash_attention's docstring)
        bm, bn, bk, warps, stages = 128, 64, max(64, triton.next_power_of_2(D)), 8, 3
    else:  # GEMM-like K-loop over D
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    bn = min(bn, max(16, triton.next_power_of_2(Nk)))
    # Column segments so that the grid covers the GPU about twice (VAE: 1 head x 4096 rows).
    progs = B * H * triton.cdiv(Nq, bm)
    n_blocks = triton.cdiv(Nk, bn)
    want = splits if splits is not None else triton.cdiv(2 * sm_count(q.device), progs)
    want = max(1, min(n_blocks, want))
    cols = triton.cdiv(n_blocks, want) * bn
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, cols=cols)


def _pv_config(q: torch.Tensor, Nk: int) -> dict[str, int]:
    D = q.shape[-1]
    if interpreted(q.device) or q.dtype == torch.float32:
        bm, bn, warps, stages = 32, 32, 4, 1
        bd = min(64, max(16, triton.next_power_of_2(D)))
    else:
        bm, bn, warps, stages = 128, 64, 8, 3
        bd = min(128, max(64, triton.next_power_of_2(D)))
    bn = min(bn, max(16, triton.next_power_of_2(Nk)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=bd, num_warps=warps, num_stages=stages)


def partial_softmax_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float | None = None, splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel A alone: (S [B, H, Nq, ld ≥ Nk] with S = q kᵀ·scale, stats [B·H, splits, 2, Nq]).

    With t = S·log2(e), row r of segment j: stats[..., j, 0, r] = max of t over the segment,
    stats[..., j, 1, r] = Σ 2^(t − max).
    Columns ≥ Nk of S are row padding (pitch rounded up to 16 elements) with unspecified contents.
    ``splits`` forces about that many column segments (at most one per key block; default: by SM count)."""
    scale = check_qkv(q, k, k, scale)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    cfg = _scores_config(q, Nk, splits)
    ld_s = triton.cdiv(Nk, 16) * 16  # 16-element row pitch: aligned vector loads of S in kernel B
    s = torch.empty(B, H, Nq, ld_s, device=q.device, dtype=score_dtype(q.dtype))
    n_splits = triton.cdiv(Nk, cfg["cols"])
    stats = torch.empty(B * H, n_splits, 2, Nq, device=q.device, dtype=torch.float32)
    align = stride_align(q.element_size(), q, k)
    grid = (triton.cdiv(Nq, cfg["BLOCK_M"]), n_splits, B * H)
    _scores_kernel[grid](
        q, k, s, stats,
        *(x // align for x in q.stride()[:3]), q.stride(3),
        *(x // align for x in k.stride()[:3]), k.stride(3),
        H, Nq, Nk, ld_s, cfg["cols"], n_splits, scale,
        HEAD_DIM=D, BLOCK_K=cfg["BLOCK_K"], ALIGN=align,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return s, stats


def attention_partial_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ·scale) v with the paper's partially fused softmax; q [B,H,Nq,D], k/v [B,H,Nk,D].

    Any strides (e.g. heads split from [B, N, H·D] by ``.unflatten(-1, (H, D)).transpose(1, 2)``),
    any D (the VAE's 512 included). Returns [B, H, Nq, D] in q's dtype, written into ``out`` if given.
    """
    scale = check_qkv(q, k, v, scale)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = alloc_out(q, out)
    if out.numel() == 0:
        return out
    s, stats = partial_softmax_scores(q, k, scale)
    cfg = _pv_config(q, Nk)
    align = stride_align(q.element_size(), v, out)
    grid = (triton.cdiv(D, cfg["BLOCK_DV"]), triton.cdiv(Nq, cfg["BLOCK_M"]), B * H)
    _pv_kernel[grid](
        s, stats, v, out,
        *(x // align for x in v.stride()[:3]), v.stride(3),
        *(x // align for x in out.stride()[:3]), out.stride(3),
        H, Nq, Nk, s.shape[-1], stats.shape[1],
        HEAD_DIM=D, ALIGN=align,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DV=cfg["BLOCK_DV"], PREC=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
