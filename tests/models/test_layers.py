"""Shared layers: the fused QKV projection holds no second copy of the weights and follows reloads;
ResnetBlock2D's in-place norms and Owned inputs keep the outputs and lower the live bytes."""

from __future__ import annotations

import os

import pytest
import torch

from memory_tracker import LiveBytes
from speedsd import ops
from speedsd.models.layers import Attention, Owned, ResnetBlock2D


def _attn(bias: bool) -> Attention:
    torch.manual_seed(0)
    a = Attention(32, heads=2, dim_head=16, bias=bias)
    for p in a.parameters():
        torch.nn.init.normal_(p, 0.3, 0.5)
    return a.eval()


def test_fused_qkv_matches_separate_and_shares_storage():
    for bias in (False, True):
        a = _attn(bias)
        x = torch.randn(2, 7, 32) + 0.5
        with ops.using(ops.Flags(attention="sdpa")):
            want = a(x)
        with torch.inference_mode(), ops.using(ops.Flags(attention="sdpa", fused_qkv=True)):
            got = a(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        w, b = a._fused_qkv_weight()
        storage = w.untyped_storage().data_ptr()
        for i, proj in enumerate((a.to_q, a.to_k, a.to_v)):
            assert proj.weight.untyped_storage().data_ptr() == storage  # a view, not a copy
            assert isinstance(proj.weight, torch.nn.Parameter)
            torch.testing.assert_close(w[32 * i : 32 * (i + 1)], proj.weight)
        assert (b is None) == (not bias)
        # state-dict keys unchanged
        assert {"to_q.weight", "to_k.weight", "to_v.weight"} <= set(a.state_dict())


def test_fused_qkv_sees_in_place_reload_and_rebuilds_after_replacement():
    a = _attn(False)
    x = torch.randn(1, 5, 32) + 0.5
    flags = ops.Flags(attention="sdpa", fused_qkv=True)
    with ops.using(flags):
        a(x)  # fuse
    new = {k: torch.randn_like(v) for k, v in a.state_dict().items()}
    a.load_state_dict(new)  # copies into the views
    with ops.using(flags):
        got = a(x)
    with ops.using(ops.Flags(attention="sdpa")):
        want = a(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    a.to(torch.float64)  # replaces every parameter: the fused weight must be rebuilt
    with ops.using(flags):
        got = a(x.double())
    with ops.using(ops.Flags(attention="sdpa")):
        want = a(x.double())
    torch.testing.assert_close(got, want)
    assert a._fused_qkv_weight()[0].dtype == torch.float64


# ---- ResnetBlock2D: norm2 over conv1's output, and an Owned input ----------------------------------

FUSED = ops.PRESETS["fast"].replace(cuda_graphs=False)  # GroupNorm kernel + fused epilogues (the GPU path)


def _block(cin: int, cout: int) -> ResnetBlock2D:
    torch.manual_seed(1)
    block = ResnetBlock2D(cin, cout, None, groups=4)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1 + 0.02)
    return block.eval().to(memory_format=torch.channels_last)


def _x(c: int, hw: tuple[int, int] = (12, 10)) -> torch.Tensor:
    x = torch.randn(1, c, *hw) * 2 + 0.5
    return x.contiguous(memory_format=torch.channels_last)


def test_owned_box_hands_over_once():
    t, u = torch.ones(2), torch.zeros(2)
    box = Owned(t)
    assert box.take() is t
    with pytest.raises(RuntimeError, match="already taken"):
        box.take()
    assert Owned.unbox(t) is t and Owned.unbox(Owned(t)) is t
    assert isinstance(Owned.like(box, u), Owned) and Owned.like(t, u) is u


@pytest.mark.parametrize("flags", ["fused", "reference"])
@pytest.mark.parametrize("cin,cout", [(16, 8), (8, 8)], ids=["conv-shortcut", "identity"])
@torch.inference_mode()
def test_resnet_block_owned_input_is_bit_identical(cin: int, cout: int, flags: str):
    if flags == "fused" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU kernels need TRITON_INTERPRET=1")
    block, x = _block(cin, cout), _x(cin)
    x0 = x.clone()
    with ops.using(FUSED if flags == "fused" else ops.Flags()):
        want = block(x)
        assert torch.equal(x, x0)  # a plain input is never written
        got = block(Owned(x.clone()))
    assert torch.equal(got, want)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernels need TRITON_INTERPRET=1")
@torch.inference_mode()
def test_resnet_block_peak_live_bytes():
    """Bounds from the tensor sizes: U = one [1, Cout, H, W] tensor, X the block input."""
    hw = (16, 16)
    with ops.using(FUSED):
        # identity shortcut, the input the caller's: norm1's output + conv1's output, then conv1's output
        # (normalised in place) + conv2's: 2U. Without norm2 in place, conv2 would run at 3U.
        block, x = _block(8, 8), _x(8, hw)
        u = x.untyped_storage().nbytes()
        block(x)  # warm: caches made on the first call are not activations
        with LiveBytes() as mem:
            block(x)
        assert 2 * u <= mem.peak <= 2 * u + u // 8, (mem.peak, u)

        # conv shortcut 16 -> 8, the input created in the block's scope (X = 2U). Plain: x, norm1's output
        # and conv1's output at once (2X + U = 5U). Owned: the shortcut, x normalised in place, conv1's
        # output (X + 2U = 4U); x is gone before conv2.
        block = _block(16, 8)
        block(_x(16, hw))
        with LiveBytes() as plain:
            x = _x(16, hw)
            y = block(x)
            del x, y
        with LiveBytes() as owned:
            y = block(Owned(_x(16, hw)))  # the box is the only holder
            del y
        assert plain.peak >= 5 * u, (plain.peak, u)
        assert 4 * u <= owned.peak <= 4 * u + u // 8, (owned.peak, u)


def test_resnet_closing_bias_is_derived_once_and_follows_reloads():
    """conv2.bias + conv_shortcut.bias (the fused closing add's bias) is one tensor reused call after call
    (no add kernel a block a step), recomputed after an in-place reload of either bias."""
    block = _block(16, 8)
    with torch.inference_mode():
        first = block._closing_bias()
    torch.testing.assert_close(first, block.conv2.bias + block.conv_shortcut.bias, atol=0, rtol=0)
    assert block._closing_bias() is first
    with torch.no_grad():
        block.conv_shortcut.bias.add_(1.0)
    again = block._closing_bias()
    assert again is not first
    torch.testing.assert_close(again, block.conv2.bias + block.conv_shortcut.bias, atol=0, rtol=0)
    identity = _block(8, 8)
    assert identity._closing_bias() is identity.conv2.bias  # identity shortcut: conv2's bias alone
