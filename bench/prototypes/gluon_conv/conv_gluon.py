"""3x3 stride-1 pad-1 conv for Hopper (sm_90) in Gluon: implicit GEMM fed by TMA, warp-specialized, persistent,
with an optional GroupNorm(+SiLU) prologue on the input.

    y[b, oy, ox, n] = Σ_{c, ky, kx} A(b, oy + ky − 1, ox + kx − 1, c) · w[n, c, ky, kx]

    A(b, iy, ix, c) = act(x[b, iy, ix, c])   if 0 <= iy < H and 0 <= ix < W,   else 0   (zero padding)
    act(v) = silu(v · scale[b, c] + shift[b, c])   (each part optional; fp32; silu(t) = t / (1 + e^-t))

The padding is applied to the TRANSFORMED input: an off-image pixel contributes 0, not silu(shift).

Implicit GEMM (one output tile = TH x TW pixels of one sample b (M = TH·TW GEMM rows) by BN output channels):

    acc[m, n] = Σ_{cb < C/BK} Σ_{tap < 9} A_tap,cb[m, :] · B_tap,cb[n, :]^T          (fp32 accumulation)
    m = i·TW + j  <->  output pixel (oy0 + i, ox0 + j);  tap = 3·ky + kx
    A_tap,cb = x[b, oy0 + ky − 1 : +TH, ox0 + kx − 1 : +TW, cb·BK : +BK]   (4-D TMA box [1, TH, TW, BK] seen as
               [TH·TW, BK]; TMA zero-fills coordinates outside [N, H, W, C], negative ones included: the padding)
    B_tap,cb = Wm[n0 : n0 + BN, tap·C + cb·BK : +BK]     Wm = weight (channels_last [Co, 3, 3, C]) viewed as [Co, 9·C]

K runs channel-block-major (cb outer, the 9 taps inner and unrolled, so ky, kx are compile-time constants).
Without the prologue both wgmma operands come from SMEM. With it the consumer loads A_tap,cb from SMEM into
registers (wgmma's register-A DotOperandLayout, ldmatrix), computes x·scale + shift in fp32, zeroes the rows
whose source pixel (oy0 + ky − 1 + i, ox0 + kx − 1 + j) lies off the image, applies SiLU (silu(0) = 0, so the
padding stays 0), packs to f16x2 and issues wgmma with A from registers. Two details keep that async:
  * the A of step i + 1 is built before wgmma(i) is issued (while wgmma(i − 1) runs): ptxas serializes all wgmmas
    of a kernel (warning C7513) when registers feeding a wgmma are written inside another wgmma's window;
  * the f16x2 packing is a non-pure inline asm, so LLVM neither sinks it past the previous wgmma nor splits it into
    halves that get re-packed at the wgmma (both also trigger C7513).
Two register-A tiles live next to the accumulator, so :func:`variant` halves BK (32, twice the stages) where a
warpgroup would hold more than 176 registers of accumulator + A at BK = 64 (ptxas spilled beyond that).
The SiLU is exact-ish (ex2.approx + rcp.approx, 2 MUFU ops an element) or, by config, tanh.approx in fp32 or f16x2.

Partitions (gl.warp_specialize):
  * producer (worker, 1 warp, few registers): walks the program's tiles and K steps, waits for a free ring
    slot (empty[s]), arms ready[s] with the byte count and issues the A and B TMA loads into slot s.
  * consumer (default partition, 4 warps = one warpgroup ('ws') or 8 warps = two warpgroups ('ws2') on one
    tile: each warpgroup owns half the tile's rows): waits ready[s], issues async wgmma, keeps one wgmma in
    flight (warpgroup_mma_wait(1)) and frees slot s−1 once the wgmma that read it retired. Epilogue: wait
    for the last wgmma, round to fp16, write the SMEM output tile and start its TMA store without waiting
    (the wait comes just before the next tile's epilogue writes the same buffer), so the store overlaps
    the next tile's mainloop; the producer keeps prefetching the next tile's K steps meanwhile.
Persistent: grid = min(#SMs, #tiles), program p takes tiles p, p + grid, ...; not persistent: one tile each.
Tile ids run output-channel block fastest, then tx, ty, b: programs in flight share their A boxes in L2.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = gl.constexpr(1.4426950408889634)
SILU_IMPLS = {"exact": 1, "tanh32": 2, "tanh16": 3}
SMEM_LIMIT = 232448  # bytes of dynamic shared memory a CTA may use on sm_90 (227 KiB)


@dataclass(frozen=True)
class GluonConvConfig:
    """An output tile of th x tw pixels by bn channels; K steps of bk channels through a `stages`-deep ring;
    `consumers` warpgroups (4 warps each) share the tile; `persistent`: one program per SM walking tiles;
    `epi_split`: the epilogue stores the tile in that many column slabs (less SMEM for the output buffer);
    `producer_regs`: the producer warp's register budget (setmaxnreg); `maxnreg`: the kernel's cap; `silu_impl`:
    how the prologue computes SiLU (SILU_IMPLS; see _act_tile)."""

    name: str = "ws"
    th: int = 8
    tw: int = 16
    bn: int = 128
    bk: int = 64
    stages: int = 4
    consumers: int = 1
    persistent: bool = True
    epi_split: int = 1
    producer_regs: int = 40
    maxnreg: int | None = None
    silu_impl: str = "exact"

    @property
    def bm(self) -> int:
        return self.th * self.tw

    @property
    def warps(self) -> int:
        return 4 * self.consumers

    def smem_bytes(self) -> int:
        ring = self.stages * (self.bm + self.bn) * self.bk * 2
        return ring + self.bm * (self.bn // self.epi_split) * 2 + 2 * self.stages * 8


# Named variants. 'ws': producer + one consumer warpgroup on a 128 x 128 tile (acc: 128 fp32 registers a thread);
# 'ws2': producer + two consumer warpgroups on a 128 x 256 tile (each warpgroup 64 x 256: 128 registers);
# '_np': the same kernel, one tile per program (grid = #tiles) instead of one program per SM;
# '_t32' / '_t16': the prologue's SiLU by tanh.approx.f32 / tanh.approx.f16x2 (SILU_IMPLS) instead of exp2 + rcp.
# :func:`variant` fits a variant to a layer (BN to Co, BK to the prologue's register budget).
_WS = GluonConvConfig(name="ws")
_WS2 = GluonConvConfig(name="ws2", bn=256, stages=4, consumers=2, epi_split=2)
VARIANTS: dict[str, GluonConvConfig] = {
    "ws": _WS,
    "ws_np": dataclasses.replace(_WS, name="ws_np", persistent=False),
    "ws2": _WS2,
    "ws2_np": dataclasses.replace(_WS2, name="ws2_np", persistent=False),
    "ws_t16": dataclasses.replace(_WS, name="ws_t16", silu_impl="tanh16"),
    "ws2_t32": dataclasses.replace(_WS2, name="ws2_t32", silu_impl="tanh32"),
    "ws2_t16": dataclasses.replace(_WS2, name="ws2_t16", silu_impl="tanh16"),
}
# registers a consumer thread may give to the accumulator plus two register-A tiles (the one in flight and the
# next): beyond this ptxas spilled at BK = 64 (sm_90, ptxas 12.8; setmaxnreg gives the consumer 240-255)
_PROLOGUE_REGS = 176


def variant(name: str, co: int, prologue: bool = False) -> GluonConvConfig:
    """The named variant fitted to a layer: BN to Co (Co = 128: 'ws2' takes 256 pixels (16 x 16) x 128; Co = 320:
    BN = 64) and, with the prologue, BK = 32 (twice the stages) where the accumulator and two register-A tiles
    would not fit the consumer's registers at BK = 64."""
    cfg = VARIANTS[name]
    if co % cfg.bn:
        if cfg.consumers == 2 and co % 128 == 0:
            cfg = dataclasses.replace(cfg, th=16, tw=16, bn=128)
        elif co % 128 == 0:
            cfg = dataclasses.replace(cfg, bn=128, epi_split=1)
        elif co % 64 == 0:
            cfg = dataclasses.replace(cfg, bn=64, epi_split=1)
        else:
            raise ValueError(f"no {name} tile divides Co={co}")
    rows = cfg.bm // cfg.consumers  # A rows (and accumulator rows) of one warpgroup
    acc_regs, a_regs = rows * cfg.bn // 128, rows * cfg.bk // 128  # fp32 acc; 2 fp16 tiles, 2 halves a register
    if prologue and acc_regs + a_regs > _PROLOGUE_REGS and cfg.bk == 64:
        cfg = dataclasses.replace(cfg, bk=32, stages=2 * cfg.stages)
    return cfg


