"""Gluon kernel of :mod:`speedsd.kernels.attention_gluon` (Hopper sm_90 only; imported lazily).

One kernel, two instances (head dim HEAD_D a constexpr; the launcher picks the config):
- d=40 (the UNet's 64² level): trimmed from bench/prototypes/gluon_attn/attn_gluon.py to its fastest variant of
  round 2, ``ws4_pp_narrow_bn64_fadd`` (H200: 136.9 µs vs 143.6 for round 1's ws3_pp_narrow and 150.1 for
  cuDNN SDPA, bench/results/attention_gluon_probe_r2_h200.txt): one CTA runs four consumer warpgroups (64 query
  rows each, 256 rows of one head) and one TMA producer warp; a turn barrier ring lets the consumers issue
  their wgmmas in turn (ping-pong); keys come in blocks of 64, K/V tiles as a 32- and a 16-column TMA box (48
  of the head's 64 padded columns) through a 6-deep ring. The d=40 instance compiles to that variant's SASS.
- d=80 (the 32² level, N = 1024): the same loop with K/V (and Q) as a 64- and a 16-column box (no padding),
  two consumer warpgroups (128 query rows a CTA: 8 x 16 = 128 CTAs at B=2, H=8, N=1024), which leaves each
  consumer the registers of its [64, 80] fp32 accumulator.
exp2 is fp32 on the MUFU; the softmax row sums are fp32 adds of the exponentials. Gluon kernels do not run
under the CPU interpreter: the tests compile both instances for sm_90 ahead of time
(attention_gluon.compile_sm90).
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

BM = gl.constexpr(64)  # query rows per consumer (one warpgroup)
QP = gl.constexpr(64)  # columns of the padded Q box (HEAD_D < A + B: d=40); columns >= HEAD_D zeroed in SMEM


@gluon.constexpr_function
def _mma_layout(n, warps):
    # wgmma accumulator [64, n]: the warpgroup's 4 warps stacked along M, 16 rows each
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def _a_layout(n, warps):
    # fp16 A operand in registers for a wgmma whose accumulator is _mma_layout(n, warps)
    return gl.DotOperandLayout(operand_index=0, parent=_mma_layout(n, warps), k_width=2)


@gluon.constexpr_function
def _rows_blocked(warps):
    # row-major blocked layout for [rows, 64] fp16 tiles (8 halves = 16 B per thread)
    return gl.BlockedLayout([1, 8], [4, 8], [warps, 1], [1, 0])


# -------------------------------------------------------------------------------------------------------
# Math (per head, per query row i; s_ij = q_i . k_j over the HEAD_D real dims; c = scale * log2(e) > 0):
#   key blocks j = 0 .. N/BN-1 of BN keys; running max m (already multiplied by c), O (unnormalised), l:
#     m_new  = max(m, c * max_j s_ij)
#     p_ij   = exp2(c * s_ij - m_new)          (one FFMA + one fp32 MUFU ex2 per score; fp16 for the PV wgmma)
#     alpha  = exp2(m - m_new)                 (0 on the first block: m = -inf)
#     l      = alpha * l + sum_j p_ij          (fp32 adds of the fp32 p, as FA2/FA3; O sums the fp16 p)
#     O      = alpha * O + P @ V_j             (fp32 wgmma accumulators: columns [0, A) and [A, A + B))
#   out_i = O_i / l_i, columns 0..HEAD_D-1 stored.
# Head columns as two TMA boxes of A and B columns (A = 32, B = 16 for d=40; A = 64, B = 16 for d=80; each
# box row is at most 128 B, the widest swizzle):
#   Q   d=40: smem [BM, 64] fp16 (one 128 B-swizzled box at column h*40; columns >= 40 zeroed once, so
#       S = Q K^T is exact and Q's columns 40..47 cancel whatever K's 48-column tiles hold there);
#       d=80: smem [BM, 64] + [BM, 16] boxes at columns h*80 and h*80 + 64 (A + B = HEAD_D: nothing to zero)
#   K_j, V_j smem [BN, A] + [BN, B] boxes at columns c and c+A, STAGES-deep ring; the d=40 V box of the last
#       head runs past the tensor edge (TMA fills 0); O columns >= HEAD_D are never stored. Key rows
#       b*N + j*BN with N % BN == 0: a key tile never straddles two batches.
#   S   regs [BM, BN] fp32 = Q_a K_a^T + Q_b K_b^T                      P regs [BM, BN] fp16
#   O   regs [BM, A] + [BM, B] fp32                                     m, l regs [BM] fp32
# Schedule (FA3 intra-warpgroup overlap): issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, wait
# for S_j only, do the softmax of S_j while P_{j-1} V_{j-1} runs, then wait for it and rescale O.
# Query tiles: CTA pid_m of batch b owns rows b*N + NC*BM*pid_m + [0, NC*BM), consumer WG the 64 from 64*WG
# (NC = 4 consumers for d=40, 2 for d=80). Where N % (NC*BM) != 0 (d=40, N = 640: 2.5 tiles) the last CTA of
# a batch runs past N: its rows there are the next batch's (computed, never stored) or, past the tensor's
# end, TMA's zero fill (S = 0, P = 1: finite, never stored); a consumer with rows_left <= 0 stores nothing
# but still takes its turns and releases its K/V stages, so the ring and the turn barriers see all NC
# consumers on every key block.
# Barriers: k_ready[s], v_ready[s] (TMA tx-count, count 1); kv_empty[s] (count NC: each consumer releases
# stage s once its P V wgmma on it completed); q_bar[c] (Q tile of consumer c); turn[c] (consumer c may
# issue its next wgmmas; ring 0 -> 1 -> .. -> NC-1 -> 0, so one consumer's softmax runs under the others'
# wgmmas).
# Grid: (cdiv(N, NC*BM), B*H), one tile per CTA.
# -------------------------------------------------------------------------------------------------------


@gluon.jit
def _softmax(s, m_i, l_i, qk_c):
    """One online-softmax step on the fp32 score tile s [BM, BN] (wgmma layout): fp16 P, alpha, new max, l."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_c)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_c - gl.expand_dims(m_new, 1))  # argument <= 0; one FFMA per score
    l_i = l_i * alpha + gl.sum(p, axis=1)  # fp32 row sums
    return p.to(gl.float16), alpha, m_new, l_i


