"""A/B of Flags.gemm_algos (the per-card cuBLASLt algorithm table) in one fresh process: random:sd1.4, fp16,
default flags but gemm_algos as given; a 20-step 512² DPM++ 2M image (median of 9 after two warm images) and the
graphed UNet step (CFG batch 2, median of 50 replays, events around each).

    python ab.py LABEL on|off [SIZE] [MODEL]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main(label: str, mode: str, size: int = 512, model: str = "random:sd1.4") -> None:
    import speedsd
    from speedsd import ops

    flags = ops.default_flags(torch.device("cuda")).replace(gemm_algos=mode == "on")
    pipe = speedsd.load(model, flags=flags)

    def one() -> None:
        pipe("a photograph of an astronaut riding a horse", steps=20, seed=0, output="tensor", scheduler="dpmpp_2m",
             height=size, width=size)
        torch.cuda.synchronize()

    one()
    one()
    one()
    ts = []
    for _ in range(9):
        t0 = time.perf_counter()
        one()
        ts.append(1e3 * (time.perf_counter() - t0))
    x = torch.randn(2, 4, size // 8, size // 8, device="cuda")
    emb = pipe.encode_text(["", "a photograph of an astronaut riding a horse"])
    t = torch.tensor(500, device="cuda")
    for _ in range(3):
        pipe.unet_step(x, t, emb)
    steps = []
    for _ in range(50):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        pipe.unet_step(x, t, emb)
        b.record()
        b.synchronize()
        steps.append(a.elapsed_time(b))
    print(f"{label} {model} {size}² gemm_algos={mode} image_ms {statistics.median(ts):.2f} (min {min(ts):.2f}) "
          f"unet_step_ms {statistics.median(steps):.3f} (min {min(steps):.3f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 512,
         sys.argv[4] if len(sys.argv) > 4 else "random:sd1.4")
