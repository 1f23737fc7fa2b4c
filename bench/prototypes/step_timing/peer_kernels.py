"""Every kernel of one UNet step of the peer (diffusers + torch.compile, channels-last; mode "default": the
reduce-overhead peer's kernels without its CUDA graphs, so the profiler sees every launch), random SD-1.4
weights, CFG batch 2, 512²: per kernel name launches and µs (median of 5 steps), and a coarse split by kind,
to set against ours (kernel_list_h200_*.txt). python peer_kernels.py OUT.txt"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import speedsd
from speedsd.bench.peers import _diffusers_models


def kind(name: str) -> str:
    n = name.lower()
    if "triton" in n:  # inductor's generated kernels: fused pointwise / norms / reductions
        if "red" in n or "per" in n:
            return "inductor reduction (norms, softmax)"
        return "inductor pointwise"
    if "fmha" in n or "flash" in n or "attention" in n or "sdpa" in n:
        return "attention"
    if "fprop" in n or "conv" in n or "implicit" in n or "dgrad" in n:
        return "conv (cuDNN)"
    if "nvjet" in n or "gemm" in n or "cutlass" in n or "sm90_xmma" in n:
        return "GEMM (cuBLAS)"
    return "other"


def main(out: str) -> None:
    pipe = speedsd.load("random:sd1.4")
    dev, dt = pipe.device, pipe.dtype
    x = torch.randn(2, 4, 64, 64, device=dev, dtype=dt)
    t = torch.tensor(500.0, device=dev)
    ctx = pipe.encode_text(["", "a photograph of an astronaut riding a horse"])
    unet, _, _ = _diffusers_models(pipe, dt)
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    del pipe
    cu = torch.compile(unet.to(memory_format=torch.channels_last), mode="default")
    with torch.inference_mode():
        for _ in range(5):
            cu(x, t, ctx)
        torch.cuda.synchronize()
        R = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(R):
                cu(x, t, ctx)
            torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    n = len(evs) // R
    seq = [evs[i * n : (i + 1) * n] for i in range(R)]
    per = defaultdict(list)
    for s in seq:
        acc = defaultdict(float)
        cnt = defaultdict(int)
        for e in s:
            acc[e.name] += e.time_range.elapsed_us()
            cnt[e.name] += 1
        for k in acc:
            per[k].append((cnt[k], acc[k]))
    rows = sorted(((statistics.median(v[1] for v in vs), vs[0][0], k) for k, vs in per.items()), reverse=True)
    total = sum(r[0] for r in rows)
    kinds = defaultdict(float)
    for us, _, name in rows:
        kinds[kind(name)] += us
    lines = [f"# {torch.cuda.get_device_name()} torch {torch.__version__}: the peer's UNet step, {n} kernels "
             f"(diffusers + torch.compile, channels-last, mode default), {total:.1f} µs"]  # fmt: skip
    lines += ["# by kind, µs:"] + [f"{v:9.1f}  {k}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines += ["# per name: launches, µs"] + [f"{c:4d} {us:9.1f}  {name[:110]}" for us, c, name in rows]
    open(out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main(sys.argv[1])
