"""The auto-attention table picks by CUDA-graph replay time (CPU: synthetic bench rows)."""

from __future__ import annotations

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
