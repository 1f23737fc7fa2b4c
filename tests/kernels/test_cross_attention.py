"""One-pass cross-attention (kernels/cross_attention.py) against fp64 references, and its dispatch.

CPU: TRITON_INTERPRET=1 (conftest). The interpreter config (16-row tiles, 2 tiles and 2 heads per program)
makes small shapes cover several programs, tiles wholly past Nq and the head loop; SD's real sizes
(4096x77 d40 ...) run in the GPU tests below and in the bench. fp16 error vs fp64 must stay within 2x what
torch's SDPA makes in fp16 (measured in each test).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interp_bounds import bounds_checked, needs_interpreter
from speedsd import attention_table, ops
from speedsd.kernels import cross_attention as ca
from speedsd.kernels.cross_attention import (
    CrossConfig,
    cross_attention,
    cross_attention_ref,
    cross_attention_supported,
    split_keys,
)
from speedsd.kernels.flash_attention import flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, Nq, Nk, D): SD's cross shapes scaled down (same Nk and head dims), then odd ones.
SHAPES = [
    pytest.param((2, 4, 96, 77, 40), id="sd-4096x77-d40"),  # keys 64 + 16 (masked to 77), d padded to 64
    pytest.param((2, 4, 64, 77, 80), id="sd-1024x77-d80"),  # head dim 64 + 16
    pytest.param((1, 2, 48, 77, 160), id="sd-256x77-d160"),  # head dim 128 + 64 (32 masked)
    pytest.param((1, 2, 17, 1, 40), id="nk1"),
    pytest.param((2, 2, 33, 7, 64), id="nk7"),
    pytest.param((1, 3, 21, 80, 24), id="nk80-even-split-h3"),  # 64 + 16 unmasked; h_group 2 -> 1
    pytest.param((1, 2, 40, 128, 80), id="nk128"),
    pytest.param((1, 1, 16, 16, 16), id="nk16-d16-exact"),
]
# (dtype, atol): fp16 also within (atol, atol) element-wise; fp32 within 2x torch fp32 error + atol.
DTYPES = [pytest.param((torch.float32, 2e-5), id="fp32"), pytest.param((torch.float16, 2e-2), id="fp16")]


def _inputs(shape, dtype, layout="model", logit_scale=1.0):
    """q, k, v with non-zero mean. 'model': q a head-split view of [B, Nq, H·D]; k and v one layer's column
    blocks of a fused cross-K/V GEMM output [B, Nk, 4·H·D] (two layers), head-split (layers.CrossKV).
    'contiguous': [B, H, N, D]. 'odd': k stored [B, H, D, Nk] (head-dim stride ≠ 1), v with row pitch 2·D."""
    B, H, Nq, Nk, D = shape
    hd = H * D
    qs, ks = 2.0 * logit_scale, 2.0 * logit_scale
    if layout == "model":
        q = (torch.randn(B, Nq, hd) * qs + 0.5).to(DEVICE, dtype)  # [B, Nq, H·D]
        kv = torch.randn(B, Nk, 4 * hd) * ks + 0.5  # [B, Nk, (k0 v0 k1 v1)]
        kv[..., 3 * hd :] = torch.randn(B, Nk, hd) * 2.0 + 0.5  # v1
        kv = kv.to(DEVICE, dtype)
        q, k, v = q, kv[..., 2 * hd : 3 * hd], kv[..., 3 * hd :]
        return tuple(t.unflatten(-1, (H, D)).transpose(1, 2) for t in (q, k, v))  # -> [B, H, N, D] views
    q, k, v = (
        (torch.randn(B, H, n, D) * s + 0.5).to(DEVICE, dtype) for n, s in ((Nq, qs), (Nk, ks), (Nk, 2.0))
    )  # fmt: skip
    if layout == "odd":
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # [B, H, D, Nk] storage
        v = torch.cat([v, torch.randn_like(v)], dim=-1)[..., :D]  # row pitch 2·D
    return q, k, v


def _poisoned_out(q):
    """NaN-filled output laid out as the launcher would (head-split q: a view of [B, Nq, H·D])."""
    B, H, Nq, D = q.shape
    if q.stride(1) < q.stride(2):
        return torch.full((B, Nq, H, D), float("nan"), device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.full((B, H, Nq, D), float("nan"), device=q.device, dtype=q.dtype)


def _check(out, q, k, v, dtype, atol, scale=None):
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "NaN/inf in output (unwritten element?)"
    err = (out.double() - ref).abs().max().item()
    torch_err = (F.scaled_dot_product_attention(q, k, v, scale=scale).double() - ref).abs().max().item()
    if dtype == torch.float16:
        assert err <= 2 * torch_err + 1e-4, f"fp16 error {err:.3g} > 2x torch SDPA fp16 {torch_err:.3g}"
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    else:
        assert err <= 2 * torch_err + atol, f"fp32 error {err:.3g} > 2x torch SDPA fp32 {torch_err:.3g} + {atol:g}"


def _run(q, k, v, dtype, atol, scale=None, config=None):
    out = _poisoned_out(q)
    ret = cross_attention(q, k, v, scale=scale, out=out, config=config)
    assert ret is out
    _check(out, q, k, v, dtype, atol, scale)


@pytest.mark.parametrize("layout", ["model", "contiguous"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_matches_fp64(shape, dt, layout):
    dtype, atol = dt
    q, k, v = _inputs(shape, dtype, layout)
    assert cross_attention_supported(q, k)
    if layout == "model":
        assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()  # one K/V GEMM output
    _run(q, k, v, dtype, atol)


@pytest.mark.parametrize("dt", DTYPES)
def test_cross_odd_strides(dt):
    """A head-dim stride ≠ 1 (k) and a row pitch ≠ D (v) are read through their strides."""
    q, k, v = _inputs((1, 2, 24, 77, 40), dt[0], "odd")
    assert k.stride(-1) != 1 and not v.is_contiguous()
    _run(q, k, v, *dt)


def test_cross_output_layout_follows_q():
    """Head-split q -> output a view of a contiguous [B, Nq, H·D] (the caller's transpose+flatten is free)."""
    q, k, v = _inputs((2, 2, 20, 77, 40), torch.float16)
    out = cross_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    out_c = cross_attention(qc, kc, vc)
    assert out_c.is_contiguous()
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)


