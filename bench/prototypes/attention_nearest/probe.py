"""Does the attention table's nearest-shape rule pick well at image sizes it never measured? (session 24)

    python bench/prototypes/attention_nearest/probe.py OUT.json

For 768², 512x768, 640² and 1024² images (SD-1.x geometry, CFG batch 2, 8 heads; the VAE mid block's one
head of 512): each UNet level's self- and cross-attention, timed by CUDA-graph replay (50 calls, median of 5
replays) through the engine's dispatch (ops.attention_op under the default flags: the table's choice, exact or
nearest, with its kernel's own fallback) against SDPA and each of our kernels that takes the shape; the
error of the dispatched result against an fp32 reference. Self-attention q/k/v are views of one fused QKV
projection, as the model makes them.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from speedsd import attention_table, ops
from speedsd.bench.common import graph_ms
from speedsd.bench.kernels_attention import make_qkv
from speedsd.kernels import attention_gluon
from speedsd.kernels.cross_attention import cross_attention, cross_attention_supported
from speedsd.kernels.flash_attention import flash_attention
from speedsd.kernels.softmax_attention import attention_partial_softmax

SIZES = {"768²": (96, 96), "512x768": (64, 96), "640²": (80, 80), "1024²": (128, 128)}
LEVELS = [(8, 40), (8, 80), (8, 160), (8, 160)]  # (heads, head dim) at latent / 1, 2, 4, 8


def graph_us(fn, calls: int = 50) -> float:
    """µs a call from CUDA-graph replay (speedsd.bench.common.graph_ms: median of 5 replays)."""
    return graph_ms(fn, calls=calls, reps=5) * 1e3


def measure(label: str, B: int, H: int, nq: int, nk: int, d: int) -> dict:
    q, k, v = make_qkv(B, H, nq, nk, d, fused=nq == nk)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flags = ops.default_flags("cuda")

    def engine():
        with ops.using(flags):
            return ops.attention_op(q, k, v)

    row = {"shape": label, "q": [B, H, nq, d], "nk": nk}
    row["choice"] = attention_table.choose(q.shape, k.shape, q.dtype)
    row["engine_err"] = float((engine().float() - ref).abs().max())
    fns = {"engine": engine, "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    if d <= 256:
        fns["flash"] = lambda: flash_attention(q, k, v)
    else:
        fns["partial"] = lambda: attention_partial_softmax(q, k, v)
    if nq == nk and attention_gluon.shape_supported(nq, nk, d) and attention_gluon.attention_gluon(q, k, v) is not None:
        fns["gluon"] = lambda: attention_gluon.attention_gluon(q, k, v)
    if cross_attention_supported(q, k) and nk <= 128:
        fns["cross"] = lambda: cross_attention(q, k, v)
    for name, fn in fns.items():
        try:
            row[f"{name}_us"] = graph_us(fn)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run here is recorded, not fatal
            row[f"{name}_error"] = str(e).splitlines()[0][:200]
    timed = {n: row[f"{n}_us"] for n in fns if f"{n}_us" in row and n != "engine"}
    row["fastest"] = min(timed, key=timed.get)
    row["engine_vs_sdpa"] = row["sdpa_us"] / row["engine_us"]
    row["engine_vs_fastest"] = timed[row["fastest"]] / row["engine_us"]
    print(row, flush=True)
    return row


def main(out: str) -> None:
    import triton

    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    for size, (h, w) in SIZES.items():
        for lvl, (heads, d) in enumerate(LEVELS):
            n = (h >> lvl) * (w >> lvl)
            res["rows"].append(measure(f"{size} self {n} d{d}", 2, heads, n, n, d))
            res["rows"].append(measure(f"{size} cross {n}x77 d{d}", 2, heads, n, 77, d))
        res["rows"].append(measure(f"{size} vae mid {h * w} d512", 1, 1, h * w, h * w, 512))
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
