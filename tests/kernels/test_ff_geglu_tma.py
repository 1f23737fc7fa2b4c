"""The TMA-fed GEGLU feed-forward GEMM (kernels/ff_geglu_tma.py) vs fp64 torch (interpreter on CPU), its
alignment checks and the plan that picks it (Hopper, M >= 2048)."""

from __future__ import annotations

import importlib

import pytest
import torch

from precision import assert_low_precision_ok

gg = importlib.import_module("speedsd.kernels.geglu")
tma = importlib.import_module("speedsd.kernels.ff_geglu_tma")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# (label, M, K, F): K and F multiples of 8 (16-byte fp16 rows); M, F not multiples of the tiles
SHAPES = [
    ("odd M=37 K=40 F=24", 37, 40, 24),
    ("UNet-structure M=64 K=32 F=64", 64, 32, 64),
    ("F past the tile M=19 K=48 F=40", 19, 48, 40),
    ("tiny M=1 K=16 F=8", 1, 16, 8),
]
# small tiles keep the interpreter fast and the shapes multi-tile; the measured Hopper tiles are GPU-tested
CONFIGS = [
    dict(BM=16, BN=16, BK=16, num_warps=4, num_stages=2),
    dict(BM=32, BN=16, BK=32, num_warps=4, num_stages=3, GROUP_M=2),
    dict(BM=16, BN=32, BK=16, num_warps=4, num_stages=2),
]


def _inputs(m, k, f, dtype, bias=True):
    x = (torch.randn(m, k, dtype=torch.float64) + 0.5).to(dtype).to(DEVICE)
    w = (torch.randn(2 * f, k, dtype=torch.float64) * k**-0.5 + 0.02).to(dtype).to(DEVICE)
    b = (torch.randn(2 * f, dtype=torch.float64) * 0.5 + 0.1).to(dtype).to(DEVICE) if bias else None
    return x, w, b


def _ref64(x, w, b, approximate="none"):
    return gg.feed_forward_geglu_ref(x.double(), w.double(), None if b is None else b.double(), approximate)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["16x16x16", "32x16x32-g2", "16x32x16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("label,m,k,f", SHAPES, ids=[s[0] for s in SHAPES])
def test_tma_kernel_fp16_within_2x_torch(label, m, k, f, bias, cfg):
    x, w, b = _inputs(m, k, f, torch.float16, bias)
    out = torch.full((m, f), float("nan"), dtype=torch.float16, device=DEVICE)
    y = tma.feed_forward_geglu_tma(x, w, b, out, approx=0, config=dict(cfg))
    assert y is out and not torch.isnan(y).any()
    assert_low_precision_ok(y, _ref64(x, w, b), gg.feed_forward_geglu_ref(x, w, b))


@pytest.mark.parametrize("approximate", ["tanh", "quick"])
def test_tma_kernel_gelu_variants(approximate):
    x, w, b = _inputs(37, 40, 24, torch.float16)
    out = torch.full((37, 24), float("nan"), dtype=torch.float16, device=DEVICE)
    y = tma.feed_forward_geglu_tma(x, w, b, out, approx=gg.APPROX[approximate], config=dict(CONFIGS[0]))
    assert_low_precision_ok(y, _ref64(x, w, b, approximate), gg.feed_forward_geglu_ref(x, w, b, approximate))


def test_feed_forward_geglu_config_tma_goes_through_the_launcher_checks():
    x, w, b = _inputs(21, 24, 16, torch.float16)
    lead_x = x.reshape(3, 7, 24)  # [3, 7, K] -> [21, K] inside
    y = gg.feed_forward_geglu(lead_x, w, b, config="tma")
    assert y.shape == (3, 7, 16)
    assert_low_precision_ok(y.reshape(21, 16), _ref64(x, w, b), gg.feed_forward_geglu_ref(x, w, b))
    with pytest.raises(ValueError, match="16-byte"):  # K = 12: 24-byte rows
        gg.feed_forward_geglu(*_inputs(5, 12, 8, torch.float16), config="tma")
    with pytest.raises(ValueError, match="fp16/bf16"):
        gg.feed_forward_geglu(*_inputs(5, 16, 8, torch.float32), config="tma")


def test_alignment_check():
    x, w, _ = _inputs(8, 16, 8, torch.float16)
    out = torch.empty(8, 8, dtype=torch.float16, device=DEVICE)
    assert tma.tma_supported(x, w, out)
    assert not tma.tma_supported(x[:, 1:9], w, out)  # base pointer 2 bytes off
    assert not tma.tma_supported(torch.empty(8, 12, dtype=torch.float16)[:, :8], w, out)  # 24-byte rows
    assert not tma.tma_supported(x.t(), w, out)  # column-major


def test_plan_takes_tma_for_large_m_only_where_available():
    ms = (128, 512, 2047, 2048, 4096, 8192)
    assert [gg.ff_plan(m, tma=True) for m in ms] == ["cublas", "tma", "tma", "tma", "tma", "tma"]
    assert [gg.ff_plan(m) for m in ms] == ["cublas", "cublas", "cublas", "cublas", "fused", "fused"]
    assert tma.tma_config(8192) == tma.tma_config(512) == dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=2)
    if DEVICE == "cpu":  # no Hopper here: the plan never offers the TMA path
        x, w, _ = _inputs(8, 16, 8, torch.float16)
        assert not gg._tma_ok(x, w, torch.empty(8, 8, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "m,k,f",
    [(8192, 320, 1280), (2048, 640, 2560), (512, 1280, 5120), (2100, 640, 2552)],
    ids=["64sq", "32sq", "16sq", "odd"],
)
def test_gpu_sd_shapes_measured_tiles(dtype, m, k, f):
    x, w, b = _inputs(m, k, f, dtype)
    out = torch.full((m, f), float("nan"), dtype=dtype, device=DEVICE)
    y = tma.feed_forward_geglu_tma(x, w, b, out, approx=0)
    assert_low_precision_ok(y, _ref64(x, w, b), gg.feed_forward_geglu_ref(x, w, b))
