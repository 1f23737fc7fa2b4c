"""Probe: the UNet's 8² (and 16²) 3x3 convs, where M = N·H·W is 128 (512) rows and the weights (29.5-59 MB)
dominate: the engine's path (ops.conv2d_op, the per-card table's choice) vs cuDNN vs im2col + one cuBLAS GEMM.

Each variant is timed from a CUDA graph of 16 back-to-back calls twice: with one weight (it stays in L2 after
the first call) and with 16 different weights (each call streams its weight from HBM, as in a UNet step).
Errors: max abs vs an fp64 conv of the same fp16 inputs.  python probe.py OUT.json
"""

import json
import statistics
import sys

import torch
import torch.nn.functional as F

from speedsd import ops
from speedsd.models.layers import Conv2d

CALLS = 16
SHAPES = [(2, 1280, 8, 1280), (2, 2560, 8, 1280), (2, 1280, 16, 1280), (2, 2560, 16, 1280), (2, 640, 16, 1280)]


def graph_ms(fns) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns[:3]:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / len(fns))
    return statistics.median(ts)


def im2col(x: torch.Tensor) -> torch.Tensor:
    """channels_last x [N, C, H, W] -> A [N·H·W, 9·C], column (r·3 + s)·C + c (the channels_last weight's order)."""
    n, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # [N, H+2, W+2, C]
    return torch.cat([xp[:, r : r + h, s : s + w, :] for r in range(3) for s in range(3)], dim=-1).reshape(n * h * w, 9 * c)


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    fast = ops.PRESETS["fast"]
    for n, ci, hw, co in SHAPES:
        x = (torch.randn(n, ci, hw, hw, device=dev) + 0.3).half().contiguous(memory_format=torch.channels_last)
        convs = []
        for _ in range(CALLS):
            cv = Conv2d(ci, co, 3, padding=1).to(dev).half()
            with torch.no_grad():
                cv.weight.copy_(torch.randn_like(cv.weight) / (3 * ci**0.5))
                cv.bias.copy_(torch.randn_like(cv.bias) * 0.1)
            cv.weight.data = cv.weight.data.contiguous(memory_format=torch.channels_last)
            convs.append(cv)
        w2 = [cv.weight.permute(0, 2, 3, 1).reshape(co, 9 * ci) for cv in convs]  # views of the channels_last weight
        a_pre = im2col(x)
        ref = F.conv2d(x.double(), convs[0].weight.double(), convs[0].bias.double(), padding=1)
        row = {"shape": f"{n}x{ci}x{hw}x{hw}->{co}", "weight_mib": convs[0].weight.numel() * 2 / 2**20}
        with ops.using(fast), torch.no_grad():
            variants = {
                "engine": lambda cv, w: ops.conv2d_op(x, cv),
                "cudnn": lambda cv, w: F.conv2d(x, cv.weight, cv.bias, padding=1),
                "im2col+linear": lambda cv, w: F.linear(im2col(x), w, cv.bias),
                "linear only": lambda cv, w: F.linear(a_pre, w, cv.bias),
                "im2col only": lambda cv, w: im2col(x),
            }
            for name, fn in variants.items():
                out = fn(convs[0], w2[0])
                if name in ("engine", "cudnn"):
                    err = float((out.double() - ref).abs().max())
                elif name != "im2col only":
                    err = float((out.double().reshape(n, hw, hw, co).permute(0, 3, 1, 2) - ref).abs().max())
                else:
                    err = None
                one = graph_ms([lambda f=fn: f(convs[0], w2[0])] * CALLS)
                many = graph_ms([lambda f=fn, c=c, w=w: f(c, w) for c, w in zip(convs, w2)])
                row[name] = {"l2_us": round(one, 2), "hbm_us": round(many, 2), "max_abs": err}
                print(row["shape"], f"{name:14s} L2 {one:7.2f} us  HBM {many:7.2f} us  err {err}", flush=True)
        res["rows"].append(row)
    json.dump(res, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
