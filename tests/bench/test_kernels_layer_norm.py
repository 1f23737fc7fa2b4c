"""The LayerNorm kernel bench runs its smoke mode on CPU, writes JSON + markdown, and fails on a wrong kernel."""

import json

from speedsd.bench import kernels_layer_norm as bench
from speedsd.kernels import layer_norm as ln


def test_smoke_run_writes_results(tmp_path):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels_layer_norm.json").read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} == set(bench.OPS) and len(rows) == 2 * len(bench.SMOKE_SHAPES)
    assert all(r["correct"] and r["ours_us"] > 0 and r["torch_us"] > 0 for r in rows)
    assert all(r["best_tile"] in r["tiles_us"] for r in rows)
    assert all(r["s_max_ulps"] == 0 for r in rows if r["op"] == "add_layer_norm")
    md = (tmp_path / "kernels_layer_norm.md").read_text()
    assert "| add_layer_norm | 2x16x96 |" in md


def test_wrong_residual_sum_fails_the_run(tmp_path, monkeypatch):
    real = ln.add_layer_norm

    def two_ulps_high(*args, **kwargs):  # s two ulps high: y still fine, s is not
        s, y = real(*args, **kwargs)
        return s + 2 * bench._ulp(s).to(s.dtype), y

    monkeypatch.setattr(ln, "add_layer_norm", two_ulps_high)
    assert bench.main(["--smoke", "--no-sweep", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "kernels_layer_norm.json").read_text())["rows"]
    assert [r["correct"] for r in rows] == [op == "layer_norm" for op in (r["op"] for r in rows)]
