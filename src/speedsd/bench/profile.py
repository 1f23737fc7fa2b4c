"""Where the GPU time of one UNet step and one VAE decode goes, by kernel category.

Kernels are timed by the profiler in eager mode (the same kernels a CUDA-graph replay runs, minus
the launch gaps), then grouped by what they do.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from speedsd.bench import common

CATEGORIES: list[tuple[str, str]] = [
    ("groupnorm", r"group_norm|groupnorm|_gn_"),
    ("attention", r"flash|fmha|attention|attn|_scores_kernel|_pv_kernel|softmax|cudnn_?sdpa|sdpa"),
    ("geglu/gelu", r"geglu|gelu"),
    ("winograd", r"winograd"),
    ("conv", r"conv|implicit|dgrad|wgrad|fprop|nhwc|xmma_fprop|cudnn"),
    ("gemm", r"gemm|cutlass|xmma|matmul|sm90_|cublas|nvjet"),
    ("layout copies", r"copy|transpose|permute|contiguous|cat|nchwToNhwc|nhwcToNchw"),
    ("elementwise", r"elementwise|vectorized|reduce|unrolled|add|mul"),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def profile(fn: Any, reps: int = 5) -> dict[str, Any]:
    """Per-category GPU time (µs per call) and the top kernels of ``fn``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per_cat: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time / reps if hasattr(e, "device_time") else e.cuda_time / reps
        per_cat[categorize(e.name)] += us
        k = per_kernel[e.name[:90]]
        k[0] += us
        k[1] += 1
    total = sum(per_cat.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "total_gpu_us": total,
        "categories_us": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n, "us": v[0], "launches": v[1] / reps} for n, v in top],
    }


def profile_pipeline(pipe: Any, size: int = 512) -> dict[str, Any]:
    """Profiles the UNet step (CFG batch 2) and the VAE decode of ``pipe`` with its flags, eager."""
    eager = pipe.with_flags(pipe.flags.replace(cuda_graphs=False))
    h = size // 8
    x = torch.randn(2, 4, h, h, device=pipe.device, dtype=pipe.dtype)
    z = torch.randn(1, 4, h, h, device=pipe.device, dtype=pipe.dtype)
    t = torch.tensor(500.0, device=pipe.device)
    ctx = eager.encode_text(["a photograph of an astronaut riding a horse", ""])
    return {
        "flags": str(pipe.flags),
        "unet_step": profile(lambda: eager.unet_step(x, t, ctx)),
        "vae_decode": profile(lambda: eager.decode_latents(z), reps=3),
    }


def markdown(res: dict[str, Any]) -> str:
    md = f"Flags: `{res['flags']}` (kernels timed eager; a graph replay runs the same kernels)\n"
    for part in ("unet_step", "vae_decode"):
        p = res[part]
        md += f"\n### {part}: {p['total_gpu_us'] / 1e3:.2f} ms of GPU kernels\n\n"
        md += common.md_table(
            ["category", "µs", "%"],
            [[c, us, 100 * us / p["total_gpu_us"]] for c, us in p["categories_us"].items()],
        )
        md += "\n\n" + common.md_table(
            ["top kernel", "µs", "launches"], [[k["name"], k["us"], k["launches"]] for k in p["top_kernels"][:10]]
        )
        md += "\n"
    return md
