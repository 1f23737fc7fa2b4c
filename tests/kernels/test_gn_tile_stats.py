"""GroupNorm from a producer's per-tile statistics (kernels/gn_tile_stats.py).

The partials come from ``tile_stats_ref`` (what the Gluon conv's epilogue writes; the kernel's own
partials are checked against it on the GPU in test_conv_gluon.py). Here: the merge launch against fp64
statistics on odd shapes (partial edge tiles, channels per group not a power of two), the apply launch
against its reference (fp16/fp32, SiLU, in place), GroupNorm and the folded affine taking the hand-over,
and every way the hand-over must be refused (other group count, a changed tensor, a pre-add).
"""

from __future__ import annotations

import pytest
import torch

from speedsd.kernels import gn_tile_stats as ts
from speedsd.kernels.bias_add import GN_STATS_ATTR
from speedsd.kernels.group_norm import group_norm, group_norm_ref
from speedsd.kernels.group_norm_affine import group_norm_scale_shift, group_norm_scale_shift_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last

# (label, [N, C, H, W], groups, (th, tw, row sets a tile)): real VAE tilings scaled down (8 warps a tile),
# edge tiles, CPG 1/3/12/16
SHAPES = [
    ("vae-like-16x16-tiles-8-warps", (1, 128, 32, 32), 32, (16, 16, 8)),
    ("B2-edge-tiles-8-warps", (2, 64, 9, 17), 32, (8, 16, 8)),
    ("cpg3-one-tile", (1, 96, 5, 7), 32, (8, 16, 1)),
    ("cpg12-8-groups-4-warps", (2, 96, 12, 20), 8, (8, 8, 4)),
    ("cpg16-512", (1, 512, 8, 8), 32, (8, 16, 4)),
    ("cpg1-many-tiles", (1, 32, 40, 24), 32, (8, 8, 1)),
]
# (label, dtype, atol, rtol) of the normalised output vs fp64 GroupNorm of the same input
DTYPES = [("fp32", torch.float32, 1e-4, 1e-4), ("fp16", torch.float16, 4e-3, 4e-3)]


def _input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 1.5  # non-zero mean
    return x.to(dtype).to(DEVICE).contiguous(memory_format=CL)


def _affine(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, generator=g, dtype=torch.float64) * 0.5 + 1.0
    return w.half().to(DEVICE), (torch.randn(c, generator=g, dtype=torch.float64) * 0.5 + 0.2).half().to(DEVICE)


def _handed_over(x, groups, tile):
    return ts.attach(x, ts.tile_stats_ref(x, groups, *tile), groups)  # tile = (th, tw, row sets)


