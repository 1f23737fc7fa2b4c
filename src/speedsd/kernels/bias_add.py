"""Per-channel bias add (+ residual) in Triton, and its plain-torch reference.

Convolutions run without their bias and this kernel adds it (and, where a block ends in a skip
connection, the residual) in one bandwidth-bound pass: y = x + bias[c] (+ residual), fp32 math, one
rounding to x's dtype. torch's broadcast add for the same job is a non-vectorised elementwise kernel.

Design: one flat 1-D grid over x's dense storage (NCHW-contiguous, channels_last or a contiguous
token tensor [..., C]). offsets = pid·BLOCK + arange, so Triton sees contiguous runs and issues 16-byte
loads/stores. The channel of storage offset i is (i // S) % C with S = H·W for NCHW and S = 1 when
channels are the fastest dim (channels_last, tokens). C and S are compile-time constants: the
division and modulo become multiply-shift sequences (SD has a handful of distinct (C, S)), and
Triton's alignment analysis keeps the bias loads vectorised in the channels-fast case. For NCHW the
block is read as rows of one 16-byte vector (VEC elements; VEC divides S), each inside one channel,
so the channel index and the bias load are per row, not per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from speedsd.kernels.device import sm_count as _sm_count

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# A tensor's hand-over of GroupNorm statistics (kernels/add_gn_stats.py); writers into a tensor drop it.
GN_STATS_ATTR = "_speedsd_gn_stats"


def drop_gn_stats(t: torch.Tensor) -> None:
    """Forget statistics riding on t: an in-place Triton write does not bump t's version counter."""
    if GN_STATS_ATTR in t.__dict__:
        delattr(t, GN_STATS_ATTR)


INT64_NUMEL = 2**31  # offsets in int64 once numel + BLOCK reaches this (the last block's lanes too); tests lower it


def bias_add_ref(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: x + bias over the channel dim (dim 1 of 4-D x, else the last) (+ residual), in x's dtype."""
    y = x
    if bias is not None:
        shape = (1, -1, 1, 1) if x.dim() == 4 else (-1,)
        y = y + bias.view(shape)  # [C] -> broadcast over the channel dim
    if residual is not None:
        y = y + residual
    return y.to(x.dtype) if y is not x else y.clone()


# y[i] = round(x[i] + bias[(i // S) % C] + r[i]) over the flat dense storage, fp32 sum, one rounding.
# The block is a [BLOCK / VEC, VEC] tile of consecutive offsets (row-major: still one contiguous run).
# S = 1 (channels fastest): the channel is taken per element. S > 1 (NCHW) with VEC | S: every row of
# VEC elements lies in one channel, so the channel and the bias load are per row (VEC times fewer).
# Masked lanes still have an in-range channel, so the bias load needs no mask.
@triton.jit
def _bias_add_kernel(
    x_ptr, b_ptr, r_ptr, y_ptr, numel,
    C: tl.constexpr, S: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    INT64: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK // VEC) * VEC  # [R] first offset of each row
    offs = rows[:, None] + tl.arange(0, VEC)[None, :]  # [R, VEC]
    mask = offs < numel
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        if S == 1:
            b = tl.load(b_ptr + offs % C)
        else:
            b = tl.load(b_ptr + (rows // S) % C)[:, None]  # VEC divides S: one channel a row
        y += b.to(tl.float32)
    if HAS_R:
        y += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- launcher ------------------------------------------------------------------------------------


def _memory_format(x: torch.Tensor) -> torch.memory_format | None:
    """The dense layout of x (contiguous first: then the NCHW formula holds), or None if not dense."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _block(numel: int, itemsize: int, sm_count: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the largest block that still gives >= 4 programs per SM (at least 1024
    elements); 8 warps move 8 KB (fp32) to 16 KB per 16-byte-vector step at BLOCK = 8192 x fp16."""
    block = 1024
    for b in (8192, 4096, 2048):
        if triton.cdiv(numel, b) >= 4 * sm_count:
            block = b
            break
    warps = max(4, min(8, block * itemsize // (16 * 32)))  # >= one 16-byte vector a thread
    return block, warps


def prepare_operands(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.memory_format]:
    """The checks and layout of :func:`bias_add`'s operands (shared with kernels/add_gn_stats.py):
    (x made dense, bias contiguous, residual dense in x's layout, out new or checked, x's layout).
    An ``out`` given loses any GroupNorm statistics riding on it (it is about to be overwritten)."""
    if x.dtype not in FLOATS:
        raise ValueError(f"bias_add supports fp32/fp16/bf16 x, got {x.dtype}")
    if not 1 <= x.dim() <= 4:
        raise ValueError(f"bias_add expects x [N, C, H, W] or [..., C] (1-3 dims), got shape {tuple(x.shape)}")
    C = x.shape[1] if x.dim() == 4 else x.shape[-1]
    if bias is not None and (bias.shape != (C,) or bias.device != x.device or bias.dtype not in FLOATS):
        raise ValueError(f"bias must be a float [{C}] tensor on {x.device}, got {tuple(bias.shape)} {bias.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}")  # fmt: skip
    fmt = _memory_format(x)
    if fmt is None:
        if out is not None:
            raise ValueError("x must be contiguous or channels_last when out is given")
        x = x.contiguous()
        fmt = torch.contiguous_format
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if residual is not None and not residual.is_contiguous(memory_format=fmt):
        residual = residual.contiguous(memory_format=fmt)
    if out is None:
        out = torch.empty_like(x)  # x is dense: same strides
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride() != x.stride():
        raise ValueError("out must match x in shape, dtype, device and strides")
    else:
        drop_gn_stats(out)
    return x, bias, residual, out, fmt


def bias_add(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x + bias[c] (+ residual), fp32 math, rounded once to x.dtype; same shape and strides as x.

    Channel dim: 1 for 4-D x [N, C, H, W] (NCHW-contiguous or channels_last), the last for 1-3-D x
    [..., C]. ``bias``: [C], any float dtype, or None (y = x + residual). ``residual``: x's shape and
    dtype; made dense in x's layout if it is not. ``out``: x itself (in place) or a tensor of x's
    shape, dtype, device and strides; default a new one. A non-dense x is copied first (then ``out``
    must be None).
    """
    x, bias, residual, out, fmt = prepare_operands(x, bias, residual, out)
    C = x.shape[1] if x.dim() == 4 else x.shape[-1]
    numel = x.numel()
    if numel == 0:
        return out
    # storage offset -> channel: (i // S) % C; S = H·W for NCHW, 1 when channels are fastest
    S = x.shape[2] * x.shape[3] if x.dim() == 4 and fmt == torch.contiguous_format else 1
    block, warps = _block(numel, x.element_size(), _sm_count(x.device))
    vec = 16 // x.element_size()  # one 16-byte vector a row
    if S > 1 and S % vec:
        vec = 1
    _bias_add_kernel[(triton.cdiv(numel, block),)](
        x, bias if bias is not None else x, residual if residual is not None else x, out, numel,
        C=C, S=S, HAS_B=bias is not None, HAS_R=residual is not None, INT64=numel + block > INT64_NUMEL,
        BLOCK=block, VEC=vec, num_warps=warps,
    )  # fmt: skip
    return out
