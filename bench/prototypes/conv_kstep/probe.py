"""Probe: the Gluon conv's K split at K-step granularity (up to 9·C / 64 splits, so the UNet's 8² level can fill
every SM), on the UNet's Gluon conv shapes (README.md: what it measured, and the L2 prefetch it measured too).

    python probe.py sweep OUT.json    # this tree: the table's config and its variants, per shape
    python probe.py table OUT.json    # any tree: the table's configs only (run on the old tree too: an A/B
                                      # of the kernel itself where the config is unchanged)

Every config: a NaN-poisoned output checked against an fp32 conv (error <= 2x torch fp16's), then timed from
a CUDA graph with as many weight copies cycled as keep them out of L2, two ways: the whole conv (the partials'
sum included) and, for a K split, the partials alone (what the engine's GroupNorm-from-partials reads). µs a call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from speedsd import conv_table
from speedsd.bench import common
from speedsd.kernels import conv_gluon as cg

SHAPES = [  # (label, x shape, Co)
    ("8² 1280->1280", (2, 1280, 8, 8), 1280),
    ("8² 2560->1280", (2, 2560, 8, 8), 1280),
    ("16² 1280->1280", (2, 1280, 16, 16), 1280),
    ("16² 2560->1280", (2, 2560, 16, 16), 1280),
    ("16² 640->1280", (2, 640, 16, 16), 1280),
    ("32² 640->640", (2, 640, 32, 32), 640),
    ("32² 1920->640", (2, 1920, 32, 32), 640),
]
L2_BYTES = 50 * 2**20


def variants(base: cg.GluonConvConfig, shape: tuple[int, ...], co: int) -> list[cg.GluonConvConfig]:
    """The table's config; at 8² (one tile of both images) also K splits up to ~2 waves of units, one and two
    consumer warpgroups, and 64-channel tiles."""
    out = [base]
    n, c, h, w = shape
    if h == 8:
        ks = 9 * c // 64
        for bn in (128, 64):
            tiles = co // bn
            for split in sorted({s for s in range(max(2, 100 // tiles), 2 * 132 // tiles + 1)} & set(range(2, ks + 1))):
                if tiles * split > 132 and tiles * split < 200:  # between one and ~1.5 waves: skip
                    continue
                for consumers in (1, 2):
                    try:
                        out.append(dataclasses.replace(base, bn=bn, split=split, consumers=consumers))
                    except ValueError:
                        continue
    elif base.split > 1:  # twice the split: two waves of units
        out.append(dataclasses.replace(base, split=2 * base.split))
    seen, uniq = set(), []
    for cfg in out:
        if str(cfg) not in seen:
            seen.add(str(cfg))
            uniq.append(cfg)
    return uniq


def time_us(fn, weights: list[torch.Tensor]) -> float:
    state = {"i": 0}

    def call() -> None:
        fn(weights[state["i"] % len(weights)])
        state["i"] += 1

    return 1e3 * common.graph_ms(call, calls=2 * len(weights), reps=7)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_shape(label: str, shape: tuple[int, ...], co: int, sweep: bool) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) + 0.5).to(dev, torch.float16).contiguous(memory_format=torch.channels_last)
    w0 = torch.randn(co, shape[1], 3, 3, generator=g) / math.sqrt(9 * shape[1])
    copies = max(2, min(8, math.ceil(3 * L2_BYTES / (w0.numel() * 2))))
    ws = [(w0 + 1e-3 * i).to(dev, torch.float16).contiguous(memory_format=torch.channels_last) for i in range(copies)]
    torch.backends.cudnn.allow_tf32 = False
    ref = F.conv2d(x.float(), ws[0].float(), None, 1, 1)
    torch_err = rel(F.conv2d(x, ws[0], None, 1, 1), ref)
    base = conv_table.choose(shape, co, 3, 1, 1, torch.float16, dev)
    row = {"label": label, "shape": list(shape), "co": co, "table": str(base), "weight_copies": copies,
           "cudnn_us": time_us(lambda w: F.conv2d(x, w, None, 1, 1), ws),
           "weight_read_us": time_us(lambda w: torch.sum(w), ws), "configs": {}}  # fmt: skip
    if not isinstance(base, cg.GluonConvConfig):
        return row
    for cfg in variants(base, shape, co) if sweep else [base]:
        t0 = time.monotonic()
        try:
            out = torch.full((shape[0], co, *shape[2:]), float("nan"), device=dev, dtype=torch.float16)
            out = out.contiguous(memory_format=torch.channels_last)
            err = rel(cg.conv3x3_gluon(x, ws[0], None, cfg, out=out), ref)
            r = {"us": time_us(lambda w, cfg=cfg: cg.conv3x3_gluon(x, w, None, cfg), ws), "rel_err": err,
                 "ok": err <= 2 * torch_err + 1e-7}  # fmt: skip
            if cfg.split > 1:
                r["partials_us"] = time_us(lambda w, cfg=cfg: cg.conv3x3_gluon_partials(x, w, cfg), ws)
        except Exception as e:  # noqa: BLE001 - report and go on
            r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        r["s"] = round(time.monotonic() - t0, 1)
        row["configs"][str(cfg)] = r
        print(label, cfg, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    row["torch_rel_err"] = torch_err
    return row


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    rows = [run_shape(label, shape, co, mode == "sweep") for label, shape, co in SHAPES]
    env = common.environment()
    json.dump({"mode": mode, **env, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
