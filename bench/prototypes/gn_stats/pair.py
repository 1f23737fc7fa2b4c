"""GroupNorm(+SiLU) as the engine runs it (auto plan) on the UNet's 64² (rows path) and 32² and the VAE's
(split path) shapes, per call from CUDA-graph replay, with each output's max abs error against torch fp32
GroupNorm+SiLU (err) and torch fp16's (err16), for A/B of two source trees in fresh processes:
python pair.py LABEL (prints a JSON line)."""

import functools
import json
import sys

import torch

from speedsd.bench.common import graph_ms
from speedsd.kernels.add_gn_stats import add_with_group_norm_stats
from speedsd.kernels.group_norm import group_norm
from speedsd.kernels.group_norm_plan import plan_for


def cl(*shape: int) -> torch.Tensor:
    return (torch.randn(shape, device="cuda") * 1.5 + 0.3).half().to(memory_format=torch.channels_last)


def handover(x: torch.Tensor, b: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = add_with_group_norm_stats(x, b, r, 32)
    return group_norm(y, 32, w, b, eps=1e-5, silu=True)


def errors(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 32, w.float(), b.float(), 1e-5))
    low = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, w, b, 1e-5))
    return round((got.float() - ref).abs().max().item(), 5), round((low.float() - ref).abs().max().item(), 5)


def main() -> None:
    row = {"label": sys.argv[1]}
    for n, c, h in ((2, 320, 64), (2, 640, 32), (2, 1280, 32), (1, 512, 128), (1, 256, 256)):
        x, r = cl(n, c, h, h), cl(n, c, h, h)
        w, b = torch.rand(c, device="cuda").half() + 0.5, torch.randn(c, device="cuda").half()
        key = f"{n}x{c}x{h}²"
        row[key + " path"] = plan_for(n, c, h * h, 32, True, 2, x.device).path
        row[key] = round(graph_ms(functools.partial(group_norm, x, 32, w, b, eps=1e-5, silu=True)) * 1e3, 2)
        row[key + " err, err16"] = errors(group_norm(x, 32, w, b, eps=1e-5, silu=True), x, w, b)
        row[key + " handover"] = round(graph_ms(functools.partial(handover, x, b, r, w)) * 1e3, 2)
    for c1, c2, h in ((640, 320, 64), (1280, 640, 32)):
        x1, x2 = cl(2, c1, h, h), cl(2, c2, h, h)
        w, b = torch.rand(c1 + c2, device="cuda").half() + 0.5, torch.randn(c1 + c2, device="cuda").half()
        key = f"2x{c1}+{c2}x{h}²"
        fn = functools.partial(group_norm, x1, 32, w, b, eps=1e-5, silu=True, concat=x2)
        row[key] = round(graph_ms(fn) * 1e3, 2)
        row[key + " err, err16"] = errors(fn(), torch.cat([x1, x2], 1), w, b)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
