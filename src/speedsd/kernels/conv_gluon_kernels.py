"""Gluon kernel of :mod:`speedsd.kernels.conv_gluon` (Hopper sm_90 only; imported lazily).

Trimmed from bench/prototypes/gluon_conv/conv_gluon.py to its plain mode (no GroupNorm/SiLU prologue:
that was 0.26-0.69x of normalize + cuDNN on the H200) with an optional bias in the epilogue. Gluon kernels
do not run under the CPU interpreter: the tests compile this one for sm_90 ahead of time
(conv_gluon.compile_sm90).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# -------------------------------------------------------------------------------------------------------
# Math: 3x3 stride-1 pad-1 conv, channels_last fp16 in and out, fp32 accumulation:
#
#   y[b, oy, ox, n] = bias[n] + Σ_{c, ky, kx} x[b, oy + ky − 1, ox + kx − 1, c] · w[n, c, ky, kx]
#                     (x = 0 outside the image: the padding)
#
# as an implicit GEMM. One output tile = TH x TW pixels of TB samples b .. b + TB (the GEMM's M = TB·TH·TW rows;
# TB > 1 for images smaller than a tile, the UNet's 8² level) by BN output channels n0 .. n0 + BN:
#
#   acc[m, n] = Σ_{cb < C/BK} Σ_{tap < 9} A_tap,cb[m, :] · B_tap,cb[n, :]ᵀ,
#               m = (e·TH + i)·TW + j <-> (b + e, oy0 + i, ox0 + j)
#   A_tap,cb = x[b : +TB, oy0 + ky − 1 : +TH, ox0 + kx − 1 : +TW, cb·BK : +BK]    tap = 3·ky + kx
#              (a 4-D TMA box [TB, TH, TW, BK] seen as [TB·TH·TW, BK]; TMA zero-fills every coordinate outside
#              [N, H, W, C], negative ones included: that is the padding, and the partial tiles at the
#              image's right and bottom edges)
#   B_tap,cb = Wm[n0 : +BN, tap·C + cb·BK : +BK]   Wm = the channels_last weight [Co, 3, 3, C] as [Co, 9·C]
# BN1 > 0: the tile has BN1 more channels n0 + BN .. n0 + BN + BN1, a second accumulator fed by a second wgmma on the
# same A box (register tensors have power-of-2 shapes; Co = 320 as one 256 + 64 tile or two 128 + 32 tiles).
#
# K runs channel-block-major: K step ks = 9·cb + tap (cb outer, the 9 taps inner). Both wgmma operands come
# from SMEM.
# HAS_RES: + r[b, oy, ox, n] as RS = ⌈(BN + BN1) / BK⌉ more K steps of the same ring, A = the residual's
# [TB, TH, TW, BK] box at channel n0 + j·BK, B (and B1) = rows 0 .. BN (BN .. BN + BN1) of columns j·BK .. of
# I = eye(BN + BN1, RS·BK) (exact: fp16 products, fp32 sums; box channels past the tile meet I's zero columns).
# Split-K (n_split > 1): a work unit is (tile, split sp); split sp runs the K steps
#   ks in [sp·KS / n_split, (sp + 1)·KS / n_split),   KS = 9·C / BK   (integer division: every step once)
# (up to KS splits, so a handful of tiles, the UNet's 8² level, can still fill every SM)
# and stores its fp32 partial acc to parts[sp, b, oy, ox, n] (y_desc is then the fp32 [n_split·N, H, W, Co]
# tensor, box rows sp·N + b .. + TB); a second kernel sums the n_split partials in split order (+ bias) into y
# (conv_igemm.sum_partials). Without a split the unit is the tile.
# Epilogue: acc (+ bias[n] in fp32) -> fp16 -> SMEM -> TMA store of the [TB, TH, TW, BN] box (TMA clips the rows
# and columns past the image), in EPI_SPLIT column slabs (less SMEM for the output buffer). STATS (TB = 1): the
# next GroupNorm's statistics of the stored fp16 values v, per warp w (its rows of the tile, those inside the
# image) and group j of CPG channels (cnt = those rows · CPG):
#   mean = Σ v / cnt,   M2 = Σ (v − mean)²      (two passes over the registers: no cancellation)
#   part[0 | 1 | 2, b, n0 / CPG + j, (ty·n_tw + tx)·num_warps + w] = mean | M2 | cnt
# or, CPG = 0 (groups that do not tile the slabs: 10 or 20 channels in a 256 + 64 or 128 + 32 tile), the same
# per channel c (cnt = those rows), channel fastest so a warp's stores are contiguous:
#   part[0 | 1 | 2, b, (ty·n_tw + tx)·num_warps + w, c] = mean | M2 | cnt
# (kernels/gn_tile_stats.py merges them into GroupNorm's per-channel scale and shift).
#
# TAPS = 4 (sub-pixel: nearest 2x upsampling + the 3x3 conv, kernels/subpixel_conv.py): four 2x2 convs on the
# low-resolution x, one per output phase ph = 2·a + c_ (a, c_ in {0, 1}), each unit one phase:
#   y[b, 2·oy + a, 2·ox + c_, n] = bias[n] + Σ_{c, ky, kx in {0, 1}} x[b, oy + a + ky − 1, ox + c_ + kx − 1, c]
#                                                                    · W4[ph·Co + n, c, ky, kx]
# i.e. tap = 2·ky + kx, A box at (b, oy0 + a + ky − 1, ox0 + c_ + kx − 1, c0), B = W4m[ph·Co + n0 :, tap·C + c0 :]
# (W4m = the channels_last [4·Co, 2, 2, C] folded weight as [4·Co, 4·C]), and the tile stored straight into the
# interleaved output: y_desc is y [N, 2H, 2W, Co] seen as [N, H, 2, 2W·Co / 2] = [N, H, 2, W, 2·Co] (5-D boxes
# [TB, TH, 1, TW, BN / EPI_SPLIT] at (b, oy0, a, ox0, c_·Co + n0)); H and W are x's. No residual; STATS as above with
# one part per (tile, phase, warp): (ty·n_tw + tx)·4 + ph in place of the tile index.
#
# Protocol (gl.warp_specialize; a STAGES-deep SMEM ring of (A, B) slots, barriers ready[s] and empty[s]):
#   * producer (worker, 1 warp): for K step `it` of its program (counted over all its tiles), slot
#     s = it mod STAGES, use u = it div STAGES: wait empty[s] at parity (u & 1) ^ 1 (the consumer freed use
#     u − 1; a fresh barrier passes parity 1 at once), arm ready[s] with the A + B byte count (TMA counts
#     zero-filled bytes too), issue both TMA loads into slot s.
#   * consumer (default partition, 1 or 2 warpgroups stacked along M on one tile): wait ready[s] at parity
#     u & 1, issue the async wgmma, keep one in flight (warpgroup_mma_wait(1)), then free the slot of step
#     it − 1, whose wgmma just retired. A tile's last slot is freed after its final wait(0); a tile's first
#     step frees nothing (the previous tile's last slot is already free). So every slot use is freed once.
#     The epilogue's TMA store is left in flight (store_wait(0) comes just before the buffer is rewritten),
#     overlapping the next tile's mainloop while the producer prefetches its K steps.
# Persistent: grid = min(#SMs, #units), program p takes units p, p + grid, ...; otherwise one unit each.
# Unit ids run output-channel block fastest, then split, tx, ty, b / TB: programs in flight share their A boxes in L2.
# -------------------------------------------------------------------------------------------------------


@gluon.jit
def _unit_coords(t, n_th, n_tw, n_split, n_nb, ks_total, TB: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr,
                 BN: gl.constexpr, NPH: gl.constexpr):  # fmt: skip
    # t = ((((bt·n_th + ty)·n_tw + tx)·n_split + sp)·NPH + ph)·n_nb + nb
    #   ->  (b = bt·TB, oy0, ox0, n0, sp, ks0, ks1, ph)      (NPH = 4 sub-pixel phases, else 1: ph = 0)
    nb = t % n_nb
    r = t // n_nb
    ph = r % NPH
    r = r // NPH
    sp = r % n_split
    r = r // n_split
    tx = r % n_tw
    r = r // n_tw
    ty = r % n_th
    b = (r // n_th) * TB
    return b, ty * TH, tx * TW, nb * BN, sp, sp * ks_total // n_split, (sp + 1) * ks_total // n_split, ph


@gluon.jit
def _load_partition(x_desc, w_desc, w1_desc, r_desc, i_desc, i1_desc, a_bufs, b_bufs, b1_bufs, ready, empty, C, Co,
                    n_th, n_tw, n_split, n_nb, num_units, HAS_RES: gl.constexpr, BN1: gl.constexpr,
                    TAPS: gl.constexpr):  # fmt: skip
    TB: gl.constexpr = x_desc.block_type.shape[0]
    TH: gl.constexpr = x_desc.block_type.shape[1]
    TW: gl.constexpr = x_desc.block_type.shape[2]
    BK: gl.constexpr = x_desc.block_type.shape[3]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    RS: gl.constexpr = (BN + BN1 + BK - 1) // BK  # the residual's K steps
    NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    NBYTES1: gl.constexpr = NBYTES + (w1_desc.block_type.nbytes if BN1 > 0 else 0)
    NPH: gl.constexpr = 4 if TAPS == 4 else 1
    ks_total = TAPS * (C // BK)
    it = 0
    for t in range(gl.program_id(0), num_units, gl.num_programs(0)):
        b, oy0, ox0, n0, sp, ks0, ks1, ph = _unit_coords(t, n_th, n_tw, n_split, n_nb, ks_total, TB, TH, TW, BN + BN1,
                                                         NPH)  # fmt: skip
        for ks in range(ks0, ks1):
            cb = ks // TAPS
            tap = ks - TAPS * cb
            c0 = cb * BK
            if TAPS == 9:  # (ky, kx) = divmod(tap, 3): the box at (oy0 + ky − 1, ox0 + kx − 1)
                dy = tap // 3 - 1
                dx = tap % 3 - 1
            else:  # phase (a, c_) = divmod(ph, 2), (ky, kx) = divmod(tap, 2): at (oy0 + a + ky − 1, ox0 + c_ + kx − 1)
                dy = ph // 2 + tap // 2 - 1
                dx = ph % 2 + tap % 2 - 1
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, NBYTES1)
            # A box at (b, oy0 + dy, ox0 + dx, c0); B box at (ph·Co + n0, tap·C + c0) (and B1 BN rows further)
            tma.async_copy_global_to_shared(x_desc, [b, oy0 + dy, ox0 + dx, c0], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [ph * Co + n0, tap * C + c0], bar, b_bufs.index(s))
            if BN1 > 0:
                tma.async_copy_global_to_shared(w1_desc, [ph * Co + n0 + BN, tap * C + c0], bar, b1_bufs.index(s))
            it += 1
        if HAS_RES:  # the residual, RS more K steps: A = r[b, oy0:, ox0:, n0 + j·BK :], B | B1 = I[:BN | BN:, j·BK :]
            for j in gl.static_range(RS):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, NBYTES1)
                tma.async_copy_global_to_shared(r_desc, [b, oy0, ox0, n0 + j * BK], bar, a_bufs.index(s))
                tma.async_copy_global_to_shared(i_desc, [0, j * BK], bar, b_bufs.index(s))
                if BN1 > 0:
                    tma.async_copy_global_to_shared(i1_desc, [BN, j * BK], bar, b1_bufs.index(s))
                it += 1


@gluon.jit
def _split_cols(x, PARTS: gl.constexpr):
    # [BM, BN] -> PARTS column slabs [BM, BN / PARTS] by halving log2(PARTS) times (register relabeling)
    xs = (x,)
    for _ in gl.static_range(PARTS.bit_length() - 1):
        nxt = ()
        for j in gl.static_range(len(xs)):
            v = xs[j]
            # [M, N] -> [M, 2, N/2] -> [M, N/2, 2] -> two [M, N/2]
            nxt += v.reshape([v.shape[0], 2, v.shape[1] // 2]).permute((0, 2, 1)).split()
        xs = nxt
    return xs


@gluon.jit
def _epilogue(y_desc, c_smem, acc, part_ptr, part_third, b, b_out, oy0, ox0, n0, H, W, Co, t_sp, T,
              STATS: gl.constexpr, CPG: gl.constexpr, EPI_SPLIT: gl.constexpr, NUM_WARPS: gl.constexpr,
              ph=0):  # fmt: skip
    # fp32 [BM, BN] -> per column slab: y's dtype (fp16 -> GroupNorm statistics; fp32: a split's partial) ->
    # SMEM -> TMA store at y[b_out, oy0, ox0, n0 + slab], left in flight (sub-pixel, 5-D c_smem: at
    # y5[b_out, oy0, a, ox0, c_·Co + n0 + slab], (a, c_) = divmod(ph, 2)). Slab by slab keeps the statistics'
    # fp32 values to one slab.
    SUB: gl.constexpr = len(c_smem.type.shape) == 5
    TH: gl.constexpr = c_smem.type.shape[1]
    TW: gl.constexpr = c_smem.type.shape[3 if SUB else 2]
    BM: gl.constexpr = c_smem.type.shape[0] * TH * TW
    SPLIT_N: gl.constexpr = c_smem.type.shape[4 if SUB else 3]
    parts = _split_cols(acc, EPI_SPLIT)
    for i in gl.static_range(EPI_SPLIT):
        v = parts[i]
        m = gl.arange(0, BM, layout=gl.SliceLayout(1, v.type.layout)) % (TH * TW)  # the pixel within its image
        rows_ok = (oy0 + m // TW < H) & (ox0 + m % TW < W)  # the tile's pixels inside the image
        out = v.to(c_smem.dtype)
        if STATS and CPG == 0:
            _chan_stats(out, rows_ok, part_ptr, part_third, b, t_sp, T, Co, n0 + i * SPLIT_N, NUM_WARPS)
        elif STATS:
            _tile_stats(out, rows_ok, part_ptr, part_third, b, t_sp, T, Co // CPG, (n0 + i * SPLIT_N) // CPG, CPG,
                        SPLIT_N, NUM_WARPS)  # fmt: skip
        tma.store_wait(0)
        c_smem.reshape([BM, SPLIT_N]).store(out)  # [TB, TH, (1,) TW, SPLIT_N] -> [BM, SPLIT_N]
        fence_async_shared()
        if SUB:
            tma.async_copy_shared_to_global(
                y_desc, [b_out, oy0, ph // 2, ox0, (ph % 2) * Co + n0 + i * SPLIT_N], c_smem
            )
        else:
            tma.async_copy_shared_to_global(y_desc, [b_out, oy0, ox0, n0 + i * SPLIT_N], c_smem)


@gluon.jit
def _mma_partition(y_desc, y1_desc, a_bufs, b_bufs, b1_bufs, ready, empty, c_smem, c1_smem, bias_ptr, part_ptr,
                   part_third, C, H, W, Co, n_img, n_th, n_tw, n_split, n_nb, num_units, HAS_BIAS: gl.constexpr,
                   HAS_RES: gl.constexpr, STATS: gl.constexpr, CPG: gl.constexpr, EPI_SPLIT: gl.constexpr,
                   BN1: gl.constexpr, TAPS: gl.constexpr, NUM_WARPS: gl.constexpr):  # fmt: skip
    TB: gl.constexpr = a_bufs.type.shape[1]
    TH: gl.constexpr = a_bufs.type.shape[2]
    TW: gl.constexpr = a_bufs.type.shape[3]
    BK: gl.constexpr = a_bufs.type.shape[4]
    BN: gl.constexpr = b_bufs.type.shape[1]
    BM: gl.constexpr = TB * TH * TW
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    # wgmma m64nBNk16 per warpgroup; warps stacked along M (each warpgroup owns BM / #warpgroups rows)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BN, 16]
    )
    mma1_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, max(BN1, 8), 16]
    )
    NPH: gl.constexpr = 4 if TAPS == 4 else 1
    ks_total = TAPS * (C // BK)
    n_res = (BN + BN1 + BK - 1) // BK if HAS_RES else 0  # the residual's K steps (the producer's RS)
    it = 0  # K steps consumed by this program over all its units
    for t in range(gl.program_id(0), num_units, gl.num_programs(0)):
        b, oy0, ox0, n0, sp, ks0, ks1, ph = _unit_coords(t, n_th, n_tw, n_split, n_nb, ks_total, TB, TH, TW, BN + BN1,
                                                         NPH)  # fmt: skip
        acc = gl.zeros([BM, BN], gl.float32, mma_layout)
        if BN1 > 0:
            acc1 = gl.zeros([BM, BN1], gl.float32, mma1_layout)
        for ks in range(ks0, ks1 + n_res):  # the conv's K steps, then the residual's (the same slots and wgmmas)
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            a_view = a_bufs.index(s).reshape([BM, BK])  # [TB, TH, TW, BK] -> [BM, BK]
            b_view = b_bufs.index(s).permute((1, 0))  # [BN, BK] K-major -> [BK, BN]
            acc = warpgroup_mma(a_view, b_view, acc, is_async=True)
            if (
                BN1 > 0
            ):  # the tile's other BN1 columns: a second wgmma on the same A; wait(2) retires step it − 1's pair
                acc1 = warpgroup_mma(a_view, b1_bufs.index(s).permute((1, 0)), acc1, is_async=True)
                acc, acc1 = warpgroup_mma_wait(2, deps=(acc, acc1))
            else:
                acc = warpgroup_mma_wait(1, deps=(acc,))
            # wait(1) retired the wgmma of step it − 1: free its slot, unless ks is the unit's first step (the
            # previous unit's last slot was freed after its final wait)
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=ks > ks0)
            it += 1
        if BN1 > 0:
            acc, acc1 = warpgroup_mma_wait(0, deps=(acc, acc1))
        else:
            acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))  # the unit's last step
        t_sp = ((oy0 // TH) * n_tw + ox0 // TW) * NPH + ph  # the statistics' part: (tile, phase)
        if BN1 > 0:  # the last BN1 channels first (acc's slabs then have the registers to themselves): one slab
            # (EPI_SPLIT = 1); statistics per channel (CPG = 0, the launcher's only choice for a bn1 tile)
            if HAS_BIAS:
                cols1 = n0 + BN + gl.arange(0, BN1, layout=gl.SliceLayout(0, mma1_layout))
                acc1 = acc1 + gl.expand_dims(gl.load(bias_ptr + cols1).to(gl.float32), 0)
            _epilogue(y1_desc, c1_smem, acc1, part_ptr, part_third, b, sp * n_img + b, oy0, ox0, n0 + BN, H, W, Co,
                      t_sp, n_th * n_tw * NPH, STATS, CPG, 1, NUM_WARPS, ph)  # fmt: skip
        if HAS_BIAS:
            cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
            acc = acc + gl.expand_dims(gl.load(bias_ptr + cols).to(gl.float32), 0)
        _epilogue(y_desc, c_smem, acc, part_ptr, part_third, b, sp * n_img + b, oy0, ox0, n0, H, W, Co, t_sp,
                  n_th * n_tw * NPH, STATS, CPG, EPI_SPLIT, NUM_WARPS, ph)  # fmt: skip
    tma.store_wait(0)


@gluon.jit
def _tile_stats(v16, rows_ok, part_ptr, third, b, t_sp, T, G, g0, CPG: gl.constexpr, SPLIT_N: gl.constexpr,
                NUM_WARPS: gl.constexpr):  # fmt: skip
    # Per warp, no cross-warp traffic: the accumulator's row m belongs to warp (m // 16) % NUM_WARPS, so
    # [BM, SPLIT_N] = [REP, NUM_WARPS, 16, GT, CPG] and the sums over axes (4, 2, 0) stay in one warp (registers
    # and shuffles). Per (warp w, group j): cnt = valid rows · CPG, mean = Σ v / cnt, M2 = Σ (v − mean)², at
    # part[0 | 1 | 2, b, g0 + j, t_sp·NUM_WARPS + w] = mean | M2 | cnt.
    BM: gl.constexpr = v16.shape[0]
    REP: gl.constexpr = BM // (16 * NUM_WARPS)
    GT: gl.constexpr = SPLIT_N // CPG
    shape5: gl.constexpr = [REP, NUM_WARPS, 16, GT, CPG]
    okf, v = gl.broadcast(gl.where(gl.expand_dims(rows_ok, 1), 1.0, 0.0), v16.to(gl.float32))  # [BM, SPLIT_N]
    okf = gl.reshape(okf, shape5)
    v = gl.reshape(v, shape5) * okf
    cnt = gl.sum(gl.sum(gl.sum(okf, axis=4), axis=2), axis=0)  # [NUM_WARPS, GT]
    mean = gl.sum(gl.sum(gl.sum(v, axis=4), axis=2), axis=0) / gl.maximum(cnt, 1.0)
    mean5 = gl.expand_dims(gl.expand_dims(gl.expand_dims(mean, 0), 2), 4)
    d = (v - mean5) * okf
    m2 = gl.sum(gl.sum(gl.sum(d * d, axis=4), axis=2), axis=0)
    out_l: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [NUM_WARPS, 1], [1, 0])  # [NUM_WARPS, GT], tiny
    mean, m2, cnt = gl.convert_layout(mean, out_l), gl.convert_layout(m2, out_l), gl.convert_layout(cnt, out_l)
    w = gl.arange(0, NUM_WARPS, layout=gl.SliceLayout(1, out_l))
    j = gl.arange(0, GT, layout=gl.SliceLayout(0, out_l))
    P = T * NUM_WARPS
    dst = part_ptr + (b * G + g0 + gl.expand_dims(j, 0)) * P + t_sp * NUM_WARPS + gl.expand_dims(w, 1)
    gl.store(dst, mean)
    gl.store(dst + third, m2)
    gl.store(dst + 2 * third, cnt)


@gluon.jit
def _chan_stats(v16, rows_ok, part_ptr, third, b, t_sp, T, Co, c0, NUM_WARPS: gl.constexpr):
    # _tile_stats per channel (groups of 1): [BM, SPLIT_N] = [REP, NUM_WARPS, 16, SPLIT_N], sums over axes (2, 0)
    # in one warp. Per (warp w, channel c0 + j): cnt = valid rows, mean = Σ v / cnt, M2 = Σ (v − mean)², at
    # part[0 | 1 | 2, b, t_sp·NUM_WARPS + w, c0 + j] (channel fastest: a warp stores SPLIT_N consecutive floats).
    BM: gl.constexpr = v16.shape[0]
    SPLIT_N: gl.constexpr = v16.shape[1]
    REP: gl.constexpr = BM // (16 * NUM_WARPS)
    shape4: gl.constexpr = [REP, NUM_WARPS, 16, SPLIT_N]
    ok = gl.reshape(gl.broadcast(gl.expand_dims(rows_ok, 1), v16)[0], shape4)  # (i1: fewer registers than fp32 0/1)
    v = gl.where(ok, gl.reshape(v16.to(gl.float32), shape4), 0.0)
    cnt = gl.sum(gl.sum(gl.where(ok, 1.0, 0.0), axis=2), axis=0)  # [NUM_WARPS, SPLIT_N]
    mean = gl.sum(gl.sum(v, axis=2), axis=0) / gl.maximum(cnt, 1.0)
    d = gl.where(ok, v - gl.expand_dims(gl.expand_dims(mean, 0), 2), 0.0)
    m2 = gl.sum(gl.sum(d * d, axis=2), axis=0)
    out_l: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [NUM_WARPS, 1], [1, 0])  # lanes along the channels
    mean, m2, cnt = gl.convert_layout(mean, out_l), gl.convert_layout(m2, out_l), gl.convert_layout(cnt, out_l)
    w = gl.arange(0, NUM_WARPS, layout=gl.SliceLayout(1, out_l))
    j = gl.arange(0, SPLIT_N, layout=gl.SliceLayout(0, out_l))
    dst = part_ptr + ((b * T + t_sp) * NUM_WARPS + gl.expand_dims(w, 1)) * Co + c0 + gl.expand_dims(j, 0)
    gl.store(dst, mean)
    gl.store(dst + third, m2)
    gl.store(dst + 2 * third, cnt)


# sizes are not specialized: one compile per (config, bias dtype, epilogue) serves every layer shape
@gluon.jit(do_not_specialize=["part_third", "C", "H", "W", "Co", "n_img", "n_th", "n_tw", "n_split", "n_nb",
                              "num_units"])  # fmt: skip
def conv3x3_kernel(x_desc, w_desc, y_desc, r_desc, i_desc, i1_desc, w1_desc, y1_desc, bias_ptr, part_ptr, part_third,
                   C, H, W, Co, n_img, n_th, n_tw, n_split, n_nb, num_units, STAGES: gl.constexpr,
                   HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr, STATS: gl.constexpr, CPG: gl.constexpr,
                   EPI_SPLIT: gl.constexpr, BN1: gl.constexpr, TAPS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                   num_warps: gl.constexpr):  # fmt: skip
    # TAPS: 9 (the 3x3 conv) or 4 (sub-pixel: w_desc on W4m [4·Co, 4·C], y_desc 5-D; see the math above)
    # x_desc: [N, H, W, C] boxes [TB, TH, TW, BK]; w_desc: [Co, 9·C] boxes [BN, BK];
    # y_desc: [N, H, W, Co] boxes [TB, TH, TW, BN / EPI_SPLIT] (n_split > 1: the fp32 partials [n_split·N, H, W, Co]);
    # BN1 > 0: a tile is BN + BN1 channels wide, the last BN1 through w1_desc (boxes [BN1, BK]) and y1_desc (boxes
    # [TB, TH, TW, BN1]), both on the same tensors (for Co like 320 = 2 x (128 + 32): one wave of 128 x 160 tiles);
    # bias_ptr: [Co] fp16/fp32 (read iff HAS_BIAS);
    # HAS_RES: r_desc: the residual [N, H, W, Co] boxes [TB, TH, TW, BK], i_desc / i1_desc: the identity
    # [BN + BN1, RS·BK] boxes [BN, BK] / [BN1, BK]; STATS: part_ptr fp32 [3, N, Co / CPG, n_th·n_tw·num_warps]
    # (CPG = 0: [3, N, n_th·n_tw·num_warps, Co]), part_third elements a third
    a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    c_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
    if BN1 > 0:
        b1_bufs = gl.allocate_shared_memory(w1_desc.dtype, [STAGES] + w1_desc.block_type.shape, w1_desc.layout)
        c1_smem = gl.allocate_shared_memory(y1_desc.dtype, y1_desc.block_type.shape, y1_desc.layout)
    else:  # (stand-ins, never touched)
        b1_bufs = b_bufs
        c1_smem = c_smem
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_mma_partition, (y_desc, y1_desc, a_bufs, b_bufs, b1_bufs, ready, empty, c_smem, c1_smem, bias_ptr, part_ptr,
                          part_third, C, H, W, Co, n_img, n_th, n_tw, n_split, n_nb, num_units, HAS_BIAS, HAS_RES,
                          STATS, CPG, EPI_SPLIT, BN1, TAPS, num_warps)),
        (_load_partition, (x_desc, w_desc, w1_desc, r_desc, i_desc, i1_desc, a_bufs, b_bufs, b1_bufs, ready, empty, C,
                           Co, n_th, n_tw, n_split, n_nb, num_units, HAS_RES, BN1, TAPS)),
    ], [1], [PRODUCER_REGS])  # fmt: skip
