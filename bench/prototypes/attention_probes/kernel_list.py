"""Every kernel of one eager UNet step (default flags, CFG batch 2, 512²), in launch order with µs (median of 5
steps), and per kernel name: launches and µs. python kernel_list.py OUT.txt"""

import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import speedsd

pipe = speedsd.load("random:sd1.4", device="cuda", dtype=torch.float16)
eager = pipe.with_flags(pipe.flags.replace(cuda_graphs=False))
x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
t = torch.tensor(500.0, device="cuda")
ctx = eager.encode_text(["a photograph of an astronaut riding a horse", ""])
for _ in range(3):
    eager.unet_step(x, t, ctx)
torch.cuda.synchronize()
R = 5
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(R):
        eager.unet_step(x, t, ctx)
    torch.cuda.synchronize()
evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
evs.sort(key=lambda e: e.time_range.start)
n = len(evs) // R
seq = [evs[i * n : (i + 1) * n] for i in range(R)]
lines = [f"# {torch.cuda.get_device_name()} torch {torch.__version__}: {n} kernels a UNet step (eager, default flags)"]
agg = defaultdict(lambda: [0, 0.0])
tot = 0.0
for i in range(n):
    us = statistics.median(s[i].device_time for s in seq)
    name = seq[0][i].name
    tot += us
    agg[name[:100]][0] += 1
    agg[name[:100]][1] += us
    lines.append(f"{i:4d} {us:8.2f} {name[:150]}")
lines.append(f"\n# total {tot:.1f} µs\n# per name: launches, µs")
for k, (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    lines.append(f"{c:4d} {us:9.1f}  {k}")
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines[-60:]))
