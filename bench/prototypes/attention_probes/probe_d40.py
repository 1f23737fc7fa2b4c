# ruff: noqa: B023 -- the lambdas run within the loop iteration that defines them
"""d=40 self-attention B=2, H=8, N=4096: the engine config vs two-consumer configs (more registers each)."""

import dataclasses
import json
import sys

import torch
import torch.nn.functional as F

from speedsd.bench.common import graph_ms
from speedsd.kernels import attention_gluon as ag


def fused(B, H, N, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (torch.randn(B, N, 3 * H * D, device="cuda", generator=g) * 1.5 + 0.3).half()
    return tuple(t.unflatten(-1, (H, D)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))


cfgs = {"engine": ag.HOPPER_D40}
for bn in (64, 128):
    for st in (3, 4, 6):
        cfgs[f"nc2_bn{bn}_s{st}"] = dataclasses.replace(
            ag.HOPPER_D40, consumers=2, block_n=bn, stages=st, consumer_regs=232
        )
out = []
for B, H, N in [(2, 8, 4096)]:
    q, k, v = fused(B, H, N, 40, seed=N)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    err16 = (F.scaled_dot_product_attention(q, k, v).double() - ref).abs().max().item()
    for name, cfg in cfgs.items():
        row = {"B": B, "H": H, "N": N, "variant": name}
        try:
            fn = lambda cfg=cfg: ag.attention_gluon(q, k, v, config=cfg)
            r = fn()
            torch.cuda.synchronize()
            err = (r.double() - ref).abs().max().item()
            row.update(err=err, err16=err16, ok=bool(err <= 2 * err16))
            row["us"] = round(graph_ms(fn, calls=20, reps=15) * 1e3, 2)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        out.append(row)
json.dump(out, open(sys.argv[1], "w"), indent=1)
