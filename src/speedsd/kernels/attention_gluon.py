"""Gluon (warp-specialized, TMA + wgmma) FlashAttention forward for SD's d=40/80/160 self-attention, Hopper only.

One problem, specialised: the UNet's self-attention with fused QKV (``Flags(fused_qkv=True)``) at its three
attention levels, where q, k, v [B, H, N, D] fp16 (D = 40, 80 or 160) are head-split views of the
column blocks of one contiguous qkv [B, N, 3·H·D] (models/layers.py Attention.forward:
``F.linear(...).chunk(3, -1)``, then ``unflatten(-1, (H, D)).transpose(1, 2)``). The kernel reads qkv
through TMA descriptors over [B·N, 3·H·D] and writes out [B, N, H·D]; it is returned as the [B, H, N, D]
view, so the caller's ``transpose(1, 2).flatten(2)`` is free. N must be a multiple of 64 (the d=40 key
tile; d=80/160 take 128-key blocks where they divide N); query tiles of 256 (d=40), 128 (d=80) or 64 (d=160)
rows may run past N (N = 640, 4160 ...: rows past N are computed, never stored). Kernel and its math:
kernels/attention_gluon_kernels.py; :func:`config_for` picks the instance.

:func:`attention_gluon` returns None (the caller falls back to SDPA) for anything else that is valid
attention input: another device, card, dtype, head dim, layout, cross-attention or N; it raises
ValueError only for input no attention could take (mismatched shapes, dtypes, devices, bad scale).

d=80 (H200, B=2, H=8, N=1024, CUDA-graph replay, bench/results/attention_gluon_d80_h200.txt): 15.7 µs vs
SDPA's 18.4 (cuDNN, with its memset node); pipeline A/B in the same file. d=160: see HOPPER_D160.

d=40: Measured as the prototype (bench/prototypes/gluon_attn, round 2, variant ws4_pp_narrow_bn64_fadd): 136.9 µs
vs 143.6 for round 1's ws3_pp_narrow (this file's previous kernel) and 150.1 for cuDNN SDPA, on an H200 at
B=2, H=8, N=4096 (CUDA-graph replay; bench/results/attention_gluon_probe_r2_h200.txt). This file's kernel
compiles to the prototype variant's SASS (same instruction mnemonics and counts; tests check registers
and spills). Timed from this file (bench.kernels_attention at 368c5bd, H200, CUDA-graph replay,
bench/results/kernels_attention_h200.md): 137.3 vs cuDNN 148.9 µs at N=4096, 2078 vs 2398 at N=16384 (1024²
images); pipeline A/B of the engine with it: bench/results/ab_session14_h200.txt.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from speedsd.kernels.device import compile_ahead, is_sm90

LOG2E = 1.4426950408889634
PROTOTYPE_VARIANT = "ws4_pp_narrow_bn64_fadd"  # bench/prototypes/gluon_attn: what was timed (module docstring)


@dataclass(frozen=True)
class GluonAttentionConfig:
    head_dim: int = 40  # the kernel instance: 40 (K/V boxes of 32 + 16 columns, Q padded), 80 (64 + 16), 160
    consumers: int = 4  # consumer warpgroups per CTA (1, 2 or 4), 64 query rows each
    block_n: int = 64  # keys per K/V tile; N must be a multiple
    stages: int = 6  # K/V SMEM ring depth
    producer_regs: int = 24  # setmaxnreg of the 1-warp TMA producer
    consumer_regs: int = 112  # setmaxnreg of the worker consumer warpgroups (the default one gets the rest;
    # unused with one consumer: the default partition is the only consumer)

    @property
    def block_m(self) -> int:  # query rows per CTA
        return 64 * self.consumers

    @property
    def boxes(self) -> tuple[int, ...]:  # the head's columns as TMA boxes: rows of <= 128 B (the widest swizzle)
        return {40: (32, 16), 80: (64, 16), 160: (64, 64, 32)}[self.head_dim]

    @property
    def padded_q(self) -> bool:  # the boxes overrun the head (d=40): Q as one [64, 64] box, columns >= d zeroed
        return sum(self.boxes) > self.head_dim

    def descriptor_boxes(self) -> list[tuple[int, int]]:
        """The kernel's seven TMA descriptors' boxes (rows, columns), in its argument order: Q padded, Q per
        column box (a, b, c), K/V per column box (a, b, c); an absent third box repeats the second (unread)."""
        a, b, *rest = self.boxes
        w = (a, b, rest[0] if rest else b)
        return [(64, 64 if self.padded_q else a), *((64, c) for c in w), *((self.block_n, c) for c in w)]

    def constexprs(self) -> dict[str, int]:
        """The kernel's constexpr arguments for this instance."""
        return {
            "HEAD_D": self.head_dim,
            "NBOX": len(self.boxes),
            "NC": self.consumers,
            "STAGES": self.stages,
            "PRODUCER_REGS": self.producer_regs,
            "CONSUMER_REGS": self.consumer_regs,
        }


