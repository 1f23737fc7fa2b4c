"""The up path's unformed concatenation: the Concat box and the split 1x1 shortcut (two GEMMs over views
of the weight) against the conv of the materialized concatenation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memory_tracker import LiveBytes
from speedsd.models.skip_concat import Concat, split_shortcut


def _parts(n, c1, c2, hw, layout, dtype=torch.float32):
    x, s = ((torch.randn(n, c, *hw, dtype=torch.float64) * 2 + 0.5).to(dtype) for c in (c1, c2))
    if layout == "channels_last":
        x, s = x.contiguous(memory_format=torch.channels_last), s.contiguous(memory_format=torch.channels_last)
    return x, s


def _conv(cin, cout, dtype=torch.float32):
    conv = torch.nn.Conv2d(cin, cout, 1)
    with torch.no_grad():
        conv.bias.add_(0.3)
    return conv.to(dtype)


def test_concat_box_hands_over_once():
    x, s = _parts(2, 3, 2, (2, 3), "nchw")
    box = Concat(x, s)
    got = box.take()
    assert got[0] is x and got[1] is s
    with pytest.raises(RuntimeError, match="already taken"):
        box.take()
    assert torch.equal(Concat(x, s).materialize(), torch.cat([x, s], dim=1))
    with pytest.raises(ValueError, match="cannot concatenate"):
        Concat(x, s[:, :, :1])
    with pytest.raises(ValueError, match="cannot concatenate"):
        Concat(x, s.double())


# (label, N, C1, C2, Cout, H, W): SD's up-block ratios (1280+640 -> 640, 640+320 -> 320) scaled, and odd sizes
SHAPES = [
    ("sd-up 1280+640->640 as 2x(32+16)->16 4x4", 2, 32, 16, 16, 4, 4),
    ("sd-up 640+320->320 as 1x(16+8)->8 6x6", 1, 16, 8, 8, 6, 6),
    ("odd 2x(13+3)->5 3x7", 2, 13, 3, 5, 3, 7),
]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("label,n,c1,c2,co,h,w", SHAPES, ids=[s[0] for s in SHAPES])
@torch.no_grad()
def test_split_shortcut_matches_conv_of_concat(label, n, c1, c2, co, h, w, layout, bias):
    x, s = _parts(n, c1, c2, (h, w), "nchw" if layout == "mixed" else layout)
    if layout == "mixed":
        x = x.contiguous(memory_format=torch.channels_last)
    conv = _conv(c1 + c2, co)
    b = conv.bias if bias else None
    y = split_shortcut(x, s, conv, b)
    want = F.conv2d(torch.cat([x, s], dim=1).double(), conv.weight.double(), None if b is None else b.double())
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)  # as conv2d_op's 1x1 GEMM makes it


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@torch.no_grad()
def test_split_shortcut_low_precision_within_2x_torch(dtype, layout):
    """Error vs fp64 <= 2x that of torch's own GEMM of the concatenation in the dtype (the split form rounds
    its partial sum once more: ~1.3x here)."""
    x, s = _parts(2, 48, 32, (5, 6), layout, dtype)
    conv = _conv(80, 40, dtype)
    y = split_shortcut(x, s, conv)
    cat = torch.cat([x, s], dim=1)
    ref = F.conv2d(cat.double(), conv.weight.double())
    theirs = F.linear(cat.permute(0, 2, 3, 1), conv.weight.flatten(1)).permute(0, 3, 1, 2)  # [N, H, W, Co] -> NCHW
    err = lambda t: float((t.double() - ref).norm() / ref.norm())
    assert err(y) <= 2 * err(theirs), (err(y), err(theirs))


@torch.no_grad()
def test_split_shortcut_copies_no_weight():
    """Large weight, few pixels: the only new memory is the output (W[:, :C1], W[:, C1:] are views)."""
    x, s = _parts(1, 96, 64, (2, 2), "channels_last")
    conv = _conv(160, 128)
    with LiveBytes() as mem:
        y = split_shortcut(x, s, conv)
    assert mem.peak == y.untyped_storage().nbytes(), (mem.peak, y.untyped_storage().nbytes())
    assert conv.weight.numel() * 4 > 10 * mem.peak  # a copy of either half would have shown
