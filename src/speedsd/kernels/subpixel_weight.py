"""The sub-pixel conv's weights: a 3x3 conv weight folded into the four phases' 2x2 weights.

``conv2d(interpolate(x, 2, "nearest"), W, padding=1)`` at output phase (a, b) = (row % 2, column % 2)
sees only 2x2 distinct input pixels, so the taps that land on the same pixel are summed beforehand
(kernels/subpixel_conv.py has the whole derivation):

    W4[k·Co + co, ci, u, v] = sum_{s in C_b(v)} ( sum_{r in R_a(u)} W[co, ci, r, s] ),   k = 2a + b,
    R_0 = ({0}, {1, 2}),  R_1 = ({0, 1}, {2})  (rows; C_b the same sets for columns).

``subpixel_weight_ref`` does it with torch ops (fp32 temporaries of the whole weight: ~12x its fp16 bytes
live at once). ``subpixel_weight`` is one Triton launch that reads each tap once and writes W4 with
nothing in between, so a denoising loop can fold its upsamplers' weights inside the loop (ops.loop_scope)
without a transient peak. Both sum in fp32, rows first, in ascending index order, and round once: the same
bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(weight: torch.Tensor) -> None:
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"subpixel_weight expects a 3x3 conv weight [Co, Ci, 3, 3], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"subpixel_weight expects a float weight, got {weight.dtype}")


def _format(weight: torch.Tensor) -> torch.memory_format:
    """W4's memory format: channels_last for a channels_last (and not also contiguous) weight."""
    cl = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _fold(t: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    """Fold 3 taps along ``dim`` into the 2 that phase ``phase`` sees: 0 -> [t0, t1 + t2], 1 -> [t0 + t1, t2]."""
    t0, t1, t2 = t.unbind(dim)
    pair = (t0, t1 + t2) if phase == 0 else (t0 + t1, t2)
    return torch.stack(pair, dim)


def subpixel_weight_ref(weight: torch.Tensor) -> torch.Tensor:
    """Plain torch: 3x3 conv weight [Co, Ci, 3, 3] -> W4 [4·Co, Ci, 2, 2] (phase 2a + b).

    Sums in fp32 (fp64 stays fp64), one rounding to weight.dtype; returned in the weight's memory format.
    """
    _check(weight)
    w = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    rows = [_fold(w, 2, a) for a in (0, 1)]  # [Co, Ci, 3, 3] -> [Co, Ci, 2, 3] per a
    w4 = torch.cat([_fold(rows[a], 3, b) for a in (0, 1) for b in (0, 1)], 0)  # 4 x [Co, Ci, 2, 2] -> [4·Co, ...]
    return w4.to(weight.dtype).contiguous(memory_format=_format(weight))


# Program (co, block of ci): the 9 taps W[co, ci, r, s] as fp32 [BLOCK] vectors; per row phase a the
# row-folded triples p (u = 0) and q (u = 1) over s, per column phase b their column folds, stored at
# W4[(2a + b)·Co + co, ci, u, v]. The sums in the reference's order: (rows) w[r] + w[r+1], then (columns)
# t[s] + t[s+1]. Strides in elements, so either memory format goes in and out.
@triton.jit
def _fold_kernel(
    w_ptr, o_ptr, Co, Ci, s_co, s_ci, s_r, s_s, o_co, o_ci, o_u, o_v, BLOCK: tl.constexpr,
):  # fmt: skip
    co = tl.program_id(0).to(tl.int64)
    ci = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = ci < Ci
    src = w_ptr + co * s_co + ci * s_ci
    w00 = tl.load(src, mask=m).to(tl.float32)
    w01 = tl.load(src + s_s, mask=m).to(tl.float32)
    w02 = tl.load(src + 2 * s_s, mask=m).to(tl.float32)
    w10 = tl.load(src + s_r, mask=m).to(tl.float32)
    w11 = tl.load(src + s_r + s_s, mask=m).to(tl.float32)
    w12 = tl.load(src + s_r + 2 * s_s, mask=m).to(tl.float32)
    w20 = tl.load(src + 2 * s_r, mask=m).to(tl.float32)
    w21 = tl.load(src + 2 * s_r + s_s, mask=m).to(tl.float32)
    w22 = tl.load(src + 2 * s_r + 2 * s_s, mask=m).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    for a in tl.static_range(2):
        if a == 0:  # rows [r0, r1 + r2]
            p0, p1, p2 = w00, w01, w02
            q0, q1, q2 = w10 + w20, w11 + w21, w12 + w22
        else:  # rows [r0 + r1, r2]
            p0, p1, p2 = w00 + w10, w01 + w11, w02 + w12
            q0, q1, q2 = w20, w21, w22
        for b in tl.static_range(2):
            if b == 0:  # columns [c0, c1 + c2]
                x0, x1, y0, y1 = p0, p1 + p2, q0, q1 + q2
            else:  # columns [c0 + c1, c2]
                x0, x1, y0, y1 = p0 + p1, p2, q0 + q1, q2
            dst = o_ptr + ((2 * a + b) * Co + co) * o_co + ci * o_ci
            tl.store(dst, x0.to(dt), mask=m)
            tl.store(dst + o_v, x1.to(dt), mask=m)
            tl.store(dst + o_u, y0.to(dt), mask=m)
            tl.store(dst + o_u + o_v, y1.to(dt), mask=m)


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weight [Co, Ci, 3, 3] (fp32/fp16/bf16, any strides) -> W4 [4·Co, Ci, 2, 2] in one Triton
    launch: the same bits as :func:`subpixel_weight_ref`, in the weight's memory format."""
    _check(weight)
    if weight.dtype not in FLOATS:
        raise ValueError(f"subpixel_weight's kernel takes fp32/fp16/bf16, got {weight.dtype} (subpixel_weight_ref)")
    co, ci = weight.shape[:2]
    out = torch.empty((4 * co, ci, 2, 2), dtype=weight.dtype, device=weight.device, memory_format=_format(weight))
    if out.numel() == 0:
        return out
    if max(abs(s) for s in weight.stride()) * 3 * max(co, ci) >= 2**31:
        raise ValueError(f"subpixel_weight: weight strides {weight.stride()} exceed int32 offsets")
    block = min(triton.next_power_of_2(ci), 256)
    grid = (co, triton.cdiv(ci, block))
    _fold_kernel[grid](weight, out, co, ci, *weight.stride(), *out.stride(), BLOCK=block,
                       num_warps=max(1, min(4, block // 64)))  # fmt: skip
    return out
