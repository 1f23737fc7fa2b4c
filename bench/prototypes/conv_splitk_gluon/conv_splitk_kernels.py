"""Gluon kernel of :mod:`speedsd.kernels.conv_splitk` (Hopper sm_90 only; imported lazily).

Gluon kernels do not run under the CPU interpreter: the tests compile this one for sm_90 ahead of time
(conv_splitk.compile_sm90) and check it on a GPU.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# -------------------------------------------------------------------------------------------------------
# Math: 3x3 stride-1 pad-1 conv, channels_last fp16 in and out, fp32 accumulation, split over K:
#
#   y[m, n] = bias[n] + Σ_{s < SPLIT} P_s[m, n],   P_s[m, n] = Σ_{kb in split s} A_kb[m, :] · B_kb[n, :]ᵀ
#   m = (b, oy, ox) an output pixel, kb = tap·(C / BK) + cb a K block (tap-major, as the channels_last weight
#   [Co, 3, 3, C] seen as Wm [Co, 9·C] orders K), tap = 3·ky + kx:
#   A_kb = x[b0 : +BB, oy0 + ky − 1 : +TH, kx − 1 : +W, cb·BK : +BK]   (a 4-D TMA box [BB, TH, W, BK] seen as
#          [BM = BB·TH·W, BK]; TMA zero-fills every coordinate outside [N, H, W, C]: that is the padding)
#   B_kb = Wm[n0 : +BN, kb·BK : +BK]
#
# One program = one output tile (BB whole images or TH whole rows of one image, by BN channels) x one split
# (kb_per consecutive K blocks). The tile's pixels are consecutive rows m0 .. m0 + BM of y [M, N].
# SPLIT > 1: each program stores its fp32 partial P_s; the program of the tile that arrives last (an
# arrival counter, re-armed to 0 by it) sums the SPLIT partials in split order, so the result does not
# depend on which one is last, adds the bias and stores fp16. SPLIT == 1: acc + bias stored directly.
#
# Protocol (gl.warp_specialize, a STAGES-deep SMEM ring, barriers ready[s] / empty[s]; as conv_gluon_kernels):
#   * producer (1 warp): step i, slot s = i mod STAGES: wait empty[s] at parity ((i div STAGES) & 1) ^ 1,
#     arm ready[s] with the A + B bytes, issue both TMA loads into slot s.
#   * consumer (default partition): wait ready[s] at parity (i div STAGES) & 1, issue the async wgmma (both
#     operands from SMEM), keep one in flight, free the slot of step i − 1 (its wgmma just retired).
# The epilogue runs after the partitions join, on the default warps.
# -------------------------------------------------------------------------------------------------------


@gluon.jit
def _tile(t, n_th, n_nb, BB: gl.constexpr, TH: gl.constexpr, BN: gl.constexpr):
    # t = (m_tile)·n_nb + nb, m_tile = (b0 / BB)·n_th + oy0 / TH  ->  (b0, oy0, n0)
    nb = t % n_nb
    r = t // n_nb
    return (r // n_th) * BB, (r % n_th) * TH, nb * BN


@gluon.jit
def _load_partition(x_desc, w_desc, a_bufs, b_bufs, ready, empty, C, n_th, n_nb, kb_per):
    BB: gl.constexpr = x_desc.block_type.shape[0]
    TH: gl.constexpr = x_desc.block_type.shape[1]
    BK: gl.constexpr = x_desc.block_type.shape[3]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    b0, oy0, n0 = _tile(gl.program_id(0), n_th, n_nb, BB, TH, BN)
    kc = C // BK
    kb0 = gl.program_id(1) * kb_per
    for i in range(kb_per):
        kb = kb0 + i
        tap = kb // kc
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, NBYTES)
        # A box at (b0, oy0 + ky − 1, kx − 1, cb·BK); B box at (n0, kb·BK)
        tma.async_copy_global_to_shared(
            x_desc, [b0, oy0 + tap // 3 - 1, tap % 3 - 1, (kb - tap * kc) * BK], bar, a_bufs.index(s)
        )
        tma.async_copy_global_to_shared(w_desc, [n0, kb * BK], bar, b_bufs.index(s))


@gluon.jit
def _mma_partition(a_bufs, b_bufs, ready, empty, kb_per, NUM_WARPS: gl.constexpr):
    BM: gl.constexpr = a_bufs.type.shape[1] * a_bufs.type.shape[2] * a_bufs.type.shape[3]
    BK: gl.constexpr = a_bufs.type.shape[4]
    BN: gl.constexpr = b_bufs.type.shape[1]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BN, 16]
    )
    acc = gl.zeros([BM, BN], gl.float32, mma_layout)
    for i in range(kb_per):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        a_view = a_bufs.index(s).reshape([BM, BK])  # [BB, TH, W, BK] -> [BM, BK]
        acc = warpgroup_mma(a_view, b_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc,))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    return (acc,)  # the default partition's results: a tuple


# sizes are not specialized: one compile per (config, bias) serves every layer shape
@gluon.jit(do_not_specialize=["M", "N", "C", "n_th", "n_nb", "kb_per"])
def conv3x3_splitk_kernel(x_desc, w_desc, bias_ptr, p_ptr, y_ptr, cnt_ptr, M, N, C, n_th, n_nb, kb_per,
                          STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                          num_warps: gl.constexpr):  # fmt: skip
    # x_desc: [N, H, W, C] boxes [BB, TH, W, BK]; w_desc: [Co, 9·C] boxes [BN, BK]; bias_ptr [Co] fp16/fp32
    # (read iff HAS_BIAS); p_ptr fp32 [SPLIT, M, Co] (SPLIT > 1); y_ptr fp16 [M, Co]; cnt_ptr int32 counters,
    # one a tile, zero between calls. Grid (tiles, SPLIT).
    a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    res = gl.warp_specialize([
        (_mma_partition, (a_bufs, b_bufs, ready, empty, kb_per, num_warps)),
        (_load_partition, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, C, n_th, n_nb, kb_per)),
    ], [1], [PRODUCER_REGS])  # fmt: skip
    acc = res[0]
    BB: gl.constexpr = x_desc.block_type.shape[0]
    TH: gl.constexpr = x_desc.block_type.shape[1]
    BM: gl.constexpr = acc.shape[0]
    BN: gl.constexpr = acc.shape[1]
    layout: gl.constexpr = acc.type.layout
    t = gl.program_id(0)
    s = gl.program_id(1)
    split = gl.num_programs(1)
    b0, oy0, n0 = _tile(t, n_th, n_nb, BB, TH, BN)
    m0 = (b0 * n_th * TH + oy0) * (BM // (BB * TH))  # first pixel row: (b0·H + oy0)·W
    m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    mn = gl.expand_dims(m, 1) * N + gl.expand_dims(n, 0)  # [BM, BN] offsets in y [M, N]
    if split > 1:
        gl.store(p_ptr + s * M * N + mn, acc)
        gl.thread_barrier()  # every thread's partial stored before the arrival is published
        done = gl.atomic_add(cnt_ptr + t, 1, sem="acq_rel", scope="gpu")
        if done == split - 1:  # the tile's last split: sum all partials in split order, re-arm the counter
            acc = gl.zeros([BM, BN], gl.float32, layout)
            for q in range(split):
                acc += gl.load(p_ptr + q * M * N + mn, cache_modifier=".cg")
            if HAS_BIAS:
                acc = acc + gl.expand_dims(gl.load(bias_ptr + n).to(gl.float32), 0)
            gl.store(y_ptr + mn, acc.to(y_ptr.dtype.element_ty))
            gl.atomic_xchg(cnt_ptr + t, 0)
    else:
        if HAS_BIAS:
            acc = acc + gl.expand_dims(gl.load(bias_ptr + n).to(gl.float32), 0)
        gl.store(y_ptr + mn, acc.to(y_ptr.dtype.element_ty))
