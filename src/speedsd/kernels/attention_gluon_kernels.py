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
- d=160 (the 16² level, N = 256): three boxes (64 + 64 + 32 columns) and one consumer warpgroup (64 rows a
  CTA, so that B=2, H=8, N=256 makes 64 CTAs).
exp2 is fp32 on the MUFU; the softmax row sums are fp32 adds of the exponentials. Gluon kernels do not run
under the CPU interpreter: the tests compile every instance for sm_90 ahead of time
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
# Head columns as TMA boxes of A, B (and C) columns (32 + 16 for d=40; 64 + 16 for d=80; 64 + 64 + 32 for
# d=160; each box row is at most 128 B, the widest swizzle). Below, for two boxes:
#   Q   d=40: smem [BM, 64] fp16 (one 128 B-swizzled box at column h*40; columns >= 40 zeroed once, so
#       S = Q K^T is exact and Q's columns 40..47 cancel whatever K's 48-column tiles hold there);
#       d=80: smem [BM, 64] + [BM, 16] boxes at columns h*80 and h*80 + 64 (A + B = HEAD_D: nothing to zero);
#       d=160 the same with three boxes
#   K_j, V_j smem [BN, A] + [BN, B] boxes at columns c and c+A, STAGES-deep ring; the d=40 V box of the last
#       head runs past the tensor edge (TMA fills 0); O columns >= HEAD_D are never stored. Key rows
#       b*N + j*BN with N % BN == 0: a key tile never straddles two batches.
#   S   regs [BM, BN] fp32 = Q_a K_a^T + Q_b K_b^T                      P regs [BM, BN] fp16
#   O   regs [BM, A] + [BM, B] fp32                                     m, l regs [BM] fp32
# Schedule (FA3 intra-warpgroup overlap): issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, wait
# for S_j only, do the softmax of S_j while P_{j-1} V_{j-1} runs, then wait for it and rescale O.
# Query tiles: CTA pid_m of batch b owns rows b*N + NC*BM*pid_m + [0, NC*BM), consumer WG the 64 from 64*WG
# (NC = 4 consumers for d=40, 2 for d=80, 1 for d=160; one consumer takes the turns alone). Where
# N % (NC*BM) != 0 (d=40, N = 640: 2.5 tiles) the last CTA of a batch runs past N: its rows there are
# the next batch's (computed, never stored) or, past the tensor's end, TMA's zero fill (S = 0, P = 1:
# finite, never stored); a consumer with rows_left <= 0 stores nothing but still takes its turns and
# releases its K/V stages, so the ring and the turn barriers see all NC consumers on every key block.
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
    """Async S = sum over the boxes of Q_box K_box^T (K stage st)."""
    tok = warpgroup_mma(qbufs[0], kbufs[0].index(st).permute((1, 0)), s, use_acc=False, is_async=True)
    if len(kbufs) == 3:
        tok = warpgroup_mma(qbufs[1], kbufs[1].index(st).permute((1, 0)), tok, is_async=True)
        return warpgroup_mma(qbufs[2], kbufs[2].index(st).permute((1, 0)), tok, is_async=True)
    else:
        return warpgroup_mma(qbufs[1], kbufs[1].index(st).permute((1, 0)), tok, is_async=True)


@gluon.jit
def _pv(p, vbuf, o):
    """Async O_box += P V_box (one box of V's columns)."""
    return warpgroup_mma(gl.convert_layout(p, _a_layout(o.shape[1], gl.num_warps())), vbuf, o, is_async=True)


@gluon.jit
def _issue_pv(p, vbufs, st, os):
    """Async O_box += P V_box for every box (V stage st); returns the accumulator tuple."""
    if len(os) == 3:
        return (_pv(p, vbufs[0].index(st), os[0]), _pv(p, vbufs[1].index(st), os[1]),
                _pv(p, vbufs[2].index(st), os[2]))  # fmt: skip
    else:
        return (_pv(p, vbufs[0].index(st), os[0]), _pv(p, vbufs[1].index(st), os[1]))


@gluon.jit
def _wait_pv(os, p):
    """Wait for every outstanding wgmma; returns (accumulators, p) (p, their A operand, alive until here)."""
    if len(os) == 3:
        o0, o1, o2, p = warpgroup_mma_wait(0, deps=(os[0], os[1], os[2], p))
        return (o0, o1, o2), p
    else:
        o0, o1, p = warpgroup_mma_wait(0, deps=(os[0], os[1], p))
        return (o0, o1), p


