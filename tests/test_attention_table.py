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


def test_unmeasured_shapes_take_the_nearest_measured_choice_of_their_kind(table):
    """Another image size: the nearest measured shape (log scale, within NEAREST_FACTOR in Nq and Nk) of the
    same kind, heads and head dim lends its choice; nothing near, another kind or head dim: SDPA."""
    entries = {
        "self 4096": _entry(SELF, SELF, "gluon"),
        "self 1024": _entry([2, 8, 1024, 40], [2, 8, 1024, 40], "flash"),
        "cross 77": _entry(SELF, CROSS_K, "cross"),
        "cross 154": _entry(SELF, [2, 8, 154, 40], "flash"),
        "vae": _entry([1, 1, 4096, 512], [1, 1, 4096, 512], "partial"),
    }
    at.write_card_table(table, "Card A", entries)
    at._table.cache_clear()

    def pick(nq: int, nk: int, h: int = 8, d: int = 40) -> str:
        return at.choose(torch.Size([2, h, nq, d]), torch.Size([2, h, nk, d]), torch.float16, card="Card A")

    assert pick(6400, 6400) == "gluon"  # 640²: 1.56x the 512² level's tokens
    assert pick(1536, 1536) == "flash" and pick(2304, 2304) == "gluon"  # 1.5x from 1024 / 1.78x from 4096
    assert pick(8192, 8192) == "gluon" and pick(8200, 8200) == "sdpa"  # NEAREST_FACTOR (2) from 4096
    assert pick(6400, 77) == "cross" and pick(4096, 300) == "flash" and pick(64, 77) == "sdpa"  # 64 rows: 64x off
    assert pick(6400, 6400, h=5) == "sdpa" and pick(6400, 6400, d=64) == "sdpa"  # other heads / head dim
    assert pick(6400, 6400, h=1, d=512) == "partial"  # the VAE's mid block at 640²
    at.write_card_table(table, "Card A", {"cross 77": entries["cross 77"]})
    at._table.cache_clear()
    assert pick(4096, 4096) == "sdpa"  # self-attention never borrows a cross-attention's choice


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


def test_upcast_models_get_flash_where_the_table_says_sdpa(monkeypatch):
    """SD 2.1-v (upcast_attention): the table's "sdpa" was timed in fp16, but upcast runs SDPA in fp32; the
    flash kernel's fp32 scores are upcast's math. Our kernels' choices, fp32 inputs, head dims flash does not
    take and models without upcast keep the table's choice."""
    from types import SimpleNamespace

    from speedsd import ops

    assert ops.upcast_choice("sdpa", torch.float16, 64, upcast=True) == "flash"
    assert ops.upcast_choice("sdpa", torch.bfloat16, 64, upcast=True) == "flash"
    assert ops.upcast_choice("sdpa", torch.float16, 64, upcast=False) == "sdpa"
    assert ops.upcast_choice("sdpa", torch.float32, 64, upcast=True) == "sdpa"
    assert ops.upcast_choice("sdpa", torch.float16, 512, upcast=True) == "sdpa"
    assert ops.upcast_choice("cross", torch.float16, 64, upcast=True) == "cross"
    # pick_attention hands the model's upcast to it (a CUDA tensor's attributes, without a GPU)
    monkeypatch.setattr(at, "choose", lambda q_shape, k_shape, dtype: "sdpa")
    q = SimpleNamespace(is_cuda=True, shape=torch.Size([2, 5, 9216, 64]), dtype=torch.float16)
    assert ops.pick_attention(q, q, upcast=True) == "flash" and ops.pick_attention(q, q) == "sdpa"


@pytest.mark.gpu
def test_upcast_dispatch_on_the_gpu_is_flash_and_accurate():
    """On a GPU, an upcast fp16 attention the table does not know (3 heads of 64) dispatches to flash, and its
    error against an fp64 reference stays within 2x of what fp16 SDPA makes (upcast's fp32 SDPA: the old path)."""
    import torch.nn.functional as F

    from speedsd import ops

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 3, 576, 64, device="cuda", generator=g).mul(s).add(0.3).half() for s in (2.0, 2.0, 1.0))
    assert ops.pick_attention(q, k, upcast=True) == "flash" and ops.pick_attention(q, k) == "sdpa"
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with ops.using(ops.PRESETS["fast"]):
        got = ops.attention_op(q, k, v, upcast=True)
    torch_err = (F.scaled_dot_product_attention(q, k, v).double() - ref).abs().max()
    assert got.dtype == torch.float16 and (got.double() - ref).abs().max() <= 2 * torch_err
