"""A projection GEMM, the residual add and the next LayerNorm in ONE launch (Hopper, TMA-fed): the
transformer block's attention out-projection followed by its add + LayerNorm.

    delta = h @ Wᵀ                       h [M, K] (the attention heads' output), W [N, K] (to_out's weight)
    s     = round(r (+ xb) + delta (+ db))   fp32 sum, one rounding to r's dtype, stored (+ sb: see below)
    y     = LayerNorm(s)·w + b            statistics (two-pass, fp32) from the rounded s

the same (s, y) as ``add_layer_norm(r, F.linear(h, W), w, b, eps, delta_bias=db, s_bias=sb, x_bias=xb)``
(kernels/layer_norm.py) except that delta is never rounded to fp16 on its own. One program owns BM whole rows:
the tile spans all N output channels, so the row statistics come from its own accumulators and neither
delta nor s makes a trip through memory before the norm. N = NA + NB with NA the largest power of two
<= N (at most 256, one TMA box) and NB = N − NA a power of two or 0: two accumulators [BM, NA] and
[BM, NB] (320 = 256 + 64, the UNet's 64² level). Unfused, that level runs cuBLAS (6.5-6.8 µs) and the
add + LayerNorm pass (7.0-7.9 µs) ten times a step (bench/results/kernel_list_h200_823bd91.txt).

h, W, r, s and y go through TMA descriptors: rows 16-byte aligned (K, N multiples of 8 for fp16), unit
column strides; boxes past M are zero-filled on load and clipped on store, so any M works without masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from speedsd.kernels.device import compile_ahead, is_sm90
from speedsd.kernels.layer_norm import add_layer_norm_ref

# (BM, BK, num_warps, num_stages) per N where a measurement found the fused kernel faster than cuBLAS + the
# add + LayerNorm pass on Hopper at M >= MIN_M; other N (and smaller M) keep the unfused pair (:func:`plan`)
CONFIGS: dict[int, tuple[int, int, int, int]] = {}
DEFAULT_CONFIG = (64, 64, 8, 3)
MIN_M = 4096
MAX_BOX = 256  # TMA box rows


def plan(m: int, n: int, device: torch.device) -> tuple[int, int, int, int] | None:
    """The measured tiles for the fused kernel at M rows of N channels on this device, or None (unfused)."""
    if m < MIN_M or n not in CONFIGS or not is_sm90(device):
        return None
    return CONFIGS[n]


def split_n(n: int) -> tuple[int, int] | None:
    """(NA, NB): NA the largest power of two <= n (<= 256), NB = n − NA a power of two or 0; None if there is
    no such split."""
    if n < 8:
        return None
    na = min(MAX_BOX, 1 << (n.bit_length() - 1))
    nb = n - na
    if nb > MAX_BOX or (nb and nb & (nb - 1)) or (nb and nb < 8):
        return None
    return na, nb


def linear_add_layer_norm_ref(
    r: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-5,
    delta_bias: torch.Tensor | None = None,
    s_bias: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in r's dtype: add_layer_norm_ref(r, F.linear(h, weight), ...) (the unfused engine's math)."""
    return add_layer_norm_ref(r, F.linear(h, weight), ln_weight, ln_bias, eps, delta_bias, s_bias, x_bias)


@triton.jit
def _vec(ptr, c0, P: tl.constexpr):
    # the vector's entries c0 .. c0 + P as fp32 [1, P]
    return tl.load(ptr + c0 + tl.arange(0, P)).to(tl.float32)[None, :]


@triton.jit
def _part_sum(acc, r_desc, om, c0, P: tl.constexpr, db_ptr, xb_ptr, HAS_DB: tl.constexpr, HAS_XB: tl.constexpr):
    # columns c0 .. c0 + P of s = round(r + xb + acc + db) (fp32 sum, one rounding), returned in r's dtype
    s = acc + r_desc.load([om, c0]).to(tl.float32)
    if HAS_DB:
        s += _vec(db_ptr, c0, P)
    if HAS_XB:
        s += _vec(xb_ptr, c0, P)
    return s.to(r_desc.dtype)


@triton.jit
def _part_store(s, s_desc, y_desc, om, c0, P: tl.constexpr, mean, rstd, sb_ptr, w_ptr, b_ptr,
                HAS_SB: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):  # fmt: skip
    # stores s (+ sb, fp32 sum, one rounding) and y = (s − mean)·rstd·w + b for columns c0 .. c0 + P
    s32 = s.to(tl.float32)
    if HAS_SB:
        s_desc.store([om, c0], (s32 + _vec(sb_ptr, c0, P)).to(s_desc.dtype))
    else:
        s_desc.store([om, c0], s)
    y = (s32 - mean[:, None]) * rstd[:, None]
    if HAS_W:
        y = y * _vec(w_ptr, c0, P)
    if HAS_B:
        y = y + _vec(b_ptr, c0, P)
    y_desc.store([om, c0], y.to(y_desc.dtype))


