"""The sub-pixel conv's weight fold (kernels/subpixel_weight.py): the Triton kernel gives the reference's
bits for every float dtype (bf16 under the interpreter: within one ulp, its casts truncate), both memory
formats and strided views, and both equal the taps summed by hand.

Runs under the Triton interpreter on CPU: SD's channel ratios scaled down, and odd sizes.
"""

from __future__ import annotations

import pytest
import torch

from precision import INTERPRET
from speedsd.kernels.subpixel_weight import subpixel_weight, subpixel_weight_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("one_thread")

# (label, (Co, Ci)) of a 3x3 conv weight [Co, Ci, 3, 3]
SHAPES = [
    ("one 1x1", (1, 1)),
    ("odd 3x5", (3, 5)),
    ("sd-ratio 16x16", (16, 16)),
    ("Ci past one block 5x300", (5, 300)),
    ("Co > Ci 40x7", (40, 7)),
]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")]


def _weight(shape, dtype, layout):
    co, ci = shape
    w = torch.randn((co, ci, 3, 3), dtype=torch.float64) * 0.3 + 0.05
    return w.to(dtype).contiguous(memory_format=LAYOUTS[layout]).to(DEVICE)


def _bits(t):
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [d for d, _ in DTYPES], ids=[n for _, n in DTYPES])
@pytest.mark.parametrize("shape", [s for _, s in SHAPES], ids=[n for n, _ in SHAPES])
def test_kernel_matches_reference_bits(shape, dtype, layout):
    weight = _weight(shape, dtype, layout)
    got, want = subpixel_weight(weight), subpixel_weight_ref(weight)
    assert got.shape == want.shape == (4 * shape[0], shape[1], 2, 2) and got.dtype == dtype
    assert got.stride() == want.stride()  # the weight's memory format
    if INTERPRET and dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (tests/precision.py)
        torch.testing.assert_close(got.double(), want.double(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(_bits(got), _bits(want))


def test_strided_view_and_empty():
    base = _weight((6, 10), torch.float16, "nchw")
    view = base[::2, 1::3]  # [3, 3, 3, 3], neither format: strides of the parent
    assert torch.equal(_bits(subpixel_weight(view)), _bits(subpixel_weight_ref(view.contiguous())))
    assert subpixel_weight(base[:0]).shape == (0, 10, 2, 2)


@pytest.mark.parametrize("fold", [subpixel_weight, subpixel_weight_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_folds_equal_the_taps_summed_by_hand(fold, layout):
    weight = _weight((6, 5), torch.float16, layout)
    w4 = fold(weight)
    w, f = weight.double(), w4.double().view(4, 6, 5, 2, 2)  # [4·Co, Ci, 2, 2] -> [phase, Co, Ci, 2, 2]
    rows = {0: ([0], [1, 2]), 1: ([0, 1], [2])}  # R_a(u); the columns C_b(v) are the same sets
    for k in range(4):
        a, b = divmod(k, 2)
        for u in range(2):
            for v in range(2):
                want = sum(w[..., r, s] for r in rows[a][u] for s in rows[b][v])
                torch.testing.assert_close(f[k, :, :, u, v], want, atol=4e-3, rtol=4e-3)  # one fp16 rounding
    assert subpixel_weight_ref(weight.double()).dtype == torch.float64


def test_bad_arguments_raise():
    weight = _weight((6, 4), torch.float32, "nchw")
    cases = [
        (lambda: subpixel_weight(weight[0]), r"\[Co, Ci, 3, 3\]"),
        (lambda: subpixel_weight_ref(torch.zeros(6, 4, 5, 5)), r"\[Co, Ci, 3, 3\]"),
        (lambda: subpixel_weight(weight.int()), "float"),
        (lambda: subpixel_weight_ref(weight.int()), "float"),
        (lambda: subpixel_weight(weight.double()), "subpixel_weight_ref"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