@pytest.mark.parametrize("dt", [pytest.param((torch.float32, 1e-4), id="fp32"), DTYPES[1]])
def test_cross_large_logits(dt):
    """Logits in the hundreds: exp overflows unless the row max is subtracted. fp32's atol: at |s| ~ 300 the
    fp32 rounding of q·k alone moves the output by ~3e-5 (summation order; see test_flash_attention)."""
    dtype, atol = dt
    q, k, v = _inputs((1, 2, 24, 77, 64), dtype, logit_scale=2.0)
    s = (q.double() @ k.double().transpose(-1, -2)).abs().max().item()
    assert s > 200  # exp(s) would overflow fp32
    _run(q, k, v, dtype, atol, scale=1.0)


@pytest.mark.parametrize(
    "shape, cfg",
    [
        pytest.param((1, 4, 40, 77, 40), CrossConfig(16, 4), id="bm16-one-tile-one-head"),
        pytest.param((1, 4, 40, 77, 40), CrossConfig(16, 4, m_group=4, num_stages=2), id="tiles-past-nq"),
        pytest.param((2, 4, 40, 77, 40), CrossConfig(32, 4, h_group=4), id="all-heads-per-program"),
        pytest.param((1, 2, 40, 77, 80), CrossConfig(16, 4, split_d=False), id="padded-d80-to-128"),
        pytest.param((1, 2, 40, 77, 40), CrossConfig(16, 4, chunk32=True), id="chunk32-d40-32+16"),
        pytest.param((1, 2, 24, 77, 160), CrossConfig(16, 4, chunk32=True), id="chunk32-d160-128+32"),
    ],
)
def test_cross_configs(shape, cfg):
    """Other tilings, the head-group loop and the head-dim splits give the same result."""
    q, k, v = _inputs(shape, torch.float32)
    _run(q, k, v, torch.float32, 2e-5, config=cfg)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1, 2, 130, 77, 40), id="rows130-d40"),
        pytest.param((2, 4, 33, 7, 64), id="nk7-d64"),
        pytest.param((1, 2, 70, 128, 160), id="nk128-d160"),
        pytest.param((1, 1, 1, 1, 80), id="one-token"),
    ],
)
def test_gpu_configs_in_bounds(shape, dtype):
    """The GPU launch configs (the heuristic on 132 and 4 SMs, and sweep-grid extremes) under the interpreter,
    every active lane of every load/store checked to land in an argument's storage (tests/interp_bounds.py):
    an out-of-bounds lane is silent here but an illegal memory access on the GPU."""
    B, H, Nq, Nk, D = shape
    q, k, v = _inputs(shape, dtype)
    configs = {ca.heuristic_config(B, H, Nq, D, dtype, sms) for sms in (132, 4)}
    configs |= {CrossConfig(128, 8, m_group=4, num_stages=3), CrossConfig(64, 4, h_group=H, chunk32=True)}
    for cfg in configs:
        out = _poisoned_out(q)
        with bounds_checked() as lanes:
            cross_attention(q, k, v, out=out, config=cfg)
        assert lanes[0] > 0, "bounds checker saw no loads"
        _check(out, q, k, v, dtype, 2e-2 if dtype == torch.float16 else 2e-5)


