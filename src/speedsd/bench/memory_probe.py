"""Where the GPU memory of a first 512² image goes (diagnostic; CUDA only; one variant per process).

    python -m speedsd.bench.memory_probe <variant>     # prints one line: RESULT {json}

Variants: ``current`` (the default pipeline), ``trace`` (also logs memory around every graph capture,
the eager live peaks of the VAE decode and a UNet step, and the decode's live peak and image per
decoder order: ``vae_orders``, see _decoder_orders), ``eager_vae`` (no VAE decode graph), ``nographs``
(the pipeline itself captures the VAE decode graph before the loop's since 29e8180, which retired the
``decode_first`` variant of `memory_probe.md`'s older rows); run with
PYTORCH_CUDA_ALLOC_CONF set for allocator variants. Reports the first image's peak allocated and
reserved memory, what the allocator holds afterwards, and the reserved/allocated MiB per memory pool
((0, 0) is the general pool, others are CUDA-graph pools). Results: bench/results/memory_probe.md.
"""

import json
import sys
import time

import torch

import speedsd
from speedsd import graphs

MiB = 2**20


def main() -> None:
    v = sys.argv[1] if len(sys.argv) > 1 else "current"
    log = []

    def rec(tag):
        torch.cuda.synchronize()
        log.append(
            (
                tag,
                round(torch.cuda.memory_allocated() / MiB),
                round(torch.cuda.memory_reserved() / MiB),
                round(torch.cuda.max_memory_allocated() / MiB),
                round(torch.cuda.max_memory_reserved() / MiB),
            )
        )

    if v == "trace":
        real = graphs.GraphCache._capture

        def cap(self, args, **kw):
            rec(f"before capture {getattr(self.fn, '__name__', '?')} {tuple(args[0].shape)}")
            out = real(self, args, **kw)
            rec(f"after capture {getattr(self.fn, '__name__', '?')}")
            return out

        graphs.GraphCache._capture = cap

    flags = None
    if v == "nographs":
        flags = speedsd.ops.PRESETS["fast"].replace(cuda_graphs=False)
    p = speedsd.load("random:sd1.4", flags=flags)
    weights = sum(t.numel() * t.element_size() for m in p.models() for t in m.parameters()) / MiB
    rec("loaded")
    torch.cuda.reset_peak_memory_stats()
    if v == "eager_vae":
        p._decode_graphs = None
    t0 = time.perf_counter()
    p("a cat", steps=20, seed=0, output="tensor")
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    rec("first image")
    first_peak_res = torch.cuda.max_memory_reserved() / MiB
    first_peak_alloc = torch.cuda.max_memory_allocated() / MiB
    torch.cuda.empty_cache()
    rec("after empty_cache")
    held = torch.cuda.memory_reserved() / MiB
    torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        p("a cat", steps=20, seed=0, output="tensor")
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    rec("5 more images")
    pools = {}
    for seg in torch.cuda.memory_snapshot():
        k = str(seg.get("segment_pool_id"))
        d = pools.setdefault(k, {"segments": 0, "total": 0, "allocated": 0, "stream": set()})
        d["segments"] += 1
        d["total"] += seg["total_size"] / MiB
        d["allocated"] += seg["allocated_size"] / MiB
        d["stream"].add(seg.get("stream"))
    for d in pools.values():
        d["stream"] = sorted(d["stream"])
        d["total"] = round(d["total"])
        d["allocated"] = round(d["allocated"])
    res = {
        "variant": v,
        "weights_mib": round(weights),
        "first_image_s": round(first_s, 2),
        "first_peak_reserved": round(first_peak_res),
        "first_peak_allocated": round(first_peak_alloc),
        "held_after_first": round(held),
        "steady_peak_reserved": round(torch.cuda.max_memory_reserved() / MiB),
        "steady_peak_allocated": round(torch.cuda.max_memory_allocated() / MiB),
        "image_ms_median": round(sorted(ts)[2], 2),
        "pools": pools,
        "log": log,
    }
    if v == "trace":
        # eager live-set peaks of the pieces (general pool), with graphs bypassed
        z = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        e = p.encode_text(["a", "b"])
        ts_ = torch.tensor([500, 500], device="cuda")
        for name, fn in [
            ("vae_decode_eager", lambda: p._vae_decode(z)),
            ("unet_eager", lambda: p._unet_forward(x, ts_, e)),
        ]:
            fn()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            res[name + "_live_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / MiB)
        res["vae_orders"] = _decoder_orders(p, z)
        # where in the decoder the live set peaks
        marks = []
        hooks = [
            m.register_forward_hook(
                lambda mod, i, o, n=n: marks.append((n, round((torch.cuda.max_memory_allocated() - base) / MiB)))
            )
            for n, m in p.vae.named_modules()
            if n.count(".") <= 2 and n
        ]
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        p._vae_decode(z)
        torch.cuda.synchronize()
        for h in hooks:
            h.remove()
        res["vae_marks"] = marks
    print("RESULT " + json.dumps(res))


def _decoder_orders(p, z: torch.Tensor) -> dict:
    """Eager VAE decode live peak (MiB over what was allocated before) per order: ``plain`` (the decoder
    keeps its activations, one conv per upsampler), ``owned`` (Owned boxes: blocks overwrite and free
    them), ``phases`` (upsamplers above PHASE_SPLIT_BYTES one phase at a time), ``both`` (the default);
    and whether each image is bit-identical to plain's (cuDNN runs four convs of Co channels for one of
    4·Co: equal as long as it keeps the same reduction order)."""
    from speedsd.kernels import subpixel_conv

    split, consume = subpixel_conv.PHASE_SPLIT_BYTES, p.vae.decoder.consume
    out, ref = {}, None
    try:
        for name, owned, phases in [("plain", 0, 0), ("owned", 1, 0), ("phases", 0, 1), ("both", 1, 1)]:
            p.vae.decoder.consume = bool(owned)
            subpixel_conv.PHASE_SPLIT_BYTES = split if phases else 2**62
            p._vae_decode(z)  # warm (cuDNN plans, folded weights)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            img = p._vae_decode(z)
            torch.cuda.synchronize()
            row = {"live_peak_mib": round((torch.cuda.max_memory_allocated() - base) / MiB, 1)}
            ref = img if ref is None else ref
            row["bit_identical"] = bool(torch.equal(img, ref))
            row["max_abs_diff"] = float((img.float() - ref.float()).abs().max())
            out[name] = row
    finally:
        subpixel_conv.PHASE_SPLIT_BYTES, p.vae.decoder.consume = split, consume
    return out


if __name__ == "__main__":
    main()
