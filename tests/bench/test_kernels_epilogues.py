"""`python -m speedsd.bench.kernels_epilogues --smoke` runs on CPU (interpreter) and writes its results."""

import json

from speedsd.bench import kernels_epilogues


def test_smoke_run_writes_results(tmp_path):
    assert kernels_epilogues.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels_epilogues.json").read_text())
    rows = data["rows"]
    ops = {(r["op"], r["layout"]) for r in rows}
    assert ops == {(op, lay) for op in ("bias", "bias+res", "upsample2x") for lay in ("channels_last", "nchw")}
    assert all(r["correct"] and r["ours_us"] > 0 and r["torch_us"] > 0 for r in rows)
    assert data["summary"]["correct"] == f"{len(rows)}/{len(rows)}" and data["errors"] == []
    assert "| upsample2x | smoke | 2x5x7x7 | nchw |" in (tmp_path / "kernels_epilogues.md").read_text()
