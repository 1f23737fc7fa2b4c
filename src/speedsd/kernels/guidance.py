"""Classifier-free guidance plumbing around the UNet in two Triton kernels, and their plain-torch references.

Per denoising step the loop turns the fp32 latents into the UNet's input (duplicate for the uncond /
cond halves, the sampler's input scaling, cast to the model dtype, channels_last) and the UNet's
output back into one guided prediction (upcast, split, u + g·(c − u)). In torch that is 4-5 input
and 4 output elementwise launches, each a few µs of mostly idle GPU inside a replayed CUDA graph:

    cfg_input:   [N, C, h, w] latents, any layout -> [2N or N, C, h, w] in dtype, contiguous or channels_last
    cfg_combine: [2N, C, h, w] model output, any layout -> [N, C, h, w] contiguous in out_dtype

Each is one pass over a flat 1-D grid of the output's dense storage; the input is read through its
strides (a plain offset when its layout matches the output's). fp32 math, one rounding to the output
dtype. The combine is launched with FMA contraction off, so u + g·(c − u) rounds after the
subtraction, the product and the sum exactly as torch's three kernels do: both kernels give the same
bits as their references (:func:`cfg_input_ref`, :func:`cfg_combine_ref`), which are what the loop did
in torch for fp32 latents. (Under the CPU interpreter fp32 -> bf16 casts truncate instead of rounding.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from speedsd.kernels.device import sm_count as _sm_count

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_OFFSET = 2**31  # int32 offsets: every element offset (and numel + BLOCK) must stay below this


def cfg_input_ref(
    latents: torch.Tensor, scale: float, dtype: torch.dtype, channels_last: bool, duplicate: bool
) -> torch.Tensor:
    """Plain torch, as the loop did it for its fp32 latents: cat([x, x]) (duplicate), x · scale (scale
    != 1) in fp32, cast, layout. (fp16/bf16 latents are upcast first, as the kernel reads them.)"""
    x = latents.float()  # fp32 latents: x itself
    x = torch.cat([x, x]) if duplicate else x  # [N, C, h, w] -> [2N, C, h, w]
    if scale != 1.0:
        x = x * scale
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def cfg_combine_ref(out: torch.Tensor, guidance_scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Plain torch, as the loop did it (out_dtype fp32): upcast, (u, c) = halves, u + g·(c − u) in fp32,
    then cast to out_dtype, contiguous."""
    uncond, cond = out.float().chunk(2)  # [2N, C, h, w] -> 2 x [N, C, h, w]
    return (uncond + guidance_scale * (cond - uncond)).to(out_dtype).contiguous()


