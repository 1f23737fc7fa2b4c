"""One fresh-process row: python ab_attn.py <label> [--dpm]: default flags; label gluon1024 sends the
1024-token d80 self-attention to the Gluon kernel, sdpa1024 to SDPA (whatever the table says); any other
label: the table. Prints a JSON line."""

import json
import sys

import torch

import speedsd
from speedsd import attention_table
from speedsd.bench.e2e import measure_row

label = sys.argv[1]
if label in ("gluon1024", "sdpa1024"):
    real = attention_table.choose

    def choose(q_shape, k_shape, dtype, card=None):
        if q_shape[2] == 1024 and k_shape[2] == 1024 and q_shape[3] == 80:
            return label[:-4]
        return real(q_shape, k_shape, dtype, card)

    attention_table.choose = choose
pipe = speedsd.load("random:sd1.4", device="cuda", dtype=torch.float16)
m = measure_row(pipe, 20, 512, 20)
m2 = measure_row(pipe, 20, 512, 20, scheduler="dpmpp_2m") if "--dpm" in sys.argv else {}
out = {"label": label, **{k: round(v, 3) for k, v in m.items()}}
out.update({"dpm_" + k: round(v, 3) for k, v in m2.items() if "image" in k})
print(json.dumps(out), flush=True)
