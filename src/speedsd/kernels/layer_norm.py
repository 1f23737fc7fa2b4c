"""LayerNorm over the last dim, and residual-add + LayerNorm fused, in Triton; plain-torch references.

* :func:`layer_norm`: y = LayerNorm(x) (+ affine), same math as ``F.layer_norm`` over the last dim.
* :func:`add_layer_norm`: s = x + delta (+ delta_bias), y = LayerNorm(s): the transformer block's
  residual add and the next norm in one pass. s is summed in fp32 and stored once in x's dtype; the
  statistics come from that rounded s, so y is the LayerNorm of exactly the s that is returned.
  ``s_bias`` adds a vector to the stored s only (not to LayerNorm's input): the bias of the GEMM that
  will accumulate into s (``s.addmm_``: cuBLAS adds its result onto s, beta = 1), so that GEMM's
  bias + residual pass disappears.

x is seen as [R, C] rows (R = numel / C). One program holds a [ROWS, BLOCK_C] register tile
(BLOCK_C = next power of two >= C, masked lanes): ROWS rows are read once, normalised with fp32
two-pass statistics (mean, then Σ(x − mean)²; never E[x²] − E[x]²) and written once. ROWS is picked
so that a program moves ~16 KB (several rows when C is small), then lowered until there are >= 2
programs per SM. Row starts are multiples of 16 bytes whenever C·itemsize is, so loads vectorise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from speedsd.kernels.device import sm_count as _sm_count

MAX_C = 16384  # widest row held in registers (one row of 16K fp32 over 16 warps: 32 values a thread)
MOVE_BYTES = 16384  # bytes of x read + y written that one program aims for
MAX_TILE = 8192  # padded elements of one [ROWS, BLOCK_C] tile (several fp32 copies live at once)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch's LayerNorm over the last dim (of x + x_bias [C] in x's dtype, when given)."""
    if x_bias is not None:
        x = x + x_bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_ref(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    delta_bias: torch.Tensor | None = None,
    s_bias: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused baseline in x's dtype: s = x (+ x_bias) + delta (+ delta_bias), then F.layer_norm(s);
    the returned s has s_bias added after the norm read it."""
    if x_bias is not None:
        x = x + x_bias.to(x.dtype)
    s = x + delta
    if delta_bias is not None:
        s = s + delta_bias.to(x.dtype)
    y = layer_norm_ref(s, weight, bias, eps)
    return (s if s_bias is None else s + s_bias.to(x.dtype)), y


# ---- kernels -------------------------------------------------------------------------------------


@triton.jit
def _normalize(s, mask, C, eps, w_ptr, b_ptr, c, mask_c, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    # s [ROWS, BLOCK_C] fp32, 0 on masked lanes. Per row: mean = Σ s / C; var = Σ (s − mean)² / C;
    # y = (s − mean)·rstd·w + b with rstd = 1 / √(var + eps)
    mean = tl.sum(s, axis=1) / C
    d = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + c, mask=mask_c, other=1.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _row_tile(R, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # this program's rows [p·ROWS, p·ROWS + ROWS) as int64 [ROWS, 1], the columns, their mask, the tile mask
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    return r.to(tl.int64)[:, None], c, mask_c, (r < R)[:, None] & mask_c[None, :]


# Program p owns rows [p·ROWS, p·ROWS + ROWS) of x [R, C] (row stride sx; y dense [R, C]):
#   y[r, :] = LayerNorm(x[r, :])·w + b, statistics in fp32 from the register tile.
#   HAS_XB: of round_dtype(x + xb) instead (a producer's bias it left out; x rounded as if it had added it)
@triton.jit
def _ln_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr,
    R, C, sx, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    xb_ptr=None, HAS_XB: tl.constexpr = False,
):  # fmt: skip
    rows, c, mask_c, mask = _row_tile(R, C, ROWS, BLOCK_C)
    x = tl.load(x_ptr + rows * sx + c[None, :], mask=mask, other=0.0)
    if HAS_XB:
        x = x.to(tl.float32) + tl.load(xb_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        x = tl.where(mask, x.to(y_ptr.dtype.element_ty), 0.0)
    x = x.to(tl.float32)
    y = _normalize(x, mask, C, eps, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)
    tl.store(y_ptr + rows * C + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# Program p owns rows [p·ROWS, p·ROWS + ROWS) of x, delta [R, C] (row strides sx, sd; s, y dense):
#   s = round_dtype(x + delta + db (+ xb))  (fp32 sum, one rounding; stored, or with HAS_SB s + sb is
#                                     stored instead, summed in fp32 and rounded once)
#   y = LayerNorm(s)·w + b           (statistics from the rounded s)
@triton.jit
def _add_ln_kernel(
    x_ptr, d_ptr, db_ptr, sb_ptr, s_ptr, y_ptr, w_ptr, b_ptr,
    R, C, sx, sd, eps,
    HAS_DB: tl.constexpr, HAS_SB: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, xb_ptr=None, HAS_XB: tl.constexpr = False,
):  # fmt: skip
    rows, c, mask_c, mask = _row_tile(R, C, ROWS, BLOCK_C)
    x = tl.load(x_ptr + rows * sx + c[None, :], mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + rows * sd + c[None, :], mask=mask, other=0.0).to(tl.float32)
    s = x + d
    if HAS_DB:
        s = s + tl.load(db_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_XB:
        s = s + tl.load(xb_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    s_low = s.to(s_ptr.dtype.element_ty)
    if HAS_SB:
        s_out = s + tl.load(sb_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        tl.store(s_ptr + rows * C + c[None, :], s_out.to(s_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(s_ptr + rows * C + c[None, :], s_low, mask=mask)
    s = tl.where(mask, s_low.to(tl.float32), 0.0)
    y = _normalize(s, mask, C, eps, w_ptr, b_ptr, c, mask_c, HAS_W, HAS_B)
    tl.store(y_ptr + rows * C + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- launcher ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerNormPlan:
    """How one [R, C] problem is tiled: ROWS rows of BLOCK_C lanes a program, ``warps`` warps."""

    rows: int
    block_c: int
    warps: int

    def programs(self, n_rows: int) -> int:
        return triton.cdiv(n_rows, self.rows)


@functools.lru_cache(maxsize=1024)
def plan_layer_norm(
    n_rows: int,
    c: int,
    itemsize: int,
    tensors: int = 2,
    sm_count: int = 132,
    rows: int | None = None,
    warps: int | None = None,
) -> LayerNormPlan:
    """Tile for R = ``n_rows`` rows of ``c`` values; ``tensors`` = row-sized tensors moved (2 or 4).

    ROWS: enough rows that a program moves ~MOVE_BYTES (padded tile <= MAX_TILE), halved while there
    are fewer than 2 programs per SM. Warps: ~16 fp32 values a thread, 2..16. ``rows``/``warps``
    override (powers of two; the bench sweeps them). E.g. fp16, 132 SMs, R = 8192: C = 320 -> 16 rows
    of 512 lanes, 16 warps, 512 programs; C = 1280, R = 512 -> 2 rows of 2048, 8 warps, 256 programs.
    """
    block_c = triton.next_power_of_2(c)
    if rows is None:
        rows = triton.next_power_of_2(triton.cdiv(MOVE_BYTES, tensors * c * itemsize))
        rows = max(1, min(rows, MAX_TILE // block_c))
        while rows > 1 and triton.cdiv(n_rows, rows) < 2 * sm_count:
            rows //= 2
    if warps is None:
        warps = max(2, min(16, triton.next_power_of_2(triton.cdiv(rows * block_c, 32 * 16))))
    for name, v in (("rows", rows), ("warps", warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 1")
    return LayerNormPlan(rows, block_c, warps)


def _rows_view(t: torch.Tensor, c: int) -> torch.Tensor:
    """[..., C] -> [R, C] with unit column stride (a view when possible, else a dense copy)."""
    t2 = t.reshape(-1, c)
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def _check_x(x: torch.Tensor, name: str) -> int:
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dim to normalise, got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise ValueError(f"{name} must be fp32/fp16/bf16, got {x.dtype}")
    c = x.shape[-1]
    if c > MAX_C:
        raise ValueError(f"{name} has C={c} > {MAX_C} channels, more than one register row holds")
    return c


def _check_vec(t: torch.Tensor | None, name: str, c: int, device: torch.device) -> None:
    if t is None:
        return
    if t.shape != (c,) or t.device != device or t.dtype not in FLOATS:
        raise ValueError(
            f"{name} must be a float [{c}] tensor on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def _plan(n_rows: int, c: int, x: torch.Tensor, tensors: int, rows: int | None, warps: int | None) -> LayerNormPlan:
    return plan_layer_norm(n_rows, c, x.element_size(), tensors, _sm_count(x.device), rows, warps)


def _x_bias_args(x_bias: torch.Tensor | None) -> dict[str, object]:
    """The kernels' x_bias arguments (none without one: the launch as before x_bias existed)."""
    return dict(xb_ptr=x_bias.contiguous(), HAS_XB=True) if x_bias is not None else {}


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    x_bias: torch.Tensor | None = None,
    rows: int | None = None,
    warps: int | None = None,
) -> torch.Tensor:
    """LayerNorm of x [..., C] over C (+ weight/bias [C], any float dtype) -> contiguous y like x.

    ``x_bias`` [C]: of x + x_bias, the sum rounded to x's dtype (a bias the producing GEMM left out).
    ``rows``/``warps``: force :func:`plan_layer_norm`'s tile (tests and the bench sweep use them).
    """
    c = _check_x(x, "x")
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        _check_vec(t, name, c, x.device)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    x2 = _rows_view(x, c)  # [..., C] -> [R, C]
    n_rows = x2.shape[0]
    plan = _plan(n_rows, c, x, 2, rows, warps)
    if n_rows == 0:
        return y
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    xb = _x_bias_args(x_bias)
    _ln_kernel[(plan.programs(n_rows),)](
        x2, y, w, b, n_rows, c, x2.stride(0), eps,
        HAS_W=weight is not None, HAS_B=bias is not None, ROWS=plan.rows, BLOCK_C=plan.block_c, **xb,
        num_warps=plan.warps,
    )  # fmt: skip
    return y


