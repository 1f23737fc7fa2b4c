"""Gluon kernels of `ff_geglu_gluon.py` (Hopper sm_90 only; imported lazily).

Gluon kernels do not run under the CPU interpreter: the tests compile this one for sm_90 ahead of time
(ff_geglu_gluon.compile_sm90) and check its numbers on a GPU.
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
# Math: SD's GEGLU feed-forward projection, fp32 accumulation:
#
#   y[m, f] = (x[m, :] · W[f, :] + b[f]) · GELU(x[m, :] · W[F + f, :] + b[F + f]),   W [2F, K], y [M, F]
#
# One output tile = BM rows x BN columns f0 .. f0 + BN. W is read as W3 [2, F, K] (value rows, gate rows): one
# TMA box [2, BN, BK] brings the tile's value and gate rows for a K step, seen as one [2·BN, BK] operand, so
# each K step is ONE wgmma of N = 2·BN per warpgroup:
#
#   acc[BM, 2·BN] = Σ_k x[m0 : +BM, k : +BK] @ [W3[0, f0 : +BN, k : +BK]; W3[1, f0 : +BN, k : +BK]]ᵀ
#   value, gate = acc[:, :BN], acc[:, BN:]    (a register relabeling: [BM, 2, BN] -> [BM, BN, 2] -> split)
#
# TMA zero-fills rows past M or F and columns past K, and clips the store at M and F: any M, F, K works.
# GELU: none ½·g·(1 + erf(g/√2)); tanh g·σ(2u), u = √(2/π)·(g + 0.044715·g³); quick g·σ(1.702·g).
#
# Protocol (gl.warp_specialize; a STAGES-deep SMEM ring of (x box, W box) slots, barriers ready[s], empty[s]),
# as kernels/conv_gluon_kernels.py: the 1-warp producer waits empty[s] at parity ((it div STAGES) & 1) ^ 1,
# arms ready[s] with the two boxes' bytes and issues both TMA loads; the consumer warpgroups (stacked along M)
# wait ready[s], issue the async wgmma, keep one in flight and free the previous step's slot (a tile's first
# step frees nothing: the previous tile's last slot was freed after its wait(0)). The epilogue's TMA store is
# left in flight over the next tile's mainloop (store_wait(0) just before the output buffer is rewritten).
# Persistent: grid = min(#SMs, #tiles); program p takes tiles p, p + grid, ... in grouped order (GROUP_M row
# tiles walk the column tiles together: their W boxes are shared in L2).
# -------------------------------------------------------------------------------------------------------


@gluon.jit
def _tile(t, n_m, n_n, GROUP_M: gl.constexpr):
    # grouped order: tile t -> (row tile, column tile)
    per_group = GROUP_M * n_n
    first_m = (t // per_group) * GROUP_M
    size_m = gl.minimum(n_m - first_m, GROUP_M)
    return first_m + (t % per_group) % size_m, (t % per_group) // size_m


@gluon.jit
def _gelu(g, APPROX: gl.constexpr):
    if APPROX == 0:
        return 0.5 * g * (1.0 + gl.erf(g * 0.7071067811865476))
    elif APPROX == 1:
        return g / (1.0 + gl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g)))
    else:
        return g / (1.0 + gl.exp(-1.702 * g))


@gluon.jit
def _gemm_tile(a_ring, b_ring, ready, empty, it, kt, acc):
    # acc += the tile's kt K steps from the ring, starting at ring counter it; returns (acc, it + kt). Keeps one
    # wgmma in flight and frees the previous step's slot (none at the tile's first step); frees the last one.
    BK: gl.constexpr = a_ring.type.shape[2]
    BN: gl.constexpr = b_ring.type.shape[2]
    STAGES: gl.constexpr = a_ring.type.shape[0]
    for kk in range(kt):
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        b_view = b_ring.index(s).reshape([2 * BN, BK]).permute((1, 0))  # [2, BN, BK] -> [BK, 2·BN]
        acc = warpgroup_mma(a_ring.index(s), b_view, acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc,))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kk > 0)  # step it − 1's slot
        it += 1
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))  # the tile's last step
    return acc, it


@gluon.jit
def _geglu_store(acc, pm, pn, F, b_ptr, c_smem, y_desc, HAS_B: gl.constexpr, APPROX: gl.constexpr):
    # value, gate (+ bias) -> value·GELU(gate) -> the output buffer -> TMA store, left in flight
    BM: gl.constexpr = c_smem.type.shape[0]
    BN: gl.constexpr = c_smem.type.shape[1]
    v, g = acc.reshape([BM, 2, BN]).permute((0, 2, 1)).split()  # [BM, 2·BN] -> value, gate [BM, BN]
    if HAS_B:
        cols = pn * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, v.type.layout))
        ok = cols < F
        v = v + gl.expand_dims(gl.load(b_ptr + cols, mask=ok, other=0.0).to(gl.float32), 0)
        g = g + gl.expand_dims(gl.load(b_ptr + F + cols, mask=ok, other=0.0).to(gl.float32), 0)
    y = (v * _gelu(g, APPROX)).to(c_smem.dtype)
    tma.store_wait(0)  # the previous tile's store has left the buffer
    c_smem.store(y)
    fence_async_shared()
    tma.async_copy_shared_to_global(y_desc, [pm * BM, pn * BN], c_smem)


@gluon.jit
def _load_partition(x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, F, K, GROUP_M: gl.constexpr):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(F, BN)
    kt = gl.cdiv(K, BK)
    it = 0
    for t in range(gl.program_id(0), n_m * n_n, gl.num_programs(0)):
        pm, pn = _tile(t, n_m, n_n, GROUP_M)
        for kk in range(kt):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, NBYTES)
            tma.async_copy_global_to_shared(x_desc, [pm * BM, kk * BK], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [0, pn * BN, kk * BK], bar, b_bufs.index(s))
            it += 1


@gluon.jit
def _mma_partition(y_desc, a_bufs, b_bufs, ready, empty, c_smem, b_ptr, M, F, K, HAS_B: gl.constexpr,
                   APPROX: gl.constexpr, GROUP_M: gl.constexpr, NUM_WARPS: gl.constexpr):  # fmt: skip
    BM: gl.constexpr = a_bufs.type.shape[1]
    BK: gl.constexpr = a_bufs.type.shape[2]
    BN: gl.constexpr = b_bufs.type.shape[2]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, 2 * BN, 16]
    )
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(F, BN)
    kt = gl.cdiv(K, BK)
    it = 0  # K steps consumed by this program over all its tiles
    for t in range(gl.program_id(0), n_m * n_n, gl.num_programs(0)):
        pm, pn = _tile(t, n_m, n_n, GROUP_M)
        acc, it = _gemm_tile(a_bufs, b_bufs, ready, empty, it, kt, gl.zeros([BM, 2 * BN], gl.float32, mma_layout))
        _geglu_store(acc, pm, pn, F, b_ptr, c_smem, y_desc, HAS_B, APPROX)
    tma.store_wait(0)


# sizes are not specialized: one compile per (config, dtype, bias, GELU form) serves every layer shape
@gluon.jit(do_not_specialize=["M", "F", "K"])
def ff_geglu_kernel(x_desc, w_desc, y_desc, b_ptr, M, F, K, STAGES: gl.constexpr, HAS_B: gl.constexpr,
                    APPROX: gl.constexpr, GROUP_M: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                    num_warps: gl.constexpr):  # fmt: skip
    # x_desc: [M, K] boxes [BM, BK]; w_desc: W3 [2, F, K] boxes [2, BN, BK]; y_desc: [M, F] boxes [BM, BN];
    # b_ptr: [2F] (read iff HAS_B)
    a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    c_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_mma_partition, (y_desc, a_bufs, b_bufs, ready, empty, c_smem, b_ptr, M, F, K, HAS_B, APPROX, GROUP_M,
                          num_warps)),
        (_load_partition, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, F, K, GROUP_M)),
    ], [1], [PRODUCER_REGS])  # fmt: skip


# -------------------------------------------------------------------------------------------------------
# Ping-pong variant: two consumer warpgroups on ALTERNATE tiles, each with its own SMEM ring, barriers and
# output buffer, so one warpgroup's epilogue (bias, GELU, store) runs under the other's MMAs. A program's tiles
# t_j = pid + j·nprog come in pairs: tile 2i goes to consumer 0 and tile 2i + 1 to consumer 1, each as that
# consumer's i-th tile; its K step kk has the ring counter it = i·KT + kk (slot it mod STAGES, parity
# (it div STAGES) & 1) on both sides.
# -------------------------------------------------------------------------------------------------------


@gluon.jit
def _pp_load_tile(x_desc, w_desc, a_ring, b_ring, ready, empty, t, i, n_m, n_n, kt, GROUP_M: gl.constexpr):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_ring.type.shape[0]
    NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    pm, pn = _tile(t, n_m, n_n, GROUP_M)
    for kk in range(kt):
        it = i * kt + kk
        s = it % STAGES
        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, NBYTES)
        tma.async_copy_global_to_shared(x_desc, [pm * BM, kk * BK], bar, a_ring.index(s))
        tma.async_copy_global_to_shared(w_desc, [0, pn * BN, kk * BK], bar, b_ring.index(s))


@gluon.jit
def _pp_load_partition(x_desc, w_desc, a0, b0, ready0, empty0, a1, b1, ready1, empty1, M, F, K,
                       GROUP_M: gl.constexpr):  # fmt: skip
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[1]
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(F, BN)
    kt = gl.cdiv(K, BK)
    nprog = gl.num_programs(0)
    i = 0
    for t in range(gl.program_id(0), n_m * n_n, 2 * nprog):
        _pp_load_tile(x_desc, w_desc, a0, b0, ready0, empty0, t, i, n_m, n_n, kt, GROUP_M)
        if t + nprog < n_m * n_n:
            _pp_load_tile(x_desc, w_desc, a1, b1, ready1, empty1, t + nprog, i, n_m, n_n, kt, GROUP_M)
        i += 1


@gluon.jit
def _pp_consumer(y_desc, a_ring, b_ring, ready, empty, c_smem, b_ptr, M, F, K, CID: gl.constexpr,
                 HAS_B: gl.constexpr, APPROX: gl.constexpr, GROUP_M: gl.constexpr):  # fmt: skip
    BM: gl.constexpr = a_ring.type.shape[1]
    BK: gl.constexpr = a_ring.type.shape[2]
    BN: gl.constexpr = b_ring.type.shape[2]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 2 * BN, 16])  # fmt: skip
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(F, BN)
    kt = gl.cdiv(K, BK)
    nprog = gl.num_programs(0)
    it = 0  # = i·KT + kk for this consumer's i-th tile
    for t in range(gl.program_id(0) + CID * nprog, n_m * n_n, 2 * nprog):
        pm, pn = _tile(t, n_m, n_n, GROUP_M)
        acc, it = _gemm_tile(a_ring, b_ring, ready, empty, it, kt, gl.zeros([BM, 2 * BN], gl.float32, mma_layout))
        _geglu_store(acc, pm, pn, F, b_ptr, c_smem, y_desc, HAS_B, APPROX)
    tma.store_wait(0)


@gluon.jit
def _alloc_ring(x_desc, w_desc, y_desc, STAGES: gl.constexpr):
    a = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    b = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    c = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    return a, b, c, ready, empty


@gluon.jit(do_not_specialize=["M", "F", "K"])
def ff_geglu_pp_kernel(x_desc, w_desc, y_desc, b_ptr, M, F, K, STAGES: gl.constexpr, HAS_B: gl.constexpr,
                       APPROX: gl.constexpr, GROUP_M: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                       CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    # as ff_geglu_kernel; num_warps = 4 (consumer 0, the default partition); consumer 1 and the producer are
    # worker partitions; one (ring, output buffer, barriers) per consumer
    a0, b0, c0, ready0, empty0 = _alloc_ring(x_desc, w_desc, y_desc, STAGES)
    a1, b1, c1, ready1, empty1 = _alloc_ring(x_desc, w_desc, y_desc, STAGES)
    gl.warp_specialize([
        (_pp_consumer, (y_desc, a0, b0, ready0, empty0, c0, b_ptr, M, F, K, 0, HAS_B, APPROX, GROUP_M)),
        (_pp_consumer, (y_desc, a1, b1, ready1, empty1, c1, b_ptr, M, F, K, 1, HAS_B, APPROX, GROUP_M)),
        (_pp_load_partition, (x_desc, w_desc, a0, b0, ready0, empty0, a1, b1, ready1, empty1, M, F, K, GROUP_M)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip
