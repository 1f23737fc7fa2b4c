"""The skip-concatenation bench runs its smoke mode on CPU, writes JSON + markdown, and fails on a wrong kernel."""

import json

from interp_bounds import needs_interpreter
from speedsd.bench import kernels_skip_concat as bench

pytestmark = needs_interpreter


def test_smoke_run_writes_results(tmp_path):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernels_skip_concat.json").read_text())["rows"]
    assert [r["label"] for r in rows] == [s[0] for s in bench.SMOKE_SHAPES]
    assert all(r["correct"] and r["norm_bit_exact"] and r["before_us"] > 0 and r["after_us"] > 0 for r in rows)
    assert "| smoke 3² 40+24 | 1 |" in (tmp_path / "kernels_skip_concat.md").read_text()


def test_wrong_split_shortcut_fails_the_run(tmp_path, monkeypatch):
    real = bench.split_shortcut
    monkeypatch.setattr(bench, "split_shortcut", lambda x, s, conv: real(x, s, conv) * 1.01)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "kernels_skip_concat.json").read_text())["rows"]
    assert not any(r["correct"] for r in rows) and all(r["norm_bit_exact"] for r in rows)


def test_wrong_norm_fails_the_run(tmp_path, monkeypatch):
    real = bench.group_norm
    monkeypatch.setattr(bench, "group_norm", lambda *a, **kw: real(*a, **kw) * (1.01 if "concat" in kw else 1))
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "kernels_skip_concat.json").read_text())["rows"]
    assert not any(r["correct"] or r["norm_bit_exact"] for r in rows)