def conv3x3_gluon_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """conv2d(act(x), weight, padding=1) in fp32 (fp64 stays fp64): act(x) = silu(x·scale + shift)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    a = x.to(acc)
    if scale is not None:
        a = a * scale.to(acc)[:, :, None, None] + shift.to(acc)[:, :, None, None]
    if silu:
        a = F.silu(a)
    return F.conv2d(a, weight.to(acc), padding=1)


# --------------------------------------------------------------------------------------------- kernel
@gluon.jit
def _tile_coords(t, n_th, n_tw, n_nb, TH: gl.constexpr, TW: gl.constexpr, BN: gl.constexpr):
    # t = ((b·n_th + ty)·n_tw + tx)·n_nb + nb  ->  (b, oy0, ox0, n0)
    nb = t % n_nb
    r = t // n_nb
    tx = r % n_tw
    r = r // n_tw
    ty = r % n_th
    b = r // n_th
    return b, ty * TH, tx * TW, nb * BN


@gluon.jit
def _load_partition(x_desc, w_desc, a_bufs, b_bufs, ready, empty, C, n_th, n_tw, n_nb, num_tiles):
    # Producer (1 warp). Ring slot s = it mod STAGES, its use count u = it div STAGES: wait until the consumer
    # freed the slot's previous use (empty[s] completes phase u − 1; a fresh barrier counts as phase −1 done,
    # so the first pass waits on parity 1 and falls through), then TMA A and B into it, completing ready[s].
    TH: gl.constexpr = x_desc.block_type.shape[1]
    TW: gl.constexpr = x_desc.block_type.shape[2]
    BK: gl.constexpr = x_desc.block_type.shape[3]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes  # TMA counts zero-filled bytes too
    kc = C // BK
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, oy0, ox0, n0 = _tile_coords(t, n_th, n_tw, n_nb, TH, TW, BN)
        for cb in range(kc):
            c0 = cb * BK
            for tap in gl.static_range(9):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, NBYTES)
                # A box at (b, oy0 + ky − 1, ox0 + kx − 1, c0); B box at (n0, tap·C + c0)
                tma.async_copy_global_to_shared(
                    x_desc, [b, oy0 + (tap // 3 - 1), ox0 + (tap % 3 - 1), c0], bar, a_bufs.index(s)
                )
                tma.async_copy_global_to_shared(w_desc, [n0, tap * C + c0], bar, b_bufs.index(s))
                it += 1


# SiLU implementations (SILU_MODE): 0 none; 1 exact: t · rcp(1 + 2^(−t·log2 e)) in fp32 (2 MUFU ops an element);
# 2 tanh32: silu(t) = h + h·tanh(h), h = t / 2, tanh.approx.f32 (1 MUFU op); 3 tanh16: the same with
# tanh.approx.f16x2 and one f16x2 fma on h rounded to fp16 (half a MUFU op an element). sm_90 retires 16 MUFU
# results a clock per SM against 2048 fp16 tensor FMAs: a 128 x 64 A tile costs 1024 (exact), 512 (tanh32) or 256
# (tanh16) clocks of MUFU per K step, against 512 clocks of wgmma for BN = 128 (1024 for BN = 256).
@gluon.jit
def _rcp_f32(x):
    return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _tanh_f32(h):
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [h], dtype=gl.float32, is_pure=True, pack=1)


# The last step of act() packs two fp32 results into one f16x2 register in a NON-pure asm: LLVM keeps it in program
# order (before the wgmma of the previous step is issued, see _mma_partition) and its 32-bit result feeds the
# wgmma as is. Pure per-half values would be re-packed (mov.b32 {h, h}) right at the wgmma, inside the previous
# wgmma's pipeline window, and ptxas would serialize the wgmmas (C7513).
@gluon.jit
def _pack_f16(v):
    # fp32 -> fp16, two elements a register: cvt.rn.f16x2.f32 d, hi, lo
    return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [v], dtype=gl.float16, is_pure=False,
                                     pack=2)  # fmt: skip


@gluon.jit
def _silu_half_pack_f16(h):
    # h = t / 2 (fp32) -> silu(t) = h + h·tanh(h) in f16x2 (h rounded to fp16 first), two elements a register
    return gl.inline_asm_elementwise(
        "{ .reg .b32 h, t; cvt.rn.f16x2.f32 h, $2, $1; tanh.approx.f16x2 t, h; fma.rn.f16x2 $0, h, t, h; }",
        "=r,f,f", [h], dtype=gl.float16, is_pure=False, pack=2,
    )  # fmt: skip


@gluon.jit
def _act_tile(a_smem, sc_ptr, sh_ptr, c_off, cols, row_y, row_x, H, W, KY: gl.constexpr, KX: gl.constexpr,
              AFFINE: gl.constexpr, SILU_MODE: gl.constexpr, a_layout: gl.constexpr):  # fmt: skip
    # A_tap = act(box) for tap (KY, KX): [BM, BK] fp16 SMEM box -> registers in wgmma's register-A layout.
    # c_off + cols: the box's channels in the flat [N·C] scale/shift (c_off = b·C + c0), reloaded every step
    # (L1 hits) rather than held across the 9 taps: registers are the scarce resource here.
    # row_y[m] = oy0 − 1 + m div TW, row_x[m] = ox0 − 1 + m mod TW: row m's source pixel is (row_y + KY, row_x + KX).
    iy = row_y + KY
    ix = row_x + KX
    ok = gl.expand_dims((iy >= 0) & (iy < H) & (ix >= 0) & (ix < W), 1)
    v = a_smem.load(a_layout).to(gl.float32)
    if AFFINE:
        v = v * gl.expand_dims(gl.load(sc_ptr + c_off + cols), 0) + gl.expand_dims(gl.load(sh_ptr + c_off + cols), 0)
    if SILU_MODE >= 2:  # the tanh forms take h = t / 2
        v = v * 0.5
    # zero the off-image rows before SiLU (silu(0) = 0 in every mode), so the packed f16x2 result goes to the wgmma
    # untouched (see _pack_f16)
    v = gl.where(ok, v, 0.0)
    if SILU_MODE == 1:
        v = v * _rcp_f32(1.0 + gl.exp2(v * -LOG2E))  # t·sigmoid(t): ex2.approx + rcp.approx, ~2 ulp
    elif SILU_MODE == 2:
        v = v + v * _tanh_f32(v)
    if SILU_MODE == 3:
        out = _silu_half_pack_f16(v)
    else:
        out = _pack_f16(v)
    return out


@gluon.jit
def _mma_partition(y_desc, a_bufs, b_bufs, ready, empty, c_smem, sc_ptr, sh_ptr, C, H, W, n_th, n_tw, n_nb,
                   num_tiles, AFFINE: gl.constexpr, SILU_MODE: gl.constexpr, EPI_SPLIT: gl.constexpr,
                   NUM_WARPS: gl.constexpr):  # fmt: skip
    TH: gl.constexpr = a_bufs.type.shape[2]
    TW: gl.constexpr = a_bufs.type.shape[3]
    BK: gl.constexpr = a_bufs.type.shape[4]
    BN: gl.constexpr = b_bufs.type.shape[1]
    BM: gl.constexpr = TH * TW
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    PROLOGUE: gl.constexpr = AFFINE or SILU_MODE > 0
    # wgmma: instruction m64nBNk16 per warpgroup; warps stacked along M (each warpgroup owns BM / #warpgroups rows)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BN, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, a_layout))
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, a_layout))
    kc = C // BK
    it = 0  # K steps consumed by this program (all its tiles): ring slot it mod STAGES, use (it div STAGES)
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, oy0, ox0, n0 = _tile_coords(t, n_th, n_tw, n_nb, TH, TW, BN)
        acc = gl.zeros([BM, BN], gl.float32, mma_layout)
        if PROLOGUE:
            # Register-A pipeline. The A of step it + 1 is built BEFORE wgmma(it) is issued: ptxas serializes
            # wgmma (C7513) if registers feeding a wgmma are written while an earlier wgmma of the same
            # pipeline window is in flight; built this way, act() of step it + 1 still overlaps wgmma(it − 1).
            row_y = oy0 - 1 + rows // TW
            row_x = ox0 - 1 + rows % TW
            c_off = b * C
            mbarrier.wait(ready.index(it % STAGES), (it // STAGES) & 1)
            a_cur = _act_tile(a_bufs.index(it % STAGES).reshape([BM, BK]), sc_ptr, sh_ptr, c_off, cols, row_y, row_x,
                              H, W, 0, 0, AFFINE, SILU_MODE, a_layout)  # fmt: skip
            for cb in range(kc):
                for tap in gl.static_range(9):
                    s = it % STAGES
                    s1 = (it + 1) % STAGES
                    if tap < 8:  # next step: tap + 1 of this channel block
                        mbarrier.wait(ready.index(s1), ((it + 1) // STAGES) & 1)
                        a_nxt = _act_tile(a_bufs.index(s1).reshape([BM, BK]), sc_ptr, sh_ptr, c_off + cb * BK, cols,
                                          row_y, row_x, H, W, (tap + 1) // 3, (tap + 1) % 3, AFFINE, SILU_MODE,
                                          a_layout)  # fmt: skip
                    else:  # next step: tap 0 of the next channel block (if any)
                        a_nxt = a_cur
                        if cb + 1 < kc:
                            mbarrier.wait(ready.index(s1), ((it + 1) // STAGES) & 1)
                            a_nxt = _act_tile(a_bufs.index(s1).reshape([BM, BK]), sc_ptr, sh_ptr, c_off + (cb + 1) * BK,
                                              cols, row_y, row_x, H, W, 0, 0, AFFINE, SILU_MODE, a_layout)  # fmt: skip
                    acc = warpgroup_mma(a_cur, b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    acc, a_cur = warpgroup_mma_wait(1, deps=(acc, a_cur))
                    # A was read through the generic proxy (ldmatrix) and TMA will refill the slot through the
                    # async proxy once it is released: order the reads first (cross-proxy WAR)
                    fence_async_shared()
                    _release_prev(empty, it, STAGES, cb, tap)
                    a_cur = a_nxt
                    it += 1
        else:
            for cb in range(kc):
                for tap in gl.static_range(9):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    a_view = a_bufs.index(s).reshape([BM, BK])  # [1, TH, TW, BK] -> [BM, BK]
                    b_view = b_bufs.index(s).permute((1, 0))  # [BN, BK] K-major -> [BK, BN]
                    acc = warpgroup_mma(a_view, b_view, acc, is_async=True)
                    acc = warpgroup_mma_wait(1, deps=(acc,))
                    _release_prev(empty, it, STAGES, cb, tap)
                    it += 1
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))  # the tile's last step
        _epilogue(y_desc, c_smem, acc, b, oy0, ox0, n0, BM, BN, EPI_SPLIT)
    tma.store_wait(0)


@gluon.jit
def _release_prev(empty, it, STAGES: gl.constexpr, cb, TAP: gl.constexpr):
    # wait(1) just retired the wgmma of step it − 1: free its ring slot, unless step it is its tile's first (the
    # previous tile's last slot was freed after its wait(0))
    if TAP == 0:
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=cb > 0)
    else:
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))


@gluon.jit
def _epilogue(y_desc, c_smem, acc, b, oy0, ox0, n0, BM: gl.constexpr, BN: gl.constexpr, EPI_SPLIT: gl.constexpr):
    # fp32 [BM, BN] -> fp16 tile -> SMEM -> TMA store y[b, oy0 : +TH, ox0 : +TW, n0 : +BN] (rows/columns past the
    # image are clipped by TMA). The store is left in flight: store_wait(0) before the buffer is rewritten (next
    # slab or next tile), so it overlaps the next tile's mainloop.
    out = acc.to(gl.float16)
    SPLIT_N: gl.constexpr = BN // EPI_SPLIT
    if EPI_SPLIT == 1:
        tma.store_wait(0)
        c_smem.reshape([BM, BN]).store(out)  # [1, TH, TW, BN] -> [BM, BN]
        fence_async_shared()
        tma.async_copy_shared_to_global(y_desc, [b, oy0, ox0, n0], c_smem)
    else:
        parts = _split_cols(out, EPI_SPLIT)  # EPI_SPLIT column slabs [BM, SPLIT_N] (register relabeling)
        for i in gl.static_range(EPI_SPLIT):
            tma.store_wait(0)
            c_smem.reshape([BM, SPLIT_N]).store(parts[i])
            fence_async_shared()
            tma.async_copy_shared_to_global(y_desc, [b, oy0, ox0, n0 + i * SPLIT_N], c_smem)


@gluon.jit
def _split_cols(x, PARTS: gl.constexpr):
    # [BM, BN] -> PARTS tensors [BM, BN / PARTS] (column slabs), by halving PARTS.bit_length() − 1 times
    xs = (x,)
    for _ in gl.static_range(PARTS.bit_length() - 1):
        nxt = ()
        for j in gl.static_range(len(xs)):
            v = xs[j]
            # [M, N] -> [M, 2, N/2] -> [M, N/2, 2] -> two [M, N/2]
            nxt += v.reshape([v.shape[0], 2, v.shape[1] // 2]).permute((0, 2, 1)).split()
        xs = nxt
    return xs


# sizes are not specialized (one compile per config serves every layer shape)
@gluon.jit(do_not_specialize=["C", "H", "W", "n_th", "n_tw", "n_nb", "num_tiles"])
def _conv3x3_ws_kernel(x_desc, w_desc, y_desc, sc_ptr, sh_ptr, C, H, W, n_th, n_tw, n_nb, num_tiles,
                       STAGES: gl.constexpr, AFFINE: gl.constexpr, SILU_MODE: gl.constexpr, EPI_SPLIT: gl.constexpr,
                       PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    # x_desc: [N, H, W, C] boxes [1, TH, TW, BK]; w_desc: [Co, 9·C] boxes [BN, BK];
    # y_desc: [N, H, W, Co] boxes [1, TH, TW, BN / EPI_SPLIT]; sc_ptr, sh_ptr: fp32 [N, C] (read iff AFFINE)
    a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    c_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_mma_partition, (y_desc, a_bufs, b_bufs, ready, empty, c_smem, sc_ptr, sh_ptr, C, H, W, n_th, n_tw, n_nb,
                          num_tiles, AFFINE, SILU_MODE, EPI_SPLIT, num_warps)),
        (_load_partition, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, C, n_th, n_tw, n_nb, num_tiles)),
    ], [1], [PRODUCER_REGS])  # fmt: skip


# --------------------------------------------------------------------------------------------- launcher
@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _nvmma(block: list[int]) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for(block, gl.float16)


def prepare(
    x: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
    cfg: GluonConvConfig,
    num_sms: int,
) -> tuple[tuple, dict, tuple[int], dict]:
    """(positional args, constexprs, grid, launch options) for _conv3x3_ws_kernel. Works on CPU tensors too
    (the AOT check builds its signature from them)."""
    n, c, h, w = x.shape
    co = weight.shape[0]
    x_nhwc = x.permute(0, 2, 3, 1)  # [N, C, H, W] channels_last -> dense [N, H, W, C] view
    w_mat = weight.permute(0, 2, 3, 1).reshape(co, 9 * c)  # channels_last [Co, C, 3, 3] -> [Co, 9·C] view
    y_nhwc = y.permute(0, 2, 3, 1)
    xb = [1, cfg.th, cfg.tw, cfg.bk]
    wb = [cfg.bn, cfg.bk]
    yb = [1, cfg.th, cfg.tw, cfg.bn // cfg.epi_split]
    xd = TensorDescriptor.from_tensor(x_nhwc, xb, _nvmma(xb))
    wd = TensorDescriptor.from_tensor(w_mat, wb, _nvmma(wb))
    yd = TensorDescriptor.from_tensor(y_nhwc, yb, _nvmma(yb))
    n_th, n_tw, n_nb = triton.cdiv(h, cfg.th), triton.cdiv(w, cfg.tw), co // cfg.bn
    num_tiles = n * n_th * n_tw * n_nb
    grid = (min(num_sms, num_tiles) if cfg.persistent else num_tiles,)
    affine = scale is not None
    sc = scale if affine else y  # unused pointer when not AFFINE
    sh = shift if affine else y
    args = (xd, wd, yd, sc, sh, c, h, w, n_th, n_tw, n_nb, num_tiles)
    const = dict(STAGES=cfg.stages, AFFINE=affine, SILU_MODE=SILU_IMPLS[cfg.silu_impl] if silu else 0,
                 EPI_SPLIT=cfg.epi_split,
                 PRODUCER_REGS=cfg.producer_regs)  # fmt: skip
    opts = dict(num_warps=cfg.warps)
    if cfg.maxnreg:
        opts["maxnreg"] = cfg.maxnreg
    return args, const, grid, opts


def check_operands(x, weight, scale, shift, cfg, who: str) -> None:
    """The operand checks of ``who`` (this conv3x3_gluon, ../gluon_conv_halo's conv3x3_halo): ValueError if the
    kernel with cfg (bk, bn, smem_bytes()) cannot take them."""
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"{who} expects x [N, C, H, W] and weight [Co, C, 3, 3], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if x.dtype != torch.float16 or weight.dtype != torch.float16 or weight.device != x.device:
        raise ValueError(f"{who} needs fp16 x and weight on one device, got {x.dtype}, {weight.dtype}")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{who} needs a channels_last x")
    if not weight.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{who} needs a channels_last weight (read in place as [Co, 9·C])")
    n, c, h, w = x.shape
    co = weight.shape[0]
    if min(n, c, h, w) < 1 or c % cfg.bk or co % cfg.bn:
        raise ValueError(f"{who}: C={c} must be a multiple of {cfg.bk} and Co={co} of {cfg.bn}")
    if (scale is None) != (shift is None):
        raise ValueError(f"{who}: pass scale and shift together (or neither)")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.shape != (n, c) or t.dtype != torch.float32 or t.device != x.device
                              or not t.is_contiguous()):  # fmt: skip
            raise ValueError(f"{name} must be a contiguous fp32 [{n}, {c}] tensor on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype}")  # fmt: skip
    if cfg.smem_bytes() > SMEM_LIMIT:
        raise ValueError(f"config {cfg} needs {cfg.smem_bytes()} B of shared memory (> {SMEM_LIMIT})")


def _check(x, weight, scale, shift, cfg: GluonConvConfig) -> None:
    check_operands(x, weight, scale, shift, cfg, "conv3x3_gluon")
    if cfg.stages < 3:
        raise ValueError("conv3x3_gluon needs >= 3 ring stages (the prologue builds step i + 1's A while i runs)")


def conv3x3_gluon(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
    config: GluonConvConfig | str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """conv2d(act(x), weight, padding=1) without bias, act(x) = silu(x·scale + shift) (each part optional).

    x: fp16 [N, C, H, W] channels_last; weight: fp16 [Co, C, 3, 3] channels_last; scale, shift: fp32 [N, C]
    (GroupNorm folded: kernels/group_norm_affine.py). C % bk == 0, Co % bn == 0. Returns y fp16 [N, Co, H, W]
    channels_last (or written into ``out``, a channels_last fp16 [N, Co, H, W] tensor). config: a GluonConvConfig,
    a VARIANTS name (fitted by :func:`variant`) or None ('ws2').
    """
    co = weight.shape[0] if weight.dim() == 4 else 0
    if config is None or isinstance(config, str):
        cfg = variant(config or "ws2", co, prologue=scale is not None or silu)
    else:
        cfg = config
    _check(x, weight, scale, shift, cfg)
    n, _, h, w = x.shape
    if out is None:
        y = torch.empty((n, co, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    elif (out.shape != (n, co, h, w) or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous(memory_format=torch.channels_last)):  # fmt: skip
        raise ValueError(f"out must be a channels_last {x.dtype} [{n}, {co}, {h}, {w}] tensor on {x.device}")
    else:
        y = out
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 132
    args, const, grid, opts = prepare(x, weight, y, scale, shift, silu, cfg, sms)
    _conv3x3_ws_kernel[grid](*args, **const, **opts)
    return y
