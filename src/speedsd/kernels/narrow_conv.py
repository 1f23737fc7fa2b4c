"""3x3 conv (stride 1, pad 1) to a few output channels, reading x once, with a GroupNorm+SiLU prologue.

SD's output convs (VAE decoder 128 -> 3 at 512², UNet 320 -> 4 at 64², VAE encoder 512 -> 8) are
memory-bound: the VAE's x is 64 MiB of fp16 against 1.5 MiB of output. An implicit GEMM gathers each
pixel's C channels once per tap (9x); here every pixel's channels are read once and multiplied by ALL
nine taps' weights in one GEMM, and the taps' products are summed afterwards at shifted pixels:

    Z[p, t·Co + o] = Σ_c A[p, c] · W[o, c, ky, kx]              t = 3·ky + kx,  N = 9·Co (pad to 2^k)
    y[b, oy, ox, o] = bias[o] + Σ_t Z[(b, oy + ky − 1, ox + kx − 1), t·Co + o]   (Z = 0 off the image)

A is x, or with the prologue A = silu(x·scale + shift) (scale, shift fp32 [N, C]: GroupNorm's affine
folded per sample and channel, scale = rstd_g·γ_c, shift = β_c − mean_g·scale), computed in fp32 right
after the load and rounded to x's dtype for tl.dot (fp32 accumulation). The conv's zero padding applies
to the normalised activation: Z is only formed for real pixels, and off-image pixels are zeroed after
the prologue (silu(shift) is not 0).

Two methods (``NarrowConvConfig.method``):

* ``"two_pass"`` (the reference design): kernel 1 writes Z in fp32 [N·H·W, 9·Co] (dense: 108 B a
  pixel at Co = 3), kernel 2 sums the nine shifted taps, adds the bias and writes y. HBM traffic at the
  VAE's 512²: x 64 MiB + Z 27 MiB written and read again + y 1.5 MiB ≈ 120 MiB, ~30 µs at 4 TB/s.
* ``"fused"`` (one kernel; :func:`fused_config` picks its tile): a program owns a
  TILE_H x TILE_W tile of pixels (power-of-2 sides) whose outer ring is a halo: it forms Z for all
  TILE_H·TILE_W pixels in registers, shifts it with ``tl.gather`` along the pixel axis
  (Z[m + (ky−1)·TILE_W + kx − 1, n]; for sm_90 Triton 3.6 lowers it to warp shuffles after one layout
  change of Z through shared memory) and writes the (TILE_H − 2) x (TILE_W − 2) interior's outputs. Z
  never leaves the SM; the halo is recomputed (16x16: 1.31x the GEMM and SM reads of x, 8x8: 1.78x). HBM
  traffic ≈ x + y, but measured on an H200 it loses to the two-pass design on the VAE's 512² (the gather
  and the halo cost more than Z's round trip, which stays mostly in L2) and wins on the UNet's 2 x 64²
  latents, where 8x8 tiles keep every SM busy.

Registers bound the fused tile: the [tile, block_k] prologue in fp32 plus Z and its shifted copy. ptxas
(sm_90a, Co = 3, prologue on) gives 16x16 k32 8 warps 142 registers uncapped, 128 without spills under
``maxnreg=128`` (two programs an SM; the default), 16x16 k64 4 warps 227, 16x32 255. Co = 4 widens Z to
64 columns (16x16 k32 8 warps: 182, 88 B of spills at 128), so it is left uncapped.

Both read x through its strides (channels_last is the fast layout: a pixel's channels are one run) and
the weight in place (no per-call weight copy: a CUDA graph replays only the conv's kernels). y has x's
dtype and memory format. Program bases are int64 (batch index); offsets inside one image are int32
(checked in the launcher). Under the CPU interpreter bf16 operands go to tl.dot as fp32 (its bf16 dot
misreads them): exact products and the same fp32 sums as the GPU's bf16 tensor-core dot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from speedsd.kernels.device import sm_count
from speedsd.kernels.softmax_attention import dot_precision, interpreted

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_CO = 8  # output channels this kernel takes (Z's N = 9·Co padded: 16, 32, 64 or 128 columns)
METHODS = ("fused", "two_pass")


@dataclass(frozen=True)
class NarrowConvConfig:
    """Launch shape. fused: a tile_h x tile_w pixel tile (halo ring included) a program; two_pass:
    block_m pixels a GEMM program, block_p pixels a shift-sum program. block_k: channels a K step;
    maxnreg: a register cap (ptxas), e.g. 128 to fit two 8-warp programs on an SM."""

    method: str = "fused"
    tile_h: int = 16
    tile_w: int = 16
    block_m: int = 128
    block_p: int = 256
    block_k: int = 32
    warps: int = 8
    stages: int = 3
    maxnreg: int | None = 128

    def key(self) -> str:
        tail = f"w{self.warps}s{self.stages}" + (f"r{self.maxnreg}" if self.maxnreg else "")
        if self.method == "fused":
            return f"fused{self.tile_h}x{self.tile_w}k{self.block_k}{tail}"
        return f"two_pass_m{self.block_m}p{self.block_p}k{self.block_k}{tail}"


# Named presets; the bench times these and more. Registers (ptxas for sm_90, Co = 3, with the prologue):
# 16x16 k32 w8 s3 fits 128 without spills (two 8-warp programs an SM; uncapped it takes 142, one program);
# the [tile, block_k] fp32 prologue tile and Z + its gathered copy are what fill them.
FUSED_16x16 = NarrowConvConfig()
FUSED_8x32 = NarrowConvConfig(tile_h=8, tile_w=32)
FUSED_8x16 = NarrowConvConfig(tile_h=8, tile_w=16, warps=4, maxnreg=None)
FUSED_8x8 = NarrowConvConfig(tile_h=8, tile_w=8, warps=4, maxnreg=None)
TWO_PASS = NarrowConvConfig(method="two_pass", block_k=64, warps=4, stages=2, maxnreg=None)
# Measured on an H200 with the prologue (bench/results/kernels_narrow_conv_h200.md): the two-pass design
# in 64-pixel GEMM blocks won at the VAE's 512² (61.5 µs; every fused tile >= 92: the gather's shuffles
# and the halo cost more than Z's round trip, which stays mostly in L2), at 256² (18.5 vs >= 27) and at
# the UNet's 2 x 64² (13.1 vs 15.7 for the best fused tile, 8x8). default_config's pick everywhere.
TWO_PASS_K32 = NarrowConvConfig(method="two_pass", block_m=64, block_k=32, warps=4, stages=3, maxnreg=None)
# fused_config's candidates, the least halo first: a 16x16 tile computes 256 pixels' Z for 196 outputs
# (1.31x), 8x16 1.52x, 8x8 1.78x
FUSED_BY_HALO = (FUSED_16x16, FUSED_8x16, FUSED_8x8)


def conv3x3_narrow_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """The same op by torch: conv2d(silu(x·scale + shift)) (prologue math in fp32, fp64 stays fp64; the
    activation rounded to x's dtype, as a separate GroupNorm+SiLU pass would store it)."""
    a = x
    if scale is not None or silu:
        a = x.to(torch.promote_types(x.dtype, torch.float32))
        if scale is not None:
            a = a * scale.to(a.dtype)[:, :, None, None] + shift.to(a.dtype)[:, :, None, None]
        if silu:
            a = F.silu(a)
        a = a.to(x.dtype)
    return F.conv2d(a, weight, bias, padding=1)


# acc[m, n] = Σ_{c < C} A[m, c] · Wt[c, n]   over K steps of BLOCK_K channels (fp32 accumulation), where
#   A[m, c] = act(x[pixel m, c]) if pix_ok[m] else 0,  act(v) = silu(v·scale[c] + shift[c]) (as enabled),
#   Wt[c, n] = w[o, c, ky, kx] for n = (3·ky + kx)·CO + o < 9·CO, else 0.
# x_pix: [BLOCK_M] pointers to each pixel's channel 0.
@triton.jit
def _tap_products(
    x_pix, pix_ok, w_ptr, sc_ptr, sh_ptr, C, sxc, swo, swc, swh, sww,
    CO: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    tap = offs_n // CO
    o = offs_n - tap * CO
    ky = tap // 3
    kx = tap - ky * 3
    n_ok = offs_n < 9 * CO
    w_col = w_ptr + o * swo + ky * swh + kx * sww  # [BLOCK_N] pointers to w[o, 0, ky, kx]
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < C
        a_ok = pix_ok[:, None] & k_ok[None, :]
        a = tl.load(x_pix[:, None] + k[None, :] * sxc, mask=a_ok, other=0.0)  # [BLOCK_M, BLOCK_K]
        if AFFINE or SILU:
            v = a.to(tl.float32)
            if AFFINE:
                s = tl.load(sc_ptr + k, mask=k_ok, other=0.0)
                t = tl.load(sh_ptr + k, mask=k_ok, other=0.0)
                v = v * s[None, :] + t[None, :]
            if SILU:
                v = v * tl.sigmoid(v)
            a = tl.where(a_ok, v, 0.0).to(a.dtype)  # the padding is zero AFTER the prologue
        wt = tl.load(w_col[None, :] + k[:, None] * swc, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's tl.dot misreads bf16: exact fp32 products, the same fp32 sums
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=PREC)
    return acc


# Fused, one program per (tile, sample b). Tile pixel m = r·TILE_W + c sits at (iy, ix) = (ty·(TILE_H − 2)
# − 1 + r, tx·(TILE_W − 2) − 1 + c); with Z = _tap_products of the tile (0 for off-image pixels):
#   G[m, n] = Z[m + (ky − 1)·TILE_W + (kx − 1), n]              (tl.gather along m; n = (3·ky + kx)·CO + o)
#   y[b, o, iy, ix] = bias[o] + Σ_{n: n mod CO = o, n < 9·CO} G[m, n]   for the interior 1 <= r, c <= TILE − 2
# (interior pixels' shifted rows stay inside the tile; the halo's clamped gathers are never stored).
@triton.jit
def _fused_kernel(
    x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, y_ptr,
    C, H, W, tiles_w,
    sxb, sxc, sxh, sxw, swo, swc, swh, sww, syb, syc, syh, syw,
    CO: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ty = pid // tiles_w
    tx = pid - ty * tiles_w
    m = tl.arange(0, BLOCK_M)
    r = m // TILE_W
    c = m - r * TILE_W
    iy = ty * (TILE_H - 2) - 1 + r
    ix = tx * (TILE_W - 2) - 1 + c
    in_img = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    x_pix = x_ptr + b * sxb + iy * sxh + ix * sxw
    z = _tap_products(
        x_pix, in_img, w_ptr, sc_ptr + b * C, sh_ptr + b * C, C, sxc, swo, swc, swh, sww,
        CO, AFFINE, SILU, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    n = tl.arange(0, BLOCK_N)
    tap = n // CO
    ky = tap // 3
    kx = tap - ky * 3
    src = m[:, None] + ((ky - 1) * TILE_W + kx - 1)[None, :]  # [BLOCK_M, BLOCK_N] source pixel of G
    src = tl.minimum(tl.maximum(src, 0), BLOCK_M - 1)
    g = tl.gather(z, src, axis=0)
    out_ok = in_img & (r >= 1) & (r <= TILE_H - 2) & (c >= 1) & (c <= TILE_W - 2)
    y_pix = y_ptr + b * syb + iy * syh + ix * syw
    for o in tl.static_range(CO):
        sel = (n - tap * CO == o) & (n < 9 * CO)
        v = tl.sum(tl.where(sel[None, :], g, 0.0), axis=1)  # [BLOCK_M]
        if HAS_BIAS:
            v += tl.load(b_ptr + o).to(tl.float32)
        tl.store(y_pix + o * syc, v.to(y_ptr.dtype.element_ty), mask=out_ok)


# Two-pass, kernel 1, one program per (block of BLOCK_M pixels p of sample b):
#   z[b·H·W + p, n] = Z[p, n] (fp32) for n < 9·CO
@triton.jit
def _taps_gemm_kernel(
    x_ptr, w_ptr, sc_ptr, sh_ptr, z_ptr,
    C, H, W,
    sxb, sxc, sxh, sxw, swo, swc, swh, sww,
    CO: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hw = H * W
    p_ok = p < hw
    iy = p // W
    ix = p - iy * W
    x_pix = x_ptr + b * sxb + iy * sxh + ix * sxw
    z = _tap_products(
        x_pix, p_ok, w_ptr, sc_ptr + b * C, sh_ptr + b * C, C, sxc, swo, swc, swh, sww,
        CO, AFFINE, SILU, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    n = tl.arange(0, BLOCK_N)
    z_ptrs = z_ptr + (b * hw + p)[:, None] * (9 * CO) + n[None, :]
    tl.store(z_ptrs, z, mask=p_ok[:, None] & (n < 9 * CO)[None, :])


# Two-pass, kernel 2, one program per (block of BLOCK_P output pixels (oy, ox) of sample b):
#   y[b, o, oy, ox] = bias[o] + Σ_{t = 3·ky + kx} z[b·H·W + (oy + ky − 1)·W + ox + kx − 1, t·CO + o]
#   (terms whose source pixel is off the image are 0)
@triton.jit
def _shift_sum_kernel(
    z_ptr, b_ptr, y_ptr, H, W, syb, syc, syh, syw,
    CO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    hw = H * W
    p_ok = p < hw
    oy = p // W
    ox = p - oy * W
    o = tl.arange(0, BLOCK_O)
    o_ok = o < CO
    z_img = z_ptr + b * hw * (9 * CO)
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for t in tl.static_range(9):
        sy = oy + (t // 3 - 1)
        sx = ox + (t % 3 - 1)
        ok = p_ok & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
        q = sy * W + sx
        z_ptrs = z_img + q[:, None] * (9 * CO) + (t * CO + o)[None, :]
        acc += tl.load(z_ptrs, mask=ok[:, None] & o_ok[None, :], other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + b * syb + (oy * syh + ox * syw)[:, None] + o[None, :] * syc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


def _tiles(size: int, tile: int) -> int:
    """Tiles of ``tile`` pixels (a halo pixel each side) covering ``size`` output pixels."""
    return triton.cdiv(size, tile - 2)


def default_config(n: int, c: int, co: int, h: int, w: int, device: torch.device) -> NarrowConvConfig:
    """The measured winner on every SD shape (TWO_PASS_K32), block_k 16 for C <= 16."""
    return dataclasses.replace(TWO_PASS_K32, block_k=16 if c <= 16 else 32)


def fused_config(n: int, h: int, w: int, co: int, device: torch.device) -> NarrowConvConfig:
    """The fused tile with the least halo that still gives every SM a program (small images trade halo
    for parallelism). Above 3 output channels (Z 64-128 columns wide) no register cap: 128 would spill."""
    sms = sm_count(device) if device.type == "cuda" else 132  # the CPU tests pick as an H100 would
    fits = [t for t in FUSED_BY_HALO if n * _tiles(h, t.tile_h) * _tiles(w, t.tile_w) >= sms]
    best = fits[0] if fits else FUSED_BY_HALO[-1]
    return dataclasses.replace(best, maxnreg=best.maxnreg if 9 * co <= 32 else None)


def _is_pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _check_config(cfg: NarrowConvConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"conv3x3_narrow: method must be one of {METHODS}, got {cfg.method!r}")
    sides = (cfg.tile_h, cfg.tile_w) if cfg.method == "fused" else (cfg.block_m, cfg.block_p)
    if not all(_is_pow2(s) for s in (*sides, cfg.block_k)) or cfg.block_k < 16:
        raise ValueError(f"conv3x3_narrow: block sides must be powers of 2 (block_k >= 16), got {cfg}")
    if cfg.method == "fused" and (min(cfg.tile_h, cfg.tile_w) < 4 or cfg.tile_h * cfg.tile_w < 16):
        raise ValueError(f"conv3x3_narrow: fused tiles need sides >= 4 and >= 16 pixels, got {cfg}")
    if cfg.method == "two_pass" and cfg.block_m < 16:
        raise ValueError(f"conv3x3_narrow: two_pass needs block_m >= 16, got {cfg}")


def _span(t: torch.Tensor) -> int:
    """Largest element offset inside one sample (dims 1..3) of a 4-d tensor."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]))


def conv3x3_narrow(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
    out: torch.Tensor | None = None,
    config: NarrowConvConfig | None = None,
) -> torch.Tensor:
    """conv2d(act(x), weight, bias, padding=1), act(x) = silu(x·scale + shift) (each part optional).

    x [N, C, H, W] (channels_last is the fast layout; any strides work), weight [Co, C, 3, 3] with
    Co <= 8, bias [Co] or None, all float (x and weight one dtype: fp16, bf16 or fp32, on one device);
    scale and shift [N, C] (both or neither; used in fp32). Returns y [N, Co, H, W] in x's dtype and
    memory format, or writes ``out`` (any strides) and returns it.
    """
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"conv3x3_narrow expects x [N, C, H, W] and weight [Co, C, 3, 3], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if x.dtype not in FLOATS or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"conv3x3_narrow needs x and weight of one float dtype on one device, got {x.dtype} on "
                         f"{x.device}, {weight.dtype} on {weight.device}")  # fmt: skip
    n, c, h, w = x.shape
    co = weight.shape[0]
    if not 1 <= co <= MAX_CO or min(n, c, h, w) < 1:
        raise ValueError(f"conv3x3_narrow takes 1..{MAX_CO} output channels and a non-empty x, got {co}, x "
                         f"{tuple(x.shape)}")  # fmt: skip
    if bias is not None and (bias.shape != (co,) or bias.device != x.device or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float [{co}] tensor on {x.device}, got {tuple(bias.shape)} {bias.dtype}")
    if (scale is None) != (shift is None):
        raise ValueError("conv3x3_narrow: pass scale and shift together (or neither)")
    affine = scale is not None
    if affine:
        for name, t in (("scale", scale), ("shift", shift)):
            if t.shape != (n, c) or t.device != x.device or not t.is_floating_point():
                raise ValueError(f"{name} must be a float [{n}, {c}] tensor on {x.device}, got {tuple(t.shape)}")
        scale, shift = scale.float().contiguous(), shift.float().contiguous()
    cl = x.is_contiguous(memory_format=torch.channels_last)
    if out is None:
        fmt = torch.channels_last if cl else torch.contiguous_format
        out = torch.empty((n, co, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    elif out.shape != (n, co, h, w) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be [{n}, {co}, {h}, {w}] {x.dtype} on {x.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")  # fmt: skip
    if max(_span(x), _span(out), weight.numel(), n * c) >= 2**31 or 9 * co * h * w >= 2**31:
        raise ValueError("conv3x3_narrow: one sample too large for 32-bit indexing")
    cfg = config or default_config(n, c, co, h, w, x.device)
    _check_config(cfg)
    block_n = max(16, triton.next_power_of_2(9 * co))
    sc_arg = scale if affine else weight
    sh_arg = shift if affine else weight
    b_arg = bias if bias is not None else weight
    upcast = x.dtype == torch.bfloat16 and interpreted(x.device)
    prec = "ieee" if upcast else dot_precision(x.dtype)
    flags = dict(CO=co, AFFINE=affine, SILU=bool(silu), PREC=prec, UPCAST=upcast)
    if cfg.method == "fused":
        tiles_w = _tiles(w, cfg.tile_w)
        _fused_kernel[(_tiles(h, cfg.tile_h) * tiles_w, n)](
            x, weight, b_arg, sc_arg, sh_arg, out, c, h, w, tiles_w,
            *x.stride(), *weight.stride(), *out.stride(),
            HAS_BIAS=bias is not None, TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, BLOCK_N=block_n,
            BLOCK_K=cfg.block_k, num_warps=cfg.warps, num_stages=cfg.stages, maxnreg=cfg.maxnreg, **flags,
        )  # fmt: skip
        return out
    z = torch.empty((n * h * w, 9 * co), dtype=torch.float32, device=x.device)  # [N·H·W, 9·Co] tap products
    _taps_gemm_kernel[(triton.cdiv(h * w, cfg.block_m), n)](
        x, weight, sc_arg, sh_arg, z, c, h, w, *x.stride(), *weight.stride(),
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k, num_warps=cfg.warps, num_stages=cfg.stages,
        maxnreg=cfg.maxnreg, **flags,
    )  # fmt: skip
    _shift_sum_kernel[(triton.cdiv(h * w, cfg.block_p), n)](
        z, b_arg, out, h, w, *out.stride(), CO=co, HAS_BIAS=bias is not None, BLOCK_P=cfg.block_p,
        BLOCK_O=max(2, triton.next_power_of_2(co)), num_warps=4,
    )  # fmt: skip
    return out
