"""The auto-attention table (speedsd.attention_table): measured choices only, "gluon" among them."""

from __future__ import annotations

import json

import pytest
import torch

from speedsd import attention_table as at

SELF = [2, 8, 4096, 40]
CROSS_K = [2, 8, 77, 40]


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Point the module at a table file written by the test; the cache is cleared around it."""
    path = tmp_path / "attention_table.json"
    monkeypatch.setattr(at, "TABLE_PATH", path)
    at._table.cache_clear()
    yield path
    at._table.cache_clear()


def _entry(q, k, best):
    return {"q_shape": q, "k_shape": k, "dtype": "float16", "best": best}


def test_choose_returns_gluon_only_where_the_table_says_so(table):
    at.write_card_table(table, "Card A", {"self": _entry(SELF, SELF, "gluon"), "cross": _entry(SELF, CROSS_K, "flash")})
    at._table.cache_clear()
    assert at.choose(torch.Size(SELF), torch.Size(SELF), torch.float16, card="Card A") == "gluon"
    assert at.choose(torch.Size([1, 8, 4096, 40]), torch.Size([1, 8, 4096, 40]), torch.float16, "Card A") == "gluon"
    assert at.choose(torch.Size(SELF), torch.Size(CROSS_K), torch.float16, card="Card A") == "flash"
    assert at.choose(torch.Size([2, 8, 1024, 80]), torch.Size([2, 8, 1024, 80]), torch.float16, "Card A") == "sdpa"
    assert at.choose(torch.Size(SELF), torch.Size(SELF), torch.float16, card="Card B") == "sdpa"  # other card
    assert at.choose(torch.Size([1, 1, 64, 512]), torch.Size([1, 1, 64, 512]), torch.float16, "Card B") == "partial"


def test_merge_keeps_other_cards_and_rejects_unknown_choices(table):
    at.merge_into(table, "Card A", {"self": _entry(SELF, SELF, "sdpa")})
    at.merge_into(table, "Card B", {"self": _entry(SELF, SELF, "gluon")})
    assert at.choose(torch.Size(SELF), torch.Size(SELF), torch.float16, card="Card A") == "sdpa"
    assert at.choose(torch.Size(SELF), torch.Size(SELF), torch.float16, card="Card B") == "gluon"
    data = json.loads(table.read_text())
    data["cards"]["Card B"]["self"]["best"] = "turbo"
    table.write_text(json.dumps(data))
    at._table.cache_clear()
    with pytest.raises(ValueError, match="unknown attention choice 'turbo'"):
        at.choose(torch.Size(SELF), torch.Size(SELF), torch.float16, card="Card B")


def test_merge_with_keep_others_adds_entries_to_a_card(table):
    """A partial run (speedsd.bench.kernels --attention-shapes) adds its shapes and keeps the card's others;
    a full run replaces the card's entries."""
    long_k = [2, 8, 154, 40]
    at.merge_into(table, "Card A", {"self": _entry(SELF, SELF, "gluon"), "cross": _entry(SELF, CROSS_K, "cross")})
    at.merge_into(table, "Card A", {"cross 154": _entry(SELF, long_k, "flash")}, keep_others=True)
    at._table.cache_clear()
    assert at.choose(torch.Size(SELF), torch.Size(SELF), torch.float16, card="Card A") == "gluon"
    assert at.choose(torch.Size(SELF), torch.Size(long_k), torch.float16, card="Card A") == "flash"
    at.merge_into(table, "Card A", {"cross 154": _entry(SELF, long_k, "sdpa")})
    assert set(json.loads(table.read_text())["cards"]["Card A"]) == {"cross 154"}


def test_committed_table_names_known_choices():
    data = json.loads(at.TABLE_PATH.read_text())
    for card in data["cards"].values():
        assert {e["best"] for e in card.values()} <= set(at.CHOICES)


def test_choose_returns_cross_where_the_table_says_so(table):
    at.write_card_table(table, "Card A", {"cross": _entry(SELF, CROSS_K, "cross")})
    at._table.cache_clear()
    assert at.choose(torch.Size(SELF), torch.Size(CROSS_K), torch.float16, card="Card A") == "cross"
    assert at.choose(torch.Size(SELF), torch.Size(SELF), torch.float16, card="Card A") == "sdpa"  # not measured
    assert at.choose(torch.Size(SELF), torch.Size(CROSS_K), torch.float16, card="Card B") == "sdpa"
