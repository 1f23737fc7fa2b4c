"""speedsd.bench.subpixel_gluon (GPU-only bench) and conv_epilogue's shape lists, on CPU: the report, the table
record and the refusal without CUDA; the epilogue bench's candidates for the UNet's 320/640-channel convs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from speedsd import conv_table
from speedsd.bench import conv_epilogue, subpixel_gluon


def _row(choice):
    key = conv_table.shape_key((2, 1280, 16, 16), 5120, 2, 1, 1, torch.float16)
    configs = {"g8x8n256+64k64s4c1e2p": {"us": 50.0, "max_err": 1e-2, "ok": True},
               "g8x8n128k64s4c1e1p": {"us": 40.0, "max_err": 9.0, "ok": False}}  # fmt: skip
    return {"shape": "2x1280x16²->1280", "key": key, "engine_us": 80.0 if choice else 45.0, "engine_conv_us": 75.0,
            "configs": configs, "best": "g8x8n256+64k64s4c1e2p", "best_us": 50.0, "choice": choice}  # fmt: skip


def test_markdown_names_every_candidate_and_the_choice():
    res = {"latent": 64, "rows": [_row("g8x8n256+64k64s4c1e2p")], "errors": []}
    md = subpixel_gluon.markdown(res)
    assert "2x1280x16²->1280" in md and "50.0 (g8x8n256+64k64s4c1e2p)" in md and "g8x8n128k64s4c1e1p" in md


def test_main_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="sm_90 GPU"):
        subpixel_gluon.main(["--out", "unused"])


@pytest.mark.parametrize("choice", ["g8x8n256+64k64s4c1e2p", None], ids=["faster", "slower"])
def test_table_records_the_k2_entry_only_where_faster(tmp_path, monkeypatch, choice):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"cards": {"X": {"other": {"best": "cudnn", "config": None}}}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "X")
    props = SimpleNamespace(name="X", multi_processor_count=132, total_memory=2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)
    monkeypatch.setattr(subpixel_gluon, "run", lambda latent, keys, shapes: {"latent": latent, "rows": [_row(choice)],
                                                                      "errors": []})  # fmt: skip
    assert subpixel_gluon.main(["--out", str(tmp_path), "--table", str(path)]) == 0
    entries = json.loads(path.read_text())["cards"]["X"]
    key = _row(choice)["key"]
    assert "other" in entries and (key in entries) == (choice is not None)
    if choice:
        assert entries[key]["best"] == "gluon" and entries[key]["config"] == choice and entries[key]["subpixel"]
    assert (tmp_path / "subpixel_gluon.md").exists()
    conv_table._table.cache_clear()


def test_conv_epilogue_candidates_for_the_unet_shapes():
    """320 and 640 channels (groups of 10 and 20): only tiles of bn + bn1 channels fit (their statistics are per
    channel); the VAE's 512 keeps its power-of-2 candidates."""
    x = torch.empty(2, 320, 64, 64)
    keys320 = {str(c) for c in conv_epilogue._candidates((2, 320, 64, 64), 320, x)}
    assert keys320 == {"g8x8n256+64k64s4c1e2p", "g8x8n256+64k64s4c1e4p", "g8x8n128+32k64s5c1e1p",
                       "g8x16n128+32k64s4c2e1p"}  # fmt: skip
    keys512 = {str(c) for c in conv_epilogue._candidates((1, 512, 64, 64), 512, torch.empty(1, 512, 64, 64))}
    assert "g16x16n128k64s4c2e2p" in keys512 and not any("+" in k for k in keys512)
    assert [s[0] for s in conv_epilogue.SHAPES["unet"]] == [2, 2]
