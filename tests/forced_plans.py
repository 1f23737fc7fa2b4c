"""Forcing GroupNorm's split plans in tests: on CPU the heuristic picks one-launch plans for small shapes,
so the tests of the split path's statistics (the producing add's hand-over, the folded affine, the output
heads) force split plans with small tiles and several chunks."""

from __future__ import annotations

import importlib

import pytest

# (label, shape, groups): SD's channel/group ratio and odd shapes
SPLIT_SHAPES = [
    ("sd-ratio 2x64x8x8 G32", (2, 64, 8, 8), 32),
    ("odd C48 G8 3x48x7x5", (3, 48, 7, 5), 8),
    ("odd C40 G4 1x40x9x11", (1, 40, 9, 11), 4),
]
# forced split plans: channels_last whole rows ("grouped") and group blocks
SPLIT_PLANS = {
    "grouped": dict(path="split", tile=64, programs=6, grouped=True),
    "blocks": dict(path="split", tile=64, programs=6, grouped=False, warps=2),
}
_PLANNERS = ("group_norm", "add_gn_stats", "group_norm_affine")  # the modules that call plan_for


def force_plans(monkeypatch: pytest.MonkeyPatch, **knobs: object) -> None:
    """Every GroupNorm plan lookup returns plan_group_norm(..., sm_count=4, **knobs)."""
    gn = importlib.import_module("speedsd.kernels.group_norm")

    def plan_for(n, c, s, groups, cl, itemsize, device):
        return gn.plan_group_norm(n, c, s, groups, cl, itemsize, 4, **knobs)

    for name in _PLANNERS:
        monkeypatch.setattr(importlib.import_module(f"speedsd.kernels.{name}"), "plan_for", plan_for)
