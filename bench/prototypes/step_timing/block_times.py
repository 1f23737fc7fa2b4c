"""GPU time of one eager UNet step (default flags, CFG batch 2, 512²) per block and latent level: every ResNet,
Transformer2D, up/downsampler and the stem/head modules runs inside a profiler range (forward hooks), and each
range's device time (its kernels, children included) is summed per (level, kind). Median of 5 steps.

    python block_times.py OUT.txt
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import speedsd
from speedsd.models.layers import Downsample2D, ResnetBlock2D, Upsample2D
from speedsd.models.unet_blocks import Transformer2D

KINDS = {ResnetBlock2D: "resnet", Transformer2D: "transformer", Downsample2D: "downsample", Upsample2D: "upsample"}
TOP = ("conv_in", "time_embedding", "conv_norm_out", "conv_out")


def main(out: str) -> None:
    pipe = speedsd.load("random:sd1.4")
    eager = pipe.with_flags(pipe.flags.replace(cuda_graphs=False))
    unet = pipe.components.unet
    open_ranges: dict[int, record_function] = {}

    def pre(mod, args, label):  # noqa: ANN001
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        level = f"{x.shape[-1]}²" if x is not None and x.dim() == 4 else "-"
        rf = record_function(f"blk|{label}|{level}")
        rf.__enter__()
        open_ranges[id(mod)] = rf

    def post(mod, args, output):  # noqa: ANN001
        open_ranges.pop(id(mod)).__exit__(None, None, None)

    for name, m in unet.named_modules():
        kind = next((k for cls, k in KINDS.items() if isinstance(m, cls)), None)
        if kind is None and name in TOP:
            kind = name
        if kind is not None:
            m.register_forward_pre_hook(lambda mod, args, k=kind: pre(mod, args, k))
            m.register_forward_hook(post)
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    t = torch.tensor(500.0, device="cuda")
    ctx = eager.encode_text(["", "a photograph of an astronaut riding a horse"])
    for _ in range(3):
        eager.unet_step(x, t, ctx)
    torch.cuda.synchronize()
    per_step: list[dict[str, float]] = []
    totals = []
    for _ in range(5):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            eager.unet_step(x, t, ctx)
            torch.cuda.synchronize()
        acc: dict[str, float] = defaultdict(float)
        for e in prof.events():
            if e.name.startswith("blk|"):
                _, kind, level = e.name.split("|")
                acc[f"{level} {kind}"] += e.device_time_total
        per_step.append(acc)
        totals.append(sum(e.self_device_time_total for e in prof.events()))
    keys = sorted({k for a in per_step for k in a})
    med = {k: statistics.median(a.get(k, 0.0) for a in per_step) for k in keys}
    total = statistics.median(totals)
    lines = [f"# {torch.cuda.get_device_name()} torch {torch.__version__}: one eager UNet step's device time by block "
             f"(default flags, CFG batch 2, 512²), µs, median of 5; all kernels of the step {total:.1f}"]  # fmt: skip
    lines += [f"{med[k]:9.1f}  {k}" for k in sorted(keys, key=lambda k: -med[k])]
    levels: dict[str, float] = defaultdict(float)
    for k, v in med.items():
        levels[k.split()[0]] += v
    lines += ["# by input level:"] + [f"{v:9.1f}  {k}" for k, v in sorted(levels.items(), key=lambda kv: -kv[1])]
    open(out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