def test_tile_stats_ref_is_per_tile_and_row_set():
    x = _input((1, 4, 3, 5), torch.float32)
    part = ts.tile_stats_ref(x, 2, 2, 4)  # tiles: rows {0,1},{2} x cols {0..3},{4}
    assert part.shape == (3, 1, 2, 4)
    tile = x[0, 2:4, 2:3, 4:5].double()  # group 1, tile (1, 1)
    torch.testing.assert_close(part[0, 0, 1, 3].double(), tile.mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(part[1, 0, 1, 3].double(), ((tile - tile.mean()) ** 2).sum(), atol=1e-5, rtol=1e-6)
    assert part[2, 0, 1, 3].item() == 2  # 1 pixel x 2 channels
    y = _input((1, 2, 9, 8), torch.float32)  # one 8 x 8 tile + a clipped one; rows of 16 pixels to 2 sets
    part = ts.tile_stats_ref(y, 1, 8, 8, 2)
    assert part.shape == (3, 1, 1, 4)
    rows1 = y[0, :, [2, 3, 6, 7]].double()  # tile 0, row set 1: pixels 16..31 and 48..63 = image rows 2, 3, 6, 7
    torch.testing.assert_close(part[0, 0, 0, 1].double(), rows1.mean(), atol=1e-6, rtol=1e-6)
    assert part[2, 0, 0].tolist() == [64, 64, 16, 0]  # the clipped tile: row 8 in set 0, nothing in set 1


@pytest.mark.parametrize("label,shape,groups,tile", SHAPES, ids=[s[0] for s in SHAPES])
def test_merge_matches_fp64_statistics(label, shape, groups, tile):
    x = _input(shape, torch.float16)
    w, b = _affine(shape[1])
    stats = ts.TileStats(groups, x._version, ts.tile_stats_ref(x, groups, *tile))
    scale, shift = stats.scale_shift(x, groups, w, b, 1e-6)
    want = group_norm_scale_shift_ref(x.double(), groups, w.double(), b.double(), 1e-6)
    torch.testing.assert_close(scale.double(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shift.double(), want[1], atol=1e-5, rtol=1e-5)
    plain = stats.scale_shift(x, groups, None, None, 1e-6)  # no affine: rstd and -mean·rstd
    torch.testing.assert_close(plain[0].double(), want[0] / w.double(), atol=1e-5, rtol=1e-5)


# per channel (a Gluon conv tile of bn + bn1 channels): the UNet's 64² / 32² GroupNorms scaled down (CPG 10 and
# 20, 4 warps a tile), an edge tile, CPG 1
CHAN_SHAPES = [
    ("unet64-like-cpg10", (2, 320, 16, 16), 32, (8, 8, 4)),
    ("unet32-like-cpg20-edge-tiles", (2, 640, 9, 12), 32, (8, 8, 4)),
    ("cpg1-one-warp", (1, 32, 5, 7), 32, (8, 16, 1)),
]


@pytest.mark.parametrize("label,shape,groups,tile", CHAN_SHAPES, ids=[s[0] for s in CHAN_SHAPES])
def test_merge_of_per_channel_partials(label, shape, groups, tile):
    """[3, N, P, C] partials (chan_stats_ref): the same merge as the per-group ones, to fp64's statistics; refused
    where the layout does not fit x."""
    x = _input(shape, torch.float16)
    w, b = _affine(shape[1])
    part = ts.chan_stats_ref(x, *tile)
    assert part.shape == (3, shape[0], part.shape[2], shape[1])
    torch.testing.assert_close(part.permute(0, 1, 3, 2), ts.tile_stats_ref(x, shape[1], *tile))
    stats = ts.TileStats(groups, x._version, part, per_channel=True)
    scale, shift = stats.scale_shift(x, groups, w, b, 1e-6)
    want = group_norm_scale_shift_ref(x.double(), groups, w.double(), b.double(), 1e-6)
    torch.testing.assert_close(scale.double(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shift.double(), want[1], atol=1e-5, rtol=1e-5)
    wrong = ts.TileStats(groups, x._version, part[:, :, :, : shape[1] // 2].contiguous(), per_channel=True)
    assert wrong.scale_shift(x, groups, w, b, 1e-6) is None
    y = ts.attach(x, part, groups, per_channel=True)  # through GroupNorm's hand-over
    got = group_norm(y, groups, w, b, 1e-6, silu=True)
    assert not hasattr(y, GN_STATS_ATTR)
    want_gn = group_norm_ref(x.double(), groups, w.double(), b.double(), 1e-6, silu=True)
    torch.testing.assert_close(got.double(), want_gn, atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("silu", [False, True], ids=["affine", "silu"])
@pytest.mark.parametrize("dlabel,dtype,atol,rtol", DTYPES, ids=[d[0] for d in DTYPES])
@pytest.mark.parametrize("label,shape,groups,tile", SHAPES[:3], ids=[s[0] for s in SHAPES[:3]])
def test_group_norm_takes_the_hand_over(label, shape, groups, tile, dlabel, dtype, atol, rtol, silu):
    x = _handed_over(_input(shape, dtype), groups, tile)
    w, b = _affine(shape[1])
    want = group_norm_ref(x.double(), groups, w.double(), b.double(), 1e-6, silu=silu)
    out = torch.full_like(x, float("nan"))
    got = group_norm(x, groups, w, b, 1e-6, silu=silu, out=out)
    assert got is out and got.is_contiguous(memory_format=CL)
    assert not hasattr(x, GN_STATS_ATTR), "the hand-over is consumed"
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    # the same through GroupNorm's own statistics: the two agree to rounding
    torch.testing.assert_close(got, group_norm(x, groups, w, b, 1e-6, silu=silu), atol=atol, rtol=rtol)


def test_group_norm_in_place_and_scale_shift():
    shape, groups, tile = SHAPES[1][1:]
    x = _handed_over(_input(shape, torch.float16), groups, tile)
    w, b = _affine(shape[1])
    want = group_norm_ref(x.double(), groups, w.double(), b.double(), 1e-6, silu=True)
    assert group_norm(x, groups, w, b, 1e-6, silu=True, out=x) is x
    torch.testing.assert_close(x.double(), want, atol=4e-3, rtol=4e-3)
    y = _handed_over(_input(shape, torch.float16, seed=3), groups, tile)
    got = group_norm_scale_shift(y, groups, w, b, 1e-6)
    want = group_norm_scale_shift_ref(y.double(), groups, w.double(), b.double(), 1e-6)
    assert not hasattr(y, GN_STATS_ATTR)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


def test_refused_hand_overs_still_normalise_correctly():
    shape, groups, tile = SHAPES[0][1:]
    w, b = _affine(shape[1])
    # another group count: refused, GroupNorm(16) from its own statistics
    x = _handed_over(_input(shape, torch.float32), groups, tile)
    want16 = group_norm_ref(x.double(), 16, w.double(), b.double(), 1e-6)
    torch.testing.assert_close(group_norm(x, 16, w, b, 1e-6).double(), want16, atol=1e-4, rtol=1e-4)
    assert not hasattr(x, GN_STATS_ATTR)
    # a tensor changed after the hand-over (a version counter: not an inference tensor): refused
    x = _handed_over(_input(shape, torch.float32), groups, tile)
    x.mul_(-1.0)
    want = group_norm_ref(x.double(), groups, w.double(), b.double(), 1e-6)
    torch.testing.assert_close(group_norm(x, groups, w, b, 1e-6).double(), want, atol=1e-4, rtol=1e-4)
    # a pre-add: the partials are of x, not x + add: not used (and kept: still x's)
    x = _handed_over(_input(shape, torch.float32), groups, tile)
    add = torch.linspace(-1, 1, shape[1], device=DEVICE)
    want = group_norm_ref(x.double() + add.double()[:, None, None], groups, w.double(), b.double(), 1e-6)
    torch.testing.assert_close(group_norm(x, groups, w, b, 1e-6, add=add).double(), want, atol=1e-4, rtol=1e-4)
    # partials of another sample count: refused
    x = _input(shape, torch.float32)
    ts.attach(x, ts.tile_stats_ref(torch.cat([x, x]), groups, *tile), groups)
    want = group_norm_ref(x.double(), groups, w.double(), b.double(), 1e-6)
    torch.testing.assert_close(group_norm(x, groups, w, b, 1e-6).double(), want, atol=1e-4, rtol=1e-4)


def test_any_partition_with_empty_parts_merges_exactly():
    """The merge needs only (mean, M2, count) per part: a random partition of each group's values into 37 parts,
    some empty, gives the group's statistics."""
    n, c, groups = 2, 48, 6
    x = _input((n, c, 7, 9), torch.float32)
    vals = x.double().cpu().reshape(n, groups, -1)  # [N, G, CPG·H·W]
    g = torch.Generator().manual_seed(5)
    label = torch.randint(0, 40, vals.shape[-1:], generator=g) % 37  # parts 0..36; a few may be empty
    part = torch.zeros(3, n, groups, 40, dtype=torch.float64)
    for p in range(40):
        v = vals[..., label == p]
        if v.shape[-1]:
            part[0, ..., p], part[2, ..., p] = v.mean(-1), v.shape[-1]
            part[1, ..., p] = ((v - v.mean(-1, keepdim=True)) ** 2).sum(-1)
    assert (part[2] == 0).any(), "some parts are empty"
    stats = ts.TileStats(groups, x._version, part.float().to(DEVICE))
    w, b = _affine(c)
    got = stats.scale_shift(x, groups, w, b, 1e-6)
    want = group_norm_scale_shift_ref(x.double(), groups, w.double(), b.double(), 1e-6)
    for g_, r in zip(got, want):
        torch.testing.assert_close(g_.double(), r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("silu", [False, True], ids=["affine", "silu"])
@pytest.mark.parametrize("dlabel,dtype,atol,rtol", DTYPES, ids=[d[0] for d in DTYPES])
@pytest.mark.parametrize("shape", [(1, 128, 32, 32), (2, 96, 5, 7), (1, 3, 4, 4)], ids=["C128", "C96-odd", "C3"])
def test_affine_act_matches_reference(shape, dlabel, dtype, atol, rtol, silu):
    x = _input(shape, dtype)
    g = torch.Generator().manual_seed(2)
    scale = (torch.randn(shape[:2], generator=g) * 0.5 + 1).to(DEVICE)
    shift = (torch.randn(shape[:2], generator=g) - 0.3).to(DEVICE)
    want = ts.affine_act_ref(x.double(), scale.double(), shift.double(), silu)
    got = ts.affine_act(x, scale, shift, silu)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    assert ts.affine_act(x, scale, shift, silu, out=x) is x
    torch.testing.assert_close(x, got, atol=0, rtol=0)


def test_affine_act_rejects_bad_operands():
    x = _input((1, 8, 4, 4), torch.float16)
    s = torch.ones(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="channels_last"):
        ts.affine_act(x.contiguous(), s, s, False)
    with pytest.raises(ValueError, match="scale must be"):
        ts.affine_act(x, s.half(), s, False)
    with pytest.raises(ValueError, match="shift must be"):
        ts.affine_act(x, s, torch.ones(8, device=DEVICE), False)
    with pytest.raises(ValueError, match="out must match"):
        ts.affine_act(x, s, s, False, out=torch.empty_like(x).contiguous())