def test_split_keys():
    assert split_keys(77) == (64, 16)
    assert split_keys(80) == (64, 16)
    assert split_keys(1) == split_keys(7) == split_keys(16) == (16, 0)
    assert split_keys(17) == (32, 0)  # 16 + 16 saves nothing over 32
    assert split_keys(40) == (32, 16)
    assert split_keys(100) == (128, 0)
    assert split_keys(128) == (128, 0)


def test_supported_problems_and_flash_fallback(monkeypatch):
    q, k, v = _inputs((1, 2, 20, 129, 40), torch.float32)
    assert not cross_attention_supported(q, k)  # 129 keys: more than one tile
    assert cross_attention_supported(q, k[:, :, :128])
    assert not cross_attention_supported(torch.empty(1, 1, 4, 168), torch.empty(1, 1, 4, 168))  # D > 160
    assert not cross_attention_supported(q.double(), k[:, :, :8].double())
    assert not cross_attention_supported(q[0], k[0])
    calls = []
    monkeypatch.setattr(ca, "flash_attention", lambda *a, **kw: calls.append(a) or flash_attention(*a, **kw))
    out = cross_attention(q, k, v, scale=0.2)
    assert len(calls) == 1
    torch.testing.assert_close(out, flash_attention(q, k, v, scale=0.2), atol=0, rtol=0)
    cross_attention(q, k[:, :, :128], v[:, :, :128])
    assert len(calls) == 1  # the kernel's own path


def test_cross_rejects_bad_inputs():
    q, k, v = _inputs((1, 2, 8, 8, 16), torch.float32)
    with pytest.raises(ValueError):
        cross_attention(q, k[..., :8], v)
    with pytest.raises(ValueError):
        cross_attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError):
        cross_attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError):
        cross_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="out must be"):
        cross_attention(q, k, v, out=torch.empty(1, 2, 8, 8))
    with pytest.raises(ValueError, match="h_group"):
        cross_attention(q, k, v, config=CrossConfig(16, 4, h_group=4))


def test_heuristic_configs_are_launchable():
    """Every GPU heuristic choice on SD-like shapes: h_group divides H, tiles are powers of two ≥ 16."""
    for B, H, Nq, D in [(2, 8, 4096, 40), (2, 8, 1024, 80), (2, 8, 256, 160), (1, 5, 9216, 64), (2, 20, 64, 64)]:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            cfg = ca.heuristic_config(B, H, Nq, D, dtype, sms=132)
            assert H % cfg.h_group == 0 and cfg.block_m >= 16 and cfg.block_m & (cfg.block_m - 1) == 0
            assert cfg.m_group in (1, 2, 4) and cfg.num_warps in (4, 8)


