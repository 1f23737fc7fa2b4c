"""GroupNorm folded into a per-(sample, channel) affine (kernels/group_norm_affine.py).

The plans are forced to the split paths with small tiles and several chunks (on CPU the heuristic would
pick one-launch plans for these small shapes, for which the function returns None).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from forced_plans import SPLIT_PLANS, SPLIT_SHAPES, force_plans

gn = importlib.import_module("speedsd.kernels.group_norm")
gna = importlib.import_module("speedsd.kernels.group_norm_affine")
ags = importlib.import_module("speedsd.kernels.add_gn_stats")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES, PLANS = SPLIT_SHAPES, SPLIT_PLANS
# (label, dtype, atol, rtol) on scale and shift against fp64 statistics of the same input
DTYPES = [("fp32", torch.float32, 1e-5, 1e-5), ("fp16", torch.float16, 1e-5, 1e-5)]


@pytest.fixture
def forced_plan(monkeypatch, request):
    force_plans(monkeypatch, **PLANS[request.param])
    return request.param


def _input(shape, layout, dtype, mean=1.5, std=2.0):
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)
    return (x.to(memory_format=torch.channels_last) if layout == "channels_last" else x).to(DEVICE)


def _affine(c, dtype):
    w = (torch.randn(c, dtype=torch.float64) * 0.5 + 1.0).to(dtype).to(DEVICE)
    return w, (torch.randn(c, dtype=torch.float64) * 0.5 + 0.2).to(dtype).to(DEVICE)


@pytest.mark.parametrize("forced_plan", list(PLANS), indirect=True)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dlabel,dtype,atol,rtol", DTYPES, ids=[d[0] for d in DTYPES])
@pytest.mark.parametrize("label,shape,groups", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_fp64_statistics(label, shape, groups, dlabel, dtype, atol, rtol, layout, forced_plan):
    x = _input(shape, layout, dtype)
    w, b = _affine(shape[1], dtype)
    got = gna.group_norm_scale_shift(x, groups, w, b, 1e-5)
    assert got is not None
    want = gna.group_norm_scale_shift_ref(x.double(), groups, w.double(), b.double(), 1e-5)
    for g, r in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == shape[:2]
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol)


@pytest.mark.parametrize("forced_plan", list(PLANS), indirect=True)
@pytest.mark.parametrize("affine", ["both", "none"])
def test_folded_affine_is_group_norm(affine, forced_plan):
    """x·scale + shift is GroupNorm(x)·w + b (no weight / bias: 1 / 0)."""
    shape, groups = (2, 48, 7, 5), 8
    x = _input(shape, "channels_last", torch.float32)
    w, b = _affine(shape[1], torch.float32) if affine == "both" else (None, None)
    scale, shift = gna.group_norm_scale_shift(x, groups, w, b, 1e-5)
    y = x * scale[:, :, None, None] + shift[:, :, None, None]
    torch.testing.assert_close(y, gn.group_norm(x, groups, w, b, 1e-5), atol=2e-5, rtol=2e-5)


def test_large_mean_small_spread(monkeypatch):
    """mean 300, std 0.1: the merged statistics stay two-pass stable (rstd ~10, so shift ~ -3000)."""
    force_plans(monkeypatch, **PLANS["blocks"])
    x = _input((2, 16, 9, 7), "nchw", torch.float32, mean=300.0, std=0.1)
    scale, shift = gna.group_norm_scale_shift(x, 4, None, None, 1e-5)
    want = gna.group_norm_scale_shift_ref(x.double(), 4, None, None, 1e-5)
    torch.testing.assert_close(scale.double(), want[0], atol=0, rtol=2e-3)
    y = x.double() * scale.double()[:, :, None, None] + shift.double()[:, :, None, None]
    y_ref = x.double() * want[0][:, :, None, None] + want[1][:, :, None, None]
    assert (y - y_ref).abs().max() < 5e-3  # |x·scale| ~ 3000: fp32 rounding of shift is ~2e-4


class _NoLaunch:
    def __call__(self, *args, **kwargs):
        raise AssertionError("a statistics launch ran although the producer wrote the statistics")


@pytest.mark.parametrize("forced_plan", list(PLANS), indirect=True)
def test_takes_the_producers_statistics(monkeypatch, forced_plan):
    shape, groups = (2, 48, 7, 5), 8
    h = _input(shape, "channels_last", torch.float16)
    r = _input(shape, "channels_last", torch.float16, mean=-0.5, std=1.0)
    w, b = _affine(shape[1], torch.float16)
    y = ags.add_with_group_norm_stats(h, None, r, groups)
    own = gna.group_norm_scale_shift(y.clone(), groups, w, b, 1e-5)  # a clone carries no statistics
    monkeypatch.setattr(gna, "split_partials", _NoLaunch())
    shared = gna.group_norm_scale_shift(y, groups, w, b, 1e-5)
    assert torch.equal(shared[0], own[0]) and torch.equal(shared[1], own[1])


def test_one_launch_plans_and_non_dense_inputs_give_none():
    x = _input((2, 32, 4, 4), "channels_last", torch.float32)  # the heuristic: one register tile
    assert gn.plan_for(2, 32, 16, 8, True, 4, x.device).path != "split"
    assert gna.group_norm_scale_shift(x, 8, None, None, 1e-5) is None
    assert gna.group_norm_scale_shift(x[:, :, :, :3], 8, None, None, 1e-5) is None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="divisible"):
        gna.group_norm_scale_shift(torch.zeros(1, 6, 4, 4, device=DEVICE), 4, None, None, 1e-5)
    with pytest.raises(ValueError, match="N, C"):
        gna.group_norm_scale_shift(torch.zeros(4, 8, device=DEVICE), 4, None, None, 1e-5)