@triton.jit
def _strided(o, C, H, W, s0, s1, s2, s3, CL: tl.constexpr):
    # element o of an [N, C, H, W] tensor stored densely (channels_last order when CL, else NCHW) ->
    # its offset in a tensor of strides (s0, s1, s2, s3)
    if CL:
        c = o % C
        w = (o // C) % W
        y = (o // (C * W)) % H
    else:
        w = o % W
        y = (o // W) % H
        c = (o // (H * W)) % C
    n = o // (C * H * W)
    return n * s0 + c * s1 + y * s2 + w * s3


# x[r·N + n, c, y, w] = round(fp32(latents[n, c, y, w]) · scale) for each copy r < (2 if DUP else 1).
# o runs over one half of x's dense storage (the batch is outermost in NCHW and NHWC storage, so the
# second copy sits numel_half further on). (n, c, y, w) of o: NCHW  o = ((n·C + c)·H + y)·W + w,
# channels_last o = ((n·H + y)·W + w)·C + c; the latents are read through their strides s0..s3, or at
# o itself when their strides are x's (SAME). SCALED = False skips the multiply (a plain cast).
@triton.jit
def _cfg_input_kernel(
    src_ptr, dst_ptr, scale, numel_half, C, H, W, s0, s1, s2, s3,
    CL: tl.constexpr, SAME: tl.constexpr, SCALED: tl.constexpr, DUP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = o < numel_half
    if SAME:
        src = o
    else:
        src = _strided(o, C, H, W, s0, s1, s2, s3, CL)
    x = tl.load(src_ptr + src, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        x = x * scale
    x = x.to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + o, x, mask=mask)
    if DUP:
        tl.store(dst_ptr + numel_half + o, x, mask=mask)


# g_out[n, c, y, w] = u + g·(c − u), u = fp32(out[n, c, y, w]), c = fp32(out[N + n, c, y, w]); each of
# −, ·, + rounded to fp32 (launched without FMA contraction), one rounding to g_out's dtype. o runs over
# g_out's contiguous NCHW storage; out is read through its strides (u at n·s0 + ..., c a further N·s0),
# or at o and o + numel when out is NCHW-contiguous (SAME).
@triton.jit
def _cfg_combine_kernel(
    src_ptr, dst_ptr, g, numel, C, H, W, s0, s1, s2, s3, cond_off,
    SAME: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = o < numel
    if SAME:
        src = o
    else:
        src = _strided(o, C, H, W, s0, s1, s2, s3, False)
    u = tl.load(src_ptr + src, mask=mask, other=0.0).to(tl.float32)
    cond = tl.load(src_ptr + cond_off + src, mask=mask, other=0.0).to(tl.float32)
    y_out = u + g * (cond - u)
    tl.store(dst_ptr + o, y_out.to(dst_ptr.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------


def _check_4d(x: torch.Tensor, name: str, what: str) -> None:
    if x.dim() != 4 or x.dtype not in FLOATS:
        raise ValueError(f"{what} expects {name} as a float [N, C, h, w] tensor, got {tuple(x.shape)} {x.dtype}")
    span = sum((s - 1) * st for s, st in zip(x.shape, x.stride())) if x.numel() else 0
    if max(span, 2 * x.numel()) + 1024 >= MAX_OFFSET:
        raise ValueError(f"{what}: {name} {tuple(x.shape)} is too large for int32 offsets")


def _block(numel: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps): latents are small (16K elements a 512² image); 1024 per program once that
    still fills every SM, else 256 so more SMs share the (latency-bound) pass."""
    return (1024, 4) if triton.cdiv(numel, 1024) >= _sm_count(device) else (256, 2)


def cfg_input(
    latents: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    channels_last: bool,
    duplicate: bool,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet input from the latents in one launch: [N, C, h, w] (any float dtype and layout) ->
    [2N (``duplicate``) or N, C, h, w] in ``dtype``, channels_last or NCHW-contiguous, = latents · scale.

    ``scale``: a Python float, multiplied in fp32 (1.0: a plain cast, no multiply). ``out``: a tensor of
    the result's shape, dtype, device and layout to write into (default a new one).
    """
    _check_4d(latents, "latents", "cfg_input")
    if dtype not in FLOATS:
        raise ValueError(f"cfg_input: dtype must be fp32/fp16/bf16, got {dtype}")
    n, c, h, w = latents.shape
    shape = (2 * n if duplicate else n, c, h, w)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=latents.device, memory_format=fmt)
    elif (
        out.shape != shape
        or out.dtype != dtype
        or out.device != latents.device
        or not out.is_contiguous(memory_format=fmt)
    ):
        raise ValueError(f"cfg_input: out must be a {shape} {dtype} tensor on {latents.device} in {fmt}")
    numel_half = latents.numel()
    if numel_half == 0:
        return out
    same = latents.is_contiguous(memory_format=fmt)  # then latents' offset of (n, c, y, w) is x's
    block, warps = _block(numel_half, latents.device)
    _cfg_input_kernel[(triton.cdiv(numel_half, block),)](
        latents, out, float(scale), numel_half, c, h, w, *latents.stride(),
        CL=channels_last, SAME=same, SCALED=float(scale) != 1.0, DUP=duplicate, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return out


def cfg_combine(
    out: torch.Tensor, guidance_scale: float, out_dtype: torch.dtype, *, result: torch.Tensor | None = None
) -> torch.Tensor:
    """The guided prediction in one launch: the UNet output [2N, C, h, w] (uncond half first; any float
    dtype and layout) -> [N, C, h, w] NCHW-contiguous in ``out_dtype`` = u + g·(c − u), fp32 math on the
    upcast halves, one rounding to ``out_dtype``. ``result``: a contiguous tensor of that
    shape, dtype and device to write into (default a new one).
    """
    _check_4d(out, "out", "cfg_combine")
    if out_dtype not in FLOATS:
        raise ValueError(f"cfg_combine: out_dtype must be fp32/fp16/bf16, got {out_dtype}")
    if out.shape[0] % 2:
        raise ValueError(f"cfg_combine: out needs an even batch (uncond and cond halves), got {tuple(out.shape)}")
    n, c, h, w = out.shape[0] // 2, *out.shape[1:]
    shape = (n, c, h, w)
    if result is None:
        result = torch.empty(shape, dtype=out_dtype, device=out.device)
    elif (
        result.shape != shape or result.dtype != out_dtype or result.device != out.device or not result.is_contiguous()
    ):
        raise ValueError(f"cfg_combine: result must be a contiguous {shape} {out_dtype} tensor on {out.device}")
    numel = result.numel()
    if numel == 0:
        return result
    block, warps = _block(numel, out.device)
    s0 = out.stride(0)
    _cfg_combine_kernel[(triton.cdiv(numel, block),)](
        out, result, float(guidance_scale), numel, c, h, w, *out.stride(), n * s0,
        SAME=out.is_contiguous(), BLOCK=block, num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return result
