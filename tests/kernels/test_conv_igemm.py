"""Implicit-GEMM conv (split-K and direct) vs an fp64 reference, on small SD-like and odd shapes.

Runs under the Triton interpreter on CPU; the SD shapes themselves are timed and checked on the GPU by
``python -m speedsd.bench.kernels_conv``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from precision import assert_low_precision_ok
from speedsd.kernels.device import arrival_counters

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ci = importlib.import_module("speedsd.kernels.conv_igemm")
IgemmConfig = ci.IgemmConfig

# (label, (B, C, H, W), N, kernel, stride, padding, config or None for the default)
SPLIT4 = IgemmConfig(block_m=32, block_n=32, block_k=16, split=4, warps=4, stages=2)
SHAPES = [
    ("unet-like 8x8 split-K", (2, 32, 8, 8), 48, 3, 1, 1, SPLIT4),
    ("unet-like 8x8 default", (2, 64, 8, 8), 64, 3, 1, 1, None),
    ("vae-out-like N=3", (1, 16, 5, 7), 3, 3, 1, 1, None),
    ("stride-2 downsample odd", (2, 32, 9, 7), 32, 3, 2, 1, SPLIT4),
    ("odd N and M, split 3", (3, 48, 5, 3), 40, 3, 1, 1, IgemmConfig(32, 16, 16, 3, 4, 2)),
    ("1x1 pad 0", (1, 16, 4, 6), 20, 1, 1, 0, None),
    ("1x1 image, 3x3 pad 1", (2, 32, 1, 1), 16, 3, 1, 1, SPLIT4),
    # TMA operands: tiles of whole pixel rows (2 images / 4 rows / 1 image), padding = TMA's zero fill
    ("tma 8x8 two images a tile, split 3", (2, 32, 8, 8), 48, 3, 1, 1, IgemmConfig(128, 16, 16, 3, 4, 2, tma=True)),
    ("tma odd N, four rows a tile", (1, 32, 8, 8), 40, 3, 1, 1, IgemmConfig(32, 16, 16, 1, 4, 2, tma=True)),
    ("tma 4x16, two-kernel sum", (2, 64, 4, 16), 32, 3, 1, 1, IgemmConfig(64, 32, 32, 2, 4, 2, False, tma=True)),
]
IDS = [s[0] for s in SHAPES]
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter's tl.dot mishandles bf16")
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, None, None, id="fp16"),
    pytest.param(torch.bfloat16, None, None, id="bf16", marks=GPU_ONLY),
]


def _inputs(shape, n, k, dtype, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(n, shape[1], k, k, generator=g, dtype=torch.float64) / (shape[1] * k * k) ** 0.5 + 0.01
    b = torch.randn(n, generator=g, dtype=torch.float64) + 0.3
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cast = [t.to(dtype).to(DEVICE) for t in (x, w, b)]
    return cast[0].contiguous(memory_format=fmt), cast[1].contiguous(memory_format=fmt), cast[2]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("label,shape,n,k,stride,pad,cfg", SHAPES, ids=IDS)
def test_conv_matches_fp64(label, shape, n, k, stride, pad, cfg, dtype, atol, rtol):
    x, w, b = _inputs(shape, n, k, dtype)
    y = ci.conv2d_igemm(x, w, b, stride, pad, config=cfg)
    ref = ci.conv2d_igemm_ref(x.double().cpu(), w.double().cpu(), b.double().cpu(), stride, pad)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(y).all()  # the output is fresh: every element must have been written
    if dtype == torch.float32:
        torch.testing.assert_close(y.double().cpu(), ref, atol=atol, rtol=rtol)
    else:
        torch_y = ci.conv2d_igemm_ref(x.float(), w.float(), b.float(), stride, pad).to(dtype)  # torch's rounding
        assert_low_precision_ok(y.cpu(), ref, torch_y.cpu())


def test_nchw_input_and_weight_and_no_bias():
    """Any strides are read correctly (channels_last is only the fast layout); bias=None adds nothing."""
    x, w, _ = _inputs((2, 32, 6, 5), 24, 3, torch.float32, channels_last=False)
    y = ci.conv2d_igemm(x, w, None, 1, 1, config=SPLIT4)
    ref = ci.conv2d_igemm_ref(x.double().cpu(), w.double().cpu(), None, 1, 1)
    torch.testing.assert_close(y.double().cpu(), ref, atol=1e-5, rtol=1e-5)


def test_split_equals_direct():
    """Every split (including ones that do not divide the K-blocks evenly: rounded to a divisor) sums
    the same products as one program."""
    x, w, b = _inputs((2, 32, 5, 5), 32, 3, torch.float32, seed=3)
    one = ci.conv2d_igemm(x, w, b, config=IgemmConfig(32, 32, 16, 1, 4, 2))
    for split in (2, 5, 18):
        got = ci.conv2d_igemm(x, w, b, config=IgemmConfig(32, 32, 16, split, 4, 2))
        torch.testing.assert_close(got, one, atol=1e-5, rtol=1e-5)


def test_second_kernel_sum_equals_last_split_sum():
    """Both ways of summing the split partials give the same output, call after call (the last-split
    mode re-arms its counters: they are zero after every call)."""
    x, w, b = _inputs((2, 32, 5, 5), 32, 3, torch.float32, seed=4)
    cfg = IgemmConfig(32, 32, 16, 6, 4, 2)
    want = ci.conv2d_igemm(x, w, b, config=IgemmConfig(32, 32, 16, 6, 4, 2, last_sums=False))
    for _ in range(2):
        torch.testing.assert_close(ci.conv2d_igemm(x, w, b, config=cfg), want, atol=0, rtol=0)
        assert int(arrival_counters(x.device, 1).abs().sum()) == 0


def test_sum_partials_adds_bias_and_residual_once():
    """y = round(Σ_s parts[s] + bias + residual) over a channels_last y, summed in split order in fp32; a
    residual laid out otherwise (or y itself) is refused."""
    g = torch.Generator().manual_seed(5)
    n, co, h, w = 2, 48, 3, 5
    cl = torch.channels_last
    parts = (torch.randn(3, n * h * w, co, generator=g) * 4 + 0.5).to(DEVICE)
    bias = (torch.randn(co, generator=g) + 0.3).half().to(DEVICE)
    r = (torch.randn(n, co, h, w, generator=g) - 0.4).half().to(DEVICE).contiguous(memory_format=cl)
    y = torch.full((n, co, h, w), float("nan")).half().to(DEVICE).contiguous(memory_format=cl)
    ci.sum_partials(parts, bias, y, r)
    want = parts[0] + parts[1] + parts[2] + bias.float() + r.permute(0, 2, 3, 1).reshape(-1, co).float()
    assert torch.equal(y.permute(0, 2, 3, 1).reshape(-1, co), want.half())
    for bad in (r.contiguous(), r.float(), y):
        with pytest.raises(ValueError, match="residual"):
            ci.sum_partials(parts, bias, y, bad)


def test_config_key_round_trips():
    for cfg in (
        IgemmConfig(128, 16, 64, 5, 8, 4),
        IgemmConfig(32, 64, 32, 3, 4, 2, last_sums=False),
        IgemmConfig(128, 64, 128, 6, 8, 4, tma=True),
        IgemmConfig(64, 64, 64, 2, 4, 3, last_sums=False, tma=True),
    ):
        assert IgemmConfig.parse(cfg.key()) == cfg
    with pytest.raises(ValueError, match="config key"):
        IgemmConfig.parse("m64n64")


def test_default_config_fills_the_card():
    cfg = ci.default_config(m=128, n=1280, c=1280, taps=9, device=torch.device("cpu"))
    tiles = (128 // cfg.block_m) * (1280 // cfg.block_n)
    assert cfg.split > 1 and tiles * cfg.split <= 132 and 1280 % cfg.block_k == 0
    assert ci.default_config(m=262144, n=3, c=128, taps=9, device=torch.device("cpu")).split == 1


@pytest.mark.parametrize(
    "args,match",
    [
        (((2, 30, 8, 8), 16, 3), "multiple of 16"),
        (((2, 32, 2, 2), 16, 5), "no output"),
    ],
    ids=["channels not /16", "filter larger than input"],
)
def test_bad_inputs_raise(args, match):
    shape, n, k = args
    x, w, b = _inputs(shape, n, k, torch.float32)
    pad = 0 if k == 5 else 1
    with pytest.raises(ValueError, match=match):
        ci.conv2d_igemm(x, w, b, 1, pad)


def test_mismatched_dtype_and_bias_raise():
    x, w, b = _inputs((1, 16, 4, 4), 8, 3, torch.float32)
    with pytest.raises(ValueError, match="one float dtype"):
        ci.conv2d_igemm(x, w.half(), b)
    with pytest.raises(ValueError, match="bias"):
        ci.conv2d_igemm(x, w, b[:4])
    with pytest.raises(ValueError, match="block_k"):
        ci.conv2d_igemm(x, w, b, config=IgemmConfig(32, 32, 32, 1, 4, 2))


TMA = IgemmConfig(32, 16, 16, 2, 4, 2, tma=True)


@pytest.mark.parametrize(
    "shape,stride,channels_last,cfg,match",
    [
        ((2, 32, 8, 8), 2, True, TMA, "stride 1"),
        ((2, 32, 8, 8), 1, False, TMA, "channels_last"),
        ((2, 32, 6, 6), 1, True, TMA, "whole rows"),
        ((3, 32, 4, 4), 1, True, IgemmConfig(32, 16, 16, 2, 4, 2, tma=True), "whole rows"),
    ],
    ids=["stride 2", "NCHW", "tile not whole rows", "tile of 2 images, odd batch"],
)
def test_tma_config_refuses_what_it_cannot_take(shape, stride, channels_last, cfg, match):
    x, w, b = _inputs(shape, 16, 3, torch.float32, channels_last=channels_last)
    with pytest.raises(ValueError, match=match):
        ci.conv2d_igemm(x, w, b, stride, 1, config=cfg)
