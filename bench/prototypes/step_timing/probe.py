"""Probe: how much of a "UNet step" figure is the timing method? (session 29)

    python probe.py OUT.json

The bench times one call at a time (``common.median_ms``: events around the call, then a host sync), so each sample
includes the GPU waiting for the host to issue the call (input copies, the graph launch; for torch.compile's
reduce-overhead, cudagraph-trees' Python and guards). ANCHORS.md's peer figure (7.37 ms, H200) came from "CUDA events
/ triton.testing.do_bench medians", and do_bench issues calls back to back. Here, in one process, on the same random
SD-1.4 weights, for speedsd's graphed step and diffusers + torch.compile(reduce-overhead, channels-last):
  synced     median_ms (the bench's method)
  b2b        events around 20 calls issued back to back, per call; median of 7 runs (call 2 ran this as an
             inline helper at 13dc8da; it became speedsd.bench.common.back_to_back_ms, same defaults)
  do_bench   triton.testing.do_bench (L2 flushed before each call, back to back), median
  host_ms    host time to issue one call (perf_counter, no sync), median of 20
and the same for the VAE decode.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import triton.testing

from speedsd.bench import common


def host_ms(fn, n: int = 20) -> float:  # noqa: ANN001
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    return statistics.median(ts)


def methods(fn) -> dict[str, float]:  # noqa: ANN001
    return {"synced": common.median_ms(fn, warmup=5, rep=50), "b2b": common.back_to_back_ms(fn),
            "do_bench": float(triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")),
            "host_ms": host_ms(fn)}  # fmt: skip


def main(out_json: str) -> None:
    import speedsd
    from speedsd.bench.peers import _diffusers_models

    pipe = speedsd.load("random:sd1.4")
    dev, dt = pipe.device, pipe.dtype
    x = torch.randn(2, 4, 64, 64, device=dev, dtype=dt)
    z = torch.randn(1, 4, 64, 64, device=dev, dtype=dt)
    t = torch.tensor(500.0, device=dev)
    ctx = pipe.encode_text(["", "a photograph of an astronaut riding a horse"])
    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": common.git_commit()}
    with torch.inference_mode():
        res["ours_unet"] = methods(lambda: pipe.unet_step(x, t, ctx))
        print("ours unet", res["ours_unet"], flush=True)
        res["ours_vae"] = methods(lambda: pipe.decode_latents(z))
        print("ours vae", res["ours_vae"], flush=True)
        unet, vae, _ = _diffusers_models(pipe, dt)
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
        vae.set_attn_processor(AttnProcessor2_0())
        cu = torch.compile(unet.to(memory_format=torch.channels_last), mode="reduce-overhead")
        cv = torch.compile(vae.to(memory_format=torch.channels_last).decode, mode="reduce-overhead")
        for _ in range(3):
            cu(x, t, ctx)
            cv(z)
        torch.cuda.synchronize()
        res["peer_unet"] = methods(lambda: cu(x, t, ctx).sample)
        print("peer unet", res["peer_unet"], flush=True)
        res["peer_vae"] = methods(lambda: cv(z).sample)
        print("peer vae", res["peer_vae"], flush=True)
        # ours once more, after the peer (clock/thermal drift check)
        res["ours_unet_again"] = methods(lambda: pipe.unet_step(x, t, ctx))
        print("ours unet again", res["ours_unet_again"], flush=True)
    for part in ("unet", "vae"):
        ours, peer = res[f"ours_{part}"], res[f"peer_{part}"]
        res[f"ratio_{part}"] = {m: peer[m] / ours[m] for m in ("synced", "b2b", "do_bench")}
    print("ratios", res["ratio_unet"], res["ratio_vae"])
    json.dump(res, open(out_json, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
