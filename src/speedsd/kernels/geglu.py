"""Fused GELU / GEGLU (SD's feed-forward: projection, split, value·GELU(gate)) and references.

* :func:`gelu`: one elementwise kernel (erf, tanh or quick).
* :func:`geglu`: h [..., 2F] -> [..., F] = h[..., :F]·GELU(h[..., F:]) in one pass.
* :func:`feed_forward_geglu`: a Triton GEMM x [M, K] @ Wᵀ (W [2F, K]) whose epilogue adds the bias and
  applies value·GELU(gate), so the [M, 2F] projection never reaches memory. Each program owns output
  columns [n, n+BN): it accumulates the value tile (W rows n..n+BN) and the gate tile (rows F+n..F+n+BN)
  in two fp32 accumulators over the same x tile, then writes [BM, BN] of the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

APPROX = {"none": 0, "tanh": 1, "quick": 2}


def gelu_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU; approximate = "none" (erf), "tanh", or "quick" (x·sigmoid(1.702x), OpenAI CLIP)."""
    if approximate == "quick":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate=approximate)


def geglu_ref(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """[..., 2F] -> [..., F]: first half is the value, second half the gate (diffusers' GEGLU)."""
    value, gate = h.chunk(2, dim=-1)
    return value * gelu_ref(gate, approximate)


def feed_forward_geglu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none"
) -> torch.Tensor:
    """x [..., K], weight [2F, K] -> [..., F]: cuBLAS GEMM, then chunk + gelu + mul."""
    return geglu_ref(F.linear(x, weight, bias), approximate)


# ---- device helpers ------------------------------------------------------------------------------


@triton.jit
def _gelu(g, APPROX: tl.constexpr):
    # none:  g·Φ(g) = ½·g·(1 + erf(g/√2))
    # tanh:  ½·g·(1 + tanh(u)) = g·σ(2u),  u = √(2/π)·(g + 0.044715·g³)
    # quick: g·σ(1.702·g)
    if APPROX == 0:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif APPROX == 1:
        u2 = 1.5957691216057308 * (g + 0.044715 * g * g * g)
        return g / (1.0 + tl.exp(-u2))
    else:
        return g / (1.0 + tl.exp(-1.702 * g))


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles walk the column tiles
    together, so their shared column operand stays in L2."""
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


def _approx(approximate: str) -> int:
    if approximate not in APPROX:
        raise ValueError(f"approximate must be one of {tuple(APPROX)}, got {approximate!r}")
    return APPROX[approximate]


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be fp32/fp16/bf16, got {t.dtype}")


# ---- elementwise GELU ----------------------------------------------------------------------------


# y[i] = GELU(x[i]) over the flat tensor, fp32 math.
@triton.jit
def _gelu_kernel(x_ptr, y_ptr, numel, APPROX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _gelu(x, APPROX).to(y_ptr.dtype.element_ty), mask=mask)


def _dense(x: torch.Tensor) -> bool:
    """Contiguous or channels_last: the elements fill the storage in some order, so a flat pass works."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def gelu(x: torch.Tensor, approximate: str = "none", *, out: torch.Tensor | None = None) -> torch.Tensor:
    """GELU of x, same shape and memory format (other non-dense x is copied first). ``out``: like x."""
    _check_float(x, "x")
    a = _approx(approximate)
    if not _dense(x):
        x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)  # same strides as x
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride() != x.stride():
        raise ValueError("out must match x in shape, dtype, device and strides")
    if x.numel():
        block = 1024 if x.numel() <= 1 << 16 else 4096
        _gelu_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), APPROX=a, BLOCK=block, num_warps=8)
    return out


# ---- GEGLU on a materialized projection ----------------------------------------------------------


