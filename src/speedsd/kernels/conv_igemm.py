"""Implicit-GEMM convolution (Triton) for the convs cuDNN runs far below the card's rate.

Two kinds of SD convs leave most of an H100 idle under cuDNN:

* the UNet's 8x8 convs (batch 2, 1280-2560 channels): M = 128 output pixels is ONE 128-row tile, so
  cuDNN's implicit GEMM runs ~10 programs on 132 SMs while 30-60 MB of weights stream from memory.
  Here the K = 9·C reduction is split over ``split`` programs per output tile (split-K), each writing
  an fp32 partial, and a second small kernel sums the partials, adds the bias and casts.
* the VAE's output conv (128 -> 3 channels at 512²): N = 3 output channels; cuDNN pads and copies.
  Here one program covers BLOCK_M pixels x all (padded to 16) output channels, no split.

The conv, as a GEMM over output pixels m = (b, oy, ox) and output channels n:

    y[m, n] = Σ_k A[m, k] · B[k, n],   k = (ky·KW + kx)·C + c,
    A[m, k] = x[b, c, oy·s − p + ky, ox·s − p + kx]   (0 outside x),   B[k, n] = w[n, c, ky, kx]

A K-block of BLOCK_K channels never straddles two taps (C % BLOCK_K == 0), so loading it is a gather of
BLOCK_M pixels' BLOCK_K contiguous channels of a channels_last x; the weight is read in place (a
channels_last weight makes each output channel's K row contiguous), never copied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from speedsd.kernels.device import arrival_counters, sm_count
from speedsd.kernels.softmax_attention import dot_precision

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def conv2d_igemm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1, padding: int = 1
) -> torch.Tensor:
    """The same conv by torch (cuDNN on a GPU)."""
    return F.conv2d(x, weight, bias, stride, padding)


@dataclass(frozen=True)
class IgemmConfig:
    """Tile sizes, K split and launch shape of one conv; ``split`` 1 writes the output directly."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    split: int = 1
    warps: int = 4
    stages: int = 3
    last_sums: bool = True  # split > 1: the tile's last split sums the partials (else a second kernel)

    def key(self) -> str:
        tail = "" if self.last_sums else "r"
        return f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split}w{self.warps}p{self.stages}{tail}"

    @staticmethod
    def parse(key: str) -> IgemmConfig:
        """Inverse of :meth:`key` (the per-card table stores configs as these strings)."""
        m = re.fullmatch(r"m(\d+)n(\d+)k(\d+)s(\d+)w(\d+)p(\d+)(r?)", key)
        if m is None:
            raise ValueError(f"not an implicit-GEMM conv config key: {key!r}")
        *sizes, tail = m.groups()
        return IgemmConfig(*map(int, sizes), last_sums=not tail)


# y (or the split's fp32 partial) [M, N] = Σ over this program's K-blocks of A[m-tile, k-block] @
# B[k-block, n-tile]; A gathered from x per tap with zero padding, B read from w[n, c, ky, kx] in place.
@triton.jit
def _conv_igemm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr,
    M, N, C, H, W, Ho, Wo,
    sxb, sxc, sxh, sxw, swn, swc, swh, sww,
    kb_per,
    KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    PARTIAL: tl.constexpr, LAST_SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    s = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid - pid_m * n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    hw = Ho * Wo
    b = offs_m // hw
    r = offs_m - b * hw
    oy = r // Wo
    ox = r - oy * Wo
    x_row = x_ptr + b * sxb  # [BLOCK_M] pointers to each output pixel's image
    w_col = w_ptr + offs_n * swn  # [BLOCK_N] pointers to each output channel's filter
    c_blocks = C // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, kb_per):
        kb = s * kb_per + i
        tap = kb // c_blocks
        c = (kb - tap * c_blocks) * BLOCK_K + offs_k  # [BLOCK_K]
        ky = tap // KW
        kx = tap - ky * KW
        iy = oy * STRIDE - PAD + ky
        ix = ox * STRIDE - PAD + kx
        ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        a_ptrs = (x_row + iy * sxh + ix * sxw)[:, None] + c[None, :] * sxc  # [BLOCK_M, BLOCK_K]
        a = tl.load(a_ptrs, mask=ok[:, None], other=0.0)
        w_ptrs = (w_col + ky * swh + kx * sww)[None, :] + c[:, None] * swc  # [BLOCK_K, BLOCK_N]
        wt = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PREC)
    mask = m_ok[:, None] & n_ok[None, :]
    mn = offs_m[:, None] * N + offs_n[None, :]
    if PARTIAL:
        tl.store(p_ptr + s * M * N + mn, acc, mask=mask)
        if LAST_SUMS:
            # the tile's last split to finish sums every split's partial, in split order (so the result
            # does not depend on which one is last), and re-arms the tile's counter for the next call
            splits = tl.num_programs(1)
            tl.debug_barrier()  # every thread's partial stored before the count is published
            done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if done == splits - 1:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for t in range(0, splits):
                    acc += tl.load(p_ptr + t * M * N + mn, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + mn, acc.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + pid, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + mn, acc.to(y_ptr.dtype.element_ty), mask=mask)


