"""FlashAttention forward (Triton) against an fp64 materialized-softmax reference.

CPU: TRITON_INTERPRET=1 (conftest) with 32x32 tiles, so small shapes still cover several key blocks,
the masked last block (Nk % 32 != 0), partial row blocks and both head-dim chunks.
"""

from __future__ import annotations

import pytest
import torch

from speedsd.kernels.flash_attention import (
    INTERPRETER_CONFIG,
    FlashConfig,
    flash_attention,
    flash_config,
    split_head_dim,
)
from speedsd.kernels.softmax_attention import attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, Nq, Nk, D) — labelled real-ish and odd shapes.
SHAPES = [
    pytest.param((1, 2, 64, 64, 40), id="self-d40"),
    pytest.param((1, 2, 50, 77, 64), id="cross77-d64"),
    pytest.param((1, 1, 33, 19, 80), id="odd-d80"),
    pytest.param((1, 1, 20, 40, 160), id="small-d160"),
    pytest.param((2, 1, 17, 9, 512), id="vae-d512-fallback"),
]
# (dtype, atol, rtol): fp16 within (atol, rtol) and 2x torch fp16 error; fp32 within 2x torch fp32 error + atol.
DTYPES = [
    pytest.param((torch.float32, 2e-5, 1e-5), id="fp32"),
    pytest.param((torch.float16, 2e-2, 2e-2), id="fp16"),
]
# Known GPU limitation (H200, bench/results/gpu_pytest_h200_fp32_large_logits.txt): at logits ~300 the
# fp32 kernels' max error is 3.2e-5 / 4.2e-5 against torch fp32's 2.9e-6, unchanged by subtracting the
# row max before scaling, so the q·k accumulation is the suspect. The engine runs fp16 on GPUs; strict:
# a fix turns this into a failure to remove the mark.
LARGE_LOGIT_DTYPES = [
    pytest.param(
        *DTYPES[0].values,
        id="fp32",
        marks=pytest.mark.xfail(torch.cuda.is_available(), reason="fp32 q·k error at logits ~300", strict=True),
    ),
    DTYPES[1],
]


def _inputs(shape, dtype, layout="contiguous", logit_scale=1.0):
    """q, k, v with non-zero mean. layout 'heads' = head-split views of [B, N, H·D] (the model's);
    'odd' = k stored [B, H, D, N] (head-dim stride ≠ 1) and v a slice of a wider buffer."""
    B, H, Nq, Nk, D = shape

    def make(n, mean, std):
        if layout == "heads":
            t = torch.randn(B, n, H * D) * std + mean  # [B, N, H·D]
            return t.unflatten(-1, (H, D)).transpose(1, 2)  # -> [B, H, N, D] view
        return torch.randn(B, H, n, D) * std + mean

    q, k, v = (
        t.to(DEVICE, dtype)
        for t in (make(Nq, 0.5, 2.0 * logit_scale), make(Nk, 0.5, 2.0 * logit_scale), make(Nk, 0.5, 1.0))
    )
    if layout == "odd":
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # [B, H, D, N] storage
        v = torch.cat([v, torch.randn_like(v)], dim=-1)[..., :D]  # row pitch 2D
    return q, k, v


def _ref64(q, k, v, scale=None):
    return attention_ref(q.double(), k.double(), v.double(), scale=scale)


