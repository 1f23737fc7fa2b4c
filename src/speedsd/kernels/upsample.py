"""Nearest-neighbour 2x upsampling in Triton, and its plain-torch reference.

``F.interpolate(x, scale_factor=2.0, mode="nearest")`` exactly (a pure copy: bit-exact in every
dtype): every input element is read once and written to its 2x2 output block.

  * channels_last ([N, H, W, C] storage): a program takes a [BLOCK_W, BLOCK_C] tile of one input row
    (channels contiguous: 16-byte loads) and stores it four times, at output pixels (2h+dy, 2w+dx).
    Each store writes runs of BLOCK_C contiguous channels.
  * NCHW: input row r = (n, c, h) of length W becomes output rows 2r and 2r+1 of length 2W. A program
    takes a [BLOCK_R, BLOCK_W] tile, interleaves it with itself (tl.join -> [BLOCK_R, BLOCK_W, 2],
    reshaped to [BLOCK_R, 2·BLOCK_W]: columns 2w and 2w+1) and stores that twice, contiguously.

Program bases are int64 scalars; offsets inside a tile are int32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TILE = 2048  # input elements per program


def upsample_nearest2x_ref(x: torch.Tensor) -> torch.Tensor:
    """torch's nearest 2x upsampling: the baseline."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


# channels_last, x [N·H, W, C] -> y [N·2H, 2W, C]; program (row = n·H + h, block of (w, c)):
#   y[2·row + dy, 2w + dx, c] = x[row, w, c]   for dy, dx in {0, 1}
# (output row n·2H + 2h + dy = 2·row + dy).
@triton.jit
def _up2x_cl_kernel(x_ptr, y_ptr, W, C, n_cb, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    wb = tl.program_id(1) // n_cb
    cb = tl.program_id(1) % n_cb
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (w < W)[:, None] & (c < C)[None, :]
    v = tl.load(x_ptr + row * W * C + (w[:, None] * C + c[None, :]), mask=mask)
    y0 = y_ptr + 2 * row * (2 * W * C)  # output row 2·row; row 2·row + 1 starts 2W·C later
    offs = (2 * w)[:, None] * C + c[None, :]  # output pixel 2w, channel c
    tl.store(y0 + offs, v, mask=mask)
    tl.store(y0 + offs + C, v, mask=mask)
    tl.store(y0 + 2 * W * C + offs, v, mask=mask)
    tl.store(y0 + 2 * W * C + offs + C, v, mask=mask)


# NCHW, x [R, W] (R = N·C·H rows) -> y [2R, 2W]; program (block of rows, block of columns):
#   y[2r + dy, 2w + dx] = x[r, w]   for dy, dx in {0, 1}
# The [BR, BW] tile is joined with itself to [BR, BW, 2] and read as [BR, 2·BW]: column j holds x[r, j // 2].
@triton.jit
def _up2x_nchw_kernel(x_ptr, y_ptr, R, W, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    w0 = tl.program_id(1) * BLOCK_W
    r = tl.arange(0, BLOCK_R)
    w = w0 + tl.arange(0, BLOCK_W)
    mask = (r0 + r < R)[:, None] & (w < W)[None, :]
    v = tl.load(x_ptr + r0 * W + (r[:, None] * W + w[None, :]), mask=mask)
    v2 = tl.reshape(tl.join(v, v), (BLOCK_R, 2 * BLOCK_W))  # [BR, BW] -> [BR, BW, 2] -> [BR, 2·BW]
    j = 2 * w0 + tl.arange(0, 2 * BLOCK_W)
    mask2 = (r0 + r < R)[:, None] & (j < 2 * W)[None, :]
    y0 = y_ptr + 2 * r0 * (2 * W) + (r[:, None] * (4 * W) + j[None, :])  # output row 2r
    tl.store(y0, v2, mask=mask2)
    tl.store(y0 + 2 * W, v2, mask=mask2)  # output row 2r + 1


def _check_int32(span: int) -> None:
    if span >= 2**31:
        raise ValueError(f"a tile spans {span} output elements; offsets inside a tile are int32")


def upsample_nearest2x(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, C, H, W] -> [N, C, 2H, 2W], each pixel repeated 2x2, in x's memory format.

    x: NCHW-contiguous or channels_last (anything else is copied to NCHW first), fp32/fp16/bf16.
    ``out``: write here (shape [N, C, 2H, 2W], x's dtype and device, dense in x's memory format).
    """
    if x.dim() != 4:
        raise ValueError(f"upsample_nearest2x expects x [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise ValueError(f"upsample_nearest2x supports fp32/fp16/bf16, got {x.dtype}")
    N, C, H, W = x.shape
    x_cl, x_nchw = x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()
    if not (x_cl or x_nchw):
        x, x_nchw = x.contiguous(), True
    cl = x_cl and not x_nchw
    if x_cl and x_nchw:  # H = W = 1 or C = 1: both layouts read x alike; out decides, else torch's choice
        if out is not None:
            cl = out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        else:
            cl = x.stride(1) < x.stride(3)
    fmt = torch.channels_last if cl else torch.contiguous_format
    shape = (N, C, 2 * H, 2 * W)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    elif (
        out.shape != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous(memory_format=fmt)
    ):
        raise ValueError(f"out must be a {shape} {x.dtype} tensor on {x.device}, dense in x's memory format")
    if x.numel() == 0:
        return out
    if cl:
        block_c = min(triton.next_power_of_2(C), 128)
        block_w = max(1, min(triton.next_power_of_2(W), TILE // block_c))
        n_cb = triton.cdiv(C, block_c)
        _check_int32(4 * W * C)
        warps = 8 if block_w * block_c >= 2048 else 4
        grid = (N * H, triton.cdiv(W, block_w) * n_cb)
        _up2x_cl_kernel[grid](x, out, W, C, n_cb, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)
    else:
        R = N * C * H
        block_w = min(triton.next_power_of_2(W), 1024)
        block_r = max(1, min(triton.next_power_of_2(R), TILE // block_w))
        _check_int32(4 * W * block_r)
        warps = 8 if block_w * block_r >= 2048 else 4
        grid = (triton.cdiv(R, block_r), triton.cdiv(W, block_w))
        _up2x_nchw_kernel[grid](x, out, R, W, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=warps)
    return out