def test_ref_matches_fp64():
    q, k, v = _inputs((1, 2, 9, 77, 40), torch.float16)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    got = cross_attention_ref(q, k, v)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cross_attention_ref(q.double(), k.double(), v.double()), ref)


# ---- dispatch: Flags(attention="cross"), "auto" and the table ----------------------------------------


def test_flags_and_table_accept_cross():
    assert ops.Flags(attention="cross").attention == "cross" and "cross" in ops.ATTENTION_MODES
    assert "cross" in attention_table.CHOICES


@pytest.mark.parametrize("mode", ["cross", "auto"])
def test_attention_op_runs_the_kernel_where_supported(mode, monkeypatch):
    """'cross' (as the flag or the table's choice under 'auto'): the kernel on ≤ 128 keys, flash elsewhere."""
    launched = []

    class Spy:  # counts launches of the cross kernel
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    real = ca._cross_attn_kernel
    monkeypatch.setattr(ca, "_cross_attn_kernel", Spy())
    monkeypatch.setattr(ops, "pick_attention", lambda q, k, upcast=False: "cross")
    q, k, v = _inputs((1, 2, 24, 77, 40), torch.float16)
    with ops.using(ops.Flags(attention=mode)):
        got = ops.attention_op(q, k, v, upcast=True)
    assert len(launched) == 1
    _check(got, q, k, v, torch.float16, 2e-2)
    q2, k2, v2 = _inputs((1, 2, 24, 130, 40), torch.float16)  # self-attention-sized context: flash
    with ops.using(ops.Flags(attention=mode)):
        got2 = ops.attention_op(q2, k2, v2)
    assert len(launched) == 1  # no second launch of the cross kernel
    assert torch.equal(got2, flash_attention(q2, k2, v2))
    torch.testing.assert_close(got, cross_attention(q, k, v), atol=0, rtol=0)


@torch.no_grad()
def test_attention_layers_on_fused_cross_kv(monkeypatch):
    """The model path: Attention layers given a CrossKV (every layer's K/V from one GEMM, strided views) run
    the kernel on those views in place and match the plain-projection math path."""
    from speedsd.models.layers import Attention, CrossKV

    seen = []
    real = ca.cross_attention
    monkeypatch.setattr(ops, "cross_attention", lambda q, k, v, **kw: seen.append(k.stride()) or real(q, k, v, **kw))
    attns = [Attention(32, context_dim=24, heads=h, dim_head=32 // h).to(DEVICE) for h in (2, 4)]
    x = torch.randn(2, 20, 32, device=DEVICE) * 2 + 0.5
    ctx = torch.randn(2, 77, 24, device=DEVICE) * 2 + 0.5
    kv = CrossKV.build(attns, ctx, {})
    for a in attns:
        with ops.using(ops.Flags(attention="math")):
            want = a(x, ctx)
        with ops.using(ops.Flags(attention="cross")):
            got = a(x, kv)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [st[2] for st in seen] == [4 * 32, 4 * 32]  # rows of the fused [B, 77, 2 layers x (K, V) x 32]


# ---- GPU ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (2, 5, 4096, 77, 64)],
    ids=["cross4096-d40", "cross1024-d80", "cross256-d160", "self64-d160", "sd2-cross4096-d64"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cross_sd_shapes_gpu(shape, dtype):
    """SD's real shapes with the launch heuristic, model layout, NaN-poisoned output; bf16 here only (the
    CPU interpreter's tl.dot mishandles bf16 operands)."""
    q, k, v = _inputs(shape, dtype)
    out = _poisoned_out(q)
    cross_attention(q, k, v, out=out)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch_err = (F.scaled_dot_product_attention(q, k, v).double() - ref).abs().max().item()
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() <= 2 * torch_err + 1e-4
