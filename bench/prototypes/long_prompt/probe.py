"""What a long prompt costs on the GPU (session 24): the 20-step 512² image with prompts read in 1, 2 and 3
blocks of 75 tokens (context 77, 154, 231), and the cross-attention at 154 / 231 keys per backend.

    python bench/prototypes/long_prompt/probe.py OUT.json

random:sd1.4, fp16, default flags (CUDA graphs), DPM++ 2M, the image timed as bench.e2e does (wall clock,
synchronized, median of 9 after an eager and a capturing run). Attention: CUDA-graph replay of 50 calls on the
model's head-split views (bench.kernels_attention.make_qkv), the median of 5 replays, and the error against
an fp32 reference.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import speedsd
from speedsd import attention_table
from speedsd.bench.common import graph_ms
from speedsd.bench.kernels_attention import make_qkv
from speedsd.kernels.flash_attention import flash_attention

PROMPTS = {
    1: "a photograph of an astronaut riding a horse",
    2: "a photograph of an astronaut riding a horse on the moon, " * 9,
    3: "a photograph of an astronaut riding a horse on the moon, " * 17,
}


def image_ms(pipe, prompt: str) -> float:
    def image() -> None:
        pipe(prompt, steps=20, height=512, width=512, seed=0, output="tensor", scheduler="dpmpp_2m")
        torch.cuda.synchronize()

    image()
    image()
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        image()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_us(fn, calls: int = 50) -> float:
    """µs a call from CUDA-graph replay (speedsd.bench.common.graph_ms: median of 5 replays)."""
    return graph_ms(fn, calls=calls, reps=5) * 1e3


def main(out: str) -> None:
    pipe = speedsd.load("random:sd1.4", device="cuda", dtype=torch.float16)
    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "images": {}, "attention": []}
    import triton

    res["triton"] = triton.__version__
    for k, prompt in PROMPTS.items():
        assert pipe.tokenizer.chunks(prompt) == k, (k, pipe.tokenizer.chunks(prompt))
        res["images"][f"{k} block(s), context {77 * k}"] = image_ms(pipe, prompt)
        print(k, res["images"], flush=True)
    for nk in (77, 154, 231):
        for label, nq, d in (("64²", 4096, 40), ("32²", 1024, 80), ("16²", 256, 160), ("8²", 64, 160)):
            q, kk, v = make_qkv(2, 8, nq, nk, d)
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kk.float(), v.float())
            fns = {
                "sdpa": lambda q=q, kk=kk, v=v: torch.nn.functional.scaled_dot_product_attention(q, kk, v),
                "flash": lambda q=q, kk=kk, v=v: flash_attention(q, kk, v),
            }
            row = {"shape": f"{label} {nq}x{nk} d{d}", "auto": attention_table.choose(q.shape, kk.shape, q.dtype)}
            for name, fn in fns.items():
                row[f"{name}_us"] = graph_us(fn)
                row[f"{name}_err"] = float((fn().float() - ref).abs().max())
            res["attention"].append(row)
            print(row, flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
