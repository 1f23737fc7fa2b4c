"""Triton kernels of the Winograd convolution (the launchers, reference and per-layer table are in
:mod:`speedsd.kernels.winograd`): input transform, batched GEMM (plain and error-compensated), output
transform, and the GEMM with the output transform fused into its epilogue.

Transform matrices arrive as constexpr tuples (see winograd.transform_matrices), so the unrolled
transforms skip zero coefficients at compile time; all transform math is fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lincomb(vals, coefs: tl.constexpr, row: tl.constexpr, count: tl.constexpr, zero):
    # Σ_j coefs[row·count + j] · vals[j], zero coefficients skipped at compile time
    acc = zero
    for j in tl.static_range(count):
        if coefs[row * count + j] != 0.0:
            acc = acc + vals[j] * coefs[row * count + j]
    return acc


@triton.jit
def _tile_coords(BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TH, TW, P, C):
    # 1-D block of BLOCK_P tiles × BLOCK_C channels (channel fastest); tile p = (n·TH + th)·TW + tw
    idx = tl.arange(0, BLOCK_P * BLOCK_C)
    p = tl.program_id(0) * BLOCK_P + idx // BLOCK_C
    c = tl.program_id(1) * BLOCK_C + idx % BLOCK_C
    return p, c, (p % TW), ((p // TW) % TH), (p // (TW * TH)), (p < P) & (c < C)


@triton.jit
def _input_transform_kernel(
    x_ptr, v_ptr, C, H, W, TH, TW, P,
    sxn, sxc, sxh, sxw,
    BT: tl.constexpr, MT: tl.constexpr, NT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    # V[a·n + b, p, c] = Σ_{i,j} Bᵀ[a, i] d_p[i, j, c] Bᵀ[b, j], d_p the n×n input tile of tile p
    # (zero outside the image = the conv's padding); row transform first, then column transform.
    # SPLIT: rows of 3C, V[t, p] = [hi | lo | hi] with hi = fp16(V), lo = fp16(V − hi).
    p, c, tw, th, nb, ok = _tile_coords(BLOCK_P, BLOCK_C, TH, TW, P, C)
    h0, w0 = th * MT - 1, tw * MT - 1
    base = x_ptr + nb * sxn + c * sxc
    zero = tl.zeros([BLOCK_P * BLOCK_C], tl.float32)
    rows = ()  # rows[i·n + b] = Σ_j d[i, j] Bᵀ[b, j]
    for i in tl.static_range(NT):
        hi = h0 + i
        hm = ok & (hi >= 0) & (hi < H)
        d = ()
        for j in tl.static_range(NT):
            wj = w0 + j
            msk = hm & (wj >= 0) & (wj < W)
            d = d + (tl.load(base + hi * sxh + wj * sxw, mask=msk, other=0.0).to(tl.float32),)
        for b in tl.static_range(NT):
            rows = rows + (_lincomb(d, BT, b, NT, zero),)
    ks = 3 * C if SPLIT else C
    out = v_ptr + p * ks + c
    for a in tl.static_range(NT):
        for b in tl.static_range(NT):
            col = ()
            for i in tl.static_range(NT):
                col = col + (rows[i * NT + b],)
            va = _lincomb(col, BT, a, NT, zero)
            hi = va.to(v_ptr.dtype.element_ty)
            dst = out + (a * NT + b) * P * ks
            tl.store(dst, hi, mask=ok)
            if SPLIT:
                tl.store(dst + C, (va - hi.to(tl.float32)).to(v_ptr.dtype.element_ty), mask=ok)
                tl.store(dst + 2 * C, hi, mask=ok)


@triton.jit
def _output_transform_kernel(
    m_ptr, y_ptr, b_ptr, r_ptr, C, H, W, TH, TW, P, scale,
    syn, syc, syh, syw, srn, src, srh, srw,
    AT: tl.constexpr, MT: tl.constexpr, NT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # y[p, u, v, c] = scale · Σ_{a,b} Aᵀ[u, a] M[a·n + b, p, c] Aᵀ[v, b] (+ bias, + residual), M [T, P, C],
    # written to out[n, c, th·m + u, tw·m + v] inside the image
    p, c, tw, th, nb, ok = _tile_coords(BLOCK_P, BLOCK_C, TH, TW, P, C)
    src_ptr = m_ptr + p * C + c
    zero = tl.zeros([BLOCK_P * BLOCK_C], tl.float32)
    rows = ()  # rows[a·m + v] = Σ_b M[a, b] Aᵀ[v, b]
    for a in tl.static_range(NT):
        mrow = ()
        for b in tl.static_range(NT):
            mrow = mrow + (tl.load(src_ptr + (a * NT + b) * P * C, mask=ok, other=0.0).to(tl.float32),)
        for v in tl.static_range(MT):
            rows = rows + (_lincomb(mrow, AT, v, NT, zero),)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
    for u in tl.static_range(MT):
        for v in tl.static_range(MT):
            col = ()
            for a in tl.static_range(NT):
                col = col + (rows[a * MT + v],)
            y = _lincomb(col, AT, u, NT, zero) * scale
            oh, ow = th * MT + u, tw * MT + v
            msk = ok & (oh < H) & (ow < W)
            if HAS_BIAS:
                y = y + bias
            if HAS_RES:
                y = y + tl.load(r_ptr + nb * srn + c * src + oh * srh + ow * srw, mask=msk, other=0.0).to(tl.float32)
            tl.store(y_ptr + nb * syn + c * syc + oh * syh + ow * syw, y.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _store_output(
    y, u, v, y_ptr, b_ptr, r_ptr, nb, oh0, ow0, co, pm, cm, H, W, scale,
    syn, syc, syh, syw, srn, src, srh, srw, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    # out[n, co, oh0 + u, ow0 + v] = scale · y (+ bias[co]) (+ residual[n, co, oh0 + u, ow0 + v]), masked to the image
    oh, ow = oh0 + u, ow0 + v
    msk = (pm & (oh < H) & (ow < W))[:, None] & cm[None, :]
    y = y * scale
    if HAS_BIAS:
        y = y + tl.load(b_ptr + co, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        roff = (nb * srn + oh * srh + ow * srw)[:, None] + (co * src)[None, :]
        y = y + tl.load(r_ptr + roff, mask=msk, other=0.0).to(tl.float32)
    yoff = (nb * syn + oh * syh + ow * syw)[:, None] + (co * syc)[None, :]
    tl.store(y_ptr + yoff, y.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _gemm_tile(a_ptr, b_ptr, t, P, K, N, offs_m, offs_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, IEEE: tl.constexpr, K_INTERP: tl.constexpr):  # fmt: skip
    # acc[BLOCK_M, BLOCK_N] = V[t, offs_m, :] @ U[t, :, offs_n], V [T, P, K], U [T, K, N], fp32 accumulation
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + t * P * K + offs_m[:, None] * K
    b_base = b_ptr + t * K * N + offs_n[None, :]
    mm, nm = offs_m < P, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # K_INTERP > 0 in the interpreter only: its range() cannot take a runtime scalar (numpy >= 2.4)
    for k0 in range(0, K_INTERP if K_INTERP > 0 else K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_base + kk[None, :], mask=mm[:, None] & (kk < K)[None, :], other=0.0)
        b = tl.load(b_base + kk[:, None] * N, mask=(kk < K)[:, None] & nm[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _bmm_kernel(a_ptr, b_ptr, c_ptr, P, K, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, IEEE: tl.constexpr, K_INTERP: tl.constexpr):  # fmt: skip
    # M[t] = V[t] @ U[t] for t = program_id(1): [P, K] @ [K, N] -> [P, N], stored in M's dtype
    pid, t = tl.program_id(0), tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemm_tile(a_ptr, b_ptr, t, P, K, N, offs_m, offs_n, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, K_INTERP)
    msk = (offs_m < P)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + t * P * N + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _fused_gemm_output_kernel(
    a_ptr, b_ptr, y_ptr, bias_ptr, r_ptr, P, K, N, H, W, TH, TW, scale,
    syn, syc, syh, syw, srn, src, srh, srw,
    AT: tl.constexpr, MT: tl.constexpr, NT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    K_INTERP: tl.constexpr,
):  # fmt: skip
    # For a block of tiles × output channels, all T GEMMs in turn; each result M[a·n + b] is folded at
    # once into R[v] = Σ_b M[a, b] Aᵀ[v, b], and after each row a into Y[u, v] += Aᵀ[u, a] R[v]:
    # y = scale · Aᵀ M A without M ever leaving registers; bias and residual added in the store.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    ys = ()
    for _q in tl.static_range(MT * MT):
        ys = ys + (zero,)
    for a in tl.static_range(NT):
        rs = ()
        for _v in tl.static_range(MT):
            rs = rs + (zero,)
        for b in tl.static_range(NT):
            acc = _gemm_tile(
                a_ptr, b_ptr, a * NT + b, P, K, N, offs_m, offs_n, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, K_INTERP
            )
            nrs = ()
            for v in tl.static_range(MT):
                if AT[v * NT + b] != 0.0:
                    nrs = nrs + (rs[v] + acc * AT[v * NT + b],)
                else:
                    nrs = nrs + (rs[v],)
            rs = nrs
        nys = ()
        for q in tl.static_range(MT * MT):
            if AT[(q // MT) * NT + a] != 0.0:
                nys = nys + (ys[q] + rs[q % MT] * AT[(q // MT) * NT + a],)
            else:
                nys = nys + (ys[q],)
        ys = nys
    pm, cm = offs_m < P, offs_n < N
    tw = offs_m % TW
    th = (offs_m // TW) % TH
    nb = offs_m // (TW * TH)
    for q in tl.static_range(MT * MT):
        _store_output(
            ys[q], q // MT, q % MT, y_ptr, bias_ptr, r_ptr, nb, th * MT, tw * MT, offs_n, pm, cm, H, W, scale,
            syn, syc, syh, syw, srn, src, srh, srw, HAS_BIAS, HAS_RES,
        )  # fmt: skip
