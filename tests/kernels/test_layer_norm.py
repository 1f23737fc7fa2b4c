"""LayerNorm and fused residual-add + LayerNorm kernels vs torch (Triton interpreter on CPU).

Outputs are allocated by the launchers; the ``poisoned`` fixture makes every float torch.empty NaN-filled,
so an element the kernel does not write shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

from precision import INTERPRET, assert_low_precision_ok
from speedsd.kernels import layer_norm as ln

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [
    pytest.param((2, 64, 320), id="sd-320 2x64x320"),
    pytest.param((2, 16, 1280), id="sd-1280 2x16x1280"),
    pytest.param((2, 77, 768), id="clip-768 2x77x768"),
    pytest.param((3, 5, 33), id="odd 3x5x33"),
    pytest.param((1, 1, 7), id="odd 1x1x7"),
    pytest.param((7, 100), id="odd 7x100"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
FP32_TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture
def poisoned(monkeypatch):
    """Every float tensor from torch.empty starts as NaN; yields the number of such allocations."""
    real = torch.empty
    count = [0]

    def nan_empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
            count[0] += 1
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    return count


def _randn(*shape, dtype=torch.float32, mean=2.0, std=3.0):
    return (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype).to(DEVICE)


def _affine(c, dtype, on=True):
    if not on:
        return None, None
    return _randn(c, dtype=dtype, mean=1.0, std=0.5), _randn(c, dtype=dtype, mean=0.2, std=0.5)


def _d(t):
    return None if t is None else t.double()


def _ln64(x, w, b, eps=1e-5):
    return ln.layer_norm_ref(x.double(), _d(w), _d(b), eps)


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype at |t| (fp32 values)."""
    fi = torch.finfo(t.dtype)
    _, e = torch.frexp(t.float())  # |t| in [2^(e-1), 2^e)
    return torch.ldexp(torch.full_like(t.float(), fi.eps / 2), e).clamp_min(fi.smallest_normal * fi.eps)


def _check_s(s, x, d, db):
    """s == (x + d + db in fp32) rounded once to x's dtype (1 ulp under the interpreter's bf16 truncation)."""
    want = x.float() + d.float()
    if db is not None:
        want = want + db.float()
    want = want.to(x.dtype)
    assert s.dtype == x.dtype and s.shape == x.shape and s.is_contiguous()
    if INTERPRET and x.dtype == torch.bfloat16:
        assert ((s.float() - want.float()).abs() <= _ulp(want)).all()
    else:
        assert torch.equal(s, want), int((s != want).sum())


# ---- layer_norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(poisoned, shape, dtype, affine):
    x = _randn(*shape, dtype=dtype)
    w, b = _affine(shape[-1], dtype, affine)
    y = ln.layer_norm(x, w, b, 1e-5)
    assert poisoned[0] >= 1
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    ref = _ln64(x, w, b)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, **FP32_TOL)
    else:
        assert_low_precision_ok(y, ref, ln.layer_norm_ref(x, w, b, 1e-5))