# y[i] = Σ_s partial[s, i] (+ bias[i mod N]), i over the M·N outputs, summed in fp32.
@triton.jit
def _splitk_sum_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _sm_count(device: torch.device) -> int:
    """The device's SMs (cached, kernels/device.py); an H100's 132 under the interpreter, so the CPU
    tests split K as the GPU would."""
    return sm_count(device) if device.type == "cuda" else 132


def default_config(m: int, n: int, c: int, taps: int, device: torch.device) -> IgemmConfig:
    """A launch shape for a conv with no measured one: tiles that fit N, and enough K splits to give
    every SM a program (each split keeps >= 4 K-blocks)."""
    block_k = max(bk for bk in (16, 32, 64) if c % bk == 0)
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_m = 64 if n >= 64 else 128
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_blocks = taps * c // block_k
    split = max(1, min(_sm_count(device) // tiles, k_blocks // 4, 16))
    return IgemmConfig(block_m, block_n, block_k, split, warps=4, stages=3)


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv2d_igemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 1,
    config: IgemmConfig | None = None,
) -> torch.Tensor:
    """conv2d(x, weight, bias, stride, padding) as a Triton implicit GEMM; a channels_last output.

    x [B, C, H, W] (channels_last is the fast layout; any strides work), weight [N, C, KH, KW], bias [N]
    or None, all one float dtype on one device; C a multiple of 16. Sums in fp32.
    """
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d_igemm expects x [B, C, H, W] and weight [N, C, KH, KW], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if x.dtype not in FLOATS or weight.dtype != x.dtype or x.device != weight.device:
        raise ValueError(f"conv2d_igemm needs x and weight of one float dtype on one device, got {x.dtype} on "
                         f"{x.device}, {weight.dtype} on {weight.device}")  # fmt: skip
    bsz, c, h, w = x.shape
    n, wc, kh, kw = weight.shape
    if wc != c or c % 16:
        raise ValueError(f"conv2d_igemm needs weight channels == x channels, a multiple of 16; got {wc} vs {c}")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float [{n}] tensor on {x.device}, got {tuple(bias.shape)} {bias.dtype}")
    if stride < 1 or padding < 0:
        raise ValueError(f"need stride >= 1 and padding >= 0, got stride={stride} padding={padding}")
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d_igemm: a {kh}x{kw} filter leaves no output on a {h}x{w} input")
    m = bsz * ho * wo
    if max(x.numel(), weight.numel(), m * n * 16) >= 2**31:
        raise ValueError("conv2d_igemm: tensor too large for 32-bit indexing")
    cfg = config or default_config(m, n, c, kh * kw, x.device)
    if c % cfg.block_k:
        raise ValueError(f"config block_k={cfg.block_k} does not divide the {c} input channels")
    y = torch.empty((bsz, n, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    k_blocks = kh * kw * c // cfg.block_k
    split = max(d for d in range(1, min(cfg.split, k_blocks) + 1) if k_blocks % d == 0)  # equal splits
    partial = split > 1
    parts = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if partial else y
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    last_sums = partial and cfg.last_sums
    counters = arrival_counters(x.device, tiles) if last_sums else parts
    has_bias = bias is not None
    b_arg = bias if has_bias else weight
    _conv_igemm_kernel[(tiles, split)](
        x, weight, b_arg, y, parts, counters, m, n, c, h, w, ho, wo, *x.stride(), *weight.stride(), k_blocks // split,
        KW=kw, STRIDE=stride, PAD=padding, PARTIAL=partial, LAST_SUMS=last_sums, HAS_BIAS=has_bias,
        PREC=dot_precision(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    if partial and not last_sums:
        block = 1024
        _splitk_sum_kernel[(triton.cdiv(m * n, block),)](
            parts, b_arg, y, m * n, n, SPLIT=split, HAS_BIAS=has_bias, BLOCK=block, num_warps=4
        )
    return y
