"""Winograd F(m×m, 3×3) convolution in Triton, m in {2, 4, 6}, and its plain-torch reference.

For a stride-1, padding-1 3×3 conv, each m×m output tile comes from an n×n input tile (n = m + 2):

    Y = Aᵀ [ Σ_ci (G g Gᵀ)[ci, co] ⊙ (Bᵀ d B)[ci] ] A          (Lavin & Gray 2016)

Pipeline (channels-last activations, P = N·⌈H/m⌉·⌈W/m⌉ tiles, T = n² transformed positions):
  1. weight transform, once per layer:  U [T, Cin, Cout] = G g Gᵀ   (fp64 math, stored fp16/bf16)
  2. input transform kernel:            V [T, P, Cin]    = Bᵀ d B   (fp32 math, stored fp16/bf16)
  3. batched GEMM over T on tensor cores: M[t] = V[t] @ U[t]        (fp32 accumulation)
  4. output transform kernel:           y = Aᵀ M A + bias (+ residual), written NHWC.
Variant "fused" (m = 2, 4): steps 3 and 4 in one kernel; M stays in registers and never reaches memory.

Error-compensated variants ("triton3", "bmm3", "fused3"): rounding U and V to fp16 is what makes fp16
Winograd 10-25x less accurate than a direct conv. These store each as an unevaluated sum of two fp16
numbers, hi = fp16(x), lo = fp16(x − hi), and compute M = V_hi U_hi + V_lo U_hi + V_hi U_lo (the
lo·lo term is below fp32's reach) as ONE GEMM on a 3x longer reduction,
[V_hi | V_lo | V_hi] @ [U_hi; U_hi; U_lo], with M kept in fp32. U is scaled by a power of two 2^s
first (so U_lo stays a normal fp16 number; the small entries of G make U tiny), undone exactly in the
output transform. 3x the GEMM work: F(4,3) still does 4/3 ≈ 1.33x, F(6,3) 5.06/3 ≈ 1.7x fewer
multiplies than the direct conv.

The transform matrices are derived exactly (fractions) from interpolation points, see
:func:`transform_matrices`; the Triton kernels receive them as constexpr tuples, so the unrolled
transforms skip zero coefficients at compile time.
"""

from __future__ import annotations

import functools
import json
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from speedsd.kernels.winograd_kernels import (
    _bmm_kernel,
    _fused_gemm_output_kernel,
    _input_transform_kernel,
    _output_transform_kernel,
)

TILES = (2, 4, 6)
GEMMS = ("triton", "bmm", "fused")
SPLIT_GEMMS = ("triton3", "bmm3", "fused3")  # error-compensated: U, V as fp16 hi + lo, K = 3·Cin, fp32 M
ALL_GEMMS = GEMMS + SPLIT_GEMMS
# Interpolation points (∞ is implicit as the last point). F(2,3)/F(4,3): Lavin & Gray; F(6,3): the
# usual well-conditioned small set 0, ±1, ±2, ±1/2 (Bᵀ entries up to 21/4).
POINTS: dict[int, tuple[Fraction, ...]] = {
    2: tuple(map(Fraction, (0, 1, -1))),
    4: tuple(map(Fraction, (0, 1, -1, 2, -2))),
    6: tuple(map(Fraction, (0, 1, -1, 2, -2))) + (Fraction(1, 2), Fraction(-1, 2)),
}
TABLE_PATH = Path(__file__).resolve().parents[1] / "data" / "winograd_table.json"


# ---- transform matrices --------------------------------------------------------------------------


def _solve_exact(rows: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction]:
    """Exact solution of a consistent (over)determined system by Gauss-Jordan on fractions."""
    aug = [r[:] + [v] for r, v in zip(rows, rhs)]
    n, piv, cols = len(rows[0]), 0, []
    for col in range(n):
        pr = next((r for r in range(piv, len(aug)) if aug[r][col] != 0), None)
        if pr is None:
            continue
        aug[piv], aug[pr] = aug[pr], aug[piv]
        aug[piv] = [v / aug[piv][col] for v in aug[piv]]
        for r in range(len(aug)):
            if r != piv and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [a - f * b for a, b in zip(aug[r], aug[piv])]
        cols.append(col)
        piv += 1
    if len(cols) != n or any(any(v != 0 for v in r) for r in aug[piv:]):
        raise ValueError("points do not define a Winograd transform")
    sol = [Fraction(0)] * n
    for r, c in enumerate(cols):
        sol[c] = aug[r][n]
    return sol