@gluon.jit
def _scale_rows(o, alpha):
    return o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o.type.layout)), 1)


@gluon.jit
def _rescale(os, alpha):
    if len(os) == 3:
        return (_scale_rows(os[0], alpha), _scale_rows(os[1], alpha), _scale_rows(os[2], alpha))
    else:
        return (_scale_rows(os[0], alpha), _scale_rows(os[1], alpha))


@gluon.jit
def _zero_accs(vbufs):
    """fp32 [BM, box] accumulators, one per V box."""
    W: gl.constexpr = gl.num_warps()
    A: gl.constexpr = vbufs[0].shape[2]
    B: gl.constexpr = vbufs[1].shape[2]
    o0 = gl.zeros([BM, A], gl.float32, _mma_layout(A, W))
    o1 = gl.zeros([BM, B], gl.float32, _mma_layout(B, W))
    if len(vbufs) == 3:
        C: gl.constexpr = vbufs[2].shape[2]
        return (o0, o1, gl.zeros([BM, C], gl.float32, _mma_layout(C, W)))
    else:
        return (o0, o1)


@gluon.jit
def _attend(qbufs, kbufs, vbufs, k_ready, v_ready, kv_empty, turn, n_kv, qk_c, WG: gl.constexpr, NC: gl.constexpr):
    """Consumer WG's full key loop for the query rows in qbufs; returns (accumulators, l) unnormalised."""
    W: gl.constexpr = gl.num_warps()
    STAGES: gl.constexpr = kbufs[0].shape[0]
    BN: gl.constexpr = kbufs[0].shape[1]
    s_layout: gl.constexpr = _mma_layout(BN, W)
    p_layout: gl.constexpr = _a_layout(vbufs[0].shape[2], W)
    TURN0: gl.constexpr = 1 if WG == 0 else 0  # consumer 0 goes first; the others wait for their turn
    NEXT: gl.constexpr = (WG + 1) % NC

    m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
    os = _zero_accs(vbufs)
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
        os = _issue_pv(p, vbufs, sp, os)
        mbarrier.arrive(turn.index(NEXT))
        s = warpgroup_mma_wait(len(os), deps=(s_tok,))  # the P V groups may still run
        p_new, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_c)  # overlaps P_{j-1} V_{j-1}
        os, p = _wait_pv(os, p)
        mbarrier.arrive(kv_empty.index(sp))  # this consumer is done with K/V stage sp
        os = _rescale(os, alpha)
        p = gl.convert_layout(p_new, p_layout)

    # epilogue: O += P_last V_last
    sl = (n_kv - 1) % STAGES
    mbarrier.wait(v_ready.index(sl), ((n_kv - 1) // STAGES) & 1)
    mbarrier.wait(turn.index(WG), (n_kv & 1) ^ TURN0)
    os = _issue_pv(p, vbufs, sl, os)
    mbarrier.arrive(turn.index(NEXT))
    os, p = _wait_pv(os, p)
    return os, l_i


@gluon.jit
def _views(bufs, slot):
    """bufs[i].index(slot) for each box's buffer: one stage of the K/V ring, or one consumer's Q tile."""
    if len(bufs) == 3:
        return (bufs[0].index(slot), bufs[1].index(slot), bufs[2].index(slot))
    else:
        return (bufs[0].index(slot), bufs[1].index(slot))


@gluon.jit
def _copy_boxes(descs, views, bar, row, col):
    """TMA of rows [row, row + box rows) of the head whose columns start at col, one box per descriptor
    (columns col, col + A[, col + A + B]) into views, all on barrier bar."""
    A: gl.constexpr = descs[0].block_type.shape[1]
    nb: gl.constexpr = descs[0].block_type.nbytes + descs[1].block_type.nbytes
    if len(descs) == 3:
        B: gl.constexpr = descs[1].block_type.shape[1]
        nb3: gl.constexpr = nb + descs[2].block_type.nbytes
        mbarrier.expect(bar, nb3)
        tma.async_copy_global_to_shared(descs[0], [row, col], bar, views[0])
        tma.async_copy_global_to_shared(descs[1], [row, col + A], bar, views[1])
        tma.async_copy_global_to_shared(descs[2], [row, col + A + B], bar, views[2])
    else:
        mbarrier.expect(bar, nb)
        tma.async_copy_global_to_shared(descs[0], [row, col], bar, views[0])
        tma.async_copy_global_to_shared(descs[1], [row, col + A], bar, views[1])


@gluon.jit
def _producer(kv_descs, kbufs, vbufs, k_ready, v_ready, kv_empty, kv_row, k_col, v_col, n_kv):
    """1 warp: every K/V tile of this (batch, head) through the STAGES-deep ring."""
    STAGES: gl.constexpr = kbufs[0].shape[0]
    BN: gl.constexpr = kbufs[0].shape[1]
    for j in range(n_kv):
        st = j % STAGES
        mbarrier.wait(kv_empty.index(st), ((j // STAGES) & 1) ^ 1)  # fresh barrier: parity 1 counts as completed
        _copy_boxes(kv_descs, _views(kbufs, st), k_ready.index(st), kv_row + j * BN, k_col)
        _copy_boxes(kv_descs, _views(vbufs, st), v_ready.index(st), kv_row + j * BN, v_col)


@gluon.jit
def _load_q(q_descs, q_smem, bar, row0, q_col, WG: gl.constexpr, HEAD_D: gl.constexpr):
    """Consumer WG's Q tile into SMEM; returns its wgmma A operands, one per K box (Q_a, Q_b[, Q_c]).
    q_descs = (the padded [64, 64] box, the [64, w] boxes of the head's column boxes)."""
    if len(q_smem) == 1:  # d=40: one padded [BM, 64] box, its columns >= HEAD_D zeroed
        A: gl.constexpr = q_descs[1][0].block_type.shape[1]
        B: gl.constexpr = q_descs[1][1].block_type.shape[1]
        q_view = q_smem[0].index(WG)
        mbarrier.expect(bar, q_descs[0].block_type.nbytes)
        tma.async_copy_global_to_shared(q_descs[0], [row0, q_col], bar, q_view)
        mbarrier.wait(bar, 0)
        _zero_q_pad(q_view, HEAD_D)
        return (q_view.slice(0, A, dim=1), q_view.slice(A, B, dim=1))
    else:  # d=80 / d=160: the head's columns exactly, one box each
        qbufs = _views(q_smem, WG)
        _copy_boxes(q_descs[1], qbufs, bar, row0, q_col)
        mbarrier.wait(bar, 0)
        return qbufs


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
def _consumer(args, WG: gl.constexpr, NC: gl.constexpr, HEAD_D: gl.constexpr):
    """Warpgroup WG: its Q tile, the key loop, the store of its 64 output rows."""
    (q_descs, o_ptr, q_smem, kbufs, vbufs, k_ready, v_ready, kv_empty, q_bar, turn, q_row, rows_left, q_col,
     o_stride, n_kv, qk_c) = args  # fmt: skip
    row0 = q_row + WG * BM
    qbufs = _load_q(q_descs, q_smem, q_bar.index(WG), row0, q_col, WG, HEAD_D)
    os, l = _attend(qbufs, kbufs, vbufs, k_ready, v_ready, kv_empty, turn, n_kv, qk_c, WG, NC)
    A: gl.constexpr = os[0].shape[1]
    B: gl.constexpr = os[1].shape[1]
    _store_part(os[0], l, o_ptr, row0, rows_left - WG * BM, q_col, o_stride, 0, HEAD_D)
    _store_part(os[1], l, o_ptr, row0, rows_left - WG * BM, q_col, o_stride, A, HEAD_D)
    if len(os) == 3:
        _store_part(os[2], l, o_ptr, row0, rows_left - WG * BM, q_col, o_stride, A + B, HEAD_D)


@gluon.jit
def attn_fwd_kernel(q_desc, qa_desc, qb_desc, qc_desc, ka_desc, kb_desc, kc_desc, o_ptr, n_ctx, H, qk_c,
                    HEAD_D: gl.constexpr, NBOX: gl.constexpr, NC: gl.constexpr, STAGES: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):  # fmt: skip
    """qkv [B*N, 3*H*HEAD_D] fp16 through TMA descriptors: k*_desc boxes [BN, w] (K and V, NBOX = 2 or 3 of
    them: ka, kb[, kc]); Q: q_desc box [64, 64] (padded: used where the boxes overrun the head, d=40) or
    q*_desc boxes [64, w] (one per K box); unused descriptors may be any. o_ptr: out [B*N, H*HEAD_D];
    n_ctx = N (a multiple of BN); qk_c = scale * log2(e); NC consumer warpgroups (1, 2 or 4). num_warps = 4."""
    BN: gl.constexpr = ka_desc.block_type.shape[0]
    A: gl.constexpr = ka_desc.block_type.shape[1]
    B: gl.constexpr = kb_desc.block_type.shape[1]
    C: gl.constexpr = kc_desc.block_type.shape[1] if NBOX == 3 else 0
    gl.static_assert(q_desc.block_type.shape[0] == BM, "Q box: 64 rows per consumer")
    gl.static_assert(A + B + C >= HEAD_D, "the K/V boxes must cover the head")
    gl.static_assert(NBOX == 2 or A + B + C == HEAD_D, "three boxes cover the head exactly")
    gl.static_assert(NC == 1 or NC == 2 or NC == 4, "1, 2 or 4 consumer warpgroups")
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    hd = H * HEAD_D  # row stride of out; column offset of k inside qkv
    q_row = b * n_ctx + pid_m * (NC * BM)
    rows_left = n_ctx - pid_m * (NC * BM)  # query rows of this batch from q_row on
    q_col = h * HEAD_D

    if A + B + C > HEAD_D:
        q_smem = (gl.allocate_shared_memory(gl.float16, [NC, BM, QP], q_desc.layout),)
    elif NBOX == 2:
        q_smem = (gl.allocate_shared_memory(gl.float16, [NC, BM, A], qa_desc.layout),
                  gl.allocate_shared_memory(gl.float16, [NC, BM, B], qb_desc.layout))  # fmt: skip
    else:
        q_smem = (gl.allocate_shared_memory(gl.float16, [NC, BM, A], qa_desc.layout),
                  gl.allocate_shared_memory(gl.float16, [NC, BM, B], qb_desc.layout),
                  gl.allocate_shared_memory(gl.float16, [NC, BM, C], qc_desc.layout))  # fmt: skip
    ka = gl.allocate_shared_memory(gl.float16, [STAGES, BN, A], ka_desc.layout)
    kb = gl.allocate_shared_memory(gl.float16, [STAGES, BN, B], kb_desc.layout)
    va = gl.allocate_shared_memory(gl.float16, [STAGES, BN, A], ka_desc.layout)
    vb = gl.allocate_shared_memory(gl.float16, [STAGES, BN, B], kb_desc.layout)
    if NBOX == 3:
        kc = gl.allocate_shared_memory(gl.float16, [STAGES, BN, C], kc_desc.layout)
        vc = gl.allocate_shared_memory(gl.float16, [STAGES, BN, C], kc_desc.layout)
        kbufs = (ka, kb, kc)
        vbufs = (va, vb, vc)
        kv_descs = (ka_desc, kb_desc, kc_desc)
        q_box_descs = (qa_desc, qb_desc, qc_desc)
    else:
        kbufs = (ka, kb)
        vbufs = (va, vb)
        kv_descs = (ka_desc, kb_desc)
        q_box_descs = (qa_desc, qb_desc)
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

    cargs = ((q_desc, q_box_descs), o_ptr, q_smem, kbufs, vbufs, k_ready, v_ready, kv_empty, q_bar,
             turn, q_row, rows_left, q_col, hd, n_ctx // BN, qk_c)  # fmt: skip
    pargs = (kv_descs, kbufs, vbufs, k_ready, v_ready, kv_empty, b * n_ctx, hd + q_col, 2 * hd + q_col, n_ctx // BN)
    # partition 0 (default, 4 warps) and the 4-warp workers are the consumers; the 1-warp worker loads
    if NC == 4:
        gl.warp_specialize(
            [(_consumer, (cargs, 0, NC, HEAD_D)), (_consumer, (cargs, 1, NC, HEAD_D)),
             (_consumer, (cargs, 2, NC, HEAD_D)), (_consumer, (cargs, 3, NC, HEAD_D)), (_producer, pargs)],
            [4, 4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
    elif NC == 2:
        gl.warp_specialize(
            [(_consumer, (cargs, 0, NC, HEAD_D)), (_consumer, (cargs, 1, NC, HEAD_D)), (_producer, pargs)],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
    else:
        gl.warp_specialize([(_consumer, (cargs, 0, NC, HEAD_D)), (_producer, pargs)], [1], [PRODUCER_REGS])
