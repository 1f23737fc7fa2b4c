"""Classifier-free guidance plumbing kernels (cfg_input, cfg_combine) vs their torch references and fp64.

Runs under the Triton interpreter on CPU: latent shapes (C = 4) of tiny and odd sizes, every input
layout the loop can hand over (NCHW, channels_last, a non-dense view), outputs poisoned with NaN.
"""

from __future__ import annotations

import pytest
import torch

from precision import INTERPRET, assert_low_precision_ok
from speedsd.kernels.guidance import cfg_combine, cfg_combine_ref, cfg_input, cfg_input_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (label, [N, C, h, w]): N is the latents' batch (cfg_combine reads 2N)
SHAPES = [
    ("N1 8x8", (1, 4, 8, 8)),
    ("N2 odd 5x7", (2, 4, 5, 7)),
    ("N1 64x64 (512px)", (1, 4, 64, 64)),
    ("N2 odd C3 9x1", (2, 3, 9, 1)),
]
SHAPE_IDS = [s[0] for s in SHAPES]
LAYOUTS = ["nchw", "channels_last", "strided"]
DTYPES = [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")]
DTYPE_IDS = [d for _, d in DTYPES]


def _randn(shape, layout, dtype=torch.float32, mean=0.5, std=2.0):
    """randn·std + mean in ``layout``; "strided" is a non-dense view (every other column of a wider tensor)."""
    if layout == "strided":
        wide = _randn((*shape[:-1], 2 * shape[-1]), "nchw", dtype, mean, std)
        return wide[..., ::2]
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(DEVICE)


def _poisoned(shape, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)


def _assert_same(y, torch_y):
    """Bit-equal to the torch path (fp32 math, round-to-nearest casts); under the interpreter fp32 ->
    bf16 truncates instead (precision.py), so there bf16 may differ by one bf16 ulp."""
    assert not torch.isnan(y).any()
    if INTERPRET and y.dtype == torch.bfloat16:
        torch.testing.assert_close(y.double(), torch_y.double(), rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(y, torch_y, atol=0, rtol=0)


# ---- cfg_input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,dname", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("duplicate", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["to-channels_last", "to-nchw"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,shape", SHAPES, ids=SHAPE_IDS)
def test_cfg_input_matches_torch(label, shape, layout, channels_last, duplicate, dtype, dname):
    latents = _randn(shape, layout)
    scale = 0.7  # Euler's 1/sqrt(sigma² + 1) range: a real multiply
    n = shape[0]
    out_shape = (2 * n if duplicate else n, *shape[1:])
    out = _poisoned(out_shape, dtype, channels_last)
    y = cfg_input(latents, scale, dtype, channels_last, duplicate, out=out)
    assert y is out
    torch_y = cfg_input_ref(latents, scale, dtype, channels_last, duplicate)
    assert torch_y.shape == out_shape and torch_y.stride() == y.stride()
    _assert_same(y, torch_y)
    ref64 = (latents.double() * scale).repeat(2 if duplicate else 1, 1, 1, 1)  # [2N or N, C, h, w]
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref64, atol=1e-6, rtol=1e-6)
    else:
        assert_low_precision_ok(y, ref64, torch_y)
    if duplicate:
        torch.testing.assert_close(y[:n], y[n:], atol=0, rtol=0)  # uncond half first, both the same


@pytest.mark.parametrize("dtype,dname", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cfg_input_scale_one_is_the_plain_cast(layout, dtype, dname):
    latents = _randn((2, 4, 5, 7), layout)
    y = cfg_input(latents, 1.0, dtype, True, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    _assert_same(y, torch.cat([latents, latents]).to(dtype).contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("src_dtype,sname", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_cfg_input_low_precision_latents(src_dtype, sname):
    """fp16/bf16 latents are read and scaled in fp32 (one rounding to the output dtype)."""
    latents = _randn((2, 4, 5, 7), "channels_last", src_dtype)
    y = cfg_input(latents, 0.3, torch.float32, False, True)
    ref = (latents.float() * 0.3).repeat(2, 1, 1, 1)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)


def test_cfg_input_default_out_and_input_untouched():
    latents = _randn((2, 4, 6, 5), "channels_last")
    before = latents.clone()
    y = cfg_input(latents, 0.5, torch.float16, False, True)
    assert y.is_contiguous() and y.shape == (4, 4, 6, 5) and y.data_ptr() != latents.data_ptr()
    torch.testing.assert_close(latents, before, atol=0, rtol=0)
    _assert_same(y, cfg_input_ref(latents, 0.5, torch.float16, False, True))


# ---- cfg_combine -----------------------------------------------------------------------------------


def _model_output(shape, layout, dtype):
    """[2N, C, h, w]: uncond and cond halves with different means, as a UNet's pair of predictions."""
    n = shape[0]
    out = _randn((2 * n, *shape[1:]), "nchw", dtype, mean=0.0)
    out[n:] += 0.8  # cond half: non-zero mean difference from the uncond half
    out[:n] -= 0.3
    if layout == "channels_last":
        return out.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.cat([out, out + 1], dim=-1)  # [2N, C, h, 2w]
        return wide[..., : shape[-1]]  # non-dense view of the first w columns
    return out


@pytest.mark.parametrize("dtype,dname", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,shape", SHAPES, ids=SHAPE_IDS)
def test_cfg_combine_matches_torch(label, shape, layout, dtype, dname):
    out = _model_output(shape, layout, dtype)
    g = 7.5
    result = _poisoned(shape, torch.float32, False)
    y = cfg_combine(out, g, torch.float32, result=result)
    assert y is result and y.is_contiguous()
    torch_y = cfg_combine_ref(out, g, torch.float32)
    assert torch_y.is_contiguous() and torch_y.shape == shape
    torch.testing.assert_close(y, torch_y, atol=0, rtol=0)  # fp32: same three roundings as torch
    u, c = out.double().chunk(2)
    torch.testing.assert_close(y.double(), u + g * (c - u), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("out_dtype,oname", DTYPES[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cfg_combine_low_precision_output(layout, out_dtype, oname):
    """A low-precision result: fp32 math, one rounding at the end; error <= 2x torch's in that dtype."""
    out = _model_output((2, 4, 5, 7), layout, torch.float16)
    y = cfg_combine(out, 3.0, out_dtype, result=_poisoned((2, 4, 5, 7), out_dtype, False))
    _assert_same(y, cfg_combine_ref(out, 3.0, out_dtype))
    u, c = out.double().chunk(2)
    naive = out.to(out_dtype).chunk(2)  # torch in the output dtype throughout
    assert_low_precision_ok(y, u + 3.0 * (c - u), naive[0] + 3.0 * (naive[1] - naive[0]))


@pytest.mark.parametrize("g", [1.0, 0.0, -2.0])
def test_cfg_combine_edge_guidance(g):
    """g = 1: c up to rounding of u + (c − u); g = 0: exactly u."""
    out = _model_output((1, 4, 8, 8), "channels_last", torch.float16)
    y = cfg_combine(out, g, torch.float32)
    torch.testing.assert_close(y, cfg_combine_ref(out, g, torch.float32), atol=0, rtol=0)
    if g == 0.0:
        torch.testing.assert_close(y, out[:1].float(), atol=0, rtol=0)


# ---- arguments -------------------------------------------------------------------------------------


def test_empty():
    assert cfg_input(torch.empty(0, 4, 8, 8, device=DEVICE), 1.0, torch.float16, True, True).shape == (0, 4, 8, 8)
    assert cfg_combine(torch.empty(0, 4, 8, 8, device=DEVICE), 7.5, torch.float32).shape == (0, 4, 8, 8)


def test_bad_arguments_raise():
    lat = _randn((1, 4, 8, 8), "nchw")
    out = _randn((2, 4, 8, 8), "nchw", torch.float16)
    fp32_out = torch.empty_like(out, dtype=torch.float32)
    cases = [
        (lambda: cfg_input(lat[0], 1.0, torch.float16, False, True), r"\[N, C, h, w\]"),
        (lambda: cfg_input(lat.double(), 1.0, torch.float16, False, True), "float"),
        (lambda: cfg_input(lat.int(), 1.0, torch.float16, False, True), "float"),
        (lambda: cfg_input(lat, 1.0, torch.float64, False, True), "dtype"),
        (lambda: cfg_input(lat, 1.0, torch.float16, False, True, out=torch.empty_like(out[:1])), "out"),
        (lambda: cfg_input(lat, 1.0, torch.float16, True, True, out=torch.empty_like(out)), "out"),  # NCHW out
        (lambda: cfg_input(lat, 1.0, torch.float16, False, True, out=fp32_out), "out"),
        (lambda: cfg_input(lat, 1.0, torch.float16, False, True, out=torch.empty_like(out, device="meta")), "out"),
        (lambda: cfg_combine(out[0], 7.5, torch.float32), r"\[N, C, h, w\]"),
        (lambda: cfg_combine(out[:1], 7.5, torch.float32), "even batch"),
        (lambda: cfg_combine(out.int(), 7.5, torch.float32), "float"),
        (lambda: cfg_combine(out, 7.5, torch.float64), "out_dtype"),
        (lambda: cfg_combine(out, 7.5, torch.float32, result=torch.empty(1, 4, 8, 8, device=DEVICE).half()), "result"),
        (lambda: cfg_combine(out, 7.5, torch.float32, result=_poisoned((1, 4, 8, 8), torch.float32, True)), "result"),
        (lambda: cfg_combine(out, 7.5, torch.float32, result=torch.empty(1, 4, 8, 8, device="meta")), "result"),
        (lambda: cfg_combine(out, 7.5, torch.float32, result=torch.empty(2, 4, 8, 8, device=DEVICE)), "result"),
    ]  # fmt: skip
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