def _check(out, q, k, v, dtype, atol, rtol, scale=None):
    """fp16: ≤ 2x torch's fp16 materialized error and within (atol, rtol). fp32: ≤ 2x torch's fp32
    materialized error + atol — with logits in the hundreds the fp32 rounding of q·k alone (order-
    dependent: numpy BLAS in the interpreter, FMA chains on the GPU) moves the output by ~3e-5, so a
    fixed 2e-5 passes or fails by summation order, not by kernel quality."""
    ref = _ref64(q, k, v, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "NaN/inf in output (unwritten element?)"
    err = (out.double() - ref).abs().max().item()
    torch_err = (attention_ref(q, k, v, scale=scale).double() - ref).abs().max().item()
    if dtype == torch.float16:
        assert err <= 2 * torch_err + 1e-4, f"fp16 error {err:.3g} > 2x torch fp16 materialized {torch_err:.3g}"
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    else:
        assert err <= 2 * torch_err + atol, f"fp32 error {err:.3g} > 2x torch fp32 {torch_err:.3g} + {atol:g}"


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_flash_matches_reference(shape, dt):
    dtype, atol, rtol = dt
    q, k, v = _inputs(shape, dtype)
    _check(flash_attention(q, k, v), q, k, v, dtype, atol, rtol)


@pytest.mark.parametrize("layout", ["heads", "odd"])
def test_flash_strided_inputs(layout):
    """Head-split views and non-unit head-dim strides are read in place (no copies needed)."""
    q, k, v = _inputs((2, 2, 40, 45, 40), torch.float16, layout)
    if layout == "heads":
        assert not q.is_contiguous()
    else:
        assert k.stride(-1) != 1 and not v.is_contiguous()
    _check(flash_attention(q, k, v), q, k, v, torch.float16, 2e-2, 2e-2)


def test_flash_output_layout_follows_heads_view():
    """[B, N, H·D] head-split input -> output whose transpose(1, 2).flatten(2) is a free view."""
    q, k, v = _inputs((1, 2, 32, 32, 40), torch.float16, "heads")
    out = flash_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    assert flash_attention(qc, kc, vc).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_flash_writes_every_element_of_out(dtype):
    """A NaN-poisoned ``out`` (itself a strided view) must come back fully written."""
    q, k, v = _inputs((1, 2, 45, 70, 80), dtype)
    buf = torch.full((1, 45, 2, 80), float("nan"), device=DEVICE, dtype=dtype)  # [B, N, H, D]
    out = buf.transpose(1, 2)
    ret = flash_attention(q, k, v, out=out)
    assert ret is out
    _check(out, q, k, v, dtype, 2e-5 if dtype == torch.float32 else 2e-2, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dt", LARGE_LOGIT_DTYPES)
def test_flash_large_logits(dt):
    """Logits in the hundreds: exp overflows unless the running max is subtracted."""
    dtype, atol, rtol = dt
    q, k, v = _inputs((1, 1, 40, 70, 64), dtype, logit_scale=2.0)
    s = (q.double() @ k.double().transpose(-1, -2)).abs().max().item()
    assert s > 200  # exp(s) would overflow fp32
    _check(flash_attention(q, k, v, scale=1.0), q, k, v, dtype, atol, rtol, scale=1.0)


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(FlashConfig(16, 16, 4, 1), id="bm16-bn16"),
        pytest.param(FlashConfig(32, 64, 4, 1), id="bn64-tail"),
        pytest.param(FlashConfig(32, 32, 4, 1, split_d=False), id="padded-d"),
        pytest.param(FlashConfig(32, 32, 4, 1, chunk32=True), id="chunk32-32+16"),
    ],
)
def test_flash_configs(cfg):
    """Other tilings and the padded (unsplit) head-dim path give the same result."""
    q, k, v = _inputs((1, 1, 40, 77, 40), torch.float32)
    _check(flash_attention(q, k, v, config=cfg), q, k, v, torch.float32, 2e-5, 1e-5)


def test_split_head_dim():
    # default: no 32-wide chunk (the 128+32 split of d=160 crashed Triton 3.6 on sm_90)
    assert split_head_dim(40) == (64, 0)
    assert split_head_dim(80) == (64, 16)
    assert split_head_dim(160) == (128, 64)
    assert split_head_dim(40, chunk32=True) == (32, 16)
    assert split_head_dim(160, chunk32=True) == (128, 32)
    assert split_head_dim(32) == (32, 0)
    assert split_head_dim(64) == (64, 0)
    assert split_head_dim(40, split=False) == (64, 0)
    assert split_head_dim(8) == (16, 0)
    assert INTERPRETER_CONFIG.block_n == 32  # the tail/multi-block coverage above assumes 32-wide tiles


def test_flash_rejects_bad_inputs():
    q, k, v = _inputs((1, 1, 8, 8, 16), torch.float32)
    with pytest.raises(ValueError):
        flash_attention(q, k[..., :8], v)
    with pytest.raises(ValueError):
        flash_attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError):
        flash_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="routes it to attention_partial_softmax"):
        flash_config(torch.empty(1, 1, 8, 512, device=DEVICE, dtype=torch.float16), 8)  # D > 256: no flash tiles


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [
        (2, 8, 4096, 4096, 40),
        (2, 8, 4096, 77, 40),
        (2, 8, 1024, 1024, 80),
        (2, 8, 256, 77, 160),
        (1, 1, 4096, 4096, 512),
    ],
    ids=["self4096-d40", "cross-d40", "self1024-d80", "cross-d160", "vae-d512"],
)
def test_flash_sd_shapes_gpu(shape):
    q, k, v = _inputs(shape, torch.float16, "heads")
    out = flash_attention(q, k, v)
    ref = attention_ref(q.float(), k.float(), v.float())
    torch_err = (attention_ref(q, k, v).float() - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 2 * torch_err + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_flash_bf16_gpu(shape):
    """bf16 (GPU only: the CPU interpreter's tl.dot mishandles bf16 operands)."""
    q, k, v = _inputs(shape, torch.bfloat16, "heads")
    out = flash_attention(q, k, v)
    ref = attention_ref(q.double(), k.double(), v.double())
    torch_err = (attention_ref(q, k, v).double() - ref).abs().max().item()
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max().item() <= 2 * torch_err + 1e-4
