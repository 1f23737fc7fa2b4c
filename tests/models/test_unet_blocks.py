"""The UNet up block with fused epilogues hands its ResNets cat([x, skip]) unformed (models/skip_concat.py):
same output as the concatenating path under every flag set that reaches it, no concatenation of activations,
and fewer live bytes in the ResNet block."""

from __future__ import annotations

import pytest
import torch

from interp_bounds import needs_interpreter
from memory_tracker import LiveBytes
from speedsd import ops
from speedsd.models.layers import ResnetBlock2D
from speedsd.models.skip_concat import Concat
from speedsd.models.unet_blocks import AttnSpec, UpBlock2D

pytestmark = [needs_interpreter, pytest.mark.usefixtures("one_thread")]

FAST = ops.PRESETS["fast"].replace(cuda_graphs=False)  # channels_last, GroupNorm kernel, fused epilogues
# label -> (flags, channels_last inputs): every flag set with fused epilogues reaches the unformed concat
FLAG_SETS = {
    "fast channels_last": (FAST, True),
    "kernels + fused epilogues, NCHW": (ops.Flags(group_norm=True, fused_epilogues=True, attention="sdpa"), False),
    "fused epilogues only (torch GroupNorm), NCHW": (ops.Flags(fused_epilogues=True, attention="sdpa"), False),
}
# 3 ResNets with 4 groups: 24+16 -> 16 (10 a group, group 2 straddles C1), 16+16 -> 16 (on a group edge),
# 16+8 -> 16 (6 a group: group 2 straddles); the UNet's two up-block kinds (with and without attention)
GROUPS, TEMB = 4, 12


def _block(attn: bool) -> UpBlock2D:
    torch.manual_seed(3)
    spec = AttnSpec(heads=2, dim_head=8, context_dim=10) if attn else None
    block = UpBlock2D(8, 24, 16, TEMB, 3, GROUPS, 1e-6, spec, add_upsample=True)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05 + 0.01)  # norms' affines != (1, 0), biases != 0
    return block.eval()


def _inputs(b: int, hw: tuple[int, int], cl: bool):
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g) * 2 + 0.5
    x, skips = r(b, 24, *hw), [r(b, 8, *hw), r(b, 16, *hw), r(b, 16, *hw)]
    if cl:
        x, skips = (
            x.contiguous(memory_format=torch.channels_last),
            [s.contiguous(memory_format=torch.channels_last) for s in skips],
        )
    return x, skips, r(b, TEMB), r(b, 5, 10)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("attn", [False, True], ids=["UpBlock2D", "CrossAttnUpBlock2D"])
@pytest.mark.parametrize("label", list(FLAG_SETS))
@torch.inference_mode()
def test_up_block_matches_concatenating_path(label, attn):
    flags, cl = FLAG_SETS[label]
    block = _block(attn)
    x, skips, temb, ctx = _inputs(2, (5, 3), cl=False)
    want = block(x, skips, temb, ctx)  # the baseline flags: torch.cat, plain ops
    if cl:
        block = block.to(memory_format=torch.channels_last)
        x, skips, temb, ctx = _inputs(2, (5, 3), cl=True)
    skips0 = [s.clone() for s in skips]
    with ops.using(flags):
        got = block(x, skips, temb, ctx)
    assert all(torch.equal(s, s0) for s, s0 in zip(skips, skips0))  # the skips are read, never written
    assert _rel(got, want) < 1e-5, _rel(got, want)


@torch.inference_mode()
def test_fused_up_block_never_concatenates(monkeypatch):
    block = _block(attn=True).to(memory_format=torch.channels_last)
    x, skips, temb, ctx = _inputs(1, (4, 4), cl=True)
    real_cat = torch.cat
    cats = []

    def counting_cat(tensors, *args, **kwargs):
        if any(t.dim() == 4 for t in tensors):  # activations (a fused weight's rows are 2-D)
            cats.append([tuple(t.shape) for t in tensors])
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", counting_cat)
    with ops.using(FAST):
        fused = block(x, skips, temb, ctx)
    assert cats == []
    with ops.using(FAST.replace(fused_epilogues=False)):
        plain = block(x, skips, temb, ctx)
    assert len(cats) == 3  # the same block concatenates once a ResNet without fused epilogues
    assert _rel(fused, plain) < 1e-5


@torch.inference_mode()
def test_resnet_concat_box_peak_live_bytes():
    """U = one [1, 8, H, W] channels_last activation. ResNet 24+16 -> 16 (x 3U, skip 2U, output 2U), the skip
    held by the caller (the UNet's list), x made in the caller's scope and handed on as in UpBlock2D.
    Concatenating: the concatenation (5U) lives to the end beside norm1's output (5U) and conv1's (2U): >= 12U.
    Unformed: x + norm1's output + the shortcut, then norm1's output + shortcut + conv1's output: 10U."""
    torch.manual_seed(5)
    block = ResnetBlock2D(40, 16, TEMB, GROUPS).eval().to(memory_format=torch.channels_last)
    hw = (16, 12)
    cl = torch.channels_last
    skip = torch.randn(1, 16, *hw).contiguous(memory_format=cl)
    x0 = torch.randn(1, 24, *hw).contiguous(memory_format=cl)
    temb = torch.randn(1, TEMB)
    u = 8 * hw[0] * hw[1] * 4

    def concatenated():
        x = x0.clone()  # (new memory: counted)
        x = torch.cat([x, skip], dim=1)
        return block(x, temb, hand_over=False)

    def unformed():
        x = x0.clone()  # (new memory: counted)
        x = Concat(x, skip)  # the caller keeps only the box (UpBlock2D rebinds x the same way)
        return block(x, temb, hand_over=False)

    with ops.using(FAST):
        want = unformed()  # warm: caches made on the first call are not activations
        with LiveBytes() as plain:
            y = concatenated()
            del y
        with LiveBytes() as box:
            got = unformed()
    assert torch.equal(got, want)
    assert plain.peak >= 12 * u, (plain.peak / u, box.peak / u)
    assert 10 * u <= box.peak <= 10 * u + u // 8, (box.peak / u, plain.peak / u)
