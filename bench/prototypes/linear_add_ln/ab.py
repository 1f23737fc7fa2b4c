"""One fresh-process pipeline row: python ab.py <label> [--dpm] [--lal BM,BK,W,S]: default flags, random SD-1.4
weights, 512², 20 steps; --lal puts the fused projection + add + LayerNorm at N = 320 with those tiles (the tree
under test must have kernels/linear_add_ln.py). Prints a JSON line."""

import json
import sys

import torch

import speedsd
from speedsd.bench.e2e import measure_row

label = sys.argv[1]
if "--lal" in sys.argv:
    import linear_add_ln as lal

    lal.CONFIGS[320] = tuple(int(v) for v in sys.argv[sys.argv.index("--lal") + 1].split(","))
pipe = speedsd.load("random:sd1.4", device="cuda", dtype=torch.float16)
m = measure_row(pipe, 20, 512, 20)
m2 = measure_row(pipe, 20, 512, 20, scheduler="dpmpp_2m") if "--dpm" in sys.argv else {}
out = {"label": label, **{k: round(v, 3) for k, v in m.items()}}
out.update({"dpm_" + k: round(v, 3) for k, v in m2.items() if "image" in k})
print(json.dumps(out), flush=True)