def add_layer_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    delta_bias: torch.Tensor | None = None,
    *,
    s_bias: torch.Tensor | None = None,
    x_bias: torch.Tensor | None = None,
    rows: int | None = None,
    warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = x + delta (+ delta_bias [C]) (+ x_bias [C], a bias x's producer left out) summed in
    fp32 and stored once in x's dtype;
    y = LayerNorm(s) over the last dim (+ weight/bias [C]), statistics from the stored s.
    ``s_bias`` [C]: the returned s is x + delta (+ delta_bias) + s_bias (fp32 sum, one rounding),
    while y stays the LayerNorm of the sum without it (see the module doc).

    x, delta [..., C]: same shape, dtype and device. s and y are new contiguous tensors like x.
    ``rows``/``warps``: force :func:`plan_layer_norm`'s tile.
    """
    c = _check_x(x, "x")
    if delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device:
        raise ValueError(
            f"delta must match x ({x.dtype} {tuple(x.shape)} on {x.device}), "
            f"got {delta.dtype} {tuple(delta.shape)} on {delta.device}"
        )
    vecs = (("weight", weight), ("bias", bias), ("delta_bias", delta_bias), ("s_bias", s_bias), ("x_bias", x_bias))
    for name, t in vecs:
        _check_vec(t, name, c, x.device)
    s = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    x2, d2 = _rows_view(x, c), _rows_view(delta, c)  # [..., C] -> [R, C]
    n_rows = x2.shape[0]
    plan = _plan(n_rows, c, x, 4, rows, warps)
    if n_rows == 0:
        return s, y
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    db = delta_bias.contiguous() if delta_bias is not None else x2
    sb = s_bias.contiguous() if s_bias is not None else x2
    xb = _x_bias_args(x_bias)
    _add_ln_kernel[(plan.programs(n_rows),)](
        x2, d2, db, sb, s, y, w, b, n_rows, c, x2.stride(0), d2.stride(0), eps,
        HAS_DB=delta_bias is not None, HAS_SB=s_bias is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        ROWS=plan.rows, BLOCK_C=plan.block_c, **xb, num_warps=plan.warps,
    )  # fmt: skip
    return s, y
