"""Candidate: FF GEGLU GEMM through TMA descriptors, optionally persistent (flattened tile loop) and warp-specialized."""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _gelu_erf(g):
    return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))


@triton.jit
def _ff_geglu_tma_kernel(x_desc, w_desc, b_ptr, y_desc, M, Fdim, K, HAS_B: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                         NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(Fdim, BN)
    n_tiles = n_m * n_n
    k_tiles = tl.cdiv(K, BK)
    per_group = GROUP_M * n_n
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_PROGS, flatten=FLATTEN, warp_specialize=WS):
        first_m = (tile // per_group) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % size_m
        pid_n = (tile % per_group) // size_m
        om = pid_m * BM
        on = pid_n * BN
        acc_v = tl.zeros([BM, BN], tl.float32)
        acc_g = tl.zeros([BM, BN], tl.float32)
        for ki in tl.range(k_tiles, num_stages=STAGES):
            a = x_desc.load([om, ki * BK])
            bv = w_desc.load([on, ki * BK])
            bg = w_desc.load([Fdim + on, ki * BK])
            acc_v = tl.dot(a, bv.T, acc_v)
            acc_g = tl.dot(a, bg.T, acc_g)
        if HAS_B:
            rn = on + tl.arange(0, BN)
            acc_v += tl.load(b_ptr + rn, mask=rn < Fdim, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(b_ptr + Fdim + rn, mask=rn < Fdim, other=0.0).to(tl.float32)[None, :]
        y_desc.store([om, on], (acc_v * _gelu_erf(acc_g)).to(y_desc.dtype))


def ff_geglu_tma(x2, w, b, out2, BM=128, BN=128, BK=64, GROUP_M=8, persistent=True, flatten=True, ws=False,
                 stages=3, num_warps=8, num_sms=132):
    M, K = x2.shape
    F = w.shape[0] // 2
    xd = TensorDescriptor.from_tensor(x2, [BM, BK])
    wd = TensorDescriptor.from_tensor(w, [BN, BK])
    yd = TensorDescriptor.from_tensor(out2, [BM, BN])
    tiles = triton.cdiv(M, BM) * triton.cdiv(F, BN)
    progs = min(tiles, num_sms) if persistent else tiles
    _ff_geglu_tma_kernel[(progs,)](xd, wd, b if b is not None else w, yd, M, F, K, HAS_B=b is not None, BM=BM, BN=BN,
                                   BK=BK, GROUP_M=GROUP_M, NUM_PROGS=progs, FLATTEN=flatten and persistent, WS=ws,
                                   STAGES=stages, num_warps=num_warps)
    return out2
