"""SD's GEGLU feed-forward projection as one GEMM fed by TMA (tensor descriptors): Hopper's path for M >= 512.

The same op as :func:`speedsd.kernels.geglu.feed_forward_geglu` (x [M, K] @ Wᵀ, W [2F, K], + bias, then
value·GELU(gate) -> [M, F]); this kernel reads x and W through TMA descriptors (bulk async copies into
swizzled shared memory, no per-thread address arithmetic or masks), takes the value and gate rows of W in one
box so that each K step is one wide wgmma, and writes y through a descriptor. Measured on an H200 (CUDA-graph
replay, bench/results/ff_tma_sweep_h200.json, three sweeps): in run 3, 38.7 µs vs 41.0 for the two-accumulator
TMA kernel at M = 8192 (K 320, F 1280: the UNet's 64² level), 28.2 vs 31.4 at M = 2048 (K 640, F 2560), and
26.7 vs 29.7 for cuBLAS + the one-pass GEGLU at M = 512 (K 1280, F 5120); in runs 1 and 2 the two-accumulator
kernel took 41.0-41.3 µs at M = 8192 against 49.0 for the pointer kernel in geglu.py, and 31.2 at M = 2048
against 34.8 for cuBLAS + the one-pass GEGLU. M = 128 (the 8² mid block) was not
measured and keeps cuBLAS (:func:`geglu.ff_plan`).

TMA needs 16-byte aligned rows: K and F multiples of 8 for fp16 (x, W and y with unit column strides).
Out-of-bounds boxes are zero-filled on load and clipped on store, so any M, F, K works without masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from speedsd.kernels.device import compile_ahead
from speedsd.kernels.geglu import _gelu, grouped_tile

# (BM, BN, BK, num_warps, num_stages) measured best on the H200 at M = 8192, 2048 and 512 alike
# (ff_tma_sweep_h200.json, run 3: 68 configs a shape). BN is the width of the value and of the gate block, so
# a program computes a [BM, 2·BN] GEMM tile.
TMA_CONFIG = (128, 64, 64, 4, 2)
TMA_MIN_M = 512


def tma_config(m: int) -> dict[str, int]:
    """The measured block sizes (one config won at every measured M)."""
    bm, bn, bk, warps, stages = TMA_CONFIG
    return dict(BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)


def tma_supported(x2: torch.Tensor, w: torch.Tensor, out2: torch.Tensor) -> bool:
    """16-byte aligned base pointers and row strides, unit last-dim strides (what a TMA descriptor takes)."""
    es = x2.element_size()
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0 for t in (x2, w, out2))


# W [2F, K] is read as W3 [2, F, K] (value rows, gate rows): one TMA box [2, BN, BK] brings value rows
# on..on+BN and the gate rows F+on.. together, one [2·BN, BK] operand, so each K step is ONE wgmma of
# N = 2·BN (vs two of N = BN: measured 38.7 vs 41.0 µs at M = 8192):
#   acc[BM, 2·BN] += x[om:om+BM, k:k+BK] @ [W3[0, on:on+BN, k:k+BK]; W3[1, on:on+BN, k:k+BK]]ᵀ
# epilogue (fp32): value, gate = acc[:, :BN], acc[:, BN:] (a register split: in the wgmma layout the column
# bit BN is a register bit);  y[om:om+BM, on:on+BN] = (value + b[on:]) · GELU(gate + b[F+on:]).
# Tiles in GROUP_M row groups (they share W tiles in L2). Rows past F or K are zero-filled by TMA, stores
# past M or F clipped.
@triton.jit
def _ff_geglu_tma_kernel(
    x_desc, w_desc, b_ptr, y_desc, M, Fdim, K,
    HAS_B: tl.constexpr, APPROX: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, Fdim, BM, BN, GROUP_M)
    om = pid_m * BM
    on = pid_n * BN
    acc = tl.zeros([BM, 2 * BN], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        b = w_desc.load([0, on, k0]).reshape(2 * BN, BK)  # [2, BN, BK] -> [2·BN, BK]
        acc = tl.dot(x_desc.load([om, k0]), b.T, acc)
    v, g = acc.reshape(BM, 2, BN).permute(0, 2, 1).split()  # [BM, 2·BN] -> [BM, BN] x 2
    if HAS_B:
        rn = on + tl.arange(0, BN)
        v += tl.load(b_ptr + rn, mask=rn < Fdim, other=0.0).to(tl.float32)[None, :]
        g += tl.load(b_ptr + Fdim + rn, mask=rn < Fdim, other=0.0).to(tl.float32)[None, :]
    y_desc.store([om, on], (v * _gelu(g, APPROX)).to(y_desc.dtype))


def feed_forward_geglu_tma(
    x2: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    out2: torch.Tensor,
    approx: int,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """out2 [M, F] = value·GELU(gate) of x2 [M, K] @ wᵀ (+ bias), w [2F, K]; fp16/bf16. The caller
    (geglu.feed_forward_geglu) has checked shapes, dtypes and devices; this checks the TMA alignment."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the TMA path takes fp16/bf16, got {x2.dtype}")
    if not tma_supported(x2, w, out2):
        raise ValueError("the TMA path needs 16-byte aligned rows (K and F multiples of 8) and unit column strides")
    m, k = x2.shape
    f = w.shape[0] // 2
    cfg = {"GROUP_M": 8, **(config or tma_config(m))}
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    w3 = w.unflatten(0, (2, f))  # [2F, K] -> [2, F, K] (value rows, gate rows)
    grid = (triton.cdiv(m, bm) * triton.cdiv(f, bn),)
    _ff_geglu_tma_kernel[grid](
        TensorDescriptor.from_tensor(x2, [bm, bk]),
        TensorDescriptor(w3, list(w3.shape), list(w3.stride()), [2, bn, bk]),
        bias if bias is not None else w,
        TensorDescriptor.from_tensor(out2, [bm, bn]),
        m, f, k,
        HAS_B=bias is not None, APPROX=approx, BM=bm, BN=bn, BK=bk, GROUP_M=cfg["GROUP_M"],
        STAGES=cfg.get("num_stages", 3), num_warps=cfg.get("num_warps", 4),
    )  # fmt: skip
    return out2


def compile_sm90(bias: bool = True, capability: int = 90):  # -> CompiledKernel
    """Compile the kernel with the measured tiles for ``capability`` without a GPU (the tests' ptxas check;
    in a process without TRITON_INTERPRET=1)."""
    from triton.compiler import ASTSource

    bm, bn, bk, warps, stages = TMA_CONFIG
    const = dict(HAS_B=bias, APPROX=0, BM=bm, BN=bn, BK=bk, GROUP_M=8, STAGES=stages)
    sig = {
        "x_desc": f"tensordesc<fp16[{bm}, {bk}]>",
        "w_desc": f"tensordesc<fp16[2, {bn}, {bk}]>",
        "b_ptr": "*fp16",
        "y_desc": f"tensordesc<fp16[{bm}, {bn}]>",
        "M": "i32",
        "Fdim": "i32",
        "K": "i32",
        **{name: "constexpr" for name in const},
    }
    src = ASTSource(_ff_geglu_tma_kernel, sig, constexprs=const)
    return compile_ahead(src, capability, num_warps=warps)
