"""FlashAttention forward in Triton: online softmax, no N×N tensor in memory.

Each program owns BLOCK_M query rows of one (batch, head) and streams K/V in BLOCK_N blocks through
on-chip memory, keeping a running row max m, running sum l and an unnormalized fp32 accumulator
(Dao et al. 2022). exp is exp2 of (s − m)·scale·log2(e), the max subtracted in raw score units.

Head dims that are not powers of two are split into two power-of-two chunks D = D0 + D1
(d=80: 64+16; d=160: 128+64 with 32 masked) instead of padding to next_pow2(D) (128/256): two
tl.dot calls per product and less wasted tensor-core work. Chunks 32 wide are avoided by default
(``FlashConfig.chunk32=False``): d=40 pads to one 64-wide chunk and d=160's tail chunk is 64, not 32.
Triton 3.6 on sm_90 raised "illegal memory access" for the 128+32 split (D1=32, fp16, pipelined
loop) while every address the kernel forms is in bounds (checked lane by lane under the interpreter,
tests/kernels/test_attention_bounds.py); fp16 operands 32 wide get 64-byte-swizzled shared
layouts for wgmma, the pattern of triton-lang/triton#11366 / #10573. ``split_d=False`` pads to
BLOCK_D = next_pow2(D). All K/V loads are masked unless the launcher proves them in bounds
(EVEN_N: Nk % BLOCK_N == 0), and the -inf column mask only runs on uneven key counts.

D > 256 (the VAE's single 512-wide head) is routed to the partially fused softmax
(:func:`speedsd.kernels.softmax_attention.attention_partial_softmax`): an fp32 [BLOCK_M, 512]
accumulator does not fit the register file with tiles large enough to keep tensor cores busy,
while at D=512 the score matrix costs little next to the QKᵀ/PV GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from speedsd.kernels.device import sm_count
from speedsd.kernels.softmax_attention import (
    LOG2E,
    alloc_out,
    attention_partial_softmax,
    check_qkv,
    dot_precision,
    interpreted,
    needs_int64,
    stride_align,
)

MAX_FLASH_HEAD_DIM = 256


@dataclass(frozen=True)
class FlashConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_d: bool = True  # D = D0 + D1 (two dots) instead of padding D to next_pow2(D)
    chunk32: bool = False  # allow 32-wide head-dim chunks (64-byte-swizzled fp16 wgmma operands)


# H100 (sm_90) configs per padded head dim, picked from the ptxas register/spill report and the
# bench sweep (`python -m speedsd.bench.kernels_attention --sweep`), which prints a replacement table.
HOPPER_CONFIGS: dict[int, FlashConfig] = {
    64: FlashConfig(128, 64, 4, 3),  # d=40 (padded to 64), d=64
    128: FlashConfig(128, 64, 8, 3),  # d=80 (64+16), d=128
    256: FlashConfig(128, 32, 8, 3),  # d=160 (128+64, 32 masked); was (..., 2) with 128+32: crashed
}
# Exact (Nq, Nk, D) overrides measured on an H100 at B·H = 16 by the bench sweep (empty until run).
TUNED_CONFIGS: dict[tuple[int, int, int], FlashConfig] = {}
INTERPRETER_CONFIG = FlashConfig(32, 32, 4, 1)
FP32_CONFIG = FlashConfig(32, 32, 8, 1)  # small tiles: exercises multi-block and tail paths


def split_head_dim(D: int, split: bool = True, chunk32: bool = False) -> tuple[int, int]:
    """(D0, D1): power-of-two chunk widths covering D; D1 == 0 when one chunk suffices.

    Without ``chunk32`` no chunk is 32 wide unless D itself is ≤ 32: d=40 -> (64, 0), d=160 -> (128, 64)."""
    full = max(16, triton.next_power_of_2(D))
    if not split or full == D or D <= 16:
        return full, 0
    d0 = full // 2
    d1 = max(16, triton.next_power_of_2(D - d0))
    if not chunk32:
        if d0 == 32:
            return full, 0
        if d1 == 32:
            d1 = 64
    return d0, d1


def flash_config(q: torch.Tensor, Nk: int) -> FlashConfig:
    """Launch heuristic: the per-head-dim table, then shrink tiles to the problem.

    Only for D ≤ MAX_FLASH_HEAD_DIM: larger heads never launch the flash kernel (flash_attention
    routes them to the partially fused softmax), so asking for their config is a caller error."""
    B, H, Nq, D = q.shape
    if D > MAX_FLASH_HEAD_DIM:
        raise ValueError(
            f"no flash config for head dim {D} > {MAX_FLASH_HEAD_DIM}: flash_attention routes it to "
            "attention_partial_softmax (see softmax_attention._scores_config / _pv_config)"
        )
    if interpreted(q.device):
        return INTERPRETER_CONFIG
    if q.dtype == torch.float32:  # correctness path (fp32 FMA dots, no tensor cores): small tiles
        return FP32_CONFIG
    if (Nq, Nk, D) in TUNED_CONFIGS:
        return TUNED_CONFIGS[(Nq, Nk, D)]
    cfg = HOPPER_CONFIGS[max(64, triton.next_power_of_2(D))]
    bm, bn, warps = cfg.block_m, cfg.block_n, cfg.num_warps
    # Short query sequences, or too few programs to cover the GPU twice: 64-row blocks, one warpgroup.
    if Nq <= 64 or B * H * triton.cdiv(Nq, bm) < 2 * sm_count(q.device):
        bm, warps = 64, 4
    bn = min(bn, max(16, triton.next_power_of_2(Nk)))
    return FlashConfig(bm, bn, warps, cfg.num_stages, cfg.split_d, cfg.chunk32)


# One program per (row block rm, batch·head bh); one loop over key blocks n = 0, BLOCK_N, ... < Nk:
#   s = q kₙᵀ (raw), s = −inf on columns ≥ Nk (masked blocks only), c = scale·log2(e)
#   m_new = max(m, maxₙ s);  p = 2^((s − m_new)·c);  α = 2^((m − m_new)·c)
#   l = l·α + Σₙ p;  acc = acc·α + p Vₙ;  m = m_new
#   O[r, :] = acc[r, :] / l[r]     (acc = [acc0 | acc1]: head-dim chunks [0, D0) and [D0, D0 + D1))
# Every load/store is masked unless a constexpr proves it in bounds: EVEN_N (Nk % BLOCK_N == 0) drops
# the key-row mask, EVEN_D0 / EVEN_D1 the head-dim masks of
# chunks that end inside HEAD_DIM. Query rows ≥ Nq are always
# masked. Row offsets are int64 when OFF64 (a [B·H] slice spans ≥ 2^31 elements).
@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, Nq, Nk, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, OFF64: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    EVEN_D0: tl.constexpr = D0 <= HEAD_DIM
    EVEN_D1: tl.constexpr = D0 + D1 <= HEAD_DIM
    D1W: tl.constexpr = D1 if D1 > 0 else 16  # acc1/q1 placeholders when there is no second chunk

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1W)
    mask_m = offs_m < Nq
    dmask0 = offs_d0 < HEAD_DIM
    dmask1 = offs_d1 < HEAD_DIM
    if OFF64:
        offs_m = offs_m.to(tl.int64)

    q_rows = Q + (b * sqb + h * sqh) * ALIGN + (offs_m[:, None] * sqm) * ALIGN  # [BM, 1]
    k_base = K + (b * skb + h * skh) * ALIGN
    v_base = V + (b * svb + h * svh) * ALIGN
    q0 = tl.load(q_rows + offs_d0[None, :] * sqd, mask=mask_m[:, None] & dmask0[None, :], other=0.0)
    if D1 > 0:
        q1 = tl.load(q_rows + offs_d1[None, :] * sqd, mask=mask_m[:, None] & dmask1[None, :], other=0.0)
    else:
        q1 = tl.zeros([BLOCK_M, D1W], Q.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1W], tl.float32)
    for start in range(0, Nk, BLOCK_N):
        kn = start + offs_n
        nmask = kn < Nk
        if OFF64:
            kn = kn.to(tl.int64)
        k_rows = k_base + (kn[:, None] * skn) * ALIGN  # [BN, 1]
        v_rows = v_base + (kn[:, None] * svn) * ALIGN  # [BN, 1]
        if EVEN_N and EVEN_D0:
            k0 = tl.load(k_rows + offs_d0[None, :] * skd)
        else:
            k0 = tl.load(k_rows + offs_d0[None, :] * skd, mask=nmask[:, None] & dmask0[None, :], other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        if D1 > 0:
            if EVEN_N and EVEN_D1:
                k1 = tl.load(k_rows + offs_d1[None, :] * skd)
            else:
                k1 = tl.load(k_rows + offs_d1[None, :] * skd, mask=nmask[:, None] & dmask1[None, :], other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
        if not EVEN_N:
            s = tl.where(nmask[None, :], s, float("-inf"))
        # running max in raw score units: s − m is exact near the max and is scaled afterwards
        # (s·scale·log2(e) first would round each logit to its ulp: ~1e-5 relative error at |s| ~ 300)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2((s - m_new[:, None]) * qk_scale)
        alpha = tl.math.exp2((m_i - m_new) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        if EVEN_N and EVEN_D0:
            v0 = tl.load(v_rows + offs_d0[None, :] * svd)
        else:
            v0 = tl.load(v_rows + offs_d0[None, :] * svd, mask=nmask[:, None] & dmask0[None, :], other=0.0)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PREC)
        if D1 > 0:
            if EVEN_N and EVEN_D1:
                v1 = tl.load(v_rows + offs_d1[None, :] * svd)
            else:
                v1 = tl.load(v_rows + offs_d1[None, :] * svd, mask=nmask[:, None] & dmask1[None, :], other=0.0)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PREC)
        m_i = m_new

    inv_l = 1.0 / l_i
    o_rows = O + (b * sob + h * soh) * ALIGN + (offs_m[:, None] * som) * ALIGN
    out_ty = O.dtype.element_ty
    tl.store(
        o_rows + offs_d0[None, :] * sod, (acc0 * inv_l[:, None]).to(out_ty), mask=mask_m[:, None] & dmask0[None, :]
    )
    if D1 > 0:
        tl.store(
            o_rows + offs_d1[None, :] * sod, (acc1 * inv_l[:, None]).to(out_ty), mask=mask_m[:, None] & dmask1[None, :]
        )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: FlashConfig | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ·scale) v without the N×N matrix; q [B,H,Nq,D], k/v [B,H,Nk,D] -> [B,H,Nq,D].

    Like F.scaled_dot_product_attention: q's dtype out (fp16/bf16 on GPU; fp32 too), any strides
    (no copies of head-split views), output laid out like q unless ``out`` is given. D > 256 falls
    back to the partially fused softmax. ``config`` overrides the launch heuristic (bench sweeps).
    """
    scale = check_qkv(q, k, v, scale)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if D > MAX_FLASH_HEAD_DIM:
        return attention_partial_softmax(q, k, v, scale=scale, out=out)
    out = alloc_out(q, out)
    if out.numel() == 0:
        return out
    cfg = config or flash_config(q, Nk)
    d0, d1 = split_head_dim(D, cfg.split_d, cfg.chunk32)
    align = stride_align(q.element_size(), q, k, v, out)
    grid = (triton.cdiv(Nq, cfg.block_m), B * H)
    _flash_fwd_kernel[grid](
        q, k, v, out,
        *(x // align for x in q.stride()[:3]), q.stride(3),
        *(x // align for x in k.stride()[:3]), k.stride(3),
        *(x // align for x in v.stride()[:3]), v.stride(3),
        *(x // align for x in out.stride()[:3]), out.stride(3),
        H, Nq, Nk, scale * LOG2E,
        HEAD_DIM=D, D0=d0, D1=d1, ALIGN=align,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN_N=Nk % cfg.block_n == 0,
        OFF64=needs_int64(((q, Nq, cfg.block_m), (out, Nq, cfg.block_m), (k, Nk, cfg.block_n), (v, Nk, cfg.block_n))),
        PREC=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
