"""bias + residual add that hands its output's GroupNorm statistics to the next GroupNorm.

The plans are forced to the split paths with small tiles (on CPU the heuristic would pick one-launch
plans for these small shapes): the producer and GroupNorm must then agree bit for bit with GroupNorm
computing the statistics itself, and the statistics launch must not run.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from forced_plans import SPLIT_PLANS, SPLIT_SHAPES, force_plans

gn = importlib.import_module("speedsd.kernels.group_norm")
ags = importlib.import_module("speedsd.kernels.add_gn_stats")
ba = importlib.import_module("speedsd.kernels.bias_add")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES, PLANS = SPLIT_SHAPES, SPLIT_PLANS


@pytest.fixture
def forced_plan(monkeypatch, request):
    force_plans(monkeypatch, **PLANS[request.param])
    return request.param


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the statistics kernel ran although the producer wrote the statistics")


def _inputs(shape, layout, dtype):
    def rnd(*s, mean=0.0, std=1.0):
        return (torch.randn(s, dtype=torch.float64) * std + mean).to(dtype).to(DEVICE)

    h, r = rnd(*shape, mean=1.5, std=2.0), rnd(*shape, mean=-0.5, std=1.0)
    if layout == "channels_last":
        h, r = h.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    return h, rnd(shape[1], mean=0.3), r


def _affine(c, dtype):
    return torch.linspace(0.5, 1.5, c, dtype=dtype, device=DEVICE), torch.linspace(
        -0.2, 0.2, c, dtype=dtype, device=DEVICE
    )


@pytest.mark.parametrize("forced_plan", list(PLANS), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("label,shape,groups", SHAPES, ids=[s[0] for s in SHAPES])
def test_shared_statistics_match_group_norm_bit_for_bit(monkeypatch, forced_plan, label, shape, groups, layout, dtype):
    if forced_plan == "grouped" and layout == "nchw":
        pytest.skip("the grouped plan is channels_last only")
    h, b, r = _inputs(shape, layout, dtype)
    w, gb = _affine(shape[1], dtype)
    y_plain = ba.bias_add(h, b, r)
    want = gn.group_norm(y_plain, groups, w, gb, 1e-5, silu=True)

    y = ags.add_with_group_norm_stats(h.clone(), b, r, groups)
    assert torch.equal(y, y_plain)  # the add itself: fp32 sum, one rounding, as bias_add
    assert y.stride() == h.stride()
    monkeypatch.setattr(gn, "_gn_stats_kernel", _NoLaunch())
    monkeypatch.setattr(gn, "_gn_rows_cl_stats_kernel", _NoLaunch())
    got = gn.group_norm(y, groups, w, gb, 1e-5, silu=True)
    assert torch.equal(got, want)
    assert not hasattr(y, ags.ATTR)  # consumed


@pytest.mark.parametrize("forced_plan", list(PLANS), indirect=True)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_group_norm_in_place_takes_the_statistics_first(monkeypatch, forced_plan, layout):
    """GroupNorm writing over the tensor that carries the statistics (the VAE decoder's norm1)."""
    if forced_plan == "grouped" and layout == "nchw":
        pytest.skip("the grouped plan is channels_last only")
    h, b, r = _inputs((1, 24, 7, 5), layout, torch.float32)
    w, gb = _affine(24, torch.float32)
    y = ags.add_with_group_norm_stats(h, b, r, 4)
    want = gn.group_norm(y.clone(), 4, w, gb, 1e-5, silu=True)  # a clone carries none: its own statistics
    monkeypatch.setattr(gn, "_gn_stats_kernel", _NoLaunch())
    monkeypatch.setattr(gn, "_gn_rows_cl_stats_kernel", _NoLaunch())
    got = gn.group_norm(y, 4, w, gb, 1e-5, silu=True, out=y)
    assert got is y and torch.equal(got, want)
    assert not hasattr(y, ags.ATTR)  # y now holds other values: its statistics are gone


@pytest.mark.parametrize("forced_plan", ["grouped"], indirect=True)
def test_in_place_and_stale_statistics_are_not_used(forced_plan):
    h, b, r = _inputs((2, 64, 8, 8), "channels_last", torch.float32)
    w, gb = _affine(64, torch.float32)
    y = ags.add_with_group_norm_stats(h, b, r, 32, out=h)
    assert y is h
    y.mul_(2.0)  # a torch in-place op bumps the version: the statistics are stale
    torch.testing.assert_close(gn.group_norm(y, 32, w, gb, 1e-5), gn.group_norm_ref(y, 32, w, gb, 1e-5))

    y = ags.add_with_group_norm_stats(h, b, r, 32)
    ba.bias_add(y, b, out=y)  # a Triton write in place does not bump it: the writer drops them
    assert not hasattr(y, ags.ATTR)
    torch.testing.assert_close(gn.group_norm(y, 32, w, gb, 1e-5), gn.group_norm_ref(y, 32, w, gb, 1e-5))

    y = ags.add_with_group_norm_stats(h, b, r, 32)
    torch.testing.assert_close(gn.group_norm(y, 16, w, gb, 1e-5), gn.group_norm_ref(y, 16, w, gb, 1e-5))
    y = ags.add_with_group_norm_stats(h, b, r, 32)
    add = torch.randn(2, 64, device=DEVICE)  # a pre-add changes the statistics: not used
    torch.testing.assert_close(
        gn.group_norm(y, 32, w, gb, 1e-5, add=add), gn.group_norm_ref(y, 32, w, gb, 1e-5, add=add)
    )


def test_one_launch_plans_are_a_plain_bias_add():
    h, b, r = _inputs((1, 32, 4, 4), "channels_last", torch.float32)  # fits one tile: no split path
    y = ags.add_with_group_norm_stats(h, b, None, 8)
    assert torch.equal(y, ba.bias_add(h, b)) and not hasattr(y, ags.ATTR)
    x3 = torch.randn(2, 5, 16, device=DEVICE)  # token tensors: plain bias_add
    torch.testing.assert_close(ags.add_with_group_norm_stats(x3, None, x3, 4), 2 * x3)


@pytest.mark.parametrize("forced_plan", ["blocks"], indirect=True)
def test_bad_arguments_raise(forced_plan):
    h, b, r = _inputs((2, 64, 8, 8), "nchw", torch.float32)
    with pytest.raises(ValueError, match="bias"):
        ags.add_with_group_norm_stats(h, b[:3], r, 32)
    with pytest.raises(ValueError, match="residual"):
        ags.add_with_group_norm_stats(h, b, r[:1], 32)
    with pytest.raises(ValueError, match="out"):
        ags.add_with_group_norm_stats(h, b, r, 32, out=torch.empty(2, 64, 8, 9, device=DEVICE))
    assert math.isfinite(float(ags.add_with_group_norm_stats(h, b, r, 32).sum()))