# The configuration measured on the H200 (prototype variant ws4_pp_narrow_bn64_fadd); 107.0 KB of shared
# memory, 96 registers a thread at launch (setmaxnreg: producer 24, worker consumers 112, default consumer
# 120), no spills (ptxas for sm_90).
HOPPER_D40 = GluonAttentionConfig()
# d=80 (the UNet's 32² level, N = 1024): two consumers, 128 query rows a CTA (128 CTAs at B=2, H=8), so each
# consumer has the registers of its [64, 80] fp32 accumulator; 128-key blocks where N allows. H200, B=2, H=8,
# N=1024, CUDA-graph replay (bench/results/attention_gluon_d80_h200.txt): 15.7 µs (128-key blocks, 3 stages),
# 17.3 (64-key blocks, 4 stages) vs SDPA (cuDNN) 18.4, our Triton flash 18.9.
HOPPER_D80 = GluonAttentionConfig(head_dim=80, consumers=2, block_n=128, stages=3, consumer_regs=232)
HOPPER_D80_BN64 = GluonAttentionConfig(head_dim=80, consumers=2, block_n=64, stages=4, consumer_regs=232)
# d=160 (the 16² level, N = 256): K/V/Q as 64 + 64 + 32-column boxes, one consumer warpgroup (64 query rows a
# CTA: 64 CTAs at B=2, H=8, N=256; two consumers leave 100 SMs idle), 128-key blocks where N allows. H200, B=2,
# H=8, N=256 (bench/results/attention_gluon_d160_h200.txt): 6.84 µs (128-key blocks), 7.27 (64-key blocks,
# 3 stages) vs our Triton flash 9.0 and SDPA 10.5; at N=64 (8²) the one-pass cross kernel stays faster (4.40 vs
# 4.77).
HOPPER_D160 = GluonAttentionConfig(head_dim=160, consumers=1, block_n=128, stages=2, consumer_regs=0)
HOPPER_D160_BN64 = GluonAttentionConfig(head_dim=160, consumers=1, block_n=64, stages=3, consumer_regs=0)
CONFIGS = (HOPPER_D40, HOPPER_D80, HOPPER_D80_BN64, HOPPER_D160, HOPPER_D160_BN64)  # config_for: the first that fits


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    """The Gluon kernel module, or None where this Triton has no Gluon/Hopper API."""
    try:
        from speedsd.kernels import attention_gluon_kernels
    except ImportError:
        return None
    return attention_gluon_kernels


def _device_ok(device: torch.device) -> bool:
    """A Hopper (sm_90: H100/H200) CUDA device and a Triton with Gluon."""
    return is_sm90(device) and _kernels() is not None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> float:
    """ValueError for input that no attention implementation takes; returns the scale."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-d q/k/v [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q/k/v devices differ: {q.device}, {k.device}, {v.device}")
    if k.shape[2] == 0:
        raise ValueError("attention over zero keys")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return scale


def config_for(d: int, n: int) -> GluonAttentionConfig | None:
    """The kernel instance for head dim ``d`` over ``n`` keys: the first of CONFIGS whose key tile divides n
    (None: no instance takes it)."""
    return next((c for c in CONFIGS if c.head_dim == d and n > 0 and n % c.block_n == 0), None)


def shape_supported(nq: int, nk: int, d: int, config: GluonAttentionConfig | None = None) -> bool:
    """The problem sizes the kernel takes: self-attention (Nq == Nk) with D = 40, 80 or 160 and N a multiple
    of 64. (Batch, heads, dtype, layout and device are checked on the tensors.)"""
    cfg = config or config_for(d, nk)
    return cfg is not None and d == cfg.head_dim and nq == nk and nq > 0 and nq % cfg.block_n == 0


def _shape_ok(q: torch.Tensor, k: torch.Tensor, config: GluonAttentionConfig | None = None) -> bool:
    B, H, N, D = q.shape
    return (
        q.dtype == k.dtype == torch.float16
        and q.shape == k.shape  # self-attention with the same batch and heads
        and shape_supported(N, k.shape[2], D, config)
        and 0 < B * H <= 65535  # grid axis 1
    )


def fused_qkv_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k, v [B, H, N, D] are exactly the head-split column blocks of one contiguous
    qkv [B, N, 3·H·D]: one storage, k and v starting H·D and 2·H·D elements after q, strides
    (N·3·H·D, D, 3·H·D, 1), q 16-byte aligned (TMA). Metadata only: no device or dtype check."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return False
    B, H, N, D = q.shape
    hd = H * D
    strides = (N * 3 * hd, D, 3 * hd, 1)
    storage = q.untyped_storage().data_ptr()
    return (
        all(t.stride() == strides for t in (q, k, v))
        and k.untyped_storage().data_ptr() == storage
        and v.untyped_storage().data_ptr() == storage
        and k.storage_offset() == q.storage_offset() + hd
        and v.storage_offset() == q.storage_offset() + 2 * hd
        and q.data_ptr() % 16 == 0
    )


def attention_gluon_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel handles this problem on this machine: fp16 self-attention (q.shape == k.shape)
    with D = 40 and N a multiple of 64 on an sm_90 GPU with Gluon. The layout is checked by
    :func:`attention_gluon` (:func:`fused_qkv_views`); elsewhere it returns None."""
    if q.dim() != 4 or k.dim() != 4:
        return False
    return _shape_ok(q, k) and _device_ok(q.device)


