"""SD's GEGLU feed-forward projection as a persistent, warp-specialized Gluon GEMM (Hopper sm_90).

The same op as :func:`speedsd.kernels.geglu.feed_forward_geglu` (x [M, K] @ Wᵀ, W [2F, K], + bias, then
value·GELU(gate) -> [M, F]). Like the Triton TMA kernel (kernels/ff_geglu_tma.py) it reads the value and gate
rows of W in one TMA box so each K step is one wide wgmma; unlike it, one TMA producer warp feeds a ring of
SMEM slots to the consumer warpgroups across tiles (persistent: one program per SM), so the next tile's loads
run under this tile's MMAs and its epilogue's store. The UNet's K is short (320-1280: 5-20 K steps a tile),
which leaves a one-tile-per-program kernel waiting on its pipeline fill and its epilogue. Kernel and math:
kernels/ff_geglu_gluon_kernels.py.

:func:`feed_forward_geglu_gluon` raises ValueError for what it cannot take; :func:`gluon_ff_supported`
answers the same question with False. The engine picks it per M where geglu.ff_plan names it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from types import ModuleType

import torch

from speedsd.kernels.device import compile_ahead, is_sm90, sm_count
from speedsd.kernels.ff_geglu_tma import tma_supported
from speedsd.kernels.geglu import feed_forward_geglu_ref

__all__ = ["FFGluonConfig", "feed_forward_geglu_gluon", "feed_forward_geglu_ref", "gluon_ff_supported"]

SMEM_LIMIT = 232448  # bytes of dynamic shared memory a CTA may use on sm_90 (227 KiB)
PRODUCER_REGS = 40  # setmaxnreg of the 1-warp TMA producer
PINGPONG_CONSUMER_REGS = 232  # setmaxnreg of the ping-pong's second consumer warpgroup


@dataclass(frozen=True)
class FFGluonConfig:
    """Output tiles of bm rows x bn columns (value and gate: a [bm, 2·bn] accumulator), K steps of bk through
    a `stages`-deep SMEM ring, `consumers` warpgroups (4 warps each, stacked along M), tiles in row groups of
    `group_m` (they share W boxes in L2), `occupancy` persistent programs per SM (0: one program per tile), so
    that one program's epilogue can run under another's MMAs; `pingpong`: two consumer warpgroups on alternate
    tiles, each with its own ring (one's epilogue under the other's MMAs; `consumers` must be 1: the tile's
    rows belong to one warpgroup)."""

    bm: int = 128
    bn: int = 64
    bk: int = 64
    stages: int = 4
    consumers: int = 1
    group_m: int = 8
    occupancy: int = 1
    pingpong: bool = False

    def __post_init__(self) -> None:
        if any(v <= 0 or v & (v - 1) for v in (self.bm, self.bn, self.bk)) or self.bk < 16 or self.bn < 16:
            raise ValueError(f"{self}: bm, bn, bk powers of 2, bn and bk >= 16")
        if self.consumers not in (1, 2) or self.bm % (64 * self.consumers) or self.bm > 256 or self.bn > 128:
            raise ValueError(f"{self}: 1 or 2 warpgroups of a multiple of 64 rows each (bm <= 256), bn <= 128")
        if (self.bm // self.consumers) * 2 * self.bn // 128 > 128:
            raise ValueError(f"{self}: more than 128 fp32 accumulator registers a thread")
        if self.pingpong and self.consumers != 1:
            raise ValueError(f"{self}: a ping-pong tile belongs to one warpgroup (consumers 1)")
        if self.stages < 2 or self.group_m < 1 or self.occupancy < 0:
            raise ValueError(f"{self}: >= 2 stages, group_m >= 1, occupancy >= 0")
        if self.smem_bytes() > SMEM_LIMIT:
            raise ValueError(f"{self} needs {self.smem_bytes()} B of shared memory (> {SMEM_LIMIT})")

    @property
    def warps(self) -> int:
        return 4 * self.consumers  # (ping-pong: the first consumer; the second is a worker partition)

    def smem_bytes(self) -> int:
        rings = 2 if self.pingpong else 1
        return rings * (
            self.stages * (self.bm + 2 * self.bn) * self.bk * 2 + self.bm * self.bn * 2 + 2 * self.stages * 8
        )

    def __str__(self) -> str:
        occ = f"o{self.occupancy}" if self.occupancy != 1 else ""
        pp = "pp" if self.pingpong else ""
        return f"ff{self.bm}x{self.bn}k{self.bk}s{self.stages}c{self.consumers}g{self.group_m}{occ}{pp}"

    @staticmethod
    def parse(key: str) -> FFGluonConfig:
        """Inverse of ``str``."""
        m = re.fullmatch(r"ff(\d+)x(\d+)k(\d+)s(\d+)c(\d+)g(\d+)(?:o(\d+))?(pp)?", key)
        if m is None or m.group(7) == "1":  # (occupancy 1 has no suffix: one key per config)
            raise ValueError(f"not a Gluon feed-forward config key: {key!r}")
        return FFGluonConfig(*map(int, m.groups()[:6]), occupancy=int(m.group(7) or 1), pingpong=bool(m.group(8)))


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    """The Gluon kernel module, or None where this Triton has no Gluon/Hopper API."""
    try:
        import ff_geglu_gluon_kernels
    except ImportError:
        return None
    return ff_geglu_gluon_kernels


def _problem(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out2: torch.Tensor) -> str | None:
    """Why the kernel cannot compute out2 = GEGLU(x2 @ wᵀ + bias); None when it can."""
    if x2.dim() != 2 or w.dim() != 2 or w.shape[1] != x2.shape[1] or w.shape[0] % 2:
        return f"expects x [M, K] and weight [2F, K], got {tuple(x2.shape)}, {tuple(w.shape)}"
    m, k = x2.shape
    f = w.shape[0] // 2
    if x2.dtype not in (torch.float16, torch.bfloat16) or w.dtype != x2.dtype or out2.dtype != x2.dtype:
        return f"needs fp16 or bf16 x, weight and out of one dtype, got {x2.dtype}, {w.dtype}, {out2.dtype}"
    if out2.shape != (m, f):
        return f"out must be [{m}, {f}], got {tuple(out2.shape)}"
    if bias is not None and (bias.shape != (2 * f,) or not bias.is_contiguous() or bias.device != x2.device):
        return f"bias must be a contiguous [{2 * f}] tensor on {x2.device}, got {tuple(bias.shape)}"
    if min(m, k, f) < 1:
        return f"empty problem: M={m}, K={k}, F={f}"
    if w.device != x2.device or out2.device != x2.device:
        return "x, weight and out must be on one device"
    if not tma_supported(x2, w, out2):
        return "needs 16-byte aligned rows (K and F multiples of 8) and unit column strides (TMA)"
    if not (is_sm90(x2.device) and _kernels() is not None):
        return f"needs an sm_90 (H100/H200) CUDA device and a Triton with Gluon, got {x2.device}"
    return None


def gluon_ff_supported(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out2: torch.Tensor) -> bool:
    """Whether :func:`feed_forward_geglu_gluon` takes these tensors."""
    return _problem(x2, w, bias, out2) is None


def _launch_args(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out2: torch.Tensor,
                 cfg: FFGluonConfig, approx: int, sms: int) -> tuple[tuple[int], tuple, dict]:  # fmt: skip
    """(grid, positional args, constexprs + num_warps) of ff_geglu_kernel; CPU tensors work too (the AOT compile
    builds its signature from them)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    m, k = x2.shape
    f = w.shape[0] // 2
    dt = gl.float16 if x2.dtype == torch.float16 else gl.bfloat16

    def desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dt))

    w3 = w.unflatten(0, (2, f))  # [2F, K] -> [2, F, K] (value rows, gate rows)
    xd, wd = desc(x2, [cfg.bm, cfg.bk]), desc(w3, [2, cfg.bn, cfg.bk])
    yd = desc(out2, [cfg.bm, cfg.bn])
    tiles = -(-m // cfg.bm) * -(-f // cfg.bn)
    args = (xd, wd, yd, out2 if bias is None else bias, m, f, k)
    const = dict(STAGES=cfg.stages, HAS_B=bias is not None, APPROX=approx, GROUP_M=cfg.group_m,
                 PRODUCER_REGS=PRODUCER_REGS, num_warps=cfg.warps)  # fmt: skip
    if cfg.pingpong:
        const["CONSUMER_REGS"] = PINGPONG_CONSUMER_REGS
    return (min(cfg.occupancy * sms, tiles) if cfg.occupancy else tiles,), args, const


def feed_forward_geglu_gluon(
    x2: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    out2: torch.Tensor,
    approx: int,
    config: FFGluonConfig | str | None = None,
) -> torch.Tensor:
    """out2 [M, F] = value·GELU(gate) of x2 [M, K] @ wᵀ (+ bias), w [2F, K]; fp16/bf16, fp32 accumulation.
    ``approx``: 0 exact (erf), 1 tanh, 2 quick (geglu.APPROX's codes). config: an FFGluonConfig or its key
    (None: the default FFGluonConfig())."""
    cfg = FFGluonConfig.parse(config) if isinstance(config, str) else config or FFGluonConfig()
    why = _problem(x2, w, bias, out2)
    if why is not None:
        raise ValueError(f"feed_forward_geglu_gluon: {why}")
    if approx not in (0, 1, 2):
        raise ValueError(f"feed_forward_geglu_gluon: approx must be 0, 1 or 2, got {approx}")
    kern = _kernels()
    assert kern is not None
    grid, args, const = _launch_args(x2, w, bias, out2, cfg, approx, sm_count(x2.device))
    fn = kern.ff_geglu_pp_kernel if cfg.pingpong else kern.ff_geglu_kernel
    with torch.cuda.device(x2.device):
        fn[grid](*args, **const)
    return out2


def compile_sm90(config: FFGluonConfig, bias: bool = True, approx: int = 0, capability: int = 90):
    """Compile the kernel ahead of time for ``capability`` without a GPU (the tests' ptxas check; in a process
    without TRITON_INTERPRET=1). Sizes are not specialized, so small CPU stand-ins give the launch's signature."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    kern = _kernels()
    if kern is None:
        raise RuntimeError("this Triton has no Gluon Hopper API")
    x2 = torch.empty((2 * config.bm, 2 * config.bk), dtype=torch.float16)
    w = torch.empty((4 * config.bn, 2 * config.bk), dtype=torch.float16)
    out2 = torch.empty((2 * config.bm, 2 * config.bn), dtype=torch.float16)
    b = torch.empty(4 * config.bn, dtype=torch.float16) if bias else None
    _, args, const = _launch_args(x2, w, b, out2, config, approx, 132)
    fn = kern.ff_geglu_pp_kernel if config.pingpong else kern.ff_geglu_kernel
    names = fn.arg_names
    sig = {names[i]: mangle_type(a) for i, a in enumerate(args)}
    sig.update({k: "constexpr" for k in const})
    constexprs = {(names.index(k),): v for k, v in const.items()}
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs={(names.index("b_ptr"),): [["tt.divisibility", 16]]})
    return compile_ahead(src, capability, num_warps=config.warps)
