"""Per-channel bias add (+ residual) kernel vs an fp64 reference: both 4-D layouts and token tensors.

Runs under the Triton interpreter on CPU: small shapes with SD's ratios and odd sizes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from precision import assert_low_precision_ok

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ba = importlib.import_module("speedsd.kernels.bias_add")
bias_add, bias_add_ref = ba.bias_add, ba.bias_add_ref

# (label, shape): 4-D shapes run in both layouts; the channel dim is 1 there and the last dim otherwise
SHAPES_4D = [
    ("sd-ratio 1x64x8x8", (1, 64, 8, 8)),
    ("sd-ratio unet 2x32x6x6", (2, 32, 6, 6)),
    ("odd C3 3x3x7x5", (3, 3, 7, 5)),
    ("odd C5 2x5x9x3", (2, 5, 9, 3)),
    ("odd C33 1x33x5x7", (1, 33, 5, 7)),
    ("1x1 pixels 3x40x1x1", (3, 40, 1, 1)),
]
SHAPES_TOKENS = [
    ("tokens 2x36x64", (2, 36, 64)),
    ("odd tokens 3x7x33", (3, 7, 33)),
    ("2-D 5x48", (5, 48)),
    ("1-D 37", (37,)),
]
CASES = [(label, shape, layout) for label, shape in SHAPES_4D for layout in ("nchw", "channels_last")] + [
    (label, shape, "tokens") for label, shape in SHAPES_TOKENS
]
CASE_IDS = [f"{label} {layout}" for label, _, layout in CASES]
LOW = [(torch.float16, "fp16"), (torch.bfloat16, "bf16")]


def _randn(shape, layout, dtype=torch.float32, mean=0.5, std=2.0):
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(DEVICE)


def _channels(shape, layout):
    return shape[1] if layout != "tokens" else shape[-1]


def _ref64(x, b, r):
    return bias_add_ref(x.double(), None if b is None else b.double(), None if r is None else r.double())


def _run(x, b, r):
    out = torch.full_like(x, float("nan"))  # poisoned, x's strides: every element must be written
    y = bias_add(x, b, r, out=out)
    assert y is out and y.stride() == x.stride()
    return y


@pytest.mark.parametrize("adds", ["bias", "residual", "bias+residual"])
@pytest.mark.parametrize("label,shape,layout", CASES, ids=CASE_IDS)
def test_matches_reference_fp32(label, shape, layout, adds):
    x = _randn(shape, layout)
    b = _randn((_channels(shape, layout),), "nchw", std=1.0) if "bias" in adds else None
    r = _randn(shape, layout, mean=-0.3) if "residual" in adds else None
    y = _run(x, b, r)
    torch.testing.assert_close(y.double(), _ref64(x, b, r), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias_dtype", ["x-dtype", "fp32"])
@pytest.mark.parametrize("residual", ["residual", "no-residual"])
@pytest.mark.parametrize("dtype,dname", LOW, ids=[d for _, d in LOW])
@pytest.mark.parametrize(
    "label,shape,layout",
    [CASES[0], CASES[3], CASES[4], CASES[-4], CASES[-3]],
    ids=[CASE_IDS[i] for i in (0, 3, 4, -4, -3)],
)
def test_low_precision_error_within_2x_torch(label, shape, layout, dtype, dname, residual, bias_dtype):
    x = _randn(shape, layout, dtype)
    b = _randn((_channels(shape, layout),), "nchw", dtype if bias_dtype == "x-dtype" else torch.float32, std=1.0)
    r = _randn(shape, layout, dtype, mean=-0.3) if residual == "residual" else None
    y = _run(x, b, r)
    assert y.dtype == dtype
    torch_y = bias_add_ref(x, b, r)
    assert torch_y.dtype == dtype
    assert_low_precision_ok(y, _ref64(x, b, r), torch_y)


def test_fp32_rounds_once_fp16():
    """x + b + r in fp32 rounded once: matches fp64 rounded to fp16 (torch's two roundings need not)."""
    x = _randn((2, 16, 9, 7), "channels_last", torch.float16)
    b = _randn((16,), "nchw", torch.float16)
    r = _randn((2, 16, 9, 7), "channels_last", torch.float16)
    y = bias_add(x, b, r)
    torch.testing.assert_close(y, _ref64(x, b, r).half(), atol=0, rtol=0)


@pytest.mark.parametrize("residual", ["residual", "no-residual"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_in_place(layout, residual):
    shape = (2, 24, 7, 9)
    x = _randn(shape, layout)
    b = _randn((24,), "nchw")
    r = _randn(shape, layout) if residual == "residual" else None
    ref = _ref64(x, b, r)
    ptr, stride = x.data_ptr(), x.stride()
    y = bias_add(x, b, r, out=x)
    assert y is x and x.data_ptr() == ptr and x.stride() == stride
    torch.testing.assert_close(x.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("res_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_default_out_and_residual_in_other_layout(layout, res_layout):
    x = _randn((2, 12, 5, 6), layout)
    x0 = x.clone()
    b = _randn((12,), "nchw")
    r = _randn((2, 12, 5, 6), res_layout)
    y = bias_add(x, b, r)
    assert y.data_ptr() != x.data_ptr() and y.stride() == x.stride()
    torch.testing.assert_close(x, x0, atol=0, rtol=0)  # x untouched
    torch.testing.assert_close(y.double(), _ref64(x, b, r), atol=1e-6, rtol=1e-6)


def test_strided_bias_and_non_dense_x():
    b = _randn((24,), "nchw")[::2]  # [12], stride 2
    x = _randn((2, 12, 6, 10), "nchw")[..., ::2]  # not dense: copied to NCHW first
    y = bias_add(x, b)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), _ref64(x, b, None), atol=1e-6, rtol=1e-6)


def test_nothing_to_add_copies():
    x = _randn((2, 8, 3, 3), "channels_last")
    y = _run(x, None, None)
    torch.testing.assert_close(y, x, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_int64_offsets_path(monkeypatch, layout):
    """The int64-offset variant (numel >= 2**31 on a GPU) forced on a small tensor."""
    monkeypatch.setattr(ba, "INT64_NUMEL", 1)
    x = _randn((2, 10, 5, 8), layout)
    b, r = _randn((10,), "nchw"), _randn((2, 10, 5, 8), layout)
    torch.testing.assert_close(_run(x, b, r).double(), _ref64(x, b, r), atol=1e-6, rtol=1e-6)


def test_empty():
    x = torch.empty((0, 8, 4, 4), device=DEVICE)
    y = bias_add(x, torch.ones(8, device=DEVICE))
    assert y.shape == x.shape


def test_bad_arguments_raise():
    x = _randn((2, 12, 4, 4), "channels_last")
    b = torch.zeros(12, device=DEVICE)
    cases = [
        (lambda: bias_add(x, torch.zeros(11, device=DEVICE)), "bias"),
        (lambda: bias_add(x, torch.zeros(1, 12, 1, 1, device=DEVICE)), "bias"),
        (lambda: bias_add(x, torch.zeros(12, device="meta")), "bias"),
        (lambda: bias_add(x, torch.zeros(12, dtype=torch.int32, device=DEVICE)), "bias"),
        (lambda: bias_add(x, b, torch.zeros(2, 12, 4, 5, device=DEVICE)), "residual"),
        (lambda: bias_add(x, b, torch.zeros(2, 12, 4, 4, device=DEVICE, dtype=torch.float16)), "residual"),
        (lambda: bias_add(x, b, torch.zeros(2, 12, 4, 4, device="meta")), "residual"),
        (lambda: bias_add(x, b, out=torch.empty(2, 12, 4, 4, device=DEVICE)), "strides"),  # NCHW out, CL x
        (lambda: bias_add(x, b, out=torch.empty_like(x, dtype=torch.float16)), "out"),
        (lambda: bias_add(x.int(), b), "fp32/fp16/bf16"),
        (lambda: bias_add(torch.zeros(1, 2, 3, 4, 5, device=DEVICE), torch.zeros(2, device=DEVICE)), "shape"),
        (lambda: bias_add(x[..., ::2], b, out=x[..., ::2]), "channels_last"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
