"""GroupNorm(+SiLU) as the engine runs it (auto plan) on the shapes that take the rows path, per call from
CUDA-graph replay, for A/B of two source trees in fresh processes: python pair.py LABEL (prints a JSON line)."""

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


def main() -> None:
    row = {"label": sys.argv[1]}
    for n, c, h in ((2, 320, 64), (1, 512, 128), (1, 256, 256)):
        x, r = cl(n, c, h, h), cl(n, c, h, h)
        w, b = torch.rand(c, device="cuda").half() + 0.5, torch.randn(c, device="cuda").half()
        key = f"{n}x{c}x{h}²"
        row[key + " path"] = plan_for(n, c, h * h, 32, True, 2, x.device).path
        row[key] = round(graph_ms(functools.partial(group_norm, x, 32, w, b, eps=1e-5, silu=True)) * 1e3, 2)
        row[key + " handover"] = round(graph_ms(functools.partial(handover, x, b, r, w)) * 1e3, 2)
    x1, x2 = cl(2, 640, 64, 64), cl(2, 320, 64, 64)
    w, b = torch.rand(960, device="cuda").half() + 0.5, torch.randn(960, device="cuda").half()
    row["2x640+320x64²"] = round(graph_ms(functools.partial(group_norm, x1, 32, w, b, silu=True, concat=x2)) * 1e3, 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
