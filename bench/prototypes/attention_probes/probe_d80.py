# ruff: noqa: B023 -- the lambdas run within the loop iteration that defines them
"""d=80 self-attention at the UNet's 32² level (B=2, H=8, N=1024) and odd shapes: Gluon configs vs SDPA
(default = cuDNN), pinned cuDNN, flash backend, our Triton flash; error vs fp64 and graph replay µs."""

import dataclasses
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from speedsd.bench.common import graph_ms
from speedsd.kernels import attention_gluon as ag
from speedsd.kernels.flash_attention import flash_attention


def fused(B, H, N, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (torch.randn(B, N, 3 * H * D, device="cuda", generator=g) * 1.5 + 0.3).half()
    return tuple(t.unflatten(-1, (H, D)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))


out = []
cfgs = {
    f"gluon_s{s}_bn{bn}": dataclasses.replace(ag.HOPPER_D80, stages=s, block_n=bn)
    for bn in (64, 128)
    for s in (3, 4, 6)
}
for B, H, N in [(2, 8, 1024), (2, 8, 4096)]:
    q, k, v = fused(B, H, N, 80, seed=N)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    err16 = (F.scaled_dot_product_attention(q, k, v).double() - ref).abs().max().item()
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), "flash_triton": lambda: flash_attention(q, k, v)}

    def pinned(b):
        def f():
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(q, k, v)

        return f

    fns["sdpa_cudnn"] = pinned(SDPBackend.CUDNN_ATTENTION)
    fns["sdpa_flash"] = pinned(SDPBackend.FLASH_ATTENTION)
    for name, cfg in cfgs.items():
        if N % cfg.block_n == 0:
            fns[name] = lambda cfg=cfg: ag.attention_gluon(q, k, v, config=cfg)
    for name, fn in fns.items():
        row = {"B": B, "H": H, "N": N, "variant": name}
        try:
            o = fn()
            torch.cuda.synchronize()
            err = (o.double() - ref).abs().max().item()
            row.update(err=err, err16=err16, ok=err <= 2 * err16)
            row["us"] = round(graph_ms(fn, calls=20, reps=15) * 1e3, 2)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        out.append(row)
json.dump(out, open(sys.argv[1], "w"), indent=1)