@gluon.jit
def _zero_q_pad(q_view, HEAD_D: gl.constexpr):
    """Zero columns >= HEAD_D of a [BM, 64] Q tile in SMEM (other heads' data) so that Q K^T is exact."""
    lay: gl.constexpr = _rows_blocked(gl.num_warps())
    q = q_view.load(lay)
    cols = gl.arange(0, QP, layout=gl.SliceLayout(0, lay))
    q = gl.where(gl.expand_dims(cols, 0) < HEAD_D, q, gl.zeros_like(q))
    q_view.store(q)
    fence_async_shared()  # generic-proxy stores -> visible to wgmma (async proxy)
    gl.thread_barrier()


@gluon.jit
def _issue_qk(qbufs, kbufs, st, s):
    """Async S = Q_a K_a^T + Q_b K_b^T (K stage st)."""
    tok = warpgroup_mma(qbufs[0], kbufs[0].index(st).permute((1, 0)), s, use_acc=False, is_async=True)
    return warpgroup_mma(qbufs[1], kbufs[1].index(st).permute((1, 0)), tok, is_async=True)


@gluon.jit
def _issue_pv(p, vbufs, st, o, o2):
    """Async O += P V_a, O2 += P V_b (V stage st)."""
    W: gl.constexpr = gl.num_warps()
    o = warpgroup_mma(gl.convert_layout(p, _a_layout(o.shape[1], W)), vbufs[0].index(st), o, is_async=True)
    o2 = warpgroup_mma(gl.convert_layout(p, _a_layout(o2.shape[1], W)), vbufs[1].index(st), o2, is_async=True)
    return o, o2


@gluon.jit
def _rescale(o, o2, alpha):
    o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o.type.layout)), 1)
    o2 = o2 * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o2.type.layout)), 1)
    return o, o2


