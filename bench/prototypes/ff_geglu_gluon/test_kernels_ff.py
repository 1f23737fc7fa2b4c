"""bench.kernels_ff: its Gluon candidates and a smoke run on CPU (the measurements run on the GPU:
``python kernels_ff.py``)."""

from __future__ import annotations

import json

import kernels_ff as kf


def test_gluon_candidates_are_valid_and_distinct():
    cfgs = kf.gluon_configs()
    assert len({str(c) for c in cfgs}) == len(cfgs) >= len(kf.GLUON_TILES)
    assert {(c.bm, c.bn, c.consumers) for c in cfgs if c.occupancy == 1 and not c.pingpong} == set(kf.GLUON_TILES)
    assert any(c.pingpong for c in cfgs)
    assert {c.occupancy for c in cfgs} == {0, 1, 2}
    assert all(c.smem_bytes() <= kf.fg.SMEM_LIMIT for c in cfgs)


def test_unet_shapes_are_sd1_ff1():
    """M = 2·h·w tokens at 64², 32², 16², 8²; K the level's channels; F = 4·K (SD-1's GEGLU inner width)."""
    assert [(m, k, f) for _, m, k, f, _ in kf.SHAPES] == [
        (2 * s * s, c, 4 * c) for s, c in ((64, 320), (32, 640), (16, 1280), (8, 1280))
    ]
    assert sum(calls for *_, calls in kf.SHAPES) == 16  # 16 transformer blocks in SD-1's UNet


def test_smoke_run_on_cpu(tmp_path):
    assert kf.main(["--smoke", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "kernels_ff.json").read_text())["rows"]
    assert row["best"] == "engine plan" and row["candidates"]["engine plan"]["ok"]
    assert (tmp_path / "kernels_ff.md").read_text().count("| smoke |") == 1