@functools.cache
def transform_matrices(tile: int) -> tuple[tuple[tuple[Fraction, ...], ...], ...]:
    """Exact (Aᵀ [m, n], G [n, 3], Bᵀ [n, n]) for F(m, 3) from POINTS[m] plus the point at ∞.

    Aᵀ[i, j] = p_j^i (evaluation of the product polynomial), G[j, k] = p_j^k / Π_{l≠j}(p_j − p_l)
    (Lagrange weights); the ∞ point contributes the leading coefficients. Bᵀ then follows from the
    1-D identity Aᵀ[(G g) ⊙ (Bᵀ d)] = correlation(d, g) for all d, g: for each input index l,
    Σ_j Aᵀ[i, j] G[j, k] Bᵀ[j, l] = [l == i + k], a linear system solved exactly.
    """
    m, r = tile, 3
    n, pts = m + r - 1, POINTS[tile]
    at = [[p**i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, p in enumerate(pts):
        f = Fraction(1)
        for k, q in enumerate(pts):
            f *= p - q if k != j else 1
        g.append([p**k / f for k in range(r)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    system = [[at[i][j] * g[j][k] for j in range(n)] for i in range(m) for k in range(r)]
    cols = [_solve_exact(system, [Fraction(int(l == i + k)) for i in range(m) for k in range(r)]) for l in range(n)]
    bt = [[cols[l][j] for l in range(n)] for j in range(n)]
    return tuple(map(tuple, at)), tuple(map(tuple, g)), tuple(map(tuple, bt))


def transform_tensors(tile: int, dtype: torch.dtype = torch.float64, device=None) -> tuple[torch.Tensor, ...]:
    """(Aᵀ, G, Bᵀ) as tensors."""
    return tuple(
        torch.tensor([[float(v) for v in r] for r in mat], dtype=dtype, device=device)
        for mat in transform_matrices(tile)
    )


def _flat(tile: int, which: int) -> tuple[float, ...]:
    return tuple(float(v) for row in transform_matrices(tile)[which] for v in row)


# ---- plain-torch reference -----------------------------------------------------------------------


def _tiles(h: int, w: int, tile: int) -> tuple[int, int]:
    return -(-h // tile), -(-w // tile)


def winograd_conv3x3_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile: int = 4,
    *,
    compute_dtype: torch.dtype = torch.float64,
    storage_dtype: torch.dtype | None = None,
    split: str = "",
) -> torch.Tensor:
    """The same algorithm in plain torch (unfold + einsum), computed in ``compute_dtype``.

    ``storage_dtype`` rounds U and V to that dtype, as the kernels store them, so the kernels can be
    checked tightly. ``split`` ("u", "v", "uv") stores those as hi + lo pairs of ``storage_dtype``
    (U scaled by 2^s first, as prepare_winograd_weight_split does; with both, the lo·lo product is
    dropped as in the kernels). Returns ``x.dtype``; pass an fp64 ``x`` to keep the fp64 result.
    """
    at, g, bt = transform_tensors(tile, compute_dtype, x.device)
    n, m = tile + 2, tile
    nb, c, h, w = x.shape
    th, tw = _tiles(h, w, tile)
    xp = F.pad(x.to(compute_dtype), (1, tw * m + 1 - w, 1, th * m + 1 - h))  # [N, C, th·m+2, tw·m+2]
    d = F.unfold(xp, kernel_size=n, stride=m).view(nb, c, n, n, th * tw)  # [N, C, n, n, L]
    v = torch.einsum("ai,ncijl,bj->abnlc", bt, d, bt)  # [n, n, N, L, Cin]
    u = torch.einsum("ak,oikl,bl->abio", g, weight.to(compute_dtype), g)  # [n, n, Cin, Cout]
    if storage_dtype is None:
        mm = torch.einsum("abnlc,abco->abnlo", v, u)  # [n, n, N, L, Cout]
    else:
        scale = 2.0 ** split_exponent(u) if "u" in split else 1.0
        v_hi, v_lo = _split_round(v, storage_dtype, "v" in split)
        u_hi, u_lo = _split_round(u * scale, storage_dtype, "u" in split)
        mm = torch.einsum("abnlc,abco->abnlo", v_hi, u_hi)  # [n, n, N, L, Cout]
        if v_lo is not None:
            mm = mm + torch.einsum("abnlc,abco->abnlo", v_lo, u_hi)
        if u_lo is not None:
            mm = mm + torch.einsum("abnlc,abco->abnlo", v_hi, u_lo)
        mm = mm / scale
    y = torch.einsum("ua,abnlo,vb->nouvl", at, mm, at).reshape(nb, -1, th * tw)  # [N, Cout·m·m, L]
    y = F.fold(y, (th * m, tw * m), kernel_size=m, stride=m)[:, :, :h, :w]  # [N, Cout, H, W]
    if bias is not None:
        y = y + bias.to(compute_dtype).view(1, -1, 1, 1)
    return y.to(x.dtype)


def _split_round(t: torch.Tensor, dtype: torch.dtype, split: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    # (hi, lo) = (dtype(t), dtype(t − hi)) in t's dtype; lo None without split
    hi = t.to(dtype).to(t.dtype)
    return hi, (t - hi).to(dtype).to(t.dtype) if split else None


def split_exponent(u: torch.Tensor) -> int:
    """s with max|U|·2^s in [2^13, 2^14): U_lo = fp16(2^s U − U_hi) stays normal for entries ≥ 2^-16 max|U|."""
    amax = float(u.detach().abs().max()) if u.numel() else 0.0
    return 0 if amax == 0.0 or not math.isfinite(amax) else 13 - math.floor(math.log2(amax))


# ---- Triton kernels ------------------------------------------------------------------------------


# ---- launchers -----------------------------------------------------------------------------------


class SplitWeight(NamedTuple):
    """Prepared weight of the error-compensated variants: u = 2^s·[U_hi; U_hi; U_lo] [T, 3·Cin, Cout], scale 2^-s."""

    u: torch.Tensor
    scale: float


def _weight_transform(weight: torch.Tensor, tile: int) -> torch.Tensor:
    # U [(m+2)², Cin, Cout] = G g Gᵀ in fp64
    if tile not in TILES or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"need a [Cout, Cin, 3, 3] weight and tile in {TILES}, got {tuple(weight.shape)}, {tile}")
    g = transform_tensors(tile, torch.float64, weight.device)[1]
    cout, cin = weight.shape[:2]
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().double(), g)  # [n, n, Cin, Cout]
    return u.reshape((tile + 2) ** 2, cin, cout)  # [T, Cin, Cout]


def prepare_winograd_weight(weight: torch.Tensor, tile: int = 4, dtype: torch.dtype | None = None) -> torch.Tensor:
    """U [(m+2)², Cin, Cout] = G g Gᵀ for weight [Cout, Cin, 3, 3]; fp64 math, stored in ``dtype``."""
    return _weight_transform(weight, tile).to(dtype or weight.dtype).contiguous()


def prepare_winograd_weight_split(weight: torch.Tensor, tile: int = 4, dtype: torch.dtype | None = None) -> SplitWeight:
    """The compensated variants' weight: 2^s U split into hi + lo of ``dtype``, stacked [hi; hi; lo] along Cin."""
    u = _weight_transform(weight, tile)
    s = split_exponent(u)
    hi, lo = _split_round(u * 2.0**s, dtype or weight.dtype, True)
    return SplitWeight(torch.cat([hi, hi, lo], dim=1).to(dtype or weight.dtype).contiguous(), 2.0**-s)


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def _transform_blocks(c: int, nt: int) -> tuple[int, int]:
    # each element keeps n² fp32 partial sums live: 2 elements a thread (256 a program) up to n = 6, 1 at n = 8
    bc = _pow2(c, 1, 64)
    return max(1, (128 if nt == 8 else 256) // bc), bc


@functools.cache
def bmm_fp32_out_supported(device: str = "cuda") -> bool:
    """Whether torch.bmm takes out_dtype=float32 for fp16 inputs here (cuBLAS, fp32 M; torch >= 2.8)."""
    try:
        a = torch.ones(1, 16, 16, device=device, dtype=torch.float16)
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _bmm_fp32(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # [T, P, K] @ [T, K, N] -> fp32 [T, P, N]: fp16 operands on tensor cores where torch can; else in fp32
    if v.is_cuda and v.dtype != torch.float32 and bmm_fp32_out_supported(str(v.device)):
        return torch.bmm(v, u, out_dtype=torch.float32)
    return torch.bmm(v.float(), u.float())


def winograd_conv3x3_prepared(
    x: torch.Tensor,
    prepared: torch.Tensor | SplitWeight,
    bias: torch.Tensor | None = None,
    tile: int = 4,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    gemm: str = "triton",
    m_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """3×3 stride-1 pad-1 conv of x [N, Cin, H, W] (any strides) with U from prepare_winograd_weight.

    Returns [N, Cout, H, W] channels-last (or writes ``out``, any strides), plus bias and residual.
    ``gemm``: "triton" (batched Triton GEMM, M stored in ``m_dtype``, default fp32), "bmm" (cuBLAS,
    M in the activation dtype) or "fused" (GEMM + output transform in one kernel; tile 2 or 4); the
    error-compensated "triton3" / "bmm3" / "fused3" take a SplitWeight (prepare_winograd_weight_split)
    and keep M in fp32.
    """
    nt, t = tile + 2, (tile + 2) ** 2
    split = gemm in SPLIT_GEMMS
    base = gemm[:-1] if split else gemm
    if tile not in TILES or gemm not in ALL_GEMMS or (base == "fused" and tile == 6):
        raise ValueError(f"tile {tile} / gemm {gemm!r} not supported")
    if split != isinstance(prepared, SplitWeight):
        raise ValueError(f"gemm {gemm!r} needs {'a SplitWeight' if split else 'a U tensor'}")
    u, scale = (prepared.u, prepared.scale) if split else (prepared, 1.0)
    if split and m_dtype not in (None, torch.float32):
        raise ValueError("the compensated variants keep M in fp32")
    k = x.shape[1] * (3 if split else 1)
    if x.dim() != 4 or u.dim() != 3 or u.shape[0] != t or u.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} and U {tuple(u.shape)} do not match for tile {tile} / {gemm}")
    if x.dtype != u.dtype:
        raise ValueError(f"x is {x.dtype} but U is {u.dtype}")
    nb, cin, h, w = x.shape
    cout = u.shape[2]
    if x.is_cuda and not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)  # the strided path works, but uncoalesced
    if out is None:
        out = torch.empty((nb, cout, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if tuple(out.shape) != (nb, cout, h, w) or (residual is not None and tuple(residual.shape) != tuple(out.shape)):
        raise ValueError("out / residual must be [N, Cout, H, W]")
    th, tw = _tiles(h, w, tile)
    p = nb * th * tw
    u = u.contiguous()
    ieee = u.dtype == torch.float32
    k_interp = k if os.environ.get("TRITON_INTERPRET") == "1" else 0
    at, bt = _flat(tile, 0), _flat(tile, 2)
    dummy = out
    b_arg = bias if bias is not None else dummy
    r_arg = residual if residual is not None else dummy
    rs = residual.stride() if residual is not None else (0, 0, 0, 0)

    v = torch.empty((t, p, k), device=x.device, dtype=u.dtype)  # [T, P, Cin] or [T, P, 3·Cin] = [hi | lo | hi]
    bp, bc = _transform_blocks(cin, nt)
    _input_transform_kernel[(triton.cdiv(p, bp), triton.cdiv(cin, bc))](
        x, v, cin, h, w, th, tw, p, *x.stride(), BT=bt, MT=tile, NT=nt, BLOCK_P=bp, BLOCK_C=bc, SPLIT=split
    )
    if base == "fused":
        bm, bn, warps = (64, 64, 8) if tile == 2 else (32, 32, 4)
        bm, bn, bk = _pow2(p, 16, bm), _pow2(cout, 16, bn), _pow2(k, 16, 32)
        _fused_gemm_output_kernel[(triton.cdiv(p, bm), triton.cdiv(cout, bn))](
            v, u, out, b_arg, r_arg, p, k, cout, h, w, th, tw, scale, *out.stride(), *rs,
            AT=at, MT=tile, NT=nt, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, K_INTERP=k_interp, num_warps=warps,
        )  # fmt: skip
        return out
    if gemm == "bmm":
        m = torch.bmm(v, u)  # [T, P, Cin] @ [T, Cin, Cout] -> [T, P, Cout]
    elif gemm == "bmm3":
        m = _bmm_fp32(v, u)  # [T, P, 3·Cin] @ [T, 3·Cin, Cout] -> fp32 [T, P, Cout]
    else:
        m = torch.empty((t, p, cout), device=x.device, dtype=m_dtype or torch.float32)
        bm, bn, bk = _pow2(p, 16, 128), _pow2(cout, 16, 128), _pow2(k, 16, 64)
        warps = 8 if bm * bn >= 128 * 128 else 4
        grid = (triton.cdiv(p, bm) * triton.cdiv(cout, bn), t)
        _bmm_kernel[grid](
            v, u, m, p, k, cout,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, K_INTERP=k_interp, num_warps=warps, num_stages=3,
        )  # fmt: skip
    bp, bc = _transform_blocks(cout, nt)
    _output_transform_kernel[(triton.cdiv(p, bp), triton.cdiv(cout, bc))](
        m, out, b_arg, r_arg, cout, h, w, th, tw, p, scale, *out.stride(), *rs,
        AT=at, MT=tile, NT=nt, HAS_BIAS=bias is not None, HAS_RES=residual is not None, BLOCK_P=bp, BLOCK_C=bc,
    )  # fmt: skip
    return out


def winograd_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tile: int = 4, **kwargs
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) by Winograd F(tile×tile, 3×3); weight transformed per call."""
    prep = prepare_winograd_weight_split if kwargs.get("gemm") in SPLIT_GEMMS else prepare_winograd_weight
    return winograd_conv3x3_prepared(x, prep(weight, tile, x.dtype), bias, tile, **kwargs)


def extra_bytes(n: int, cin: int, h: int, w: int, cout: int, tile: int, gemm: str, itemsize: int = 2) -> int:
    """Bytes of transformed tensors a call holds beyond x and y: U, V and (unless fused) M."""
    th, tw = _tiles(h, w, tile)
    t, p = (tile + 2) ** 2, n * th * tw
    k = cin * (3 if gemm in SPLIT_GEMMS else 1)
    m_item = 0 if gemm.startswith("fused") else (itemsize if gemm == "bmm" else 4)
    return t * (k * cout + p * k) * itemsize + t * p * cout * m_item


# ---- the engine's per-layer entry ----------------------------------------------------------------


def shape_key(n: int, cin: int, h: int, w: int, cout: int, dtype: torch.dtype, card: str) -> str:
    """The choice table's key: "N,Cin,H,W,Cout,dtype,card"."""
    return f"{n},{cin},{h},{w},{cout},{str(dtype).removeprefix('torch.')},{card}"


def parse_choice(choice: object) -> tuple[int, str] | None:
    """Table value -> (tile, gemm), or None for cuDNN. Values: "cudnn", 4, "4", "4:bmm", "6:bmm3"."""
    if choice is None or choice == "cudnn":
        return None
    tile, _, gemm = str(choice).partition(":")
    return int(tile), gemm or "triton"


@functools.lru_cache(maxsize=8)
def _read_table(path: str, mtime_ns: int) -> dict[str, object]:
    data = json.loads(Path(path).read_text())
    return data.get("entries", {})


def load_table() -> dict[str, object]:
    """Entries of the table at TABLE_PATH; {} when there is none."""
    try:
        return _read_table(str(TABLE_PATH), os.stat(TABLE_PATH).st_mtime_ns)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@functools.lru_cache(maxsize=16)
def _card(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _prepared_for(conv: torch.nn.Conv2d, tile: int, dtype: torch.dtype, split: bool) -> torch.Tensor | SplitWeight:
    # cached on the module; an in-place update (under no_grad) bumps weight._version and re-transforms
    wt = conv.weight
    key = (wt._version, wt.data_ptr(), wt.device, dtype, tile, split)
    cache = getattr(conv, "_speedsd_winograd", None)
    if cache is None:
        cache = {}
        conv._speedsd_winograd = cache
    hit = cache.get((tile, dtype, split))
    if hit is None or hit[0] != key:
        prep = prepare_winograd_weight_split if split else prepare_winograd_weight
        hit = cache[(tile, dtype, split)] = (key, prep(wt, tile, dtype))
    return hit[1]


def drop_prepared(module: torch.nn.Module) -> None:
    """Free the transformed filters cached on ``module``'s conv layers (rebuilt on the next use)."""
    for m in module.modules():
        m.__dict__.pop("_speedsd_winograd", None)


def winograd_conv3x3_module(x: torch.Tensor, conv: torch.nn.Conv2d, bias: bool = True) -> torch.Tensor | None:
    """The engine's entry: conv's forward by Winograd if the per-layer table picks a tile, else None.

    ``bias=False`` leaves conv.bias out (the caller adds it elsewhere)."""
    if conv.groups != 1 or conv.dilation != (1, 1) or x.dim() != 4:
        return None
    n, cin, h, w = x.shape
    choice = parse_choice(load_table().get(shape_key(n, cin, h, w, conv.out_channels, x.dtype, _card(x.device))))
    if choice is None:
        return None
    tile, gemm = choice
    prepared = _prepared_for(conv, tile, x.dtype, gemm in SPLIT_GEMMS)
    return winograd_conv3x3_prepared(x, prepared, conv.bias if bias else None, tile, gemm=gemm)
