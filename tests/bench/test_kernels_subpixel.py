"""`python -m speedsd.bench.kernels_subpixel --smoke` runs on CPU (interpreter) and writes its results."""

import json

from speedsd.bench import kernels_subpixel


def test_smoke_run_writes_results(tmp_path):
    assert kernels_subpixel.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels_subpixel.json").read_text())
    rows = data["rows"]
    assert [r["shape"] for r in rows] == ["1x16x8x8", "2x12x5x5", "1x4x36x36"] and data["errors"] == []
    for r in rows:
        t = r["heuristic"]
        assert r["correct"] and 0 < r["rel_err_b"] <= 2 * r["rel_err_a"] + 1e-6
        assert r["phases_bit_identical"] and not r["b_by_phase"]  # small shapes: one conv
        assert min(t["a_us"], t["b_us"], t["one_us"], t["phases_us"], t["c_us"], t["torch_us"]) > 0
    assert "| smoke | 1x4x36x36 | heuristic |" in (tmp_path / "kernels_subpixel.md").read_text()
