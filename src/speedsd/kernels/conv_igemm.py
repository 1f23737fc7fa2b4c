"""Implicit-GEMM convolution (Triton) for the convs cuDNN runs far below the card's rate.

Two kinds of SD convs leave most of an H100 idle under cuDNN:

* the UNet's 8x8 convs (batch 2, 1280-2560 channels): M = 128 output pixels is ONE 128-row tile, so
  cuDNN's implicit GEMM runs ~10 programs on 132 SMs while 30-60 MB of weights stream from memory.
  Here the K = 9·C reduction is split over ``split`` programs per output tile (split-K), each writing
  an fp32 partial; the tile's last program to finish sums the partials, adds the bias and casts
  (``last_sums``), or a second small kernel does, spread over the whole output (measured faster for most
  split-K shapes on an H200: bench/results/kernels_conv_h200.md).
* the VAE's output conv (128 -> 3 channels at 512²): N = 3 output channels; cuDNN pads and copies.
  Here one program covers BLOCK_M pixels x all (padded to 16) output channels, no split.

The conv, as a GEMM over output pixels m = (b, oy, ox) and output channels n:

    y[m, n] = Σ_k A[m, k] · B[k, n],   k = (ky·KW + kx)·C + c,
    A[m, k] = x[b, c, oy·s − p + ky, ox·s − p + kx]   (0 outside x),   B[k, n] = w[n, c, ky, kx]

A K-block of BLOCK_K channels never straddles two taps (C % BLOCK_K == 0), so loading it is a gather of
BLOCK_M pixels' BLOCK_K contiguous channels of a channels_last x; the weight is read in place (a
channels_last weight makes each output channel's K row contiguous), never copied.

``IgemmConfig.tma`` (3x3 stride-1 pad-1 convs whose output tiles are whole pixel rows: the 8² level's 128
pixels = 2 images): both operands come by TMA descriptor instead of per-thread gathers. A tap's K block is
the box x[b0 : +BB, oy0 + ky − 1 : +TH, kx − 1 : +W, c0 : +BLOCK_K] of the [N, H, W, C] view (TMA zero-fills
the coordinates outside the image: the padding), seen as [BLOCK_M, BLOCK_K]; the weight block is a box of
the [N, 9·C] view. Measured on an H200 at 2x1280x8x8 -> 1280 (CUDA-graph replay, weights cycled out of L2;
bench/results/kernels_conv_h200.md): 20.2 µs, 17.2 with the partials summed by the second kernel, against
22.5 for the pointer kernel's best and 23.7 for cuDNN.
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
    tma: bool = False  # operands by TMA descriptor (3x3 stride-1 pad-1, tiles of whole pixel rows)

    def key(self) -> str:
        tail = ("" if self.last_sums else "r") + ("t" if self.tma else "")
        return f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split}w{self.warps}p{self.stages}{tail}"

    @staticmethod
    def parse(key: str) -> IgemmConfig:
        """Inverse of :meth:`key` (the per-card table stores configs as these strings)."""
        m = re.fullmatch(r"m(\d+)n(\d+)k(\d+)s(\d+)w(\d+)p(\d+)(r?)(t?)", key)
        if m is None:
            raise ValueError(f"not an implicit-GEMM conv config key: {key!r}")
        *sizes, two_kernel, tma = m.groups()
        return IgemmConfig(*map(int, sizes), last_sums=not two_kernel, tma=bool(tma))


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
    _finish(acc, y_ptr, b_ptr, p_ptr, cnt_ptr, pid, s, offs_m, offs_n, M, N, PARTIAL, LAST_SUMS, HAS_BIAS)


# the tile's output: y = acc (+ bias) with split 1; else this split's fp32 partial, and the tile's last split to
# finish sums every split's partial, in split order (so the result does not depend on which one is last), and
# re-arms the tile's counter for the next call
@triton.jit
def _finish(acc, y_ptr, b_ptr, p_ptr, cnt_ptr, tile, s, offs_m, offs_n, M, N,
            PARTIAL: tl.constexpr, LAST_SUMS: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    mn = offs_m[:, None] * N + offs_n[None, :]
    if PARTIAL:
        tl.store(p_ptr + s * M * N + mn, acc, mask=mask)
        if LAST_SUMS:
            splits = tl.num_programs(1)
            tl.debug_barrier()  # every thread's partial stored before the count is published
            done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if done == splits - 1:
                acc = tl.zeros(acc.shape, dtype=tl.float32)
                for t in range(0, splits):
                    acc += tl.load(p_ptr + t * M * N + mn, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + mn, acc.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + mn, acc.to(y_ptr.dtype.element_ty), mask=mask)


# The same GEMM with both operands by TMA (3x3 stride 1 pad 1). Program (tile, s): tile = (m-tile, n-tile),
# the m-tile = BB images x TH rows x all W columns = output pixels pid_m·BM .. +BM, at (b0, oy0):
#   acc[BM, BN] = Σ_{kb in split s} X[b0:+BB, oy0 + ky − 1:+TH, kx − 1:+W, c0:+BK] (as [BM, BK])
#                                    @ Wm[n0:+BN, kb·BK:+BK]ᵀ
#   kb = tap·(C / BK) + c0 / BK, tap = 3·ky + kx; Wm = the channels_last weight as [N, 9·C]; boxes past the
#   image (the padding) and past N come zero-filled.
@triton.jit
def _conv_igemm_tma_kernel(
    x_desc, w_desc, b_ptr, y_ptr, p_ptr, cnt_ptr, M, N, C, n_th, kb_per,
    PARTIAL: tl.constexpr, LAST_SUMS: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BB: tl.constexpr, TH: tl.constexpr, WW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = BB * TH * WW
    pid = tl.program_id(0)
    s = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid - pid_m * n_tiles
    b0 = (pid_m // n_th) * BB
    oy0 = (pid_m - (pid_m // n_th) * n_th) * TH
    c_blocks = C // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.range(0, kb_per, num_stages=STAGES):
        kb = s * kb_per + i
        tap = kb // c_blocks
        ky = tap // 3
        kx = tap - ky * 3
        a = x_desc.load([b0, oy0 + ky - 1, kx - 1, (kb - tap * c_blocks) * BLOCK_K]).reshape(BLOCK_M, BLOCK_K)
        wt = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(a, wt.T, acc, input_precision=PREC)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the tile's pixels are consecutive output rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _finish(acc, y_ptr, b_ptr, p_ptr, cnt_ptr, pid, s, offs_m, offs_n, M, N, PARTIAL, LAST_SUMS, HAS_BIAS)


# y[i] = Σ_s partial[s, i] (+ bias[i mod N]) (+ residual[i]), i over the M·N outputs, summed in fp32 and
# rounded once.
@triton.jit
def _splitk_sum_kernel(
    p_ptr, b_ptr, r_ptr, y_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        acc += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def sum_partials(
    parts: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, residual: torch.Tensor | None = None
) -> None:
    """y = Σ_s parts[s] (+ bias) (+ residual), summed in fp32 in split order and rounded once: parts fp32
    [S, M, N] contiguous, y the [M, N] outputs in memory order (a channels_last [B, N, H, W] tensor: M = B·H·W),
    bias [N] or None, residual None or a tensor of y's shape, dtype and memory order (not y itself)."""
    split, m, n = parts.shape
    if parts.dtype != torch.float32 or not parts.is_contiguous() or y.numel() != m * n:
        raise ValueError(f"sum_partials: parts must be contiguous fp32 [S, M, N] with M·N = y.numel(), got "
                         f"{tuple(parts.shape)} {parts.dtype} for y {tuple(y.shape)}")  # fmt: skip
    if residual is not None and (
        residual.shape != y.shape or residual.dtype != y.dtype or residual.stride() != y.stride()
        or residual.data_ptr() == y.data_ptr()
    ):  # fmt: skip
        raise ValueError("sum_partials: the residual must be laid out like y (and not be y)")
    block = 1024
    _splitk_sum_kernel[(triton.cdiv(m * n, block),)](
        parts, parts if bias is None else bias, parts if residual is None else residual, y, m * n, n, SPLIT=split,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip


def _sm_count(device: torch.device) -> int:
    """The device's SMs (cached, kernels/device.py); an H100's 132 under the interpreter, so the CPU
    tests split K as the GPU would."""
    return sm_count(device) if device.type == "cuda" else 132


def fill_split(tiles: int, k_blocks: int, sms: int) -> int:
    """K splits that give every SM a program, each split keeping >= 4 K-blocks (at most 16)."""
    return max(1, min(sms // max(tiles, 1), k_blocks // 4, 16))


def default_config(m: int, n: int, c: int, taps: int, device: torch.device) -> IgemmConfig:
    """A launch shape for a conv with no measured one: tiles that fit N, and enough K splits to give
    every SM a program (each split keeps >= 4 K-blocks)."""
    block_k = max(bk for bk in (16, 32, 64) if c % bk == 0)
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_m = 64 if n >= 64 else 128
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = fill_split(tiles, taps * c // block_k, _sm_count(device))
    return IgemmConfig(block_m, block_n, block_k, split, warps=4, stages=3)


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def nhwc_view(t: torch.Tensor) -> torch.Tensor:
    """A channels_last [N, C, H, W] tensor as its dense [N, H, W, C] view with canonical strides (a TMA tensor;
    channels_last-contiguous tensors may carry any stride on size-1 dims)."""
    n, c, h, w = t.shape
    return t.as_strided((n, h, w, c), (h * w * c, w * c, c, 1))


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A channels_last [Co, C, KH, KW] weight read in place as [Co, KH·KW·C] (each output channel's K row)."""
    co, c, kh, kw = weight.shape
    return weight.as_strided((co, kh * kw * c), (kh * kw * c, 1))


def _row_tiling(bsz: int, h: int, w: int, block_m: int) -> tuple[int, int] | None:
    """(BB images, TH rows) that make a tile of ``block_m`` output pixels whole rows, or None."""
    if block_m % w:
        return None
    rows = block_m // w
    if rows <= h:
        return (1, rows) if h % rows == 0 else None
    return (rows // h, h) if rows % h == 0 and bsz % (rows // h) == 0 else None


def tma_problem(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, cfg: IgemmConfig) -> str | None:
    """Why the TMA kernel cannot run conv2d(x, weight, stride, padding) with cfg; None when it can."""
    bsz, c, h, w = x.shape
    if tuple(weight.shape[2:]) != (3, 3) or stride != 1 or padding != 1:
        return "takes 3x3 convs with stride 1 and padding 1 only"
    cl = torch.channels_last
    if not (x.is_contiguous(memory_format=cl) and weight.is_contiguous(memory_format=cl)):
        return "needs channels_last x and weight (their [N, H, W, C] and [N, 9·C] views are the TMA tensors)"
    if x.data_ptr() % 16 or weight.data_ptr() % 16 or (c * x.element_size()) % 16:
        return "needs 16-byte aligned x and weight and rows of C channels a multiple of 16 bytes"
    if _row_tiling(bsz, h, w, cfg.block_m) is None or w > 256:
        return f"block_m={cfg.block_m} output pixels are not whole rows of a {bsz}x{h}x{w} output (W <= 256)"
    if cfg.block_n > 256 or cfg.block_k * x.element_size() < 16:
        return f"block_n <= 256 and block_k of >= 16 bytes, got {cfg.block_n}, {cfg.block_k}"
    return None


def _launch_tma(
    x: torch.Tensor,
    weight: torch.Tensor,
    b_arg: torch.Tensor,
    y: torch.Tensor,
    parts: torch.Tensor,
    counters: torch.Tensor,
    cfg: IgemmConfig,
    tiles: int,
    split: int,
    kb_per: int,
    flags: dict[str, object],
) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    bsz, c, h, w = x.shape
    n = weight.shape[0]
    bb, th = _row_tiling(bsz, h, w, cfg.block_m)
    x_nhwc, w_mat = nhwc_view(x), weight_matrix(weight)  # [N, H, W, C], [N, 9·C]
    x_desc = TensorDescriptor(x_nhwc, list(x_nhwc.shape), list(x_nhwc.stride()), [bb, th, w, cfg.block_k])
    w_desc = TensorDescriptor(w_mat, list(w_mat.shape), list(w_mat.stride()), [cfg.block_n, cfg.block_k])
    _conv_igemm_tma_kernel[(tiles, split)](
        x_desc, w_desc, b_arg, y, parts, counters, bsz * h * w, n, c, h // th, kb_per, **flags, BB=bb, TH=th, WW=w,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.stages, num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip


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
    if cfg.tma:
        why = tma_problem(x, weight, stride, padding, cfg)
        if why is not None:
            raise ValueError(f"conv2d_igemm with a TMA config: {why}")
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
    flags = dict(PARTIAL=partial, LAST_SUMS=last_sums, HAS_BIAS=has_bias, PREC=dot_precision(x.dtype))
    if cfg.tma:
        _launch_tma(x, weight, b_arg, y, parts, counters, cfg, tiles, split, k_blocks // split, flags)
    else:
        _conv_igemm_kernel[(tiles, split)](
            x, weight, b_arg, y, parts, counters, m, n, c, h, w, ho, wo, *x.stride(), *weight.stride(),
            k_blocks // split, KW=kw, STRIDE=stride, PAD=padding, **flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, num_warps=cfg.warps, num_stages=cfg.stages,
        )  # fmt: skip
    if partial and not last_sums:
        sum_partials(parts, bias, y)
    return y
