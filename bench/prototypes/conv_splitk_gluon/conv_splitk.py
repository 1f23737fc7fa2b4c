"""Split-K Gluon (TMA + wgmma) 3x3 conv for the UNet's small-spatial convs on Hopper (sm_90). PROTOTYPE, not landed.

At 8² with batch 2 a 3x3 conv is a GEMM of M = 128 output pixels by N = 1280 channels over K = 9·C = 11520+:
cuDNN and the Triton implicit GEMM (conv_igemm.py) run it at ~1.4 TB/s of weight streaming, ~22 µs for 30 MB
of weights on an H200. This kernel gives each program a whole 128-pixel tile (weights read once) and
kb_per consecutive K blocks of it (split-K: tiles x SPLIT programs fill the SMs), with both wgmma operands
brought to shared memory by TMA: the input box [BB, TH, W, BK] of a tap (the padding is TMA's zero fill)
and the weight box [BN, BK] of the channels_last weight read in place as [Co, 9·C]. The partials are summed
in split order by the tile's last program (conv_splitk_kernels.py has the math and the protocol).

:func:`conv3x3_splitk` raises ValueError for anything its kernel cannot take; :func:`conv_splitk_problem`
answers the same question with the reason. :func:`conv3x3_splitk_ref` is the same conv by torch.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from speedsd.kernels.conv_igemm import _row_tiling as _tiling  # (BB images, TH rows) of a whole-row tile
from speedsd.kernels.device import arrival_counters, compile_ahead

SMEM_LIMIT = 232448  # bytes of dynamic shared memory a CTA may use on sm_90 (227 KiB)
PRODUCER_REGS = 40  # setmaxnreg of the 1-warp TMA producer


def conv3x3_splitk_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same conv by torch (cuDNN on a GPU): stride 1, padding 1."""
    return F.conv2d(x, weight, bias, 1, 1)


@dataclass(frozen=True)
class SplitKConfig:
    """Output tiles of ``bm`` pixels (whole rows) by ``bn`` channels, K blocks of ``bk`` channels through a
    ``stages``-deep SMEM ring, the K blocks of a tile split over ``split`` programs (rounded down to a divisor of
    the conv's 9·C / bk), ``warps`` consumer warps (4: one warpgroup, 8: two stacked along the pixels)."""

    bm: int = 128
    bn: int = 64
    bk: int = 64
    stages: int = 6
    split: int = 6
    warps: int = 4

    def __post_init__(self) -> None:
        pow2 = all(v > 0 and v & (v - 1) == 0 for v in (self.bm, self.bn))
        if not pow2 or self.bm not in (64, 128, 256) or not 16 <= self.bn <= 256 or self.bk not in (32, 64, 128):
            raise ValueError(f"{self}: bm 64/128/256, bn a power of 2 in 16..256, bk 32/64/128")
        if self.warps not in (4, 8) or self.bm % (16 * self.warps) or self.stages < 2 or self.split < 1:
            raise ValueError(f"{self}: 4 or 8 warps (16 pixel rows each at least), >= 2 stages, split >= 1")
        if self.smem_bytes() > SMEM_LIMIT:
            raise ValueError(f"{self} needs {self.smem_bytes()} B of shared memory (> {SMEM_LIMIT})")

    def smem_bytes(self) -> int:
        return self.stages * (self.bm + self.bn) * self.bk * 2 + 2 * self.stages * 8

    def key(self) -> str:
        return f"k{self.bm}x{self.bn}x{self.bk}p{self.stages}s{self.split}w{self.warps}"

    def __str__(self) -> str:
        return self.key()

    @staticmethod
    def parse(key: str) -> SplitKConfig:
        """Inverse of :meth:`key` (the per-card conv table stores configs as these strings)."""
        m = re.fullmatch(r"k(\d+)x(\d+)x(\d+)p(\d+)s(\d+)w(\d+)", key)
        if m is None:
            raise ValueError(f"not a split-K conv config key: {key!r}")
        return SplitKConfig(*map(int, m.groups()))


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    """The Gluon kernel module, or None where this Triton has no Gluon/Hopper API."""
    try:
        import conv_splitk_kernels  # this folder (on sys.path when run from it)
    except ImportError:
        return None
    return conv_splitk_kernels


def conv_splitk_problem(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: SplitKConfig
) -> str | None:
    """Why the kernel cannot compute conv3x3(x, weight) + bias with cfg; None when it can: the engine's Gluon
    conv's operand checks (cfg has its bk / bn), then this kernel's whole-row tiling."""
    from speedsd.kernels.conv_gluon import _problem

    why = _problem(x, weight, bias, cfg)  # type: ignore[arg-type]
    if why is not None:
        return why
    n, c, h, w = x.shape
    if w > 256 or w % 8 or _tiling(n, h, w, cfg.bm) is None:
        return f"config {cfg}: {cfg.bm}-pixel tiles of whole rows do not tile {n}x{h}x{w} (W a multiple of 8)"
    if n * h * w * weight.shape[0] * splits(c, cfg) >= 2**31:
        return f"too large for 32-bit offsets: x {tuple(x.shape)}, Co={weight.shape[0]}"
    return None


