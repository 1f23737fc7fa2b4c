"""Attention kernels with the *GPU* launch configs, every load/store bounds-checked lane by lane.

The CPU interpreter normally runs INTERPRETER_CONFIG (32x32 tiles); the GPU picks per-head-dim
configs (128/64-row blocks, split head dims, 2-3 stages) that the interpreter never saw, and an
out-of-bounds lane there is silent on CPU but an "illegal memory access" on the GPU. Here the launch
heuristics are forced onto their GPU branch (``interpreted`` -> False, 132 or 4 SMs) and
tests/interp_bounds.py checks that every active lane of every load/store lands inside an argument's
storage. CPU only (the GPU faults by itself).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
import triton.language as tl

from interp_bounds import OutOfBounds, bounds_checked
from speedsd.kernels.softmax_attention import attention_ref, needs_int64

fa = importlib.import_module("speedsd.kernels.flash_attention")
sa = importlib.import_module("speedsd.kernels.softmax_attention")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only bounds checks")

# (B, H, Nq, Nk, D): the unit-test shapes, SD head dims with uneven/short key counts, a one-token case.
SHAPES = [
    pytest.param((1, 2, 64, 64, 40), id="self-d40"),
    pytest.param((1, 2, 50, 77, 64), id="cross77-d64"),
    pytest.param((1, 1, 33, 19, 80), id="odd-d80"),
    pytest.param((1, 1, 20, 40, 160), id="small-d160"),
    pytest.param((1, 1, 130, 77, 40), id="rows130-cross77-d40"),
    pytest.param((1, 1, 70, 130, 160), id="d160-tail"),
    pytest.param((1, 1, 1, 1, 80), id="one-token"),
    pytest.param((1, 1, 24, 40, 512), id="vae-d512"),
]


def _qkv(shape, dtype, layout):
    B, H, Nq, Nk, D = shape
    if layout == "heads":  # head-split views of [B, N, H·D], as the model passes them
        q, k, v = (
            (torch.randn(B, n, H * D) * s + 0.5).to(dtype).unflatten(-1, (H, D)).transpose(1, 2)
            for n, s in ((Nq, 2.0), (Nk, 2.0), (Nk, 1.0))
        )
    else:  # k stored [B, H, D, N] (head-dim stride != 1), v a slice of a wider buffer
        q = (torch.randn(B, H, Nq, D) * 2 + 0.5).to(dtype)
        k = (torch.randn(B, H, D, Nk) * 2 + 0.5).to(dtype).transpose(-1, -2)
        v = (torch.randn(B, H, Nk, 2 * D) + 0.5).to(dtype)[..., :D]
    return q, k, v


@pytest.fixture(params=[132, 4], ids=["sm132", "sm4"])
def gpu_heuristics(request, monkeypatch):
    """Launch heuristics as on a GPU with that many SMs (4: forces the partial kernel's column split)."""
    for mod in (fa, sa):
        monkeypatch.setattr(mod, "interpreted", lambda device: False)
        monkeypatch.setattr(mod, "sm_count", lambda device, n=request.param: n)
    return request.param


def _run_checked(fn, q, k, v, **kw):
    with bounds_checked() as lanes:
        out = fn(q, k, v, **kw)
    assert lanes[0] > 0, "bounds checker saw no loads"
    ref = attention_ref(q.double(), k.double(), v.double())
    tol = 2e-5 if q.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("layout", ["heads", "odd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flash_gpu_configs_in_bounds(gpu_heuristics, shape, dtype, layout):
    _run_checked(fa.flash_attention, *_qkv(shape, dtype, layout))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_partial_gpu_configs_in_bounds(gpu_heuristics, shape, dtype):
    _run_checked(sa.attention_partial_softmax, *_qkv(shape, dtype, "heads"))


@pytest.mark.parametrize(
    "cfg",
    [pytest.param(c, id=f"d{d}-" + "-".join(map(str, c.__dict__.values()))) for d, c in fa.HOPPER_CONFIGS.items()]
    + [
        pytest.param(fa.FlashConfig(64, 32, 4, 2, chunk32=True), id="old-d160-crash-config"),
        pytest.param(fa.FlashConfig(64, 64, 4, 3, split_d=False), id="padded"),
    ],
)
@pytest.mark.parametrize("shape", [(1, 1, 20, 40, 160), (1, 1, 70, 77, 40), (1, 1, 40, 64, 80)], ids=str)
def test_flash_forced_configs_in_bounds(shape, cfg):
    """Every table config on every SD head dim, EVEN_N and masked key blocks (fp16)."""
    _run_checked(fa.flash_attention, *_qkv(shape, torch.float16, "heads"), config=cfg)


def test_flash_int64_offsets(monkeypatch):
    """The OFF64 path (row offsets in int64) computes the same result."""
    monkeypatch.setattr(fa, "needs_int64", lambda views: True)
    _run_checked(fa.flash_attention, *_qkv((1, 2, 40, 45, 80), torch.float16, "heads"))


def test_needs_int64():
    small = torch.empty(2, 8, 4096, 40, device="meta")
    assert not needs_int64(((small, 4096, 128),))
    big = torch.empty(1, 1, 70000, 40000, device="meta")  # 70000·40000 > 2^31 elements in one slice
    assert needs_int64(((small, 4096, 128), (big, 70000, 64)))


@triton.jit
def _copy_kernel(X, Y, n, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n + EXTRA), mask=offs < n)


def test_bounds_checker_catches_overrun():
    """The checker itself: lanes past the end must raise, the exact mask must not."""
    x, y = torch.randn(8), torch.empty(64)
    with bounds_checked():
        _copy_kernel[(1,)](x, y, 8, EXTRA=0, BLOCK=64)
    assert torch.equal(x, y[:8])
    with pytest.raises(OutOfBounds), bounds_checked():
        _copy_kernel[(1,)](x, y, 8, EXTRA=56, BLOCK=64)  # reads x[8:64]: 224 bytes past an 8-element storage