@gluon.jit
def _attend(qbufs, kbufs, vbufs, k_ready, v_ready, kv_empty, turn, n_kv, qk_c, WG: gl.constexpr, NC: gl.constexpr):
    """Consumer WG's full key loop for the query rows in qbufs; returns (o, o2, l) unnormalised."""
    W: gl.constexpr = gl.num_warps()
    STAGES: gl.constexpr = kbufs[0].shape[0]
    BN: gl.constexpr = kbufs[0].shape[1]
    A: gl.constexpr = vbufs[0].shape[2]
    B: gl.constexpr = vbufs[1].shape[2]
    s_layout: gl.constexpr = _mma_layout(BN, W)
    p_layout: gl.constexpr = _a_layout(A, W)
    TURN0: gl.constexpr = 1 if WG == 0 else 0  # consumer 0 goes first; the others wait for their turn
    NEXT: gl.constexpr = (WG + 1) % NC

    m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
    o = gl.zeros([BM, A], gl.float32, _mma_layout(A, W))
    o2 = gl.zeros([BM, B], gl.float32, _mma_layout(B, W))
    s = gl.zeros([BM, BN], gl.float32, s_layout)

    # prologue: S_0 and its softmax
    mbarrier.wait(k_ready.index(0), 0)
    mbarrier.wait(turn.index(WG), TURN0)
    s_tok = _issue_qk(qbufs, kbufs, 0, s)
    mbarrier.arrive(turn.index(NEXT))
    s = warpgroup_mma_wait(0, deps=(s_tok,))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_c)
    p = gl.convert_layout(p, p_layout)

    for j in range(1, n_kv):
        st = j % STAGES
        sp = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
        mbarrier.wait(v_ready.index(sp), ((j - 1) // STAGES) & 1)
        mbarrier.wait(turn.index(WG), (j & 1) ^ TURN0)
        s_tok = _issue_qk(qbufs, kbufs, st, s)
        o, o2 = _issue_pv(p, vbufs, sp, o, o2)
        mbarrier.arrive(turn.index(NEXT))
        s = warpgroup_mma_wait(2, deps=(s_tok,))  # the 2 P V groups may still run
        p_new, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_c)  # overlaps P_{j-1} V_{j-1}
        o, o2, p = warpgroup_mma_wait(0, deps=(o, o2, p))  # p (A operand) alive until here
        mbarrier.arrive(kv_empty.index(sp))  # this consumer is done with K/V stage sp
        o, o2 = _rescale(o, o2, alpha)
        p = gl.convert_layout(p_new, p_layout)

    # epilogue: O += P_last V_last
    sl = (n_kv - 1) % STAGES
    mbarrier.wait(v_ready.index(sl), ((n_kv - 1) // STAGES) & 1)
    mbarrier.wait(turn.index(WG), (n_kv & 1) ^ TURN0)
    o, o2 = _issue_pv(p, vbufs, sl, o, o2)
    mbarrier.arrive(turn.index(NEXT))
    o, o2, p = warpgroup_mma_wait(0, deps=(o, o2, p))
    return o, o2, l_i


@gluon.jit
def _store_part(o, l, o_ptr, row0, rows_left, col0, o_stride, C0: gl.constexpr, HEAD_D: gl.constexpr):
    """out[row0 + r, col0 + C0 + c] = O[r, c] / l[r] for C0 + c < HEAD_D and r < rows_left."""
    lay: gl.constexpr = o.type.layout
    BW: gl.constexpr = o.shape[1]
    inv = gl.convert_layout(1.0 / l, gl.SliceLayout(1, lay))
    o16 = (o * gl.expand_dims(inv, 1)).to(gl.float16)
    r = gl.arange(0, BM, layout=gl.SliceLayout(1, lay))
    c = C0 + gl.arange(0, BW, layout=gl.SliceLayout(0, lay))
    offs = gl.expand_dims((row0 + r).to(gl.int64) * o_stride, 1) + gl.expand_dims(col0 + c, 0)
    mask = (gl.expand_dims(r, 1) < rows_left) & (gl.expand_dims(c, 0) < HEAD_D)
    gl.store(o_ptr + offs, o16, mask=mask)


@gluon.jit
def _load_kv(kv_descs, kbufs, vbufs, k_bar, v_bar, row, k_col, v_col, st):
    """TMA of key rows [row, row+BN) into stage st: K and V as A + B columns from k_col / v_col."""
    A: gl.constexpr = kv_descs[0].block_type.shape[1]
    nb: gl.constexpr = kv_descs[0].block_type.nbytes + kv_descs[1].block_type.nbytes
    mbarrier.expect(k_bar, nb)
    tma.async_copy_global_to_shared(kv_descs[0], [row, k_col], k_bar, kbufs[0].index(st))
    tma.async_copy_global_to_shared(kv_descs[1], [row, k_col + A], k_bar, kbufs[1].index(st))
    mbarrier.expect(v_bar, nb)
    tma.async_copy_global_to_shared(kv_descs[0], [row, v_col], v_bar, vbufs[0].index(st))
    tma.async_copy_global_to_shared(kv_descs[1], [row, v_col + A], v_bar, vbufs[1].index(st))


@gluon.jit
def _producer(kv_descs, kbufs, vbufs, k_ready, v_ready, kv_empty, kv_row, k_col, v_col, n_kv):
    """1 warp: every K/V tile of this (batch, head) through the STAGES-deep ring."""
    STAGES: gl.constexpr = kbufs[0].shape[0]
    BN: gl.constexpr = kbufs[0].shape[1]
    for j in range(n_kv):
        st = j % STAGES
        mbarrier.wait(kv_empty.index(st), ((j // STAGES) & 1) ^ 1)  # fresh barrier: parity 1 counts as completed
        _load_kv(kv_descs, kbufs, vbufs, k_ready.index(st), v_ready.index(st), kv_row + j * BN, k_col, v_col, st)


@gluon.jit
def _load_q(q_descs, q_smem, bar, row0, q_col, WG: gl.constexpr, HEAD_D: gl.constexpr):
    """Consumer WG's Q tile into SMEM; returns its two wgmma A operands (Q_a, Q_b)."""
    A: gl.constexpr = q_descs[1].block_type.shape[1]  # K's box widths: Q_a = columns [0, A), Q_b = [A, A + B)
    B: gl.constexpr = q_descs[2].block_type.shape[1]
    if A + B > HEAD_D:  # d=40: one padded [BM, 64] box, its columns >= HEAD_D zeroed
        q_view = q_smem[0].index(WG)
        mbarrier.expect(bar, q_descs[0].block_type.nbytes)
        tma.async_copy_global_to_shared(q_descs[0], [row0, q_col], bar, q_view)
        mbarrier.wait(bar, 0)
        _zero_q_pad(q_view, HEAD_D)
        qbufs = (q_view.slice(0, A, dim=1), q_view.slice(A, B, dim=1))
    else:  # d=80: the head's columns exactly, as an A- and a B-column box
        qbufs = (q_smem[0].index(WG), q_smem[1].index(WG))
        mbarrier.expect(bar, q_descs[0].block_type.nbytes + q_descs[3].block_type.nbytes)
        tma.async_copy_global_to_shared(q_descs[0], [row0, q_col], bar, qbufs[0])
        tma.async_copy_global_to_shared(q_descs[3], [row0, q_col + A], bar, qbufs[1])
        mbarrier.wait(bar, 0)
    return qbufs


@gluon.jit
def _consumer(args, WG: gl.constexpr, NC: gl.constexpr, HEAD_D: gl.constexpr):
    """Warpgroup WG: its Q tile, the key loop, the store of its 64 output rows."""
    (q_descs, o_ptr, q_smem, kbufs, vbufs, k_ready, v_ready, kv_empty, q_bar, turn, q_row, rows_left, q_col,
     o_stride, n_kv, qk_c) = args  # fmt: skip
    row0 = q_row + WG * BM
    qbufs = _load_q(q_descs, q_smem, q_bar.index(WG), row0, q_col, WG, HEAD_D)
    o, o2, l = _attend(qbufs, kbufs, vbufs, k_ready, v_ready, kv_empty, turn, n_kv, qk_c, WG, NC)
    _store_part(o, l, o_ptr, row0, rows_left - WG * BM, q_col, o_stride, 0, HEAD_D)
    _store_part(o2, l, o_ptr, row0, rows_left - WG * BM, q_col, o_stride, o.shape[1], HEAD_D)


@gluon.jit
def attn_fwd_kernel(q_desc, qb_desc, ka_desc, kb_desc, o_ptr, n_ctx, H, qk_c, HEAD_D: gl.constexpr,
                    NC: gl.constexpr, STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr):  # fmt: skip
    """qkv [B*N, 3*H*HEAD_D] fp16 through four TMA descriptors: ka_desc / kb_desc boxes [BN, A] / [BN, B]
    (K and V), q_desc box [64, 64] (d=40, padded) or [64, A] and qb_desc [64, B] (d=80; unused for d=40);
    o_ptr: out [B*N, H*HEAD_D]; n_ctx = N (a multiple of BN); qk_c = scale * log2(e); NC consumer
    warpgroups (4 or 2). num_warps = 4."""
    BN: gl.constexpr = ka_desc.block_type.shape[0]
    A: gl.constexpr = ka_desc.block_type.shape[1]
    B: gl.constexpr = kb_desc.block_type.shape[1]
    gl.static_assert(q_desc.block_type.shape[0] == BM, "Q box: 64 rows per consumer")
    gl.static_assert(A + B >= HEAD_D, "the two K/V boxes must cover the head")
    gl.static_assert(NC == 2 or NC == 4, "2 or 4 consumer warpgroups")
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    hd = H * HEAD_D  # row stride of out; column offset of k inside qkv
    q_row = b * n_ctx + pid_m * (NC * BM)
    rows_left = n_ctx - pid_m * (NC * BM)  # query rows of this batch from q_row on
    q_col = h * HEAD_D

    if A + B > HEAD_D:
        q_smem = (gl.allocate_shared_memory(gl.float16, [NC, BM, QP], q_desc.layout),)
    else:
        q_smem = (gl.allocate_shared_memory(gl.float16, [NC, BM, A], q_desc.layout),
                  gl.allocate_shared_memory(gl.float16, [NC, BM, B], qb_desc.layout))  # fmt: skip
    ka = gl.allocate_shared_memory(gl.float16, [STAGES, BN, A], ka_desc.layout)
    kb = gl.allocate_shared_memory(gl.float16, [STAGES, BN, B], kb_desc.layout)
    va = gl.allocate_shared_memory(gl.float16, [STAGES, BN, A], ka_desc.layout)
    vb = gl.allocate_shared_memory(gl.float16, [STAGES, BN, B], kb_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=NC)
    for i in gl.static_range(NC):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()  # barrier inits -> visible to the async proxy / other partitions

    kbufs = (ka, kb)
    vbufs = (va, vb)
    cargs = ((q_desc, ka_desc, kb_desc, qb_desc), o_ptr, q_smem, kbufs, vbufs, k_ready, v_ready, kv_empty, q_bar,
             turn, q_row, rows_left, q_col, hd, n_ctx // BN, qk_c)  # fmt: skip
    pargs = ((ka_desc, kb_desc), kbufs, vbufs, k_ready, v_ready, kv_empty, b * n_ctx, hd + q_col, 2 * hd + q_col,
             n_ctx // BN)  # fmt: skip
    # partition 0 (default, 4 warps) and the 4-warp workers are the consumers; the 1-warp worker loads
    if NC == 4:
        gl.warp_specialize(
            [(_consumer, (cargs, 0, NC, HEAD_D)), (_consumer, (cargs, 1, NC, HEAD_D)),
             (_consumer, (cargs, 2, NC, HEAD_D)), (_consumer, (cargs, 3, NC, HEAD_D)), (_producer, pargs)],
            [4, 4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [(_consumer, (cargs, 0, NC, HEAD_D)), (_consumer, (cargs, 1, NC, HEAD_D)), (_producer, pargs)],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