# h [M, 2F] (row stride sh, unit column stride) -> y [M, F]:  y[m, f] = h[m, f] · GELU(h[m, F + f])
@triton.jit
def _geglu_kernel(
    h_ptr, y_ptr, M, Fdim, sh,
    APPROX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    rf = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rm < M)[:, None] & (rf < Fdim)[None, :]
    rows = rm.to(tl.int64)[:, None]
    hp = h_ptr + rows * sh + rf[None, :]
    v = tl.load(hp, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(hp + Fdim, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * Fdim + rf[None, :], (v * _gelu(g, APPROX)).to(y_ptr.dtype.element_ty), mask=mask)


def geglu(h: torch.Tensor, approximate: str = "none", *, out: torch.Tensor | None = None) -> torch.Tensor:
    """h [..., 2F] -> [..., F] = h[..., :F]·GELU(h[..., F:]) in one pass. ``out``: contiguous [..., F]."""
    _check_float(h, "h")
    a = _approx(approximate)
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"geglu needs an even last dim, got shape {tuple(h.shape)}")
    f = h.shape[-1] // 2
    lead = h.shape[:-1]
    h2 = h.reshape(-1, 2 * f)  # [..., 2F] -> [M, 2F] (a view when possible)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    m = h2.shape[0]
    if out is None:
        out = torch.empty((*lead, f), device=h.device, dtype=h.dtype)
    elif out.shape != (*lead, f) or out.dtype != h.dtype or out.device != h.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(*lead, f)} tensor of h's dtype and device")
    if out.numel():
        block_f = min(triton.next_power_of_2(f), 512)
        block_m = max(1, 4096 // block_f)
        grid = (triton.cdiv(f, block_f), triton.cdiv(m, block_m))
        _geglu_kernel[grid](h2, out, m, f, h2.stride(0), APPROX=a, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=8)
    return out


# ---- GEMM with a GEGLU epilogue ------------------------------------------------------------------


# Program (pid_m, pid_n), grouped GROUP_M row-tiles at a time for L2 reuse of W:
#   V = x[rm, :] @ W[rn, :]ᵀ + b[rn],  G = x[rm, :] @ W[F + rn, :]ᵀ + b[F + rn]   (fp32 accumulators)
#   y[rm, rn] = V · GELU(G)
@triton.jit
def _ff_geglu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, Fdim, K, sxm, swn, sym,
    HAS_B: tl.constexpr, APPROX: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, Fdim, BM, BN, GROUP_M)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm_in = rm % M  # wrapped rows/cols: loads stay in bounds without masks, stores are masked
    rn_in = rn % Fdim
    a_ptrs = x_ptr + rm_in.to(tl.int64)[:, None] * sxm + rk[None, :]  # [BM, BK]
    v_ptrs = w_ptr + rn_in[None, :] * swn + rk[:, None]  # [BK, BN] = W[rn, k]ᵀ
    g_ptrs = v_ptrs + Fdim * swn
    acc_v = tl.zeros([BM, BN], tl.float32)
    acc_g = tl.zeros([BM, BN], tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        k_left = K - k * BK
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        bv = tl.load(v_ptrs, mask=rk[:, None] < k_left, other=0.0)
        bg = tl.load(g_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if IEEE:
            acc_v = tl.dot(a, bv, acc_v, input_precision="ieee")
            acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
        else:
            acc_v = tl.dot(a, bv, acc_v)
            acc_g = tl.dot(a, bg, acc_g)
        a_ptrs += BK
        v_ptrs += BK
        g_ptrs += BK
    if HAS_B:
        acc_v += tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + Fdim + rn_in).to(tl.float32)[None, :]
    y = acc_v * _gelu(acc_g, APPROX)
    mask = (rm < M)[:, None] & (rn < Fdim)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# Candidates for SD's shapes on Hopper (M = 128..8192, K = 320..1280, F = 1280..5120). BN is the width of
# each of the two accumulators, so a BN = 128 program computes a 128-wide result from a 256-wide GEMM.
FF_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(128, 64, 64, 8, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(128, 128, 32, 8, 4),
]
_ff_geglu_tuned = triton.autotune(configs=FF_CONFIGS, key=["M", "Fdim", "K", "HAS_B", "APPROX", "IEEE"])(
    _ff_geglu_kernel
)


def ff_heuristic_config(m: int, f: int, k: int) -> dict[str, int]:
    """Block sizes without autotuning: >= ~1 wave of programs on 132 SMs, wide tiles when M is large."""
    if m >= 4096:
        return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
    if m * f >= 128 * 64 * 264:
        return dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=4)
    return dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=4)


# Measured (CUDA-graph replay, SD-1.4 UNet feed-forwards): the fused kernel with the heuristic tiles
# wins at M = 8192 (H200 ff_sweep_h200.json: 49.7 µs vs cuBLAS with the bias + geglu 52.6; H100
# ff_epilogue_ab_h100.json: 49.2 vs 60.1); cuBLAS's GEMM plus our one-pass GEGLU wins below (M = 2048:
# 35.0 vs 47.6, M = 512: 30.0 vs 41.5, M = 128: 10.4 vs 14.2 on the H200; 13.1 vs 14.3 at M = 128 on the
# H100). A sweep of 49-90 tile/warp/stage configs a shape (ff_sweep_h200.json) found at most 5 % over the
# heuristic at M = 8192 and none that beat cuBLAS below it.
FUSED_MIN_M, FUSED_MAX_SMALL_M = 4096, 0