# Program p owns rows om = p·BM .. om + BM of every output (N = NA + NB columns, all of them):
#   acc_a [BM, NA] = h[om:, :] @ W[0:NA, :]ᵀ,  acc_b [BM, NB] = h[om:, :] @ W[NA:N, :]ᵀ   (K steps of BK, fp32)
#   s = round(r + xb + acc + db);  mean = Σ_c s / N;  var = Σ_c (s − mean)² / N;  rstd = 1 / √(var + eps)
#   store s (+ sb) and y = (s − mean)·rstd·w + b
# h's box [BM, BK] is loaded once a K step and feeds both wgmmas; r, s and y have one descriptor per part
# (boxes [BM, NA] and [BM, NB]).
@triton.jit
def _linear_add_ln_kernel(
    h_desc, wa_desc, wb_desc, r0_desc, r1_desc, s0_desc, s1_desc, y0_desc, y1_desc,
    db_ptr, sb_ptr, xb_ptr, w_ptr, b_ptr, K, eps,
    NA: tl.constexpr, NB: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
    HAS_DB: tl.constexpr, HAS_SB: tl.constexpr, HAS_XB: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):  # fmt: skip
    om = tl.program_id(0) * BM
    acc_a = tl.zeros([BM, NA], tl.float32)
    acc_b = tl.zeros([BM, NB if NB > 0 else 16], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        a = h_desc.load([om, k0])
        acc_a = tl.dot(a, wa_desc.load([0, k0]).T, acc_a)
        if NB > 0:
            acc_b = tl.dot(a, wb_desc.load([NA, k0]).T, acc_b)
    n = NA + NB
    s_a = _part_sum(acc_a, r0_desc, om, 0, NA, db_ptr, xb_ptr, HAS_DB, HAS_XB)
    total = tl.sum(s_a.to(tl.float32), axis=1)
    if NB > 0:
        s_b = _part_sum(acc_b, r1_desc, om, NA, NB, db_ptr, xb_ptr, HAS_DB, HAS_XB)
        total += tl.sum(s_b.to(tl.float32), axis=1)
    mean = total / n
    d_a = s_a.to(tl.float32) - mean[:, None]
    m2 = tl.sum(d_a * d_a, axis=1)
    if NB > 0:
        d_b = s_b.to(tl.float32) - mean[:, None]
        m2 += tl.sum(d_b * d_b, axis=1)
    rstd = 1.0 / tl.sqrt(m2 / n + eps)
    _part_store(s_a, s0_desc, y0_desc, om, 0, NA, mean, rstd, sb_ptr, w_ptr, b_ptr, HAS_SB, HAS_W, HAS_B)
    if NB > 0:
        _part_store(s_b, s1_desc, y1_desc, om, NA, NB, mean, rstd, sb_ptr, w_ptr, b_ptr, HAS_SB, HAS_W, HAS_B)


def _problem(r2: torch.Tensor, h2: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take these 2-D operands; None when it can."""
    m, n = r2.shape
    if h2.shape[0] != m or weight.shape != (n, h2.shape[1]):
        shapes = f"{tuple(r2.shape)}, {tuple(h2.shape)}, {tuple(weight.shape)}"
        return f"expects r [M, N], h [M, K], weight [N, K]; got {shapes}"
    if not (r2.dtype == h2.dtype == weight.dtype) or r2.dtype not in (torch.float16, torch.bfloat16):
        return f"needs one fp16/bf16 dtype for r, h and weight, got {r2.dtype}, {h2.dtype}, {weight.dtype}"
    if not (r2.device == h2.device == weight.device):
        return "r, h and weight must be on one device"
    if split_n(n) is None:
        return f"N={n} is not NA + NB with NA a power of two <= {MAX_BOX} and NB a power of two (>= 8) or 0"
    es = r2.element_size()
    for name, t in (("r", r2), ("h", h2), ("weight", weight)):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * es) % 16:
            return f"{name} needs unit column stride and 16-byte aligned rows (TMA)"
    return None


def supported(r: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear_add_layer_norm` takes these operands (shapes, dtypes, TMA alignment; not the device)."""
    if r.dim() < 2 or h.dim() != r.dim() or r.shape[:-1] != h.shape[:-1]:
        return False
    return _problem(r.reshape(-1, r.shape[-1]), h.reshape(-1, h.shape[-1]), weight) is None


def linear_add_layer_norm(
    r: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-5,
    delta_bias: torch.Tensor | None = None,
    *,
    s_bias: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) for r [..., N], h [..., K], weight [N, K] (see the module doc): new contiguous tensors like r,
    or ``out`` (two contiguous tensors of r's shape and dtype). Vectors [N], any float dtype. ``config``
    (BM, BK, num_warps, num_stages) forces the tiles."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if r.dim() < 2 or h.dim() != r.dim() or r.shape[:-1] != h.shape[:-1]:
        raise ValueError(
            f"r [..., N] and h [..., K] must share their leading dims, got {tuple(r.shape)}, {tuple(h.shape)}"
        )
    n = r.shape[-1]
    r2, h2 = r.reshape(-1, n), h.reshape(-1, h.shape[-1])  # [..., C] -> [M, C] (views where possible)
    why = _problem(r2, h2, weight)
    if why is not None:
        raise ValueError(f"linear_add_layer_norm: {why}")
    vecs = dict(db=delta_bias, sb=s_bias, xb=x_bias, w=ln_weight, b=ln_bias)
    for name, t in vecs.items():
        if t is not None and (t.shape != (n,) or t.device != r.device or not t.is_floating_point()):
            raise ValueError(f"{name} must be a float [{n}] tensor on {r.device}, got {t.dtype} {tuple(t.shape)}")
    if out is None:
        out = (
            torch.empty(r.shape, device=r.device, dtype=r.dtype),
            torch.empty(r.shape, device=r.device, dtype=r.dtype),
        )
    s, y = out
    if any(t.shape != r.shape or t.dtype != r.dtype or t.device != r.device or not t.is_contiguous() for t in out):
        raise ValueError(f"out must be two contiguous {r.dtype} tensors of shape {tuple(r.shape)} on {r.device}")
    m = r2.shape[0]
    if m == 0:
        return s, y
    na, nb = split_n(n)  # type: ignore[misc]
    bm, bk, warps, stages = config or CONFIGS.get(n, DEFAULT_CONFIG)
    s2, y2 = s.view(m, n), y.view(m, n)
    ptrs = {k: (t.contiguous() if t is not None else r2) for k, t in vecs.items()}
    _linear_add_ln_kernel[(triton.cdiv(m, bm),)](
        TensorDescriptor.from_tensor(h2, [bm, bk]),
        TensorDescriptor.from_tensor(weight, [na, bk]),
        TensorDescriptor.from_tensor(weight, [max(nb, 8), bk]),
        *(TensorDescriptor.from_tensor(t, [bm, width]) for t in (r2, s2, y2) for width in (na, max(nb, 8))),
        ptrs["db"], ptrs["sb"], ptrs["xb"], ptrs["w"], ptrs["b"], h2.shape[1], eps,
        NA=na, NB=nb, BM=bm, BK=bk, STAGES=stages,
        HAS_DB=delta_bias is not None, HAS_SB=s_bias is not None, HAS_XB=x_bias is not None,
        HAS_W=ln_weight is not None, HAS_B=ln_bias is not None, num_warps=warps,
    )  # fmt: skip
    return s, y


def compile_sm90(
    n: int = 320, config: tuple[int, int, int, int] | None = None, capability: int = 90
):  # -> CompiledKernel
    """Compile the kernel for N = ``n`` with its tiles (every bias and affine on) for ``capability`` without a
    GPU (the tests' ptxas check; in a process without TRITON_INTERPRET=1)."""
    from triton.compiler import ASTSource

    na, nb = split_n(n)  # type: ignore[misc]
    bm, bk, warps, stages = config or CONFIGS.get(n, DEFAULT_CONFIG)
    flags = dict(HAS_DB=True, HAS_SB=True, HAS_XB=True, HAS_W=True, HAS_B=True)
    const = dict(NA=na, NB=nb, BM=bm, BK=bk, STAGES=stages, **flags)
    nb_box = max(nb, 8)
    sig = {
        "h_desc": f"tensordesc<fp16[{bm}, {bk}]>",
        "wa_desc": f"tensordesc<fp16[{na}, {bk}]>",
        "wb_desc": f"tensordesc<fp16[{nb_box}, {bk}]>",
        **{f"{t}{i}_desc": f"tensordesc<fp16[{bm}, {w}]>" for t in "rsy" for i, w in enumerate((na, nb_box))},
        **{name: "*fp16" for name in ("db_ptr", "sb_ptr", "xb_ptr", "w_ptr", "b_ptr")},
        "K": "i32",
        "eps": "fp32",
        **{name: "constexpr" for name in const},
    }
    src = ASTSource(_linear_add_ln_kernel, sig, constexprs=const)
    return compile_ahead(src, capability, num_warps=warps)
