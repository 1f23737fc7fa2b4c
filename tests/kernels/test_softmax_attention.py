"""Partially fused softmax attention (kernel A: scores + row statistics, kernel B: on-the-fly
normalized P·V) against an fp64 materialized-softmax reference, plus kernel A's intermediates."""

from __future__ import annotations

import math

import pytest
import torch

from speedsd.kernels.softmax_attention import (
    LOG2E,
    _scores_config,
    attention_partial_softmax,
    attention_ref,
    partial_softmax_scores,
    score_dtype,
    stride_align,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, Nq, Nk, D)
SHAPES = [
    pytest.param((1, 2, 64, 64, 40), id="self-d40"),
    pytest.param((1, 2, 50, 77, 64), id="cross77-d64"),
    pytest.param((1, 1, 33, 19, 80), id="odd-d80"),
    pytest.param((1, 1, 20, 40, 160), id="small-d160"),
    pytest.param((1, 1, 24, 40, 512), id="vae-d512"),
]
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


def _inputs(shape, dtype, heads_view=False, logit_scale=1.0):
    B, H, Nq, Nk, D = shape

    def make(n, mean, std):
        if heads_view:
            t = torch.randn(B, n, H * D) * std + mean  # [B, N, H·D]
            return t.unflatten(-1, (H, D)).transpose(1, 2)  # -> [B, H, N, D] view
        return torch.randn(B, H, n, D) * std + mean

    q, k, v = make(Nq, 0.5, 2.0 * logit_scale), make(Nk, 0.5, 2.0 * logit_scale), make(Nk, 0.5, 1.0)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _check(out, q, k, v, dtype, atol, rtol, scale=None):
    """fp16: ≤ 2x torch's fp16 materialized error and within (atol, rtol). fp32: ≤ 2x torch's fp32
    materialized error + atol — a fixed atol is not honest for large logits, where the fp32 rounding
    of q·k (order-dependent: numpy BLAS in the interpreter, FMA chains on the GPU) alone moves the
    output by ~3e-5 (torch's own fp32 error on test_partial_large_logits)."""
    ref = attention_ref(q.double(), k.double(), v.double(), scale=scale)
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
def test_partial_matches_reference(shape, dt):
    dtype, atol, rtol = dt
    q, k, v = _inputs(shape, dtype)
    _check(attention_partial_softmax(q, k, v), q, k, v, dtype, atol, rtol)


def test_partial_heads_view_and_poisoned_out():
    """Head-split views in; a NaN-poisoned strided ``out`` must be fully written."""
    q, k, v = _inputs((2, 2, 45, 77, 40), torch.float16, heads_view=True)
    assert not q.is_contiguous()
    buf = torch.full((2, 45, 2, 40), float("nan"), device=DEVICE, dtype=torch.float16)  # [B, N, H, D]
    out = buf.transpose(1, 2)
    assert attention_partial_softmax(q, k, v, out=out) is out
    _check(out, q, k, v, torch.float16, 2e-2, 2e-2)
    assert attention_partial_softmax(q, k, v).transpose(1, 2).is_contiguous()  # layout follows q


