"""The sub-pixel interleave writing the next GroupNorm's partials (kernels/subpixel_conv.py, STATS).

The interleave's programs each write (mean, M2, count) of their groups' values; merged (kernels/gn_tile_stats.py)
they must give the statistics of the stored output: one conv or phase by phase, odd widths (masked columns),
batch 2, several channel blocks. Where the kernel cannot (NCHW, groups straddling its 128-channel blocks) no
statistics are handed over and the output is the same. Runs under the Triton interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch

from speedsd.kernels import gn_tile_stats as ts
from speedsd.kernels import subpixel_conv as sc
from speedsd.kernels.bias_add import GN_STATS_ATTR
from speedsd.kernels.group_norm import group_norm, group_norm_ref
from speedsd.kernels.group_norm_affine import group_norm_scale_shift_ref
from speedsd.kernels.subpixel_weight import subpixel_weight_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last

pytestmark = pytest.mark.usefixtures("one_thread")

# (label, (N, Ci, Co, H, W), groups): CPG 4 / 2 / 8, two channel blocks, odd widths
SHAPES = [
    ("cpg4-odd-7", (1, 8, 32, 5, 7), 8),
    ("B2-cpg2-odd-9", (2, 8, 64, 4, 9), 32),
    ("Co256-two-blocks-cpg8", (1, 16, 256, 3, 5), 32),
]
DTYPES = [("fp32", torch.float32, 1e-5), ("fp16", torch.float16, 1e-5)]


def _problem(shape, dtype, seed=0):
    n, ci, co, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, ci, h, w, generator=g) * 2 + 0.5).to(dtype).to(DEVICE).contiguous(memory_format=CL)
    weight = (torch.randn(co, ci, 3, 3, generator=g) / (3 * ci**0.5) + 0.02).to(dtype).to(DEVICE)
    bias = (torch.randn(co, generator=g) + 0.3).to(dtype).to(DEVICE)
    return x, subpixel_weight_ref(weight.contiguous(memory_format=CL)), bias


@pytest.mark.parametrize("by_phase", [False, True], ids=["one-conv", "by-phase"])
@pytest.mark.parametrize("dlabel,dtype,tol", DTYPES, ids=[d[0] for d in DTYPES])
@pytest.mark.parametrize("label,shape,groups", SHAPES, ids=[s[0] for s in SHAPES])
def test_interleave_statistics_are_the_outputs(label, shape, groups, dlabel, dtype, tol, by_phase):
    x, w4, bias = _problem(shape, dtype)
    plain = sc.subpixel_upsample_conv(x, w4, bias, by_phase=by_phase)
    y = sc.subpixel_upsample_conv(x, w4, bias, by_phase=by_phase, stats_groups=groups)
    assert torch.equal(y, plain), "statistics change nothing stored"
    stats = getattr(y, GN_STATS_ATTR)
    assert isinstance(stats, ts.TileStats) and stats.groups == groups
    n, _, co, h, w = shape
    assert stats.part[2].sum(-1).eq(co // groups * 4 * h * w).all(), "every value counted once"
    gw = (torch.randn(co) * 0.3 + 1).to(DEVICE)
    gb = (torch.randn(co) * 0.3).to(DEVICE)
    scale, shift = stats.scale_shift(y, groups, gw, gb, 1e-6)
    want = group_norm_scale_shift_ref(y.double(), groups, gw.double(), gb.double(), 1e-6)
    torch.testing.assert_close(scale.double(), want[0], atol=tol, rtol=tol)
    torch.testing.assert_close(shift.double(), want[1], atol=tol, rtol=tol)


def test_group_norm_after_the_upsampler():
    x, w4, bias = _problem((1, 8, 64, 4, 6), torch.float16)
    y = sc.subpixel_upsample_conv(x, w4, bias, stats_groups=32)
    want = group_norm_ref(y.double(), 32, None, None, 1e-6, silu=True)
    got = group_norm(y, 32, None, None, 1e-6, silu=True)
    assert not hasattr(y, GN_STATS_ATTR)
    torch.testing.assert_close(got.double(), want, atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize(
    "case", ["nchw", "groups-straddle-blocks", "reference-interleave"], ids=lambda c: c
)  # fmt: skip
def test_no_statistics_where_the_kernel_cannot(case):
    shape, groups = ((1, 8, 160, 3, 5), 2) if case == "groups-straddle-blocks" else ((1, 8, 32, 3, 5), 8)
    x, w4, bias = _problem(shape, torch.float32)
    kw = {"interleave": sc.phase_interleave_ref} if case == "reference-interleave" else {}
    if case == "nchw":
        x, w4 = x.contiguous(), w4.contiguous()
    y = sc.subpixel_upsample_conv(x, w4, bias, stats_groups=groups, **kw)
    assert not hasattr(y, GN_STATS_ATTR)
    torch.testing.assert_close(y, sc.subpixel_upsample_conv(x, w4, bias, **kw), atol=0, rtol=0)


def test_interleave_part_arguments_raise():
    p = torch.randn(1, 4 * 32, 4, 5).to(DEVICE).contiguous(memory_format=CL)
    parts = sc.stats_parts(tuple(p.shape), 32, 8, None, p.device)
    block_w = sc._cl_blocks(1, 3, 4, 32, None, p.device)[0]
    assert parts == 3 * -(-4 // block_w)  # a part per low-res row and column block
    with pytest.raises(ValueError, match="part: an fp32"):
        sc.phase_interleave(p, None, part=torch.empty(3, 1, 8, parts, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="part: an fp32"):
        sc.phase_interleave(p.contiguous(), None, part=torch.empty(3, 1, 8, parts, device=DEVICE))
    with pytest.raises(ValueError, match="exceed P"):
        sc.phase_interleave(p, None, part=torch.empty(3, 1, 8, parts, device=DEVICE), part_offset=1)
