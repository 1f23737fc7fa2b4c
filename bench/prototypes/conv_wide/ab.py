"""Probe + A/B: Gluon conv tiles of bn + bn1 channels (``GluonConvConfig.bn1``) for the UNet's 64² convs to 320
channels, which cuDNN runs as 128 x 192 tiles (the last one 40 % padding) and which power-of-2 tiles cannot split
into one wave (320 = 2.5 x 128). 128 x (128 + 32) tiles: 64 pixel blocks x 2 = 128 units, one wave on 132 SMs.

    python ab.py kernels OUT.json TABLE.json   # time candidates vs cuDNN; TABLE = the package table + winners
    python ab.py image LABEL [TABLE.json|-] [SIZE] [MODEL]   # one process: a 20-step DPM++ 2M image (512²,
                                                             # random:sd1.4 by default), median of 9

Kernels: every candidate is checked on a NaN-poisoned output against an fp32 conv (error <= 2x cuDNN fp16's)
and timed from CUDA graphs with weight copies cycled out of L2 (µs a call). Image: random:sd1.4, fp16, default
flags, after two warm images (eager, then the graph captures); the conv table read from TABLE when given.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [  # (x shape, Co): the UNet's 64² 3x3 convs to 320 channels (7 + 2 + 1 a step)
    ((2, 320, 64, 64), 320),
    ((2, 640, 64, 64), 320),
    ((2, 960, 64, 64), 320),
]
CONFIGS = [
    "g8x16n128+32k64s5c2e1p",
    "g8x16n128+32k64s5c1e1p",
    "g8x16n128+32k64s4c2e1p",
    "g8x16n128+32k64s5c2e1",
    "g8x8n256+64k64s4c1e2p",
    "g8x16n64+16k64s6c2e1p",
    "g8x16n64k64s5c2e1p",
    "g16x16n64+16k64s4c2e1p",
]
L2_BYTES = 50 * 2**20


def kernels(out_json: str, table_out: str) -> None:
    from speedsd import conv_table
    from speedsd.bench import common
    from speedsd.kernels import conv_gluon as cg

    dev = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False
    rows, entries = [], {}
    for shape, co in SHAPES:
        g = torch.Generator().manual_seed(sum(shape))
        x = (torch.randn(shape, generator=g) + 0.5).to(dev, torch.float16).contiguous(memory_format=torch.channels_last)
        w0 = torch.randn(co, shape[1], 3, 3, generator=g) / math.sqrt(9 * shape[1])
        copies = max(2, min(8, math.ceil(3 * L2_BYTES / (w0.numel() * 2))))
        ws = [
            (w0 + 1e-3 * i).to(dev, torch.float16).contiguous(memory_format=torch.channels_last) for i in range(copies)
        ]
        ref = F.conv2d(x.float(), ws[0].float(), None, 1, 1)
        cud = F.conv2d(x, ws[0], None, 1, 1).float() - ref
        tol = 2 * (cud.abs().max().item()), 2 * (cud.norm() / ref.norm()).item()

        def time_us(fn, ws=ws):
            state = {"i": 0}

            def call() -> None:
                fn(ws[state["i"] % len(ws)])
                state["i"] += 1

            return 1e3 * common.graph_ms(call, calls=2 * len(ws), reps=7)

        row = {"shape": list(shape), "co": co, "cudnn_us": time_us(lambda w, x=x: F.conv2d(x, w, None, 1, 1)),
               "configs": {}}  # fmt: skip
        for key in CONFIGS:
            try:
                out = torch.full((shape[0], co, *shape[2:]), float("nan"), device=dev, dtype=torch.float16)
                out = cg.conv3x3_gluon(x, ws[0], None, key, out=out.contiguous(memory_format=torch.channels_last))
                d = out.float() - ref
                err = (d.abs().max().item(), (d.norm() / ref.norm()).item())
                ok = bool(err[0] <= tol[0] and err[1] <= tol[1])
                r = {"us": time_us(lambda w, key=key, x=x: cg.conv3x3_gluon(x, w, None, key)), "max_abs": err[0],
                     "rel": err[1], "ok": ok}  # fmt: skip
            except Exception as e:  # noqa: BLE001 - report and go on
                r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            row["configs"][key] = r
            print(shape, co, key, r, flush=True)
        good = {k: v["us"] for k, v in row["configs"].items() if v.get("ok")}
        best = min(good, key=good.get) if good else None
        row["best"], row["best_us"] = best, good.get(best)
        print(shape, co, "cudnn", round(row["cudnn_us"], 2), "best", best, row["best_us"], flush=True)
        if best is not None and good[best] < row["cudnn_us"]:
            key = conv_table.shape_key(shape, co, 3, 1, 1, torch.float16)
            entries[key] = {"best": "gluon", "config": best, "gluon_config": best,
                            "graph_ms": {"cudnn": row["cudnn_us"] / 1e3, "gluon": good[best] / 1e3}}  # fmt: skip
        rows.append(row)
    json.dump({**common.environment(), "rows": rows, "entries": entries}, open(out_json, "w"), indent=1)
    table = json.loads(conv_table.TABLE_PATH.read_text())
    table["cards"][torch.cuda.get_device_name()].update(entries)
    Path(table_out).write_text(json.dumps(table, indent=1))


def image(label: str, table: str | None, size: int = 512, model: str = "random:sd1.4") -> None:
    import speedsd
    from speedsd import conv_table

    if table:
        conv_table.TABLE_PATH = Path(table)
    pipe = speedsd.load(model)

    def one() -> None:
        pipe("a photograph of an astronaut riding a horse", steps=20, height=size, width=size, seed=0,
             output="tensor", scheduler="dpmpp_2m")  # fmt: skip
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    one()
    one()
    peak = torch.cuda.max_memory_allocated() / 2**20
    one()
    ts = []
    for _ in range(9):
        t0 = time.perf_counter()
        one()
        ts.append(1e3 * (time.perf_counter() - t0))
    print(f"{label} {model} {size}² image_ms {statistics.median(ts):.2f} (min {min(ts):.2f} max {max(ts):.2f}) "
          f"two_image_peak_mib {peak:.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "kernels":
        kernels(sys.argv[2], sys.argv[3])
    else:
        argv = sys.argv[2:] + [None] * 4
        table = argv[1] if argv[1] not in (None, "-") else None
        image(argv[0], table, int(argv[2] or 512), argv[3] or "random:sd1.4")