def attention_gluon(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: GluonAttentionConfig | None = None,
) -> torch.Tensor | None:
    """softmax(q kᵀ·scale) v for fused-QKV views q, k, v [B, H, N, D] fp16 (D = 40, 80, 160) -> [B, H, N, D] (a
    view of a contiguous [B, N, H·D]: ``out`` when given); None where the kernel does not apply (module
    docstring). ``config``: the instance (default :func:`config_for`)."""
    scale = _check(q, k, v, scale)
    B, H, N, D = q.shape
    if out is not None and (
        out.shape != (B, N, H * D) or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous [B, N, H·D] = {(B, N, H * D)} {q.dtype} tensor on {q.device}")
    config = config or config_for(D, N)
    if not (_shape_ok(q, k, config) and fused_qkv_views(q, k, v) and _device_ok(q.device)):
        return None
    if out is None:
        out = torch.empty(B, N, H * D, device=q.device, dtype=q.dtype)  # [B, N, H·D]
    # the qkv block the views come from: [B·N, 3·H·D], starting at q
    qkv2d = q.as_strided((B * N, 3 * H * D), (3 * H * D, 1))
    _launch(qkv2d, out, N, H, scale * LOG2E, config)
    return out.unflatten(-1, (H, D)).transpose(1, 2)  # [B, N, H·D] -> [B, H, N, D] view


def _descriptors(qkv2d: torch.Tensor, cfg: GluonAttentionConfig) -> list:
    """The kernel's TMA descriptors over qkv [B·N, 3·H·D], boxes as :meth:`GluonAttentionConfig.descriptor_boxes`."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    def desc(rows: int, cols: int) -> TensorDescriptor:
        # rows of 128 / 64 / 32 B -> 128 / 64 / 32 B swizzle
        lay = gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float16)
        return TensorDescriptor.from_tensor(qkv2d, [rows, cols], lay)

    return [desc(rows, cols) for rows, cols in cfg.descriptor_boxes()]


def launch_grid(B: int, H: int, N: int, cfg: GluonAttentionConfig = HOPPER_D40) -> tuple[int, int]:
    """(query tiles of block_m rows per (batch, head), B·H): one CTA each; the last tile of a batch may
    run past N (d=40, N = 640: 3 tiles of 256, 128 rows past N; its consumers 2 and 3 store nothing)."""
    return (N + cfg.block_m - 1) // cfg.block_m, B * H


def _launch(qkv2d: torch.Tensor, out: torch.Tensor, N: int, H: int, qk_c: float, cfg: GluonAttentionConfig) -> None:
    kern = _kernels()
    assert kern is not None
    B = qkv2d.shape[0] // N
    with torch.cuda.device(out.device):
        kern.attn_fwd_kernel[launch_grid(B, H, N, cfg)](
            *_descriptors(qkv2d, cfg), out, N, H, qk_c, **cfg.constexprs(), num_warps=4
        )


def attention_gluon_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain torch: SDPA in fp32, result in q's dtype (any layout, device, shape)."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    return out.to(q.dtype)


def compile_sm90(config: GluonAttentionConfig = HOPPER_D40, capability: int = 90):  # -> CompiledKernel
    """Compile the kernel ahead of time for ``capability`` without a GPU (the tests' ptxas check; in a
    process without TRITON_INTERPRET=1). The signature is what a launch on the GPU specialises: out
    16-byte aligned, N % 16 == 0."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    kern = _kernels()
    if kern is None:
        raise RuntimeError("this Triton has no Gluon Hopper API")
    fn = kern.attn_fwd_kernel

    def desc_ty(rows: int, cols: int) -> str:
        lay = gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float16)
        return f"tensordesc<fp16[{rows}, {cols}],{lay!r}>"

    const = config.constexprs()
    names = ("q_desc", "qa_desc", "qb_desc", "qc_desc", "ka_desc", "kb_desc", "kc_desc")
    sig = {
        **{name: desc_ty(rows, cols) for name, (rows, cols) in zip(names, config.descriptor_boxes())},
        "o_ptr": "*fp16",
        "n_ctx": "i32",
        "H": "i32",
        "qk_c": "fp32",
        **{name: "constexpr" for name in const},
    }
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ("o_ptr", "n_ctx")}
    src = GluonASTSource(fn, sig, constexprs=const, attrs=attrs)
    return compile_ahead(src, capability, num_warps=4)
