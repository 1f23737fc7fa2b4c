"""The Winograd study's choice, sensitivity line and written conclusion, on a hand-made payload."""

from __future__ import annotations

import json

from speedsd.bench import winograd_report as rep
from speedsd.bench import winograd_study


def _row(method, ms, ratio, graph_ms=None):
    r = {"method": method, "ms": ms, "graph_ms": graph_ms, "tflops": 100.0 / ms, "extra_bytes": 2**20 * 8,
         "err": 3e-4 * ratio, "err_ratio": ratio, "usable": True}  # fmt: skip
    if method.startswith("F"):
        tile, gemm = method[1:].split(":")
        r.update(tile=int(tile), gemm=gemm)
    return r


def _payload(timing="eager"):
    rows_a = [
        _row("cudnn-cl", 0.5, 1.0, 0.5),
        _row("cudnn-nchw", 0.6, 1.0, 0.6),
        _row("F2:triton", 0.45, 1.8, 0.45),
        _row("F4:bmm", 0.3, 12.0, 0.3),
        _row("F6:bmm", 0.25, 25.0, 0.2),
        _row("F6:bmm3", 0.48, 1.0, 0.48),
    ]
    rows_b = [_row("cudnn-cl", 0.03, 1.0, 0.03), _row("F2:triton", 0.05, 1.8, 0.02), _row("F4:bmm", 0.06, 11.0, 0.04)]
    a = {"model": "vae", "shape": [1, 512, 256, 256, 512], "skipped": {}, "fastest_winograd": "F6:bmm", "rows": rows_a}
    b = {
        "model": "unet",
        "shape": [2, 1280, 8, 8, 1280],
        "skipped": {},
        "fastest_winograd": "F2:triton",
        "rows": rows_b,
    }
    for res in (a, b):
        res["choice"] = rep.choose(res, 2.0, "graph_ms" if timing == "graph" else "ms")
    return {"card": "Test Card", "max_err_ratio": 2.0, "timing": timing, "results": [a, b]}


def test_choose_by_error_ratio_and_timing():
    p = _payload()
    a, b = p["results"]
    assert rep.choose(a, 2.0) == "2:triton"  # F4/F6 are faster but over 2x cuDNN's error
    assert rep.choose(a, 16.0) == "4:bmm" and rep.choose(a, 32.0) == "6:bmm"
    assert rep.choose(b, 2.0) == "cudnn" and rep.choose(b, 2.0, "graph_ms") == "2:triton"


def test_sensitivity_counts_and_sums():
    s = rep.sensitivity(_payload(), (2.0, 16.0, 32.0))
    assert s[2.0]["counts"] == {"F2": 1, "cudnn": 1}
    assert s[16.0]["counts"] == {"F4": 1, "cudnn": 1} and s[32.0]["counts"] == {"F6": 1, "cudnn": 1}
    assert abs(s[32.0]["sum_us"] - 280.0) < 1e-9 and abs(s[32.0]["cudnn_sum_us"] - 530.0) < 1e-9
    line = rep.sensitivity_line(_payload())
    assert "ratio 4: cuDNN 1, F2 1, F4 0, F6 0" in line and "ratio 32: cuDNN 1, F2 0, F4 0, F6 1" in line


def test_conclusion_numbers(tmp_path):
    text = rep.conclusion(_payload())
    assert "Card: Test Card" in text and "does not hold" in text  # F6 is fastest where Winograd wins
    assert "F(6,3): bmm 25x [25-25], bmm3 1x [1-1]" in text
    assert "1/1 rows within 2x" in text and "vae 1x512x256²->512 -> 2:triton" in text
    path = tmp_path / "winograd_study.json"
    path.write_text(json.dumps(_payload("graph")))
    winograd_study.main(["--out", str(tmp_path / "md"), "--from-json", str(path)])
    md = (tmp_path / "md" / "winograd_study.md").read_text()
    assert "## Conclusion" in md and "Sensitivity" in md and "| unet | 2,1280,8,8,1280 | 2:triton |" in md
