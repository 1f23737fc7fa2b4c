"""The channels_last ``rows`` GroupNorm kernels (kernels/group_norm_rows.py) against the fp64/fp32 torch
reference, under the Triton interpreter on CPU: odd shapes, every option (SiLU, weight/bias, pre-add,
two sources, producer mode), several row chunks and tiles a chunk, outputs poisoned."""

from __future__ import annotations

import importlib

import pytest
import torch

from precision import assert_low_precision_ok
from speedsd.kernels.group_norm import _dual_args, group_norm, group_norm_ref
from speedsd.kernels.group_norm_rows import rows_apply, rows_stats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (label, N, C, H, W, groups): CPG 10 like SD's 320 channels, odd spatial sizes, a group of 1 channel, CPG 40
SHAPES = [
    ("sd320_cpg10", 2, 40, 6, 5, 4),
    ("odd_cpg3", 1, 12, 7, 3, 4),
    ("cpg1", 2, 8, 4, 4, 8),
    ("one_pixel", 2, 16, 1, 1, 2),
    ("cpg40_onehot", 1, 80, 3, 4, 2),  # CPG > 32: the one-hot channel -> group step
]
# (chunks, block_s): one tile a chunk, several tiles a chunk, more chunks than rows fill
PLANS = [(1, 64), (3, 2), (16, 1)]


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _x(n: int, c: int, h: int, w: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _cl((torch.randn(n, c, h, w, generator=g) * 1.7 + 3.0).to(dtype).to(DEVICE))


def _run(x, groups, w, b, silu, chunks, block_s, add=None, concat=None, eps=1e-5):
    dual = _dual_args(x, concat) if concat is not None else None
    c = x.shape[1] + (concat.shape[1] if concat is not None else 0)
    a = (add, add.stride(0) if add.dim() == 2 else 0) if add is not None else None
    stats = rows_stats(x, groups, chunks, block_s, 4, add=a, dual=dual)
    out = _cl(torch.full((x.shape[0], c, *x.shape[2:]), float("nan"), dtype=x.dtype, device=x.device))
    return rows_apply(x, out, stats, groups, w, b, eps, silu, chunks, block_s, 4, add=a, dual=dual)


@pytest.mark.parametrize("label,n,c,h,w,groups", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("chunks,block_s", PLANS)
@pytest.mark.parametrize("silu", [False, True])
def test_rows_fp32_matches_reference(label, n, c, h, w, groups, chunks, block_s, silu):
    x = _x(n, c, h, w, torch.float32, seed=c + h)
    wt, bs = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    got = _run(x, groups, wt, bs, silu, chunks, block_s)
    want = group_norm_ref(x.double(), groups, wt.double(), bs.double(), silu=silu).float()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rows_low_precision_within_twice_torch(dtype):
    x = _x(2, 40, 6, 5, dtype, seed=3)
    wt, bs = torch.rand(40, device=DEVICE) + 0.5, torch.randn(40, device=DEVICE)
    got = _run(x, 4, wt, bs, True, 3, 2)
    want = group_norm_ref(x.double(), 4, wt.double(), bs.double(), silu=True)
    torch_low = group_norm_ref(x, 4, wt.to(dtype), bs.to(dtype), silu=True)
    assert_low_precision_ok(got, want, torch_low)


@pytest.mark.parametrize("add_rows", [1, 2])
def test_rows_pre_add(add_rows):
    x = _x(2, 40, 5, 5, torch.float32, seed=5)
    add = torch.randn(add_rows, 40, device=DEVICE).squeeze(0) * 4.0
    got = _run(x, 4, None, None, True, 3, 2, add=add)
    want = group_norm_ref(x.double(), 4, silu=True, add=add.double())
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("c1,c2,groups", [(24, 16, 4), (30, 10, 4), (8, 8, 2)])  # groups straddle c1 in (30, 10)
def test_rows_two_sources(c1, c2, groups):
    x1, x2 = _x(2, c1, 5, 3, torch.float32, seed=7), _x(2, c2, 5, 3, torch.float32, seed=8)
    wt, bs = torch.rand(c1 + c2, device=DEVICE) + 0.5, torch.randn(c1 + c2, device=DEVICE)
    got = _run(x1, groups, wt, bs, True, 3, 2, concat=x2)
    want = group_norm_ref(torch.cat([x1, x2], 1).double(), groups, wt.double(), bs.double(), silu=True)
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("has_b,has_r", [(True, True), (True, False), (False, True)])
def test_rows_producer_mode(has_b, has_r):
    x, r = _x(2, 40, 5, 6, torch.float16, seed=9), _x(2, 40, 5, 6, torch.float16, seed=10)
    b = torch.randn(40, device=DEVICE).half() if has_b else None
    y = torch.full_like(x, float("nan"))
    stats = rows_stats(x, 4, 3, 2, 4, produce=(b, r if has_r else None, y))
    want_y = x.float() + (b.float()[None, :, None, None] if has_b else 0) + (r.float() if has_r else 0)
    torch.testing.assert_close(y, want_y.half(), atol=0, rtol=0)
    out = torch.full_like(x, float("nan"))
    got = rows_apply(y, out, stats, 4, None, None, 1e-5, False, 2, 4, 4)
    torch.testing.assert_close(got.float(), group_norm_ref(y.double(), 4).float(), atol=3e-3, rtol=0)


def test_rows_large_mean_small_spread():
    """Shifted sums keep the variance when the mean is 1000x the spread (no E[x²] − E[x]² loss)."""
    g = torch.Generator().manual_seed(11)
    x = _cl(torch.randn(2, 40, 8, 8, generator=g, dtype=torch.float64) * 0.01 + 10.0).float().to(DEVICE)
    got = _run(x, 4, None, None, False, 4, 4)
    want = group_norm_ref(x.double(), 4).float()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_rows_path_matches_group_norm_api():
    x = _x(2, 40, 6, 5, torch.float32, seed=12)
    wt, bs = torch.rand(40, device=DEVICE) + 0.5, torch.randn(40, device=DEVICE)
    got = group_norm(x, 4, wt, bs, silu=True, path="rows", chunks=3, tile=64, apply_chunks=4, apply_tile=32)
    want = group_norm_ref(x.double(), 4, wt.double(), bs.double(), silu=True).float()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_rows_plan_hand_over_and_affine(monkeypatch):
    """A rows plan end to end through the engine's entry points: the producer's hand-over statistics are the
    ones the GroupNorm and the affine fold read (same values as recomputing them)."""
    import speedsd.kernels.group_norm_plan as gp
    from speedsd.kernels.add_gn_stats import add_with_group_norm_stats
    from speedsd.kernels.group_norm_affine import group_norm_scale_shift

    x, r = _x(2, 40, 6, 5, torch.float16, seed=13), _x(2, 40, 6, 5, torch.float16, seed=14)
    bias = torch.randn(40, device=DEVICE).half()
    wt, bs = torch.rand(40, device=DEVICE) + 0.5, torch.randn(40, device=DEVICE)
    plan = gp.plan_group_norm(2, 40, 30, 4, True, 2, 4, "rows", chunks=3, tile=64, apply_chunks=2, apply_tile=32)
    for mod in ("add_gn_stats", "group_norm", "group_norm_affine"):
        monkeypatch.setattr(importlib.import_module(f"speedsd.kernels.{mod}"), "plan_for", lambda *a: plan)
    y = add_with_group_norm_stats(x, bias, r, 4)
    want = group_norm_ref(y.double(), 4, wt.double(), bs.double(), silu=True)
    handed = group_norm(y, 4, wt, bs, silu=True)  # reads the hand-over
    assert_low_precision_ok(handed, want, group_norm_ref(y, 4, wt.half(), bs.half(), silu=True))
    torch.testing.assert_close(handed, group_norm(y, 4, wt, bs, silu=True), atol=0, rtol=0)  # recomputed
    scale, shift = group_norm_scale_shift(y, 4, wt, bs, 1e-5)
    folded = y.double() * scale.double()[:, :, None, None] + shift.double()[:, :, None, None]
    torch.testing.assert_close(folded, group_norm_ref(y.double(), 4, wt.double(), bs.double()), atol=1e-4, rtol=0)
