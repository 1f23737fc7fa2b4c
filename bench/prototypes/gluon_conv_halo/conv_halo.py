"""3x3 stride-1 pad-1 conv for Hopper (sm_90) in Gluon with a fused GroupNorm-apply + SiLU prologue, the activation
computed ONCE per haloed input element (not once per tap as in ../gluon_conv).

    y[b, oy, ox, n] = Σ_{c, ky, kx} A(b, oy + ky − 1, ox + kx − 1, c) · w[n, c, ky, kx]
    A(b, iy, ix, c) = act(x[b, iy, ix, c]) on the image, 0 off it (padding AFTER the activation)
    act(v) = silu(v · scale[b, c] + shift[b, c])   (fp32; scale/shift optional, silu optional)

Output tile: TH x TW pixels of sample b by BN output channels, K in chunks of BK input channels.
Per (tile, chunk) the TRANSFORM partition (4 warps) reads the haloed box x[b, oy0−1 : oy0+TH+1, ox0−1 : ox0+TW+1,
c0 : c0+BK] from global memory (masked loads: off-image pixels read 0 and are forced to 0 after the affine, and
silu(0) = 0), applies act once per element ((TH+2)(TW+2)/(TH·TW) = 1.27x for 16x16, 1.41x for 8x16) and stores it
as fp16 into one stage of the T ring in SMEM. The box is written as four power-of-two pieces
(TH x TW, TH x 2, 2 x TW, 2 x 2) because register tensors need power-of-two shapes.

T stage layout (PaddedSharedLayout, element offsets in halves):
    pixel (r, c), channel k  ->  r·ROWPITCH + c·PIXPITCH + k,   PIXPITCH = BK + 8,  ROWPITCH = TW·PIXPITCH + ROWPAD
ROWPAD (a power of two >= 2·PIXPITCH) holds the two halo columns c = TW, TW + 1 of each row. The 8-half pad per
pixel shifts consecutive pixels by 4 banks, so the window loads below are bank-conflict free without swizzling.
A tap (ky, kx) window is the same padded [TH, TW, BK] view started at pixel (ky, kx): memdesc subslices must start
at multiples of their own size, so the view is made by slicing one element at the window's first offset out of a
flat 1-D view and reinterpreting it as the [TH, TW, BK] padded view (a base-pointer shift; the row/pixel pitch
lives in the padding, so every tap sees the right neighbours).

The MMA partition (default, 4 or 8 warps = 1 or 2 warpgroups) loads each window into registers in a
DistributedLinearLayout that is wgmma's register-A DotOperandLayout with the M index m = i·TW + j split into
(i, j): the reshape [TH, TW, BK] -> [TH·TW, BK] is then free, and issues wgmma with A from registers and
B = the tap's weights [BN, BK] from a TMA-fed SMEM ring (producer partition, 1 warp). The A of step i + 1 is loaded
before wgmma(i) is issued and pinned by a non-pure asm move (ptxas would otherwise serialize wgmma, C7513; see
../gluon_conv). T stage s is released once the chunk's nine windows are in registers; a weight slot once the
wgmma that read it retired (warpgroup_mma_wait(1)).

Persistent: grid = min(#SMs, #tiles), tiles ordered (b, ty, tx, nb) with nb fastest. Note the box of (b, ty, tx)
is activated once per output-channel block (n_nb = Co / BN times).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gluon_conv"))
from conv_gluon import (  # noqa: E402  (the shared Gluon helpers, launcher pieces and limits)
    LOG2E,
    SMEM_LIMIT,  # noqa: F401  (this module's limit too: cg.SMEM_LIMIT)
    _epilogue,
    _nvmma,
    _rcp_f32,
    _release_prev,
    _sm_count,
    _tanh_f32,
    _tile_coords,
    check_operands,
)

SILU_IMPLS = {"exact": 1, "tanh32": 2}
PADK = 8  # halves of padding after every pixel's BK channels


@dataclass(frozen=True)
class HaloConvConfig:
    """Tile th x tw pixels by bn channels, K chunks of bk channels; `w_stages` weight slots (one per tap), `t_stages`
    activated-box stages; `consumers` MMA warpgroups; `transform_regs` / `producer_regs`: setmaxnreg budgets of the
    transform (4 warps) and producer (1 warp) partitions."""

    name: str = "h8x16"
    th: int = 8
    tw: int = 16
    bn: int = 256
    bk: int = 64
    w_stages: int = 3
    t_stages: int = 2
    consumers: int = 2
    persistent: bool = True
    epi_split: int = 2
    transform_warps: int = 2
    transform_regs: int = 120
    producer_regs: int = 24
    silu_impl: str = "exact"

    @property
    def bm(self) -> int:
        return self.th * self.tw

    @property
    def warps(self) -> int:
        return 4 * self.consumers

    @property
    def pixpitch(self) -> int:
        return self.bk + PADK

    @property
    def rowpad(self) -> int:
        return triton.next_power_of_2(2 * self.pixpitch)

    @property
    def rowpitch(self) -> int:
        return self.tw * self.pixpitch + self.rowpad

    @property
    def stage_halves(self) -> int:
        return triton.next_power_of_2((self.th + 2) * self.rowpitch)

    def smem_bytes(self) -> int:
        t = self.t_stages * self.stage_halves * 2
        w = self.w_stages * self.bn * self.bk * 2
        return t + w + self.bm * (self.bn // self.epi_split) * 2 + 4 * (self.w_stages + self.t_stages) * 8


# 'h8x16': 8x16 pixels x 256 channels, two MMA warpgroups (64 rows each, acc 128 regs), BK = 64;
# 'h16': 16x16 x 128, two warpgroups of 128 rows, BK = 32 (acc 128 regs + two 16-reg A tiles);
# 'h8x16_1': 8x16 x 128, one warpgroup, BK = 32; '_t32': SiLU by tanh.approx.f32 (1 MUFU op instead of 2).
_H8 = HaloConvConfig()
_H16 = HaloConvConfig(name="h16", th=16, tw=16, bn=128, bk=32, w_stages=6, epi_split=2)
VARIANTS: dict[str, HaloConvConfig] = {
    "h8x16": _H8,
    "h16": _H16,
    "h8x16_1": HaloConvConfig(
        name="h8x16_1", bn=128, bk=32, w_stages=6, consumers=1, epi_split=1, transform_warps=4, transform_regs=120
    ),
    "h8x16_t32": dataclasses.replace(_H8, name="h8x16_t32", silu_impl="tanh32"),
    "h16_t32": dataclasses.replace(_H16, name="h16_t32", silu_impl="tanh32"),
}


def variant(name: str, co: int) -> HaloConvConfig:
    """The named variant fitted to Co: BN = 256 tiles become 16x16 x 128 where Co % 256 != 0."""
    cfg = VARIANTS[name]
    if co % cfg.bn:
        if co % 128 == 0 and cfg.consumers == 2:
            cfg = dataclasses.replace(cfg, th=16, bn=128, bk=32, w_stages=6)
        elif co % 128 == 0:
            cfg = dataclasses.replace(cfg, bn=128)
        else:
            raise ValueError(f"no {name} tile divides Co={co}")
    return cfg


def conv3x3_halo_ref(x, weight, scale=None, shift=None, silu: bool = True) -> torch.Tensor:
    """conv2d(act(x), weight, padding=1): act in fp32, rounded to x.dtype, then the conv (fp32 on CPU)."""
    a = x.float()
    if scale is not None:
        a = a * scale.float()[:, :, None, None] + shift.float()[:, :, None, None]
    if silu:
        a = F.silu(a)
    a = a.to(x.dtype)
    if a.is_cuda:
        return F.conv2d(a, weight, padding=1)
    return F.conv2d(a.float(), weight.float(), padding=1).to(x.dtype)


# --------------------------------------------------------------------------------------------- layouts (host side)
@functools.cache
def _layouts(th: int, tw: int, bk: int, bn: int, warps: int, xwarps: int):
    """(window register layout L3, padded window SMEM layout, flat 1-D layout, piece register layout)."""
    from triton._C.libtriton import gluon_ir, ir

    ctx = ir.context()
    ir.load_dialects(ctx)
    builder = gluon_ir.GluonOpBuilder(ctx)
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, bn, 16])
    dot_a = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    ll = builder.to_linear_layout(dot_a._to_ir(builder), [th * tw, bk])

    def split(bases):  # [m, k] -> [m // TW, m % TW, k] (m bits split into i and j: TW is a power of two)
        return [[m // tw, m % tw, k] for m, k in bases]

    l3 = gl.DistributedLinearLayout(split(ll.reg_bases), split(ll.lane_bases), split(ll.warp_bases), [], [th, tw, bk])
    pix = bk + PADK
    rowpad = triton.next_power_of_2(2 * pix)
    win = gl.PaddedSharedLayout.with_identity_for([[bk, PADK], [tw * bk, rowpad]], [th, tw, bk], [2, 1, 0])
    flat = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    kt = bk // 8  # lanes along k (8 halves = 16 B each)
    xl = gl.BlockedLayout([1, 1, 8], [1, 32 // kt, kt], [xwarps, 1, 1], [2, 1, 0])
    return l3, win, flat, xl


# --------------------------------------------------------------------------------------------- kernel
@gluon.jit
def _pin(a):
    # identity move in a non-pure asm: keeps the window load before the wgmma issue (no C7513 serialization)
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [a], dtype=gl.float16, is_pure=False, pack=2)


@gluon.jit
def _view(stage, off: gl.constexpr, STAGE_H: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, BK: gl.constexpr,
          FLAT: gl.constexpr, WIN: gl.constexpr):  # fmt: skip
    # the padded [TH, TW, BK] view of one T stage starting `off` halves in (a base shift: see the module doc)
    return stage._reinterpret(gl.float16, [STAGE_H], FLAT).slice(off, 1, 0)._reinterpret(gl.float16, [TH, TW, BK], WIN)


@gluon.jit
def _window(tbuf, ts, TAP: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, BK: gl.constexpr,
            ROWPITCH: gl.constexpr, PIXPITCH: gl.constexpr, FLAT: gl.constexpr, WIN: gl.constexpr,
            L3: gl.constexpr, a_layout: gl.constexpr):  # fmt: skip
    # A of tap (ky, kx): act-box pixels (ky + i, kx + j), i < TH, j < TW -> registers [TH·TW, BK] in register-A layout
    STAGE_H: gl.constexpr = tbuf.type.shape[1]
    v = _view(tbuf.index(ts), (TAP // 3) * ROWPITCH + (TAP % 3) * PIXPITCH, STAGE_H, TH, TW, BK, FLAT, WIN)
    w = v.load(L3).reshape([TH * TW, BK])  # [TH, TW, BK] -> [TH·TW, BK], m = i·TW + j (same linear layout)
    return _pin(gl.convert_layout(w, a_layout))


@gluon.jit
def _act_piece(x_ptr, scv, shv, stage, b, iy0, ix0, c0, C, H, W, OFF: gl.constexpr, R: gl.constexpr, S: gl.constexpr,
               TH: gl.constexpr, TW: gl.constexpr, BK: gl.constexpr, FLAT: gl.constexpr, WIN: gl.constexpr,
               XL: gl.constexpr, AFFINE: gl.constexpr, SILU_MODE: gl.constexpr):  # fmt: skip
    # act(x[b, iy0 + r, ix0 + s, c0 + k]) for r < R, s < S, k < BK (0 off the image) -> stage view at OFF, [R, S, BK]
    r = gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL)))
    s = gl.arange(0, S, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
    k = gl.arange(0, BK, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
    iy = iy0 + r
    ix = ix0 + s
    ok2 = gl.expand_dims((iy >= 0) & (iy < H), 1) & gl.expand_dims((ix >= 0) & (ix < W), 0)  # [R, S]
    pix = gl.expand_dims((b * H + iy) * W, 1) + gl.expand_dims(ix, 0)  # [R, S] NHWC pixel index
    offs = gl.expand_dims(pix * C + c0, 2) + gl.expand_dims(gl.expand_dims(k, 0), 1)  # [R, S, BK]
    ok = gl.expand_dims(ok2, 2)
    v = gl.load(x_ptr + offs, mask=ok, other=0.0).to(gl.float32)
    if AFFINE:
        v = v * gl.expand_dims(gl.expand_dims(scv, 0), 1) + gl.expand_dims(gl.expand_dims(shv, 0), 1)
    v = gl.where(ok, v, 0.0)  # padding after the affine; silu(0) = 0 keeps it 0
    if SILU_MODE == 1:
        v = v * _rcp_f32(1.0 + gl.exp2(v * -LOG2E))
    elif SILU_MODE == 2:
        h = v * 0.5
        v = h + h * _tanh_f32(h)
    STAGE_H: gl.constexpr = stage.type.shape[0]
    view = _view(stage, OFF, STAGE_H, TH, TW, BK, FLAT, WIN)
    view.slice(0, R, 0).slice(0, S, 1).store(v.to(gl.float16))


@gluon.jit
def _transform_partition(x_ptr, sc_ptr, sh_ptr, tbuf, t_ready, t_empty, C, H, W, n_th, n_tw, n_nb, num_tiles,
                         TH: gl.constexpr, TW: gl.constexpr, BK: gl.constexpr, BN: gl.constexpr,
                         ROWPITCH: gl.constexpr, PIXPITCH: gl.constexpr, FLAT: gl.constexpr, WIN: gl.constexpr,
                         XL: gl.constexpr, AFFINE: gl.constexpr, SILU_MODE: gl.constexpr):  # fmt: skip
    # 4 warps: per (tile, chunk) wait for a free T stage, write act(haloed box) into it, arrive t_ready
    T_STAGES: gl.constexpr = tbuf.type.shape[0]
    kl: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, XL))
    kk = gl.arange(0, BK, layout=kl)
    kc = C // BK
    tc = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, oy0, ox0, n0 = _tile_coords(t, n_th, n_tw, n_nb, TH, TW, BN)
        for cb in range(kc):
            c0 = cb * BK
            scv = gl.load(sc_ptr + b * C + c0 + kk) if AFFINE else kk.to(gl.float32)
            shv = gl.load(sh_ptr + b * C + c0 + kk) if AFFINE else kk.to(gl.float32)
            s = tc % T_STAGES
            mbarrier.wait(t_empty.index(s), ((tc // T_STAGES) & 1) ^ 1)
            stage = tbuf.index(s)
            _act_piece(x_ptr, scv, shv, stage, b, oy0 - 1, ox0 - 1, c0, C, H, W, 0, TH, TW, TH, TW, BK, FLAT, WIN,
                       XL, AFFINE, SILU_MODE)  # fmt: skip
            _act_piece(x_ptr, scv, shv, stage, b, oy0 - 1, ox0 - 1 + TW, c0, C, H, W, TW * PIXPITCH, TH, 2, TH, TW,
                       BK, FLAT, WIN, XL, AFFINE, SILU_MODE)  # fmt: skip
            _act_piece(x_ptr, scv, shv, stage, b, oy0 - 1 + TH, ox0 - 1, c0, C, H, W, TH * ROWPITCH, 2, TW, TH, TW,
                       BK, FLAT, WIN, XL, AFFINE, SILU_MODE)  # fmt: skip
            _act_piece(x_ptr, scv, shv, stage, b, oy0 - 1 + TH, ox0 - 1 + TW, c0, C, H, W,
                       TH * ROWPITCH + TW * PIXPITCH, 2, 2, TH, TW, BK, FLAT, WIN, XL, AFFINE, SILU_MODE)  # fmt: skip
            mbarrier.arrive(t_ready.index(s))  # Triton puts a partition-wide bar.sync before the elected arrive
            tc += 1


@gluon.jit
def _load_partition(w_desc, w_bufs, w_ready, w_empty, C, n_th, n_tw, n_nb, num_tiles,
                    TH: gl.constexpr, TW: gl.constexpr):  # fmt: skip
    # 1 warp: the weights of every (chunk, tap) step through the ring (parities as in ../gluon_conv)
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BK: gl.constexpr = w_desc.block_type.shape[1]
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    kc = C // BK
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, oy0, ox0, n0 = _tile_coords(t, n_th, n_tw, n_nb, TH, TW, BN)
        for cb in range(kc):
            for tap in gl.static_range(9):
                s = it % STAGES
                mbarrier.wait(w_empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(w_ready.index(s), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [n0, tap * C + cb * BK], w_ready.index(s), w_bufs.index(s))
                it += 1


@gluon.jit
def _mma_partition(y_desc, tbuf, w_bufs, w_ready, w_empty, t_ready, t_empty, c_smem, C, n_th, n_tw, n_nb, num_tiles,
                   TH: gl.constexpr, TW: gl.constexpr, ROWPITCH: gl.constexpr, PIXPITCH: gl.constexpr,
                   FLAT: gl.constexpr, WIN: gl.constexpr, L3: gl.constexpr, EPI_SPLIT: gl.constexpr,
                   NUM_WARPS: gl.constexpr):  # fmt: skip
    BN: gl.constexpr = w_bufs.type.shape[1]
    BK: gl.constexpr = w_bufs.type.shape[2]
    BM: gl.constexpr = TH * TW
    WS: gl.constexpr = w_bufs.type.shape[0]
    T_STAGES: gl.constexpr = tbuf.type.shape[0]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BN, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    kc = C // BK
    it = 0  # weight steps consumed (ring slot it mod WS)
    tc = 0  # chunks consumed (T stage tc mod T_STAGES)
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, oy0, ox0, n0 = _tile_coords(t, n_th, n_tw, n_nb, TH, TW, BN)
        acc = gl.zeros([BM, BN], gl.float32, mma_layout)
        ts = tc % T_STAGES
        mbarrier.wait(t_ready.index(ts), (tc // T_STAGES) & 1)
        a_cur = _window(tbuf, ts, 0, TH, TW, BK, ROWPITCH, PIXPITCH, FLAT, WIN, L3, a_layout)
        for cb in range(kc):
            for tap in gl.static_range(9):
                s = it % WS
                if tap < 8:
                    a_nxt = _window(tbuf, ts, tap + 1, TH, TW, BK, ROWPITCH, PIXPITCH, FLAT, WIN, L3, a_layout)
                    if tap == 7:  # all nine windows of this chunk are (being) read into registers: free the stage
                        mbarrier.arrive(t_empty.index(ts))
                else:  # next step: tap 0 of the next chunk (if any)
                    a_nxt = a_cur
                    if cb + 1 < kc:
                        ts = (tc + 1) % T_STAGES
                        mbarrier.wait(t_ready.index(ts), ((tc + 1) // T_STAGES) & 1)
                        a_nxt = _window(tbuf, ts, 0, TH, TW, BK, ROWPITCH, PIXPITCH, FLAT, WIN, L3, a_layout)
                    tc += 1
                mbarrier.wait(w_ready.index(s), (it // WS) & 1)
                acc = warpgroup_mma(a_cur, w_bufs.index(s).permute((1, 0)), acc, is_async=True)
                acc, a_cur = warpgroup_mma_wait(1, deps=(acc, a_cur))
                _release_prev(w_empty, it, WS, cb, tap)
                a_cur = a_nxt
                it += 1
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(w_empty.index((it + WS - 1) % WS))  # the tile's last step
        _epilogue(y_desc, c_smem, acc, b, oy0, ox0, n0, BM, BN, EPI_SPLIT)
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["C", "H", "W", "n_th", "n_tw", "n_nb", "num_tiles"])
def _conv3x3_halo_kernel(x_ptr, w_desc, y_desc, sc_ptr, sh_ptr, C, H, W, n_th, n_tw, n_nb, num_tiles,
                         TH: gl.constexpr, TW: gl.constexpr, W_STAGES: gl.constexpr, T_STAGES: gl.constexpr,
                         STAGE_H: gl.constexpr, ROWPITCH: gl.constexpr, PIXPITCH: gl.constexpr,
                         FLAT: gl.constexpr, WIN: gl.constexpr, L3: gl.constexpr, XL: gl.constexpr,
                         AFFINE: gl.constexpr, SILU_MODE: gl.constexpr, EPI_SPLIT: gl.constexpr,
                         TRANSFORM_WARPS: gl.constexpr, TRANSFORM_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                         num_warps: gl.constexpr):  # fmt: skip
    # x_ptr: fp16 NHWC; w_desc: [Co, 9·C] boxes [BN, BK]; y_desc: [N, H, W, Co] boxes [1, TH, TW, BN / EPI_SPLIT]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BK: gl.constexpr = w_desc.block_type.shape[1]
    tbuf = gl.allocate_shared_memory(gl.float16, [T_STAGES, STAGE_H], FLAT)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [W_STAGES] + w_desc.block_type.shape, w_desc.layout)
    c_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
    w_ready = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    t_ready = gl.allocate_shared_memory(gl.int64, [T_STAGES, 1], mbarrier.MBarrierLayout())
    t_empty = gl.allocate_shared_memory(gl.int64, [T_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(W_STAGES):
        mbarrier.init(w_ready.index(i), count=1)
        mbarrier.init(w_empty.index(i), count=1)
    for i in gl.static_range(T_STAGES):
        mbarrier.init(t_ready.index(i), count=1)
        mbarrier.init(t_empty.index(i), count=1)
    gl.warp_specialize([
        (_mma_partition, (y_desc, tbuf, w_bufs, w_ready, w_empty, t_ready, t_empty, c_smem, C, n_th, n_tw, n_nb,
                          num_tiles, TH, TW, ROWPITCH, PIXPITCH, FLAT, WIN, L3, EPI_SPLIT, num_warps)),
        (_transform_partition, (x_ptr, sc_ptr, sh_ptr, tbuf, t_ready, t_empty, C, H, W, n_th, n_tw, n_nb, num_tiles,
                                TH, TW, BK, BN, ROWPITCH, PIXPITCH, FLAT, WIN, XL, AFFINE, SILU_MODE)),
        (_load_partition, (w_desc, w_bufs, w_ready, w_empty, C, n_th, n_tw, n_nb, num_tiles, TH, TW)),
    ], [TRANSFORM_WARPS, 1], [TRANSFORM_REGS, PRODUCER_REGS])  # fmt: skip


# --------------------------------------------------------------------------------------------- launcher
def prepare(x, weight, y, scale, shift, silu: bool, cfg: HaloConvConfig, num_sms: int):
    """(positional args, constexprs, grid, launch options) for _conv3x3_halo_kernel (CPU tensors work: AOT)."""
    n, c, h, w = x.shape
    co = weight.shape[0]
    x_nhwc = x.permute(0, 2, 3, 1)  # [N, C, H, W] channels_last -> dense [N, H, W, C] view
    w_mat = weight.permute(0, 2, 3, 1).reshape(co, 9 * c)  # channels_last [Co, C, 3, 3] -> [Co, 9·C] view
    y_nhwc = y.permute(0, 2, 3, 1)
    wb, yb = [cfg.bn, cfg.bk], [1, cfg.th, cfg.tw, cfg.bn // cfg.epi_split]
    wd = TensorDescriptor.from_tensor(w_mat, wb, _nvmma(wb))
    yd = TensorDescriptor.from_tensor(y_nhwc, yb, _nvmma(yb))
    n_th, n_tw, n_nb = triton.cdiv(h, cfg.th), triton.cdiv(w, cfg.tw), co // cfg.bn
    num_tiles = n * n_th * n_tw * n_nb
    grid = (min(num_sms, num_tiles) if cfg.persistent else num_tiles,)
    affine = scale is not None
    l3, win, flat, xl = _layouts(cfg.th, cfg.tw, cfg.bk, cfg.bn, cfg.warps, cfg.transform_warps)
    args = (x_nhwc, wd, yd, scale if affine else y, shift if affine else y, c, h, w, n_th, n_tw, n_nb, num_tiles)
    const = dict(TH=cfg.th, TW=cfg.tw, W_STAGES=cfg.w_stages, T_STAGES=cfg.t_stages, STAGE_H=cfg.stage_halves,
                 ROWPITCH=cfg.rowpitch, PIXPITCH=cfg.pixpitch, FLAT=flat, WIN=win, L3=l3, XL=xl, AFFINE=affine,
                 SILU_MODE=SILU_IMPLS[cfg.silu_impl] if silu else 0, EPI_SPLIT=cfg.epi_split,
                 TRANSFORM_WARPS=cfg.transform_warps, TRANSFORM_REGS=cfg.transform_regs,
                 PRODUCER_REGS=cfg.producer_regs)  # fmt: skip
    return args, const, grid, dict(num_warps=cfg.warps)


def _check(x, weight, scale, shift, cfg: HaloConvConfig) -> None:
    check_operands(x, weight, scale, shift, cfg, "conv3x3_halo")
    if x.numel() >= 2**31:
        raise ValueError("conv3x3_halo: x must have < 2^31 elements (int32 offsets in the transform)")
    if cfg.w_stages < 2 or cfg.t_stages < 2:
        raise ValueError("conv3x3_halo needs >= 2 weight slots and >= 2 T stages")


def conv3x3_halo(x, weight, scale=None, shift=None, silu: bool = True, config=None, out=None) -> torch.Tensor:
    """conv2d(act(x), weight, padding=1) without bias, act(x) = silu(x·scale + shift) (scale/shift optional).

    x: fp16 [N, C, H, W] channels_last; weight: fp16 [Co, C, 3, 3] channels_last; scale, shift: fp32 [N, C].
    config: a HaloConvConfig, a VARIANTS name (fitted to Co by :func:`variant`) or None ('h8x16').
    Returns y fp16 [N, Co, H, W] channels_last (or writes ``out``)."""
    co = weight.shape[0] if weight.dim() == 4 else 0
    cfg = variant(config or "h8x16", co) if config is None or isinstance(config, str) else config
    _check(x, weight, scale, shift, cfg)
    n, _, h, w = x.shape
    if out is None:
        out = torch.empty((n, co, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    elif (out.shape != (n, co, h, w) or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous(memory_format=torch.channels_last)):  # fmt: skip
        raise ValueError(f"out must be a channels_last {x.dtype} [{n}, {co}, {h}, {w}] tensor on {x.device}")
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 132
    args, const, grid, opts = prepare(x, weight, out, scale, shift, silu, cfg, sms)
    _conv3x3_halo_kernel[grid](*args, **const, **opts)
    return out