@pytest.mark.parametrize("dt", LARGE_LOGIT_DTYPES)
def test_partial_large_logits(dt):
    dtype, atol, rtol = dt
    q, k, v = _inputs((1, 1, 40, 70, 64), dtype, logit_scale=2.0)
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max().item() > 200
    _check(attention_partial_softmax(q, k, v, scale=1.0), q, k, v, dtype, atol, rtol, scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1, 1, 32, 300, 64, 4), id="4-segments"),  # 3 segments with the GPU's 64-wide key blocks
        pytest.param((1, 2, 40, 130, 40, 2), id="2-segments"),
    ],
)
def test_scores_and_row_stats(shape, dtype):
    """Kernel A: S = q kᵀ·scale stored once (fp16 for fp16 inputs); each row segment's
    (max S, Σ 2^((S − max)·log2(e))) agrees with the stored S; the segments merge to the row's sum.
    Segments are forced (``splits``), so the multi-segment path runs with any device's tiles."""
    B, H, Nq, Nk, D, want = shape
    q, k, _ = _inputs(shape[:5], dtype)
    s, stats = partial_softmax_scores(q, k, splits=want)
    assert s.dtype == score_dtype(dtype) and s.shape[:3] == (B, H, Nq) and s.shape[3] % 16 == 0
    n_splits = stats.shape[1]
    cols = _scores_config(q, Nk, splits=want)["cols"]  # segment width, a multiple of BLOCK_N
    assert n_splits == -(-Nk // cols) and n_splits > 1 and Nk % cols != 0  # several segments, ragged last
    exact = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5  # [B, H, Nq, Nk]
    if dtype == torch.float32:  # fp32 dot-product bound D·u·Σ|q_i k_i| (any summation order; TF32 fails it)
        tol = D * 2.0**-24 * (q.double().abs() @ k.double().abs().transpose(-1, -2)) * D**-0.5 + 1e-6
    else:  # fp16 storage of S: half an ulp at |S| plus the fp32 accumulation
        tol = 1e-3 * exact.abs().max().item() + 1e-3
    assert ((s[..., :Nk].double() - exact).abs() <= tol).all(), (s[..., :Nk].double() - exact).abs().max().item()
    s2 = s[..., :Nk].double() * LOG2E
    st = stats.double().view(B, H, n_splits, 2, Nq)
    m_all = torch.full((B, H, Nq), -math.inf, dtype=torch.float64, device=q.device)
    l_all = torch.zeros(B, H, Nq, dtype=torch.float64, device=q.device)
    segs = [(j * cols, min((j + 1) * cols, Nk)) for j in range(n_splits)]
    for j, (a, b) in enumerate(segs):
        m = s2[..., a:b].amax(-1)
        l = torch.exp2(s2[..., a:b] - m[..., None]).sum(-1)
        torch.testing.assert_close(st[:, :, j, 0], m / LOG2E, atol=1e-6, rtol=1e-6)  # natural units
        torch.testing.assert_close(st[:, :, j, 1], l, atol=1e-5, rtol=1e-5)
        l_all = l_all * torch.exp2(m_all - torch.maximum(m_all, m)) + l * torch.exp2(m - torch.maximum(m_all, m))
        m_all = torch.maximum(m_all, m)
    torch.testing.assert_close(l_all, torch.exp2(s2 - s2.amax(-1, keepdim=True)).sum(-1), atol=1e-5, rtol=1e-6)


def test_stride_align():
    x = torch.empty(2, 64, 8 * 40, dtype=torch.float16).unflatten(-1, (8, 40)).transpose(1, 2)
    assert stride_align(2, x) == 8  # 16-byte rows: vector loads
    assert stride_align(2, torch.empty(2, 3, 5, 7, dtype=torch.float16)) == 1
    assert stride_align(4, torch.empty(1, 1, 4, 64)) == 4


@pytest.mark.gpu
def test_partial_sd_shapes_gpu():
    for shape in [(2, 8, 4096, 4096, 40), (2, 8, 1024, 77, 80), (1, 1, 4096, 4096, 512)]:
        q, k, v = _inputs(shape, torch.float16, heads_view=True)
        out = attention_partial_softmax(q, k, v)
        ref = attention_ref(q.float(), k.float(), v.float())
        torch_err = (attention_ref(q, k, v).float() - ref).abs().max().item()
        assert (out.float() - ref).abs().max().item() <= 2 * torch_err + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_partial_bf16_gpu(shape):
    """bf16 stores S in fp32 (GPU only: the CPU interpreter's tl.dot mishandles bf16 operands)."""
    q, k, v = _inputs(shape, torch.bfloat16, heads_view=True)
    assert partial_softmax_scores(q, k)[0].dtype == torch.float32
    out = attention_partial_softmax(q, k, v)
    ref = attention_ref(q.double(), k.double(), v.double())
    torch_err = (attention_ref(q, k, v).double() - ref).abs().max().item()
    assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max().item() <= 2 * torch_err + 1e-4
