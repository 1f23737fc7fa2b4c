"""The Gluon GEGLU feed-forward GEMM (kernels/ff_geglu_gluon.py).

CPU: the config's string round trip and validation, the launcher's clear errors (and the predicate's False for
the same inputs), the launch arguments. Gluon kernels do not run under the interpreter, so every numerical check
is a GPU test (sm_90): NaN-poisoned outputs, error vs fp64 within 2x torch's own fp16/bf16 error, on the UNet's
shapes and odd ones (M, F past the tiles, K not a multiple of BK), with and without bias, the three GELU forms.
Run from this folder: TRITON_INTERPRET=1 PYTHONPATH=<repo>/src:<repo>/tests:. pytest -q .
"""

from __future__ import annotations

import importlib

import pytest
import torch

from precision import assert_low_precision_ok

gg = importlib.import_module("speedsd.kernels.geglu")
fg = importlib.import_module("ff_geglu_gluon")


def _inputs(m, k, f, dtype=torch.float16, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(m + k + f)
    x = (torch.randn(m, k, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)
    w = (torch.randn(2 * f, k, generator=g, dtype=torch.float64) * k**-0.5 + 0.02).to(device, dtype)
    b = (torch.randn(2 * f, generator=g, dtype=torch.float64) * 0.5 + 0.1).to(device, dtype) if bias else None
    return x, w, b


# ---- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "ff128x64k64s4c1g8",
        "ff128x128k64s4c2g8",
        "ff256x64k64s3c2g4",
        "ff64x64k32s6c1g1",
        "ff128x64k64s2c1g8o2",
        "ff128x64k64s3c1g8pp",
    ],
)
def test_config_round_trip(key):
    cfg = fg.FFGluonConfig.parse(key)
    assert str(cfg) == key and cfg.smem_bytes() <= fg.SMEM_LIMIT and cfg.warps == 4 * cfg.consumers


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(bn=96), "powers of 2"),
        (dict(bk=8), "bk >= 16"),
        (dict(bn=256), "bn <= 128"),
        (dict(consumers=3), "1 or 2 warpgroups"),
        (dict(bm=64, consumers=2), "multiple of 64"),
        (dict(bm=128, bn=128, consumers=1), "accumulator registers"),
        (dict(stages=1), ">= 2 stages"),
        (dict(bm=256, bn=128, consumers=2), "accumulator registers"),
        (dict(bm=256, bn=64, consumers=2, stages=6), "shared memory"),
        (dict(bm=128, consumers=2, pingpong=True), "ping-pong tile belongs to one warpgroup"),
        (dict(bm=128, bn=64, stages=4, pingpong=True), "shared memory"),  # two rings
    ],
)
def test_invalid_configs_raise(fields, match):
    with pytest.raises(ValueError, match=match):
        fg.FFGluonConfig(**fields)
    for bad in ("ff128x64k64s4c1", "ff128x64k64s4c1g8o1"):
        with pytest.raises(ValueError, match="not a Gluon feed-forward config"):
            fg.FFGluonConfig.parse(bad)


# ---- launcher checks ---------------------------------------------------------------------------------

BAD = [
    pytest.param(lambda x, w, b, o: (x[0], w, b, o), "expects x", id="1d-x"),
    pytest.param(lambda x, w, b, o: (x, w[:, :8], b, o), "expects x", id="K-differs"),
    pytest.param(lambda x, w, b, o: (x, w[:-1], b, o), "expects x", id="odd-2F"),
    pytest.param(lambda x, w, b, o: (x.float(), w.float(), b, o.float()), "fp16 or bf16", id="fp32"),
    pytest.param(lambda x, w, b, o: (x, w.bfloat16(), b, o), "one dtype", id="mixed"),
    pytest.param(lambda x, w, b, o: (x, w, b, o[:, :8]), "out must be", id="out-shape"),
    pytest.param(lambda x, w, b, o: (x, w, b[:-2], o), "bias must be", id="bias-length"),
    pytest.param(lambda x, w, b, o: (x[:0], w, b, o[:0]), "empty", id="empty"),
    pytest.param(lambda x, w, b, o: (x[:, :12].contiguous(), w[:, :12].contiguous(), b, o), "aligned rows", id="K12"),
    pytest.param(lambda x, w, b, o: (x, w, b, o), "sm_90", id="cpu-device"),
]


