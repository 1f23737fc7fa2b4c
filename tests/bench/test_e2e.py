"""`speedsd bench` runs end to end on a tiny model on CPU and writes its JSON + markdown."""

import json

import torch

from speedsd.bench import e2e


def test_bench_runs_on_tiny_model(tmp_path):
    rc = e2e.main(
        [
            "--model",
            "random:tiny",
            "--size",
            "32",
            "--steps",
            "2",
            "--reps",
            "2",
            "--no-peers",
            "--rows",
            "baseline",
            "--out",
            str(tmp_path),
            "--name",
            "tiny",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    row = data["ablation"][0]
    assert row["row"] == "baseline" and row["image_ms"] > 0 and row["unet_step_ms"] > 0
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    assert data["environment"]["card"].startswith(card)
    md = (tmp_path / "tiny.md").read_text()
    assert "| baseline |" in md
    assert (tmp_path / "tiny.png").stat().st_size > 1000  # the bar chart


def test_ablation_rows_add_one_optimization_each():
    rows = e2e.ablation()
    assert rows[0][1] == rows[0][1].__class__()  # baseline: all off
    assert rows[-1][1].cuda_graphs and rows[-1][1].channels_last and rows[-1][1].group_norm
