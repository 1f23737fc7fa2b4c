"""speedsd.ops dispatch of the sub-pixel upsample conv: when it applies, that it equals nearest-2x +
3x3 conv, and that its folded weight follows in-place weight updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interp_bounds import needs_interpreter
from speedsd import ops
from speedsd.models.layers import Conv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(c: int) -> Conv2d:
    conv = Conv2d(c, c, 3, padding=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (3 * c**0.5))
        conv.bias.copy_(torch.randn(c, generator=g) + 0.5)
    return conv


def _want(x: torch.Tensor, conv: Conv2d) -> torch.Tensor:
    return F.conv2d(
        F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), conv.weight.double(), conv.bias.double(), padding=1
    )


@needs_interpreter
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_subpixel_path_matches_upsample_conv(monkeypatch, channels_last: bool) -> None:
    monkeypatch.setattr(ops, "SUBPIXEL_MIN_PIXELS", 6 * 5)
    conv = _conv(8)
    x = torch.randn(2, 8, 6, 5) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    real = ops.subpixel_upsample_conv
    monkeypatch.setattr(ops, "subpixel_upsample_conv", lambda *a: calls.append(1) or real(*a))
    with ops.using(ops.Flags(subpixel_upsample=True)):
        got = ops.upsample_conv_op(x, conv)
        assert len(calls) == 1
        small = ops.upsample_conv_op(x[:, :, :5], conv)  # 25 < 30 pixels: the plain path
        assert len(calls) == 1
    assert got.shape == (2, 8, 12, 10)
    torch.testing.assert_close(got.double(), _want(x, conv), atol=2e-5, rtol=2e-5)
    with ops.using(ops.Flags()):
        torch.testing.assert_close(small, ops.upsample_conv_op(x[:, :, :5], conv), atol=0, rtol=0)


def test_folded_weight_follows_in_place_updates(monkeypatch) -> None:
    monkeypatch.setattr(ops, "SUBPIXEL_MIN_PIXELS", 0)
    conv = _conv(4)
    x = torch.randn(1, 4, 4, 4) + 0.5
    with ops.using(ops.Flags(subpixel_upsample=True)):
        before = ops.upsample_conv_op(x, conv)
        with torch.no_grad():
            conv.weight.mul_(-2.0)  # bumps weight._version: the fold must be redone
        after = ops.upsample_conv_op(x, conv)
    torch.testing.assert_close(before.double(), _want(x, _conv(4)), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(after.double(), _want(x, conv), atol=2e-5, rtol=2e-5)


def test_subpixel_without_interpreter_uses_torch_interleave(monkeypatch) -> None:
    """On a CPU without the Triton interpreter the flag still works (torch's strided interleave)."""
    monkeypatch.setattr(ops, "SUBPIXEL_MIN_PIXELS", 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    conv = _conv(4)
    x = torch.randn(1, 4, 3, 5) + 0.5
    with ops.using(ops.Flags(subpixel_upsample=True)):
        got = ops.upsample_conv_op(x, conv)
    torch.testing.assert_close(got.double(), _want(x, conv), atol=2e-5, rtol=2e-5)
