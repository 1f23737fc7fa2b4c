"""A/B of the standalone UNet step as its own loop scope (session 29), one fresh process per run.

    python ab.py LABEL old|new

new: the tree as is (pipeline._unet_forward enters ops.loop_scope(inner=True): a step outside a denoising loop
folds its 16²/32² upsamplers and runs them sub-pixel). old: that scope replaced by a no-op in this process (the
upsamplers outside a loop run nearest + conv, as before). random:sd1.4, fp16, default flags, 512²:
- the standalone UNet step (CFG batch 2): synced median of 30 and back to back (common.back_to_back_ms);
- a 20-step Euler ancestral image (a sampler that draws noise: per-step graphs, the path this changes) and a
  20-step DPM++ 2M image (the whole-loop graph, unchanged: the control), medians of 7 after two warm images;
- peak allocated MiB over the Euler images, and over the standalone steps.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch


def main(label: str, mode: str) -> None:
    import speedsd
    from speedsd import pipeline
    from speedsd.bench import common

    if mode == "old":
        real_ops = pipeline.ops

        class _Ops:  # the pipeline module's ops, with loop_scope a no-op
            def __getattr__(self, name: str):  # noqa: ANN204
                if name == "loop_scope":
                    return lambda inner=False: contextlib.nullcontext()
                return getattr(real_ops, name)

        pipeline.ops = _Ops()
    pipe = speedsd.load("random:sd1.4")
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    t = torch.tensor(500.0, device="cuda")
    emb = pipe.encode_text(["", "a photograph of an astronaut riding a horse"])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    synced = common.median_ms(lambda: pipe.unet_step(x, t, emb), warmup=5, rep=30)
    b2b = common.back_to_back_ms(lambda: pipe.unet_step(x, t, emb))
    step_peak = (torch.cuda.max_memory_allocated() - base) / 2**20

    def image(sampler: str) -> float:
        t0 = time.perf_counter()
        pipe("a photograph of an astronaut riding a horse", steps=20, seed=0, output="tensor", scheduler=sampler)
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t0)

    out = {}
    for sampler in ("euler_a", "dpmpp_2m"):
        image(sampler)
        image(sampler)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out[sampler] = statistics.median(image(sampler) for _ in range(7))
        out[sampler + "_peak"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    print(f"{label} {mode}: step synced {synced:.3f} ms, back to back {b2b:.3f} ms, step peak +{step_peak:.0f} MiB; "
          f"euler_a {out['euler_a']:.2f} ms (+{out['euler_a_peak']:.0f} MiB); dpmpp_2m {out['dpmpp_2m']:.2f} ms "
          f"(+{out['dpmpp_2m_peak']:.0f} MiB)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