def ff_plan(m: int, tma: bool = False) -> str:
    """ "tma" (one TMA-fed kernel, kernels/ff_geglu_tma.py; where ``tma``: a Hopper GPU and aligned rows),
    "fused" (one kernel, heuristic tiles) or "cublas" (GEMM + one-pass GEGLU) for M rows."""
    from speedsd.kernels.ff_geglu_tma import TMA_MIN_M

    if tma and m >= TMA_MIN_M:
        return "tma"
    return "fused" if m >= FUSED_MIN_M or m <= FUSED_MAX_SMALL_M else "cublas"


def _tma_ok(x2: torch.Tensor, w: torch.Tensor, out2: torch.Tensor) -> bool:
    from speedsd.kernels.device import is_sm90
    from speedsd.kernels.ff_geglu_tma import tma_supported

    return x2.dtype in (torch.float16, torch.bfloat16) and is_sm90(x2.device) and tma_supported(x2, w, out2)


def feed_forward_geglu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    approximate: str = "none",
    *,
    out: torch.Tensor | None = None,
    config: dict[str, int] | str | None = None,
) -> torch.Tensor:
    """x [..., K] @ weightᵀ (weight [2F, K]) + bias -> value·GELU(gate) [..., F], one launch.

    ``config``: None = the measured plan on CUDA (:func:`ff_plan`: the TMA kernel on Hopper for M >= 2048,
    this kernel with the heuristic tiles, or cuBLAS + the one-pass GEGLU kernel; a fixed small config under
    the interpreter), "tma" = the TMA kernel with its measured tiles (fp16/bf16, aligned rows), "autotune" =
    Triton autotuning over :data:`FF_CONFIGS`, "heuristic" = :func:`ff_heuristic_config`, or a dict
    with BM, BN, BK (>= 16, powers of two) and optionally num_warps, num_stages, GROUP_M.
    """
    _check_float(x, "x")
    a = _approx(approximate)
    if weight.dim() != 2 or weight.shape[0] % 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [2F, K] with K = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be {x.dtype} on {x.device}, got {weight.dtype} on {weight.device}")
    f2, k = weight.shape
    f = f2 // 2
    if k == 0 or f == 0:
        raise ValueError(f"weight must have K > 0 and F > 0, got {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (f2,) or bias.device != x.device):
        raise ValueError(f"bias must be a [{f2}] tensor on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [..., K] -> [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty((*lead, f), device=x.device, dtype=x.dtype)
    elif out.shape != (*lead, f) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(*lead, f)} tensor of x's dtype and device")
    if out.numel() == 0:
        return out
    b = bias.contiguous() if bias is not None else w
    args = (x2, w, b, out, m, f, k, x2.stride(0), w.stride(0), f)
    flags = dict(HAS_B=bias is not None, APPROX=a, IEEE=x.dtype == torch.float32)
    if config is None and x.is_cuda:
        plan = ff_plan(m, tma=_tma_ok(x2, w, out.view(m, f)))
        if plan == "cublas":
            h = torch.nn.functional.linear(x2, w, bias)  # [M, 2F]
            geglu(h, approximate, out=out.view(m, f))  # [M, 2F] -> out as [M, F]
            return out
        config = "tma" if plan == "tma" else "heuristic"
    if config == "tma":
        from speedsd.kernels.ff_geglu_tma import feed_forward_geglu_tma

        feed_forward_geglu_tma(x2, w, bias.contiguous() if bias is not None else None, out.view(m, f), a)
        return out
    if config == "autotune":
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(f, meta["BN"]),)
        _ff_geglu_tuned[grid](*args, **flags)
        return out
    if config is None:  # interpreter: small tiles keep the test shapes multi-tile and fast
        config = dict(BM=32, BN=32, BK=32)
    elif config == "heuristic":
        config = ff_heuristic_config(m, f, k)
    cfg = {"GROUP_M": 8, "num_warps": 4, "num_stages": 3, **config}
    for key in ("BM", "BN", "BK"):
        v = cfg[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"config {key}={v} must be a power of two >= 16")
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(f, cfg["BN"]),)
    _ff_geglu_kernel[grid](*args, **flags, **cfg)
    return out