@pytest.mark.parametrize("args, match", BAD)
def test_launcher_raises_clear_errors(args, match):
    x, w, b = _inputs(40, 32, 24)
    xx, ww, bb, oo = args(x, w, b, torch.empty(40, 24, dtype=torch.float16))
    with pytest.raises(ValueError, match=match):
        fg.feed_forward_geglu_gluon(xx, ww, bb, oo, approx=0)
    assert not fg.gluon_ff_supported(xx, ww, bb, oo)


def test_launch_args():
    """Persistent grid = min(#SMs, #tiles); W read as [2, F, K] in [2, BN, BK] boxes; sizes as runtime args."""
    x, w, b = _inputs(8192, 320, 1280)
    out = torch.empty(8192, 1280, dtype=torch.float16)
    cfg = fg.FFGluonConfig.parse("ff128x64k64s4c1g8")
    grid, args, const = fg._launch_args(x, w, b, out, cfg, 0, 132)
    assert grid == (132,) and args[3] is b and args[4:] == (8192, 1280, 320)
    assert args[1].block_shape == [2, 64, 64] and list(args[1].base.shape) == [2, 1280, 320]
    assert args[0].block_shape == [128, 64] and args[2].block_shape == [128, 64]
    assert const["HAS_B"] and const["num_warps"] == 4 and const["GROUP_M"] == 8
    small, _, const = fg._launch_args(x[:100], w, None, out[:100], cfg, 0, 132)
    assert small == (20,) and not const["HAS_B"]  # 1 row tile x 20 column tiles
    two = fg.FFGluonConfig.parse("ff128x64k64s2c1g8o2")
    assert fg._launch_args(x, w, b, out, two, 0, 132)[0] == (264,)  # two programs an SM
    per_tile = fg.FFGluonConfig.parse("ff128x64k64s2c1g8o0")
    assert fg._launch_args(x, w, b, out, per_tile, 0, 132)[0] == (64 * 20,)  # one program a tile


# ---- GPU ------------------------------------------------------------------------------------------------


def _require_hopper() -> None:
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and fg._kernels()):
        pytest.skip("needs an sm_90 GPU (H100/H200) and a Triton with Gluon")


GPU_SHAPES = [  # (M, K, F): the UNet's three levels (batch 2, 512²) and odd ones
    pytest.param(8192, 320, 1280, id="unet64"),
    pytest.param(2048, 640, 2560, id="unet32"),
    pytest.param(512, 1280, 5120, id="unet16"),
    pytest.param(333, 200, 72, id="odd-M-F-K"),
    pytest.param(1, 16, 8, id="tiny"),
]
GPU_CONFIGS = [
    "ff128x64k64s4c1g8",
    "ff128x128k64s4c2g8",
    "ff256x64k64s3c2g4",
    "ff64x64k32s6c1g1",
    "ff128x64k64s2c1g8o2",
    "ff128x32k64s4c1g8o0",
    "ff128x64k64s3c1g8pp",
    "ff64x128k64s2c1g1pp",
]


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("key", GPU_CONFIGS)
@pytest.mark.parametrize("m, k, f", GPU_SHAPES)
def test_gpu_fp16_within_2x_torch(m, k, f, key, bias):
    _require_hopper()
    x, w, b = _inputs(m, k, f, bias=bias, device="cuda")
    out = torch.full((m, f), float("nan"), dtype=torch.float16, device="cuda")
    y = fg.feed_forward_geglu_gluon(x, w, b, out, approx=0, config=key)
    torch.cuda.synchronize()
    assert y is out and not torch.isnan(y).any(), "unwritten outputs"
    ref = gg.feed_forward_geglu_ref(x.double(), w.double(), None if b is None else b.double())
    assert_low_precision_ok(y, ref, gg.feed_forward_geglu_ref(x, w, b))


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["tanh", "quick"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_gelu_forms_and_bf16(approximate, dtype):
    _require_hopper()
    x, w, b = _inputs(300, 136, 200, dtype=dtype, device="cuda")
    out = torch.full((300, 200), float("nan"), dtype=dtype, device="cuda")
    y = fg.feed_forward_geglu_gluon(x, w, b, out, approx=gg.APPROX[approximate], config="ff128x64k64s4c1g8")
    torch.cuda.synchronize()
    ref = gg.feed_forward_geglu_ref(x.double(), w.double(), b.double(), approximate)
    assert_low_precision_ok(y, ref, gg.feed_forward_geglu_ref(x, w, b, approximate))
