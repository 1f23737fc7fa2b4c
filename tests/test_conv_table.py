"""The per-card conv table: what the bench records is what ops' dispatch reads."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from speedsd import conv_table
from speedsd.bench.kernels_conv import table_entries, table_from_results
from speedsd.kernels.conv_gluon import GluonConvConfig, variant
from speedsd.kernels.conv_igemm import IgemmConfig

WS2 = str(variant("ws2", 256))


def _row(shape, n, best_ms, cudnn_ms, ok=True, config="m64n128k128s6w8p4", gluon=None):
    """A kernels_conv result row; ``gluon``: (ms, ok) of the best Gluon variant, as bench_gluon reports it."""
    row = {"x_shape": list(shape), "n": n, "kernel": 3, "stride": 1, "padding": 1, "ok": ok,
           "best_config": config, "best_ms": best_ms, "cudnn_ms": cudnn_ms}  # fmt: skip
    if gluon is not None:
        row.update(gluon_config=WS2, gluon_ms=gluon[0], gluon_ok=gluon[1])
    return row


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
    """Every entry of the shipped table names a valid choice and config."""
    conv_table._table.cache_clear()
    data = json.loads(conv_table.TABLE_PATH.read_text())
    for card, entries in data["cards"].items():
        for key, e in entries.items():
            assert e["best"] in conv_table.CHOICES, (card, key)
            if e["best"] == "gluon":
                GluonConvConfig.parse(e["config"])
            elif e["config"] is not None:  # igemm's best launch shape, also where cuDNN won
                IgemmConfig.parse(e["config"])
            if "gluon_config" in e:
                GluonConvConfig.parse(e["gluon_config"])
        conv_table._table(card, str(conv_table.TABLE_PATH))  # loads without error


GLUON_ROWS = [  # (igemm ms, igemm ok, gluon (ms, ok), cuDNN ms) -> recorded best
    pytest.param(0.30, True, (0.20, True), 0.25, "gluon", id="gluon-fastest"),
    pytest.param(0.30, True, (0.20, False), 0.25, "cudnn", id="gluon-fastest-but-wrong"),
    pytest.param(0.15, True, (0.20, True), 0.25, "igemm", id="igemm-fastest"),
    pytest.param(0.15, False, (0.20, True), 0.25, "gluon", id="igemm-wrong-gluon-next"),
    pytest.param(0.30, True, (0.25, True), 0.25, "cudnn", id="tie-goes-to-cudnn"),
]


@pytest.mark.parametrize("igemm_ms, igemm_ok, gluon, cudnn_ms, best", GLUON_ROWS)
def test_gluon_entries_are_recorded_and_chosen(tmp_path, monkeypatch, igemm_ms, igemm_ok, gluon, cudnn_ms, best):
    path = tmp_path / "conv_table.json"
    monkeypatch.setattr(conv_table, "TABLE_PATH", path)
    monkeypatch.setattr(conv_table, "card_name", lambda device: "Card A")
    row = _row((1, 256, 256, 256), 256, igemm_ms, cudnn_ms, ok=igemm_ok, gluon=gluon)
    (entry,) = table_entries([row], torch.float16).values()
    assert entry["best"] == best and entry["gluon_config"] == WS2
    assert entry["graph_ms"] == {"cudnn": cudnn_ms, "igemm": igemm_ms, "gluon": gluon[0]}
    assert entry["config"] == (WS2 if best == "gluon" else "m64n128k128s6w8p4")
    conv_table.merge_into(path, "Card A", table_entries([row], torch.float16))
    got = conv_table.choose((1, 256, 256, 256), 256, 3, 1, 1, torch.float16, torch.device("cpu"))
    want = {"gluon": GluonConvConfig.parse(WS2), "igemm": IgemmConfig.parse("m64n128k128s6w8p4"), "cudnn": None}
    assert got == want[best]


@pytest.mark.parametrize("gluon, best", [((0.020, True), "gluon"), ((0.020, False), "cudnn"), ((0.040, True), "cudnn")])
def test_gluon_only_rows(gluon, best):
    """A --shapes unet row (no implicit-GEMM search: best_config None, best_ms NaN) chooses between cuDNN and a
    correct, faster Gluon K-split config; the unsearched implicit GEMM never wins (its NaN does not compare)."""
    row = _row((2, 640, 32, 32), 640, float("nan"), 0.033, ok=True, config=None, gluon=gluon)
    row["gluon_config"] = "g8x16n128k64s4c1e1sk3p"
    (entry,) = table_entries([row], torch.float16).values()
    assert entry["best"] == best
    assert entry["config"] == ("g8x16n128k64s4c1e1sk3p" if best == "gluon" else None)
    assert entry["graph_ms"] == {"cudnn": 0.033, "gluon": gluon[0]}  # no implicit-GEMM time: none was measured


def test_rows_without_gluon_keep_their_entries():
    (entry,) = table_entries([_row((2, 1280, 8, 8), 1280, 0.020, 0.023)], torch.float16).values()
    assert entry["best"] == "igemm" and "gluon_config" not in entry and set(entry["graph_ms"]) == {"cudnn", "igemm"}


def test_subset_run_keeps_the_cards_other_entries(tmp_path):
    path = tmp_path / "conv_table.json"
    base = table_entries([_row((2, 1280, 8, 8), 1280, 0.020, 0.023)], torch.float16)
    vae = table_entries([_row((1, 256, 256, 256), 256, 0.3, 0.25, gluon=(0.2, True))], torch.float16)
    conv_table.merge_into(path, "Card A", base)
    conv_table.merge_into(path, "Card B", base)
    conv_table.merge_into(path, "Card A", vae, keep=True)
    cards = json.loads(path.read_text())["cards"]
    assert set(cards["Card A"]) == set(base) | set(vae) and set(cards["Card B"]) == set(base)
    conv_table.merge_into(path, "Card A", vae)  # a full run replaces the card's entries
    assert set(json.loads(path.read_text())["cards"]["Card A"]) == set(vae)


def test_unknown_choice_raises(tmp_path):
    path = tmp_path / "conv_table.json"
    path.write_text(json.dumps({"cards": {"Card A": {"k": {"best": "winograd", "config": None}}}}))
    with pytest.raises(ValueError, match="unknown conv choice"):
        conv_table._table("Card A", str(path))


def test_tma_entry_runs_on_channels_last_and_falls_back_on_nchw(monkeypatch):
    """A table entry naming a TMA config runs the TMA kernel where its operands are channels_last; on an NCHW
    input (channels_last off) the same entry gives None: the caller runs cuDNN."""
    from speedsd import ops

    cfg = IgemmConfig(64, 16, 16, 2, 4, 2, tma=True)
    monkeypatch.setattr(conv_table, "choose", lambda *a: cfg)
    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    conv = torch.nn.Conv2d(32, 24, 3, padding=1).to(device)
    x = (torch.randn(2, 32, 4, 8, generator=g) + 0.5).to(device)
    want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad():
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        got = ops._igemm_conv(x.contiguous(memory_format=torch.channels_last), conv, conv.bias)
        assert got is not None
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
        assert ops._igemm_conv(x, conv, conv.bias) is None


def test_two_kernel_sum_is_chosen_where_it_measured_faster(tmp_path):
    """A row whose best config's two-kernel variant (partials summed by a second kernel) measured faster records
    that variant and its time; rebuilt from a results JSON (--table-from) the same entries come back."""
    fast_two = {**_row((2, 1280, 8, 8), 1280, 0.020, 0.023, config="m128n64k128s6w8p4t"), "two_kernel_sum_ms": 0.018}
    slow_two = {**_row((2, 2560, 8, 8), 1280, 0.020, 0.023), "two_kernel_sum_ms": 0.021}
    entries = table_entries([fast_two, slow_two], torch.float16, commit="abc1234")
    one, two = entries.values()
    assert one["config"] == "m128n64k128s6w8p4rt" and one["graph_ms"]["igemm"] == 0.018
    assert IgemmConfig.parse(one["config"]) == IgemmConfig(128, 64, 128, 6, 8, 4, last_sums=False, tma=True)
    assert two["config"] == "m64n128k128s6w8p4" and two["graph_ms"]["igemm"] == 0.020
    swept = {**fast_two, "two_kernel_config": "m128n64k128s10w8p4rt", "two_kernel_ok": True}
    (entry,) = table_entries([swept], torch.float16).values()
    assert entry["config"] == "m128n64k128s10w8p4rt"  # the two-kernel split sweep's own best
    (entry,) = table_entries([{**swept, "two_kernel_ok": False}], torch.float16).values()
    assert entry["config"] == "m128n64k128s6w8p4t" and entry["graph_ms"]["igemm"] == 0.020  # not accurate: refused
    results = tmp_path / "kernels_conv.json"
    env = {"card": "Card A", "commit": "abc1234"}
    results.write_text(json.dumps({"environment": env, "rows": [fast_two, slow_two]}))
    card, table = table_from_results(results)
    assert card == "Card A" and table == entries
