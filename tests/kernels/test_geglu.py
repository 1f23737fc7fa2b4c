"""GELU, GEGLU and the fused GEMM+GEGLU feed-forward kernels vs torch (interpreter on CPU)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from precision import assert_low_precision_ok

gg = importlib.import_module("speedsd.kernels.geglu")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
APPROXES = ["none", "tanh", "quick"]
# e^(−x) of large |x| is inf by design (σ → 0); numpy warns under the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _randn(*shape, dtype=torch.float32, mean=0.5, std=2.0):
    return (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype).to(DEVICE)


# ---- gelu ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", APPROXES)
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-6), (torch.float16, None), (torch.bfloat16, None)], ids=["fp32", "fp16", "bf16"]
)
def test_gelu(dtype, tol, approximate):
    x = _randn(3, 77, 13, dtype=dtype, std=3.0)  # odd sizes: 3003 elements, a partial last block
    out = torch.full_like(x, float("nan"))
    y = gg.gelu(x, approximate, out=out)
    assert y is out and torch.isfinite(y).all()
    ref = gg.gelu_ref(x.double(), approximate)
    if tol is not None:
        torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    else:
        assert_low_precision_ok(y, ref, gg.gelu_ref(x, approximate))


def test_gelu_non_contiguous_channels_last_and_extremes():
    x = _randn(8, 10)[:, ::3]
    torch.testing.assert_close(gg.gelu(x), F.gelu(x), atol=1e-6, rtol=1e-6)
    xc = _randn(2, 6, 3, 5).to(memory_format=torch.channels_last)
    yc = gg.gelu(xc)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yc, F.gelu(xc), atol=1e-6, rtol=1e-6)
    big = torch.tensor([-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4], device=DEVICE)
    for a in APPROXES:
        torch.testing.assert_close(gg.gelu(big, a), gg.gelu_ref(big, a), atol=1e-5, rtol=1e-6)


# ---- geglu on a materialized projection ----------------------------------------------------------


@pytest.mark.parametrize("approximate", APPROXES)
@pytest.mark.parametrize(
    "label,shape", [("odd 2x37x(2*24)", (2, 37, 48)), ("sd-ratio 64x(2*160)", (64, 320)), ("1-row", (1, 6))]
)
def test_geglu_fp32(label, shape, approximate):
    h = _randn(*shape)
    f = shape[-1] // 2
    out = torch.full((*shape[:-1], f), float("nan"), device=DEVICE)
    y = gg.geglu(h, approximate, out=out)
    assert y is out
    torch.testing.assert_close(y.double(), gg.geglu_ref(h.double(), approximate), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_geglu_low_precision_within_2x_torch(dtype):
    h = _randn(5, 19, 2 * 40, dtype=dtype)
    ref = gg.geglu_ref(h.double())
    y = gg.geglu(h)
    assert y.dtype == dtype
    assert_low_precision_ok(y, ref, gg.geglu_ref(h))


def test_geglu_strided_rows():
    big = _randn(9, 70)
    h = big[:, 3:67]  # rows with stride 70, unit column stride: used in place
    torch.testing.assert_close(gg.geglu(h).double(), gg.geglu_ref(h.double()), atol=1e-5, rtol=1e-5)


# ---- fused GEMM + GEGLU --------------------------------------------------------------------------

# (label, leading dims of x, K, F)
FF_SHAPES = [
    ("odd M=37 K=40 F=24", (37,), 40, 24),
    ("batched 2x19 K=48 F=40", (2, 19), 48, 40),
    ("exact tiles M=64 K=64 F=32", (64,), 64, 32),
    ("tiny M=1 K=16 F=8", (1,), 16, 8),
]


def _ff_inputs(lead, k, f, dtype, bias=True):
    x = _randn(*lead, k, dtype=dtype, std=1.0)
    w = _randn(2 * f, k, dtype=dtype, mean=0.02, std=k**-0.5)
    b = _randn(2 * f, dtype=dtype, mean=0.1, std=0.5) if bias else None
    return x, w, b


def _ff_ref64(x, w, b, approximate):
    return gg.feed_forward_geglu_ref(x.double(), w.double(), None if b is None else b.double(), approximate)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("label,lead,k,f", FF_SHAPES, ids=[s[0] for s in FF_SHAPES])
def test_feed_forward_geglu_fp32(label, lead, k, f, bias):
    x, w, b = _ff_inputs(lead, k, f, torch.float32, bias)
    out = torch.full((*lead, f), float("nan"), device=DEVICE)
    y = gg.feed_forward_geglu(x, w, b, out=out)
    assert y is out and y.shape == (*lead, f)
    torch.testing.assert_close(y.double(), _ff_ref64(x, w, b, "none"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("approximate", APPROXES)
@pytest.mark.parametrize("label,lead,k,f", FF_SHAPES[:2], ids=[s[0] for s in FF_SHAPES[:2]])
def test_feed_forward_geglu_fp16_within_2x_torch(label, lead, k, f, approximate):
    x, w, b = _ff_inputs(lead, k, f, torch.float16)
    ref = _ff_ref64(x, w, b, approximate)
    y = gg.feed_forward_geglu(x, w, b, approximate)
    assert y.dtype == torch.float16
    assert_low_precision_ok(y, ref, gg.feed_forward_geglu_ref(x, w, b, approximate))


@pytest.mark.parametrize(
    "config", ["heuristic", {"BM": 16, "BN": 16, "BK": 16}, {"BM": 64, "BN": 16, "BK": 32, "GROUP_M": 2}]
)
def test_feed_forward_geglu_block_configs(config):
    x, w, b = _ff_inputs((2, 23), 40, 40, torch.float32)
    y = gg.feed_forward_geglu(x, w, b, config=config)
    torch.testing.assert_close(y.double(), _ff_ref64(x, w, b, "none"), atol=1e-4, rtol=1e-4)


def test_feed_forward_geglu_non_contiguous_x():
    x, w, b = _ff_inputs((6, 5), 32, 24, torch.float32)
    xt = x.transpose(0, 1)  # [5, 6, K] view with non-dense leading dims
    y = gg.feed_forward_geglu(xt, w, b)
    torch.testing.assert_close(y.double(), _ff_ref64(xt, w, b, "none"), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "lead,k",
    [((2, 1024), 640), ((2, 4096), 320), ((2, 64), 1280)],
    ids=["m2048-tma-plan", "m8192-tma-plan", "m128-cublas-plan"],
)
def test_feed_forward_geglu_gpu_sd_shape(dtype, lead, k):  # the interpreter's tl.dot mishandles bf16: GPU only
    x, w, b = _ff_inputs(lead, k, 4 * k, dtype)
    ref = _ff_ref64(x, w, b, "none")
    y = gg.feed_forward_geglu(x, w, b)
    assert_low_precision_ok(y, ref, gg.feed_forward_geglu_ref(x, w, b))


def test_ff_plan_thresholds():
    assert [gg.ff_plan(m) for m in (128, 256, 512, 2048, 4095, 4096, 8192)] == [
        "cublas", "cublas", "cublas", "cublas", "cublas", "fused", "fused"
    ]  # fmt: skip


def test_bad_arguments_raise():
    x, w, b = _ff_inputs((4,), 16, 8, torch.float32)
    with pytest.raises(ValueError, match="approximate"):
        gg.gelu(x, "erf")
    with pytest.raises(ValueError, match="even"):
        gg.geglu(_randn(3, 5))
    with pytest.raises(ValueError, match="weight"):
        gg.feed_forward_geglu(x, w[:, :8], b)
    with pytest.raises(ValueError, match="weight"):
        gg.feed_forward_geglu(x, w.half(), b)
    with pytest.raises(ValueError, match="bias"):
        gg.feed_forward_geglu(x, w, b[:8])
    with pytest.raises(ValueError, match="out"):
        gg.feed_forward_geglu(x, w, b, out=torch.empty(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        gg.feed_forward_geglu(x, w, b, config={"BM": 24, "BN": 16, "BK": 16})
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        gg.gelu(x.double())


def test_ops_dispatch_uses_kernels():
    from speedsd import ops

    x, w, b = _ff_inputs((7,), 16, 8, torch.float32)
    with ops.using(ops.Flags(gelu=True)):
        y = ops.feed_forward_geglu_op(x, w, b)
        g = ops.gelu_op(x, "tanh")
    torch.testing.assert_close(y, gg.feed_forward_geglu_ref(x, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g, F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-6)
