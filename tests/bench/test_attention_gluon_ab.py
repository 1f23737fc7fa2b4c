"""The Gluon attention pipeline A/B (CPU: its attention choice per variant, image comparison, report)."""

from __future__ import annotations

import math

import pytest
import torch

from speedsd.bench import attention_gluon_ab as ab


def test_picker_old_never_gluon_new_where_supported(monkeypatch):
    q = torch.zeros(2, 8, 4096, 40)
    table = {"v": "gluon"}

    def table_pick(q, k):
        return table["v"]

    old, new = ab.attention_picker("old", table_pick), ab.attention_picker("new", table_pick)
    assert old(q, q) == "sdpa" and new(q, q) == "sdpa"  # CPU: the kernel is not supported here
    table["v"] = "flash"
    assert old(q, q) == "flash" and new(q, q) == "flash"
    monkeypatch.setattr(ab, "attention_gluon_supported", lambda q, k: True)
    assert new(q, q) == "gluon" and old(q, q) == "flash"
    with pytest.raises(ValueError, match="variant"):
        ab.attention_picker("both", table_pick)


def test_compare_and_markdown():
    a = torch.rand(1, 3, 8, 8)
    b = a.clone()
    b[0, 0, 0, 0] += 0.25
    same, diff = ab.compare(a, a.clone()), ab.compare(a, b)
    assert same["max_abs"] == 0 and math.isinf(same["psnr_db"])
    assert diff["max_abs"] == pytest.approx(0.25) and diff["psnr_db"] == pytest.approx(-10 * math.log10(0.0625 / 192))
    rows = [{"variant": "old", "image_ms": 121.5, "gluon_calls": 0}, {"variant": "new", "image_ms": 120.25}]
    md = ab.markdown({"model": "random:sd1.4", "size": 512, "steps": 20, "rows": rows, "images": diff})
    assert "| old |" in md and "min 120.25" in md and "first old vs first new" in md
