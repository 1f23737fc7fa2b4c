"""Probe: GroupNorm(+SiLU) read from a K-split conv1's fp32 partials, per-launch knobs (session 29).

    python probe.py OUT.json

The UNet's 16² conv1 GroupNorm (2x1280x16², 3 partials) took 9.86 µs a launch in the step's kernel list
(kernel_list_h200_58cb080.txt) against ~4.5 for the same GroupNorm on an fp16 tensor. For the 16² (3 partials)
and 8² (10 partials) shapes this times, in CUDA-graph replay (20 calls a graph, median of 15 replays), with
the partials cycled over 4 copies (each launch reads its own from L2 as after a conv):
  engine     group_norm_partials as the engine runs it (the TUNED plan: gb=1, one tile, 16 warps at 16²)
  gbG/wW     one tile, G groups a program, W warps
  unfused    conv_igemm.sum_partials into fp16, then group_norm on it (two launches)
Each checked against group_norm_partials_ref in fp64 (max abs error <= 2x the engine plan's + 1e-3).
"""

from __future__ import annotations

import json
import sys

import torch

from speedsd.bench import common
from speedsd.kernels.conv_igemm import sum_partials
from speedsd.kernels.group_norm import group_norm
from speedsd.kernels.group_norm_partials import group_norm_partials, group_norm_partials_ref

SHAPES = {"unet16 split3": (2, 1280, 16, 16, 3), "unet8 split10": (2, 1280, 8, 8, 10)}


def variants() -> list[tuple[str, dict]]:
    out = [("engine", {})]
    for gb in (1, 2):
        for w in (4, 8, 16, 32):
            out.append((f"gb{gb}/w{w}", {"gb": gb, "warps": w}))
    return out


def shape_rows(n: int, c: int, h: int, w: int, split: int) -> list[dict]:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    parts = [((torch.randn(split, n * h * w, c, generator=g) + 0.2) * 0.5).to(dev) + i * 1e-3 for i in range(4)]
    weight = (1 + 0.1 * torch.randn(c, generator=g)).to(dev, torch.float16)
    bias = (0.1 * torch.randn(c, generator=g)).to(dev, torch.float16)
    add = (0.3 * torch.randn(n, c, generator=g)).to(dev, torch.float32)
    shape = (n, c, h, w)
    ref = group_norm_partials_ref(parts[0].double(), shape, 32, weight, bias, 1e-5, True, add)
    rows, base = [], None
    for name, knobs in variants():
        try:
            y = group_norm_partials(parts[0], shape, 32, weight, bias, 1e-5, True, add=add, **knobs)
            if y is None:
                rows.append({"variant": name, "skipped": "no fused plan"})
                continue
            e = (y.double() - ref).abs().max().item()
            base = e if base is None else base
            us = 1e3 * common.cycled_graph_ms(
                lambda p, kn=knobs: group_norm_partials(p, shape, 32, weight, bias, 1e-5, True, add=add, **kn),
                parts, reps=15,
            )  # fmt: skip
            rows.append({"variant": name, "us": us, "max_err": e})
        except Exception as ex:  # noqa: BLE001
            rows.append({"variant": name, "error": repr(ex)[:200]})
        print(shape, split, rows[-1], flush=True)
    ys = [torch.empty(shape, device=dev, dtype=torch.float16, memory_format=torch.channels_last) for _ in range(4)]

    def unfused(i: int) -> torch.Tensor:
        sum_partials(parts[i], None, ys[i])
        return group_norm(ys[i], 32, weight, bias, 1e-5, True, add=add)

    e = (unfused(0).double() - ref).abs().max().item()
    us = 1e3 * common.cycled_graph_ms(unfused, list(range(4)), reps=15)
    rows.append({"variant": "unfused", "us": us, "max_err": e})
    print(shape, split, rows[-1], flush=True)
    tol = 2 * (base or 0.0) + 1e-3
    for r in rows:
        if "max_err" in r:
            r["ok"] = bool(r["max_err"] <= tol)
    return rows


def main(out_json: str) -> None:
    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": common.git_commit()}
    for label, dims in SHAPES.items():
        res[label] = shape_rows(*dims)
    json.dump(res, open(out_json, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
