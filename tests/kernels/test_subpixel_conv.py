"""Sub-pixel form of nearest 2x upsampling + 3x3 conv vs torch's upsample-then-conv, and the phase
interleave kernel vs its strided-copy reference: both layouts, every float dtype, with and without bias.

Runs under the Triton interpreter on CPU: small shapes with SD's ratios and odd sizes.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

from interp_bounds import bounds_checked
from precision import INTERPRET
from speedsd.kernels.subpixel_weight import subpixel_weight_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

sc = importlib.import_module("speedsd.kernels.subpixel_conv")

pytestmark = pytest.mark.usefixtures("one_thread")

# (label, (N, Ci, Co, H, W)) of the low-resolution conv input; the output is [N, Co, 2H, 2W]
SHAPES = [
    ("tiny odd 1x3->3x5x7", (1, 3, 3, 5, 7)),
    ("square 2x8->8x4x4", (2, 8, 8, 4, 4)),
    ("odd C20 1x20->20x3x9", (1, 20, 20, 3, 9)),
    ("C > channel block 1x8->160x3x5", (1, 8, 160, 3, 5)),
    ("Ci != Co 1x12->5x6x1", (1, 12, 5, 6, 1)),
    ("sd-ratio 1x64->64x12x12", (1, 64, 64, 12, 12)),
    ("sd-ratio unet 2x32->32x8x8", (2, 32, 32, 8, 8)),
]
SHAPE_IDS = [s[0] for s in SHAPES]
LAYOUTS = ["channels_last", "nchw"]
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
DTYPES = [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")]
BF16_ULP = 2.0**-7  # bf16 spacing relative to the value: 8 significant bits


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 convs on a GPU must be IEEE fp32 (cuDNN allows TF32 by default), else 1e-5 is out of reach."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev


def _randn(shape, dtype=torch.float32, layout="nchw", mean=0.5, std=2.0):
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)
    return x.contiguous(memory_format=FORMATS[layout]).to(DEVICE)


def _problem(shape, dtype, layout, with_bias):
    n, ci, co, h, w = shape
    x = _randn((n, ci, h, w), dtype, layout)
    weight = _randn((co, ci, 3, 3), dtype, mean=0.02, std=1 / (3 * ci**0.5))  # output ~ O(1)
    bias = _randn((co,), dtype, mean=0.3, std=1.0) if with_bias else None
    return x, weight, bias


def _ref64(x, weight, bias):
    return sc.subpixel_upsample_conv_ref(x.double(), weight.double(), None if bias is None else bias.double())


def _rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def _bits(t):
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _phase_input(n, c, h, w, dtype, layout, poison=True):
    """P [N, 4C, H+1, W+1]; with ``poison`` the row and column each phase never reads are NaN:
    phase (a, b) reads rows a..a+H-1 and columns b..b+W-1, so row (1-a)·H and column (1-b)·W are unused."""
    p = _randn((n, 4 * c, h + 1, w + 1), dtype, layout)
    if poison:
        for a in (0, 1):
            for b in (0, 1):
                k = 2 * a + b
                p[:, k * c : (k + 1) * c, (1 - a) * h, :] = float("nan")
                p[:, k * c : (k + 1) * c, :, (1 - b) * w] = float("nan")
    return p


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype,dname", DTYPES, ids=[d for _, d in DTYPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,shape", SHAPES, ids=SHAPE_IDS)
def test_matches_upsample_then_conv(label, shape, layout, dtype, dname, with_bias):
    x, weight, bias = _problem(shape, dtype, layout, with_bias)
    y = sc.subpixel_upsample_conv(x, subpixel_weight_ref(weight), bias)
    ref = _ref64(x, weight, bias)
    theirs = sc.subpixel_upsample_conv_ref(x, weight, bias)  # torch in this dtype: the yardstick
    assert y.shape == ref.shape and y.dtype == dtype and not torch.isnan(y).any()
    assert y.is_contiguous(memory_format=FORMATS[layout])
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
        return
    checked = y
    if INTERPRET and dtype == torch.bfloat16:
        # the interpreter truncates fp32 -> bf16 (the GPU rounds): the kernel's bias add must be within
        # one bf16 ulp of the same math rounded to nearest, and that rounded result obeys the 2x rule
        checked = sc.phase_interleave_ref(F.conv2d(x, subpixel_weight_ref(weight), None, padding=1), bias)
        torch.testing.assert_close(y.double(), checked.double(), rtol=BF16_ULP, atol=1e-30)
    ours, torchs = _rel(checked, ref), _rel(theirs, ref)
    assert ours <= 2 * torchs + 1e-6, (ours, torchs)
    # element-wise: no outlier far beyond torch's worst element (the folded weights round once more)
    worst_ours, worst_torch = (checked.double() - ref).abs().max(), (theirs.double() - ref).abs().max()
    assert worst_ours <= 4 * worst_torch + 1e-4, (float(worst_ours), float(worst_torch))


@pytest.mark.parametrize("label,shape", [SHAPES[0], SHAPES[4], SHAPES[6]], ids=[SHAPES[i][0] for i in (0, 4, 6)])
def test_folding_is_exact_in_fp64(label, shape):
    """The math alone (no kernel): fp64 folded weights + 2x2 conv + strided interleave == upsample + 3x3 conv."""
    x, weight, bias = (t.double() for t in _problem(shape, torch.float32, "nchw", True))
    p = F.conv2d(x, subpixel_weight_ref(weight), None, padding=1)  # [N, Ci, H, W] -> [N, 4·Co, H+1, W+1]
    torch.testing.assert_close(sc.phase_interleave_ref(p, bias), _ref64(x, weight, bias), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype,dname", DTYPES, ids=[d for _, d in DTYPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,shape", SHAPES, ids=SHAPE_IDS)
def test_interleave_bit_exact_without_bias(label, shape, layout, dtype, dname):
    n, _, c, h, w = shape
    p = _phase_input(n, c, h, w, dtype, layout)
    y, ref = sc.phase_interleave(p, None), sc.phase_interleave_ref(p, None)
    assert y.shape == (n, c, 2 * h, 2 * w) and y.dtype == dtype and y.stride() == ref.stride()
    assert not torch.isnan(y).any()  # the poisoned row/column of each phase was not read
    assert torch.equal(_bits(y), _bits(ref))


@pytest.mark.parametrize("bias_dtype", ["p-dtype", "fp32"])
@pytest.mark.parametrize("dtype,dname", DTYPES, ids=[d for _, d in DTYPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,shape", [SHAPES[i] for i in (0, 2, 3, 6)], ids=[SHAPE_IDS[i] for i in (0, 2, 3, 6)])
def test_interleave_with_bias(label, shape, layout, dtype, dname, bias_dtype):
    n, _, c, h, w = shape
    p = _phase_input(n, c, h, w, dtype, layout)
    bias = _randn((c,), dtype if bias_dtype == "p-dtype" else torch.float32, mean=0.3, std=1.0)
    y, ref = sc.phase_interleave(p, bias), sc.phase_interleave_ref(p, bias)  # both: fp32 sum, one rounding
    assert y.stride() == ref.stride() and not torch.isnan(y).any()
    if INTERPRET and dtype == torch.bfloat16:  # interpreter truncates fp32 -> bf16: within one ulp
        torch.testing.assert_close(y.double(), ref.double(), rtol=BF16_ULP, atol=1e-30)
    else:
        assert torch.equal(_bits(y), _bits(ref))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_interleave_copies_non_finite_values(layout):
    p = _phase_input(1, 6, 3, 4, torch.float16, layout, poison=False)
    p[0, 0, 1, 2], p[0, 7, 0, 3], p[0, 13, 2, 1], p[0, 23, 3, 4] = float("inf"), float("-inf"), float("nan"), -0.0
    assert torch.equal(_bits(sc.phase_interleave(p, None)), _bits(sc.phase_interleave_ref(p, None)))


def test_interleave_non_dense_input_is_copied():
    p = _randn((2, 24, 5, 12))[..., ::2]  # [2, 24, 5, 6], stride 2 along W
    bias = _randn((6,))
    y = sc.phase_interleave(p, bias)
    assert y.is_contiguous() and torch.equal(y, sc.phase_interleave_ref(p, bias))


def test_interleave_empty():
    assert sc.phase_interleave(torch.empty((2, 8, 1, 4), device=DEVICE), None).shape == (2, 2, 0, 6)
    assert sc.phase_interleave(torch.empty((0, 8, 4, 4), device=DEVICE), None).shape == (0, 2, 6, 6)


def test_bad_arguments_raise():
    x, weight, bias = _problem((1, 4, 6, 3, 3), torch.float32, "channels_last", True)
    w4 = subpixel_weight_ref(weight)
    p = _phase_input(1, 6, 3, 3, torch.float32, "channels_last", poison=False)
    cases = [
        (lambda: sc.phase_interleave(p[0], None), r"4·C, H\+1, W\+1"),
        (lambda: sc.phase_interleave(p[:, :23], None), "4·C > 0 channels"),
        (lambda: sc.phase_interleave(p.double(), None), "fp32/fp16/bf16"),
        (lambda: sc.phase_interleave(p, bias[:5]), r"bias must be a float \[6\]"),
        (lambda: sc.phase_interleave(p, bias.int()), r"bias must be a float \[6\]"),
        (lambda: sc.phase_interleave(p, torch.zeros(6, device="meta")), "bias must be"),
        (lambda: sc.subpixel_upsample_conv(x[0], w4, bias), r"x \[N, Ci, H, W\]"),
        (lambda: sc.subpixel_upsample_conv(x, weight, bias), "subpixel_weight"),  # the 3x3 weight by mistake
        (lambda: sc.subpixel_upsample_conv(x, w4[:, :3], bias), r"\[4·Co, 4, 2, 2\]"),
        (lambda: sc.subpixel_upsample_conv(x, w4.half(), bias), "dtype and device"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


# ---- one phase at a time (the low-memory form above PHASE_SPLIT_BYTES) ---------------------------


def _one_phase(p, k, c, layout):
    return p[:, k * c : (k + 1) * c].contiguous(memory_format=FORMATS[layout])  # [N, C, H+1, W+1]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype,dname", DTYPES, ids=[d for _, d in DTYPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,shape", [SHAPES[i] for i in (0, 3, 6)], ids=[SHAPE_IDS[i] for i in (0, 3, 6)])
def test_interleave_one_phase_at_a_time_equals_all_phases(label, shape, layout, dtype, dname, with_bias):
    n, _, c, h, w = shape
    p = _phase_input(n, c, h, w, dtype, layout)
    bias = _randn((c,), dtype, mean=0.3, std=1.0) if with_bias else None
    want = sc.phase_interleave(p, bias)
    y = torch.full_like(want, float("nan"))  # poisoned: each call must write exactly its own phase
    y6 = y.unflatten(3, (w, 2)).unflatten(2, (h, 2))  # [N, C, H, 2, W, 2] view: [..., a, :, b] is phase 2a+b
    for k in range(4):
        pk = _one_phase(p, k, c, layout)
        with bounds_checked() if INTERPRET else contextlib.nullcontext():  # every active lane inside p_k, bias, y
            assert sc.phase_interleave(pk, bias, phase=k, out=y) is y
        a, b = divmod(k, 2)
        assert not torch.isnan(y6[:, :, :, a, :, b]).any()
        for later in range(k + 1, 4):  # not written yet
            assert torch.isnan(y6[:, :, :, later // 2, :, later % 2]).all()
    assert torch.equal(_bits(y), _bits(want))
    ref = None
    for k in range(4):  # the torch reference in the same form
        ref = sc.phase_interleave_ref(_one_phase(p, k, c, layout), bias, phase=k, out=ref)
    assert ref.stride() == want.stride()
    if not (INTERPRET and dtype == torch.bfloat16 and with_bias):  # interpreter truncates to bf16 (above)
        assert torch.equal(_bits(ref), _bits(want))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,shape", [SHAPES[i] for i in (2, 5)], ids=[SHAPE_IDS[i] for i in (2, 5)])
def test_upsample_conv_by_phase_is_bit_identical(label, shape, layout, with_bias):
    """Four phase convs (W4's row blocks) + one-phase interleaves == one conv + the four-phase interleave."""
    x, weight, bias = _problem(shape, torch.float32, layout, with_bias)
    w4 = subpixel_weight_ref(weight)
    one = sc.subpixel_upsample_conv(x, w4, bias, by_phase=False)
    split = sc.subpixel_upsample_conv(x, w4, bias, by_phase=True)
    assert split.stride() == one.stride()
    if DEVICE == "cuda":  # cuDNN may pick another algorithm for Co than for 4·Co output channels (the fp16
        # SD shapes are checked for bit equality by bench/kernels_subpixel and bench/memory_probe trace)
        torch.testing.assert_close(split, one, atol=1e-5, rtol=1e-5)
        return
    assert torch.equal(split, one)
    ref = sc.subpixel_upsample_conv(x, w4, bias, by_phase=True, interleave=sc.phase_interleave_ref)
    assert torch.equal(ref, sc.subpixel_upsample_conv(x, w4, bias, by_phase=False, interleave=sc.phase_interleave_ref))
    assert torch.equal(ref, one)


def test_phase_split_threshold(monkeypatch):
    """By default the split follows the size of P [N, 4·Co, H+1, W+1] against PHASE_SPLIT_BYTES."""
    x, weight, bias = _problem((1, 8, 6, 3, 4), torch.float32, "channels_last", True)
    w4 = subpixel_weight_ref(weight)
    p_bytes = 4 * 6 * 4 * 5 * 4
    calls = []

    def counting(p, bias, **kw):
        calls.append(kw.get("phase"))
        return sc.phase_interleave(p, bias, **kw)

    for limit, want in [(p_bytes, [None]), (p_bytes - 1, [0, 1, 2, 3])]:
        monkeypatch.setattr(sc, "PHASE_SPLIT_BYTES", limit)
        calls.clear()
        sc.subpixel_upsample_conv(x, w4, bias, interleave=counting)
        assert calls == want
    calls.clear()
    sc.subpixel_upsample_conv(x.contiguous(), w4, bias, interleave=counting)  # NCHW: one conv unless asked
    assert calls == [None]
    # SD's VAE decoder at 512²: the last upsampler (P 129 MiB) splits, the one before (65 MiB) does not
    monkeypatch.undo()

    def meta(c, hw):
        return torch.empty(1, c, hw, hw, dtype=torch.float16, device="meta", memory_format=torch.channels_last)

    assert sc.splits_by_phase(meta(256, 256), 256) and not sc.splits_by_phase(meta(256, 256).contiguous(), 256)
    assert not sc.splits_by_phase(meta(512, 128), 512)


def test_phase_bad_arguments_raise():
    p = _phase_input(1, 6, 3, 3, torch.float32, "channels_last", poison=False)
    y = sc.phase_interleave(p, None)
    cases = [
        (lambda: sc.phase_interleave(p[:, :6], None, phase=4), "phase must be 0..3"),
        (lambda: sc.phase_interleave(p[:, :6, 0], None, phase=1), r"phase 1's p \[N, C, H\+1, W\+1\]"),
        (lambda: sc.phase_interleave(p[:, :6], None, phase=0, out=y[:, :, :4]), r"out must be a dense \[1, 6, 6, 6\]"),
        (lambda: sc.phase_interleave(p[:, :6], None, phase=0, out=y.half()), "out must be"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    with pytest.raises(ValueError, match="out must be a dense"):
        sc.phase_interleave(p[:, :6], None, phase=0, out=torch.empty(1, 6, 6, 12)[..., ::2])
