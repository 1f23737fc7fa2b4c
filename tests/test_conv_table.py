"""The per-card conv table: what the bench records is what ops' dispatch reads."""

from __future__ import annotations

import torch

from speedsd import conv_table
from speedsd.bench.kernels_conv import table_entries
from speedsd.kernels.conv_igemm import IgemmConfig


def _row(shape, n, best_ms, cudnn_ms, ok=True, config="m64n128k128s6w8p4"):
    return {"x_shape": list(shape), "n": n, "kernel": 3, "stride": 1, "padding": 1, "ok": ok,
            "best_config": config, "best_ms": best_ms, "cudnn_ms": cudnn_ms}  # fmt: skip


def test_recorded_winners_are_chosen_per_card(tmp_path, monkeypatch):
    path = tmp_path / "conv_table.json"
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    monkeypatch.setattr(conv_table, "card_name", lambda device: "Card A")
    rows = [
        _row((2, 1280, 8, 8), 1280, 0.020, 0.023),  # faster and correct: Triton
        _row((2, 1280, 16, 16), 1280, 0.050, 0.033),  # slower: cuDNN
        _row((1, 128, 64, 64), 3, 0.010, 0.020, ok=False),  # faster but not accurate enough: cuDNN
    ]
    conv_table.merge_into(path, "Card A", table_entries(rows, torch.float16))
    conv_table.merge_into(path, "Card B", table_entries(rows[:1], torch.float16))
    dev = torch.device("cpu")
    assert conv_table.choose((2, 1280, 8, 8), 1280, 3, 1, 1, torch.float16, dev) == IgemmConfig.parse(
        "m64n128k128s6w8p4"
    )
    assert conv_table.choose((2, 1280, 16, 16), 1280, 3, 1, 1, torch.float16, dev) is None
    assert conv_table.choose((1, 128, 64, 64), 3, 3, 1, 1, torch.float16, dev) is None
    assert conv_table.choose((2, 1280, 8, 8), 1280, 3, 1, 1, torch.float32, dev) is None  # other dtype
    assert conv_table.choose((2, 1280, 8, 8), 1280, 3, 2, 1, torch.float16, dev) is None  # other stride
    monkeypatch.setattr(conv_table, "card_name", lambda device: "Card C")
    assert conv_table.choose((2, 1280, 8, 8), 1280, 3, 1, 1, torch.float16, dev) is None  # unknown card
    monkeypatch.setattr(conv_table, "card_name", lambda device: "Card B")  # B kept when A was rewritten
    assert conv_table.choose((2, 1280, 8, 8), 1280, 3, 1, 1, torch.float16, dev) is not None


def test_committed_table_parses():
    """Every entry of the shipped table names a valid launch shape."""
    conv_table._table.cache_clear()
    import json

    data = json.loads(conv_table.TABLE_PATH.read_text())
    for card, entries in data["cards"].items():
        for key, e in entries.items():
            assert e["best"] in ("igemm", "cudnn"), (card, key)
            IgemmConfig.parse(e["config"])