# ---- add_layer_norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("delta_bias", [True, False], ids=["dbias", "nodbias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_layer_norm(poisoned, shape, dtype, affine, delta_bias):
    x = _randn(*shape, dtype=dtype)
    d = _randn(*shape, dtype=dtype, mean=-0.5, std=1.5)
    w, b = _affine(shape[-1], dtype, affine)
    db = _randn(shape[-1], dtype=dtype, mean=0.3, std=0.5) if delta_bias else None
    s, y = ln.add_layer_norm(x, d, w, b, 1e-5, db)
    assert poisoned[0] >= 2
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    _check_s(s, x, d, db)
    # y is the LayerNorm of the stored s ...
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), _ln64(s, w, b), **FP32_TOL)
    else:
        assert_low_precision_ok(y, _ln64(s, w, b), ln.layer_norm_ref(s, w, b, 1e-5))
    # ... and no worse than the unfused torch baseline against the exact fp64 sum
    s64 = x.double() + d.double() + (0.0 if db is None else db.double())
    ref = _ln64(s64, w, b)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, **FP32_TOL)
    elif not (INTERPRET and dtype == torch.bfloat16):  # truncating casts: s itself is 1 ulp off there
        assert_low_precision_ok(y, ref, ln.add_layer_norm_ref(x, d, w, b, 1e-5, db)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_add_layer_norm_s_bias_goes_to_s_only(poisoned, shape, dtype):
    """s_bias: the stored s is x + d + db + sb (fp32, one rounding); y is still LayerNorm(x + d + db)."""
    x = _randn(*shape, dtype=dtype)
    d = _randn(*shape, dtype=dtype, mean=-0.5, std=1.5)
    w, b = _affine(shape[-1], dtype, True)
    db = _randn(shape[-1], dtype=dtype, mean=0.3, std=0.5)
    sb = _randn(shape[-1], dtype=dtype, mean=-0.7, std=0.5)
    s, y = ln.add_layer_norm(x, d, w, b, 1e-5, db, s_bias=sb)
    s0, y0 = ln.add_layer_norm(x, d, w, b, 1e-5, db)
    assert torch.equal(y, y0)  # the norm never sees s_bias
    want = (x.float() + d.float() + db.float() + sb.float()).to(dtype)  # the kernel's order, fp32
    if INTERPRET and dtype == torch.bfloat16:  # the interpreter's casts truncate: 1 ulp
        assert ((s.float() - want.float()).abs() <= _ulp(want)).all()
    else:
        assert torch.equal(s, want), int((s != want).sum())
    rs, ry = ln.add_layer_norm_ref(x, d, w, b, 1e-5, db, s_bias=sb)  # the reference: s_bias after the norm
    assert torch.equal(ry, ln.add_layer_norm_ref(x, d, w, b, 1e-5, db)[1])
    bound = x.abs().float() + d.abs().float() + db.abs().float() + sb.abs().float()
    assert ((rs.float() - s.float()).abs() <= 3 * _ulp(bound.to(dtype))).all()  # it rounds after every add


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_x_bias_is_a_bias_the_producer_left_out(poisoned, shape, dtype):
    """x_bias (proj_in's bias, its GEMM run without it): layer_norm reads round(x + xb), as if the producer
    had added it, and add_layer_norm's stored s includes it (one fp32 sum, one rounding)."""
    c = shape[-1]
    x = _randn(*shape, dtype=dtype)
    d = _randn(*shape, dtype=dtype, mean=-0.5, std=1.5)
    w, b = _affine(c, dtype, True)
    db = _randn(c, dtype=dtype, mean=0.3, std=0.5)
    xb = _randn(c, dtype=dtype, mean=4.0, std=2.0)
    y = ln.layer_norm(x, w, b, 1e-5, x_bias=xb)
    x_with = (x.float() + xb.float()).to(dtype)  # what the producer with its bias would have stored
    if INTERPRET and dtype == torch.bfloat16:  # truncating casts: x + xb is 1 ulp (of ~6: 1/32) off there
        torch.testing.assert_close(y.double(), _ln64(x_with, w, b), atol=0.06, rtol=0.02)
    else:
        assert torch.equal(y, ln.layer_norm(x_with, w, b, 1e-5))
    torch.testing.assert_close(
        ln.layer_norm_ref(x, w, b, 1e-5, x_bias=xb), ln.layer_norm_ref(x_with, w, b, 1e-5), atol=0, rtol=0
    )
    s, y2 = ln.add_layer_norm(x, d, w, b, 1e-5, db, x_bias=xb)
    want = (x.float() + d.float() + db.float() + xb.float()).to(dtype)
    if INTERPRET and dtype == torch.bfloat16:
        assert ((s.float() - want.float()).abs() <= _ulp(want)).all()
    else:
        assert torch.equal(s, want), int((s != want).sum())
    ref = _ln64(x.double() + d.double() + db.double() + xb.double(), w, b)
    if dtype == torch.float32:
        torch.testing.assert_close(y2.double(), ref, **FP32_TOL)
    elif not (INTERPRET and dtype == torch.bfloat16):
        assert_low_precision_ok(y2, ref, ln.add_layer_norm_ref(x, d, w, b, 1e-5, db, x_bias=xb)[1])


def test_add_layer_norm_mixed_parameter_dtypes():
    """fp16 activations with fp32 weight/bias/delta_bias (delta_bias is added in fp32 before rounding)."""
    x, d = _randn(3, 9, 40, dtype=torch.float16), _randn(3, 9, 40, dtype=torch.float16, mean=0.0)
    w, b = _affine(40, torch.float32)
    db = _randn(40, mean=0.1, std=0.3)
    s, y = ln.add_layer_norm(x, d, w, b, 1e-6, db)
    _check_s(s, x, d, db)
    assert_low_precision_ok(y, _ln64(s, w, b, 1e-6), ln.layer_norm_ref(s.float(), w, b, 1e-6).half())
    y1 = ln.layer_norm(x, w, b, 1e-6)
    assert_low_precision_ok(y1, _ln64(x, w, b, 1e-6), ln.layer_norm_ref(x.float(), w, b, 1e-6).half())


# ---- tiling, strides, numerics -------------------------------------------------------------------


@pytest.mark.parametrize("rows,warps", [(1, 1), (2, 4), (4, 2), (16, 8)], ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [pytest.param((7, 100), id="7x100"), pytest.param((3, 11, 48), id="3x11x48")])
def test_forced_tiles_partial_last_program(poisoned, shape, rows, warps):
    """Row blocks that do not divide R (the last program masks rows) and more rows than R."""
    x = _randn(*shape)
    d = _randn(*shape, mean=1.0)
    w, b = _affine(shape[-1], torch.float32)
    y = ln.layer_norm(x, w, b, rows=rows, warps=warps)
    torch.testing.assert_close(y.double(), _ln64(x, w, b), **FP32_TOL)
    s, y2 = ln.add_layer_norm(x, d, w, b, delta_bias=b, rows=rows, warps=warps)
    _check_s(s, x, d, b)
    torch.testing.assert_close(y2.double(), _ln64(s, w, b), **FP32_TOL)


def test_strided_rows_and_non_unit_column_stride(poisoned):
    big = _randn(12, 70)
    x = big[:, 3:67]  # [12, 64] rows with stride 70: used in place
    d = _randn(64, 12).t()  # column stride 12: copied to dense first
    w, b = _affine(64, torch.float32)
    y = ln.layer_norm(x, w, b)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), _ln64(x, w, b), **FP32_TOL)
    s, y2 = ln.add_layer_norm(x, d, w, b)
    _check_s(s, x, d, None)
    torch.testing.assert_close(y2.double(), _ln64(s, w, b), **FP32_TOL)


