"""The auto-attention table picks by CUDA-graph replay time (CPU: synthetic bench rows)."""

from __future__ import annotations

import pytest
import torch

from speedsd.bench import kernels_attention as ka


def _rows(label: str, times: dict[str, tuple[float, float | None]], ok: dict[str, bool] | None = None) -> list[dict]:
    rows = []
    for variant, (ms, graph) in times.items():
        r = {"shape": label, "variant": variant, "ms": ms}
        if graph is not None:
            r["graph_ms"] = graph
        if ok and variant in ok:
            r["ok"] = ok[variant]
        rows.append(r)
    return rows


def test_table_uses_graph_replay_time():
    # do_bench says sdpa (the Triton launch's Python overhead); the graph replay says flash
    rows = _rows("cross 1024x77 d80", {"flash": (0.032, 0.0053), "partial": (0.083, 0.0114), "sdpa": (0.011, 0.0083)})
    rows += _rows("self 4096 d40", {"flash": (0.184, 0.180), "partial": (0.399, 0.398), "sdpa": (0.156, 0.150)})
    table = ka.best_attention_table(rows)
    assert table["cross 1024x77 d80"]["best"] == "flash"
    assert table["self 4096 d40"]["best"] == "sdpa"
    assert table["cross 1024x77 d80"]["graph_ms"]["sdpa"] == 0.0083
    assert table["cross 1024x77 d80"]["ms"]["flash"] == 0.032


def test_table_falls_back_to_do_bench_and_skips_wrong_results():
    # a candidate without a graph time (capture failed): every candidate is compared on do_bench
    rows = _rows("self 1024 d80", {"flash": (0.039, 0.018), "partial": (0.078, None), "sdpa": (0.022, 0.0183)})
    rows += _rows("self 256 d160", {"flash": (0.11, 0.008), "sdpa": (0.013, 0.0105)}, ok={"flash": False})
    table = ka.best_attention_table(rows)
    assert table["self 1024 d80"]["best"] == "sdpa"
    assert table["self 256 d160"]["best"] == "sdpa"  # flash was fastest but failed its accuracy check


def test_table_takes_gluon_where_it_is_fastest_and_correct():
    rows = _rows("self 4096 d40", {"flash": (0.184, 0.180), "sdpa": (0.156, 0.150), "gluon": (0.160, 0.144)})
    rows += _rows("self 16384 d40", {"flash": (2.9, 2.8), "sdpa": (2.3, 2.2), "gluon": (2.1, 2.0)}, ok={"gluon": False})
    rows += _rows("cross 4096x77 d40", {"flash": (0.02, 0.010), "sdpa": (0.01, 0.012)})
    table = ka.best_attention_table(rows)
    assert table["self 4096 d40"]["best"] == "gluon"
    assert table["self 4096 d40"]["graph_ms"] == {"flash": 0.180, "sdpa": 0.150, "gluon": 0.144}
    assert table["self 16384 d40"]["best"] == "sdpa"  # gluon fastest but failed its accuracy check
    assert table["cross 4096x77 d40"]["best"] == "flash"


def test_gluon_shapes_get_fused_qkv_views_with_the_same_values():
    import torch

    from speedsd.kernels.attention_gluon import fused_qkv_views

    labels = [s[0] for s in ka.SHAPES + ka.LONG_SHAPES if ka.gluon_shape(*s[3:])]
    assert labels[:4] == ["self 4096 d40", "self 1024 d80", "self 256 d160", "self 64 d160"]  # 512²
    assert labels[-1] == "self 16384 d40"
    # 768², 512x768, 1024²: every self-attention whose token count is a multiple of 64 (not 144 and 96)
    more = ["self 9216 d40", "self 2304 d80", "self 576 d160", "self 6144 d40", "self 1536 d80", "self 384 d160"]
    assert labels[4:-1] == more + ["self 4096 d80", "self 1024 d160"]
    sep = ka.make_qkv(2, 2, 128, 128, 40, device="cpu")
    fused = ka.make_qkv(2, 2, 128, 128, 40, device="cpu", fused=True)
    assert fused_qkv_views(*fused) and not fused_qkv_views(*sep)
    for a, b in zip(sep, fused):
        assert torch.equal(a, b)


def test_table_takes_cross_where_it_is_fastest_and_correct():
    rows = _rows("cross 4096x77 d40", {"flash": (0.09, 0.0125), "sdpa": (0.017, 0.0142), "cross": (0.03, 0.006)})
    rows += _rows(
        "cross 1024x77 d80",
        {"flash": (0.1, 0.0055), "sdpa": (0.011, 0.0085), "cross": (0.03, 0.004)},
        ok={"cross": False},
    )
    table = ka.best_attention_table(rows)
    assert table["cross 4096x77 d40"]["best"] == "cross"
    assert table["cross 4096x77 d40"]["graph_ms"]["cross"] == 0.006
    assert table["cross 1024x77 d80"]["best"] == "flash"  # cross fastest but failed its accuracy check
    assert "cross" in ka.CANDIDATES and "cross" in ka.OURS


def test_cross_variant_never_times_the_flash_fallback():
    fn = ka.variants()["cross"]
    q, k, v = (torch.randn(1, 2, n, 40) for n in (16, 130, 130))
    with pytest.raises(RuntimeError, match="does not take"):
        fn(q, k, v)
