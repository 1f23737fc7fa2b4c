"""The cross-attention config sweep's grid and report (CPU: synthetic rows; the timing needs a GPU)."""

from __future__ import annotations

import re

import pytest

from speedsd.bench import cross_attention_sweep as sw
from speedsd.kernels.cross_attention import CrossConfig


@pytest.mark.parametrize("heads", [8, 5, 2])
def test_grid_configs_launch_on_these_heads(heads):
    grid = sw.config_grid(heads)
    assert len(grid) == len(set(grid)) >= 20
    assert all(heads % c.h_group == 0 and not c.chunk32 for c in grid)
    assert {c.block_m for c in grid} == {32, 64, 128} and {c.m_group for c in grid} == {1, 2, 4}
    assert any(c.h_group == heads for c in grid)  # every head in one program
    assert all(c.chunk32 for c in sw.config_grid(heads, chunk32=True))


def test_sweep_shapes_are_the_cross_shapes():
    assert [s[0] for s in sw.CROSS_SHAPES] == ["cross 4096x77 d40", "cross 1024x77 d80", "cross 256x77 d160"]


def test_markdown_ranks_correct_configs_and_prints_a_tuned_table():
    fast, slow, wrong = CrossConfig(128, 8), CrossConfig(64, 4, m_group=2, num_stages=2), CrossConfig(32, 4)
    rows = [
        {"name": "flash", "config": None, "us": 12.3, "rel_err": 2e-4, "ok": True},
        {"name": "cross", "config": repr(slow), "us": 7.0, "rel_err": 2e-4, "ok": True},
        {"name": "cross", "config": repr(fast), "us": 5.0, "rel_err": 2e-4, "ok": True},
        {"name": "cross", "config": repr(wrong), "us": 1.0, "rel_err": 0.3, "ok": False},
        {"name": "cross", "config": repr(CrossConfig(128, 4)), "error": "OutOfResources: shared memory"},
    ]
    shape = {"key": (4096, 77, 40), "rows": rows}
    shape["best"] = sw._best(rows)[0]["config"]
    md = sw.markdown({"shapes": {"cross 4096x77 d40": shape}})
    assert shape["best"] == repr(fast)
    assert md.index(repr(fast)) < md.index(repr(slow))
    assert "2 configs failed or were wrong" in md and "rel err 0.3" in md and "OutOfResources" in md
    block = re.search(r"```python\n(TUNED_CONFIGS = \{.*?\})\n```", md, re.S).group(1)
    scope: dict = {"CrossConfig": CrossConfig}
    exec(block, scope)
    assert scope["TUNED_CONFIGS"] == {(4096, 77, 40): fast}