def test_large_mean_small_std_needs_stable_variance():
    """mean 300, std 0.1: E[x²]−E[x]² in fp32 loses the variance entirely; ours must not."""
    x = _randn(6, 100, mean=300.0, std=0.1)
    naive = (x * x).mean(-1) - x.mean(-1) ** 2
    true = x.double().var(-1, unbiased=False)
    assert ((naive.double() - true).abs() / true).max() > 0.05  # the naive formula really fails here
    torch.testing.assert_close(ln.layer_norm(x).double(), _ln64(x, None, None), atol=2e-3, rtol=2e-3)
    s, y = ln.add_layer_norm(x, torch.zeros_like(x))
    torch.testing.assert_close(y.double(), _ln64(x, None, None), atol=2e-3, rtol=2e-3)


def test_empty_rows_return_empty():
    x = _randn(0, 5, 32)
    assert ln.layer_norm(x).shape == (0, 5, 32)
    s, y = ln.add_layer_norm(x, x)
    assert s.shape == y.shape == (0, 5, 32)


def test_plan_heuristic():
    p = ln.plan_layer_norm(8192, 320, 2, 2, 132)  # UNet 64² tokens, fp16
    assert (p.rows, p.block_c) == (16, 512) and p.programs(8192) >= 264
    p = ln.plan_layer_norm(128, 1280, 2, 4, 132)  # few rows: one row a program
    assert (p.rows, p.block_c) == (1, 2048)
    p = ln.plan_layer_norm(10**6, 2560, 4, 2, 132)
    assert p.rows * p.block_c <= ln.MAX_TILE and 2 <= p.warps <= 16


@pytest.mark.skipif(not INTERPRET, reason="interpreter-only bounds checks")
@pytest.mark.parametrize("rows", [None, 16], ids=["auto", "rows16"])
def test_gpu_plans_in_bounds(monkeypatch, rows):
    """GPU heuristics (132 SMs) and a forced 16-row tile: every active lane inside an argument's storage."""
    from interp_bounds import bounds_checked

    monkeypatch.setattr(ln, "_sm_count", lambda device: 132)
    x = _randn(37, 90)[:, 5:85]  # strided rows, C = 80
    d = _randn(37, 80, dtype=torch.float32)
    w, b = _affine(80, torch.float32)
    with bounds_checked() as lanes:
        y = ln.layer_norm(x, w, b, rows=rows)
        s, y2 = ln.add_layer_norm(x, d, w, b, delta_bias=b, rows=rows)
    assert lanes[0] > 0
    torch.testing.assert_close(y.double(), _ln64(x, w, b), **FP32_TOL)
    _check_s(s, x, d, b)
    torch.testing.assert_close(y2.double(), _ln64(s, w, b), **FP32_TOL)


def test_bad_arguments_raise():
    x = _randn(4, 16)
    w = _randn(16)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        ln.layer_norm(x.double())
    with pytest.raises(ValueError, match="last dim"):
        ln.layer_norm(_randn(4, 0))
    with pytest.raises(ValueError, match="last dim"):
        ln.layer_norm(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match="C=20000"):
        ln.layer_norm(torch.zeros(1, 20000, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        ln.layer_norm(x, w[:8])
    with pytest.raises(ValueError, match="bias"):
        ln.layer_norm(x, w, w.long())
    with pytest.raises(ValueError, match="delta must match"):
        ln.add_layer_norm(x, x.half())
    with pytest.raises(ValueError, match="delta must match"):
        ln.add_layer_norm(x, x[:2])
    with pytest.raises(ValueError, match="delta_bias"):
        ln.add_layer_norm(x, x, delta_bias=w[:3])
    with pytest.raises(ValueError, match="s_bias"):
        ln.add_layer_norm(x, x, s_bias=w[:3])
    with pytest.raises(ValueError, match="power of two"):
        ln.layer_norm(x, rows=3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight"):
            ln.layer_norm(x, w.cpu())