def splits(c: int, cfg: SplitKConfig) -> int:
    """The K split a launch uses: the largest divisor of the 9·C / bk K blocks not above cfg.split (equal
    splits: every program streams the same number of blocks)."""
    kb = 9 * c // cfg.bk
    return max(d for d in range(1, min(cfg.split, kb) + 1) if kb % d == 0)


def _launch_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    parts: torch.Tensor,
    counters: torch.Tensor,
    cfg: SplitKConfig,
) -> tuple[tuple[int, int], tuple, dict]:
    """(grid, positional args, constexprs + num_warps) of conv3x3_splitk_kernel; CPU tensors work too (the AOT
    compile builds its signature from them)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    n, c, h, w = x.shape
    co = weight.shape[0]
    bb, th = _tiling(n, h, w, cfg.bm)
    split = splits(c, cfg)
    # dense views with canonical strides (channels_last-contiguous tensors may carry any stride on size-1 dims)
    x_nhwc = x.as_strided((n, h, w, c), (h * w * c, w * c, c, 1))  # [N, C, H, W] -> [N, H, W, C]
    w_mat = weight.as_strided((co, 9 * c), (9 * c, 1))  # [Co, C, 3, 3] channels_last -> [Co, 9·C]

    def desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gl.float16))

    tiles = (n // bb) * (h // th) * (co // cfg.bn)
    args = (desc(x_nhwc, [bb, th, w, cfg.bk]), desc(w_mat, [cfg.bn, cfg.bk]), weight if bias is None else bias,
            parts, y, counters, n * h * w, co, c, h // th, co // cfg.bn, 9 * c // cfg.bk // split)  # fmt: skip
    const = dict(STAGES=cfg.stages, HAS_BIAS=bias is not None, PRODUCER_REGS=PRODUCER_REGS, num_warps=cfg.warps)
    return (tiles, split), args, const


def conv3x3_splitk(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: SplitKConfig | None = None
) -> torch.Tensor:
    """conv2d(x, weight, bias, stride=1, padding=1) -> fp16 [N, Co, H, W] channels_last.

    x: fp16 [N, C, H, W] channels_last; weight: fp16 [Co, C, 3, 3] channels_last; bias: None or [Co] fp16/fp32
    (added in fp32 before the fp16 store). C a multiple of config.bk, Co of config.bn, W a multiple of 8, and
    config.bm pixels whole rows of the input (e.g. 128 = 2 images of 8x8 or 8 rows of 16).
    """
    cfg = config or SplitKConfig()
    why = conv_splitk_problem(x, weight, bias, cfg)
    if why is not None:
        raise ValueError(f"conv3x3_splitk: {why}")
    n, c, h, w = x.shape
    co = weight.shape[0]
    split = splits(c, cfg)
    y = torch.empty((n, co, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    parts = torch.empty((split, n * h * w, co), dtype=torch.float32, device=x.device) if split > 1 else y
    counters = arrival_counters(x.device, n * h * w // cfg.bm * (co // cfg.bn))
    grid, args, const = _launch_args(x, weight, bias, y, parts, counters, cfg)
    with torch.cuda.device(x.device):
        _kernels().conv3x3_splitk_kernel[grid](*args, **const)
    return y


def compile_sm90(cfg: SplitKConfig, shape: tuple[int, int, int, int] = (2, 128, 8, 8), bias: bool = False,
                 capability: int = 90):  # fmt: skip
    """Compile the kernel ahead of time for ``capability`` without a GPU (the tests' ptxas check; in a process
    without TRITON_INTERPRET=1) for input ``shape`` [N, C, H, W] (sizes are not specialized; the tiling is):
    Triton's CompiledKernel."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    kern = _kernels()
    if kern is None:
        raise RuntimeError("this Triton has no Gluon Hopper API")
    n, c, h, w = shape
    co = 2 * cfg.bn
    x = torch.empty(shape, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    wt = torch.empty((co, c, 3, 3), dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    y = torch.empty((n, co, h, w), dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    b = torch.empty(co, dtype=torch.float16) if bias else None
    parts = torch.empty((2, n * h * w, co), dtype=torch.float32)
    _, args, const = _launch_args(x, wt, b, y, parts, torch.empty(4, dtype=torch.int32), cfg)
    fn = kern.conv3x3_splitk_kernel
    names = fn.arg_names
    sig = {names[i]: mangle_type(a) for i, a in enumerate(args)}
    sig.update({k: "constexpr" for k in const})
    constexprs = {(names.index(k),): v for k, v in const.items()}
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in ("bias_ptr", "p_ptr", "y_ptr", "cnt_ptr")}
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return compile_ahead(src, capability, num_warps=cfg.warps)
