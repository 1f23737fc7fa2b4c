"""Nearest 2x upsampling kernel vs F.interpolate: bit-exact, both layouts, every float dtype.

Runs under the Triton interpreter on CPU: small shapes with SD's ratios and odd sizes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

up = importlib.import_module("speedsd.kernels.upsample")
upsample_nearest2x, upsample_nearest2x_ref = up.upsample_nearest2x, up.upsample_nearest2x_ref

SHAPES = [
    ("sd-ratio 1x64x8x8", (1, 64, 8, 8)),
    ("sd-ratio 2x32x6x6", (2, 32, 6, 6)),
    ("odd C3 3x3x7x5", (3, 3, 7, 5)),
    ("odd C5 2x5x9x3", (2, 5, 9, 3)),
    ("odd C33 1x33x5x7", (1, 33, 5, 7)),
    ("C > channel block, W > tile 1x160x3x37", (1, 160, 3, 37)),
    ("one row 2x4x1x9", (2, 4, 1, 9)),
    ("wide rows > block 1x2x3x1100", (1, 2, 3, 1100)),
    ("one pixel 3x8x1x1", (3, 8, 1, 1)),
]
LAYOUTS = ["nchw", "channels_last"]
DTYPES = [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _randn(shape, layout, dtype=torch.float32):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    return x.contiguous(memory_format=FORMATS[layout]).to(DEVICE)


def _poisoned_out(x, layout):
    n, c, h, w = x.shape
    out = torch.full((n, c, 2 * h, 2 * w), float("nan"), dtype=x.dtype, device=x.device)
    if not x.is_contiguous():
        out = out.contiguous(memory_format=FORMATS[layout])
    return out  # x dense both ways (H = W = 1): NCHW, like torch's output


def _bits(t):
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype,dname", DTYPES, ids=[d for _, d in DTYPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_bit_exact(label, shape, layout, dtype, dname):
    x = _randn(shape, layout, dtype)
    out = _poisoned_out(x, layout)
    y = upsample_nearest2x(x, out=out)
    ref = upsample_nearest2x_ref(x)
    assert y is out and y.shape == ref.shape and y.dtype == dtype
    assert torch.equal(_bits(y), _bits(ref))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_default_out_keeps_memory_format(layout):
    x = _randn((2, 12, 5, 7), layout)
    y = upsample_nearest2x(x)
    ref = upsample_nearest2x_ref(x)
    assert y.is_contiguous(memory_format=FORMATS[layout]) and y.stride() == ref.stride()
    assert torch.equal(y, ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_values_copied_bit_exact(layout):
    x = _randn((1, 16, 4, 6), layout, torch.float16)
    x[0, 3, 1, 2], x[0, 5, 0, 0], x[0, 15, 3, 5] = float("inf"), float("-inf"), float("nan")
    x[0, 7, 2, 1] = -0.0
    y = upsample_nearest2x(x, out=_poisoned_out(x, layout))
    assert torch.equal(_bits(y), _bits(upsample_nearest2x_ref(x)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_pixel_input_follows_out_layout(layout):
    """x [3, 8, 1, 1] is dense in both layouts: the output's layout decides the kernel."""
    x = _randn((3, 8, 1, 1), "nchw")
    out = torch.full((3, 8, 2, 2), float("nan"), device=DEVICE).contiguous(memory_format=FORMATS[layout])
    assert upsample_nearest2x(x, out=out) is out
    assert torch.equal(out, upsample_nearest2x_ref(x))


def test_non_dense_input_is_copied():
    x = _randn((2, 6, 5, 14), "nchw")[..., ::2]  # [2, 6, 5, 7], stride 2 along W
    y = upsample_nearest2x(x)
    assert y.is_contiguous() and torch.equal(y, upsample_nearest2x_ref(x))


def test_empty():
    x = torch.empty((0, 8, 4, 4), device=DEVICE)
    assert upsample_nearest2x(x).shape == (0, 8, 8, 8)


def test_bad_arguments_raise():
    x = _randn((1, 8, 4, 4), "channels_last")
    cases = [
        (lambda: upsample_nearest2x(x[0]), "N, C, H, W"),
        (lambda: upsample_nearest2x(x.int()), "fp32/fp16/bf16"),
        (lambda: upsample_nearest2x(x, out=torch.empty(1, 8, 8, 8, device=DEVICE)), "memory format"),  # NCHW out
        (lambda: upsample_nearest2x(x, out=_poisoned_out(x, "channels_last")[..., :7]), "out"),
        (lambda: upsample_nearest2x(x, out=_poisoned_out(x.half(), "channels_last")), "out"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
