"""`speedsd bench`: the paper's ablation table on your GPU, the peers beside it, and fidelity.

    speedsd bench --model random:sd1.4 --out bench/results

Rows add one optimization at a time (baseline → GroupNorm/GELU kernels → partially fused softmax →
FlashAttention → Winograd → channels-last + fused QKV → CUDA graphs); columns are the paper's: text
encoder, UNet per step, UNet x20, VAE decode, the whole 20-step image, peak memory, and the latency
reduction against the baseline. With diffusers installed the same run times diffusers eager (SDPA)
and diffusers + torch.compile(reduce-overhead, channels-last) on the same weights, and compares the
optimized fp16 image with diffusers fp32 next to diffusers' own fp16 image.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from typing import Any

import torch

from speedsd import ops
from speedsd.bench import common, targets
from speedsd.bench.peers import fidelity, peer_rows
from speedsd.kernels.winograd import drop_prepared


def ablation() -> list[tuple[str, ops.Flags]]:
    f = ops.Flags()
    rows = [("baseline", f)]
    f = f.replace(group_norm=True, gelu=True)
    rows.append(("+GroupNorm/GELU kernels", f))
    f = f.replace(attention="partial")
    rows.append(("+partially fused softmax", f))
    f = f.replace(attention="flash")
    rows.append(("+FlashAttention", f))
    f = f.replace(winograd=True)
    rows.append(("+Winograd", f))
    f = f.replace(channels_last=True, fused_qkv=True, attention="auto")
    rows.append(("+channels-last/QKV fusion, best attention", f))
    f = f.replace(fused_epilogues=True)
    rows.append(("+fused bias/residual/LayerNorm epilogues", f))
    f = f.replace(subpixel_upsample=True)
    rows.append(("+sub-pixel upsample convs", f))
    f = f.replace(igemm_conv=True)
    rows.append(("+Triton/Gluon convs for cuDNN's slow shapes (split-K 8², GroupNorm-folded heads, VAE)", f))
    f = f.replace(gemm_algos=True)
    rows.append(("+cuBLASLt algorithms per linear (per-card table)", f))
    f = f.replace(cuda_graphs=True)
    rows.append(("+CUDA graphs", f))
    return rows


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _needs_kernels(flags: ops.Flags) -> bool:
    return flags.group_norm or flags.gelu or flags.attention in ("partial", "flash") or flags.winograd


def measure_row(pipe: Any, steps: int, size: int, reps: int, scheduler: str = "pndm") -> dict[str, float]:
    """Per-component medians (ms) and the whole image, for one pipeline (one set of flags).

    The image uses ``scheduler``: PNDM (diffusers' SD default) evaluates the UNet steps + 1 times."""
    h = w = size // 8
    dev, dt = pipe.device, pipe.dtype
    ids = pipe.components.tokenizer(["a photograph of an astronaut riding a horse"] * 2)
    ids = ids.to(dev)
    ctx = pipe.encode_ids(ids)
    x = torch.randn(2, 4, h, w, device=dev, dtype=dt)
    t = torch.tensor(500.0, device=dev)
    z = torch.randn(1, 4, h, w, device=dev, dtype=dt)
    out: dict[str, float] = {}
    out["text_encoder_ms"] = common.median_ms(lambda: pipe.encode_ids(ids), warmup=3, rep=reps)
    out["unet_step_ms"] = common.median_ms(lambda: pipe.unet_step(x, t, ctx), warmup=3, rep=reps)
    out[f"unet_x{steps}_ms"] = out["unet_step_ms"] * steps
    out["vae_decode_ms"] = common.median_ms(lambda: pipe.decode_latents(z), warmup=2, rep=max(3, reps // 2))
    if torch.cuda.is_available() and pipe.flags.cuda_graphs:  # back to back (common.back_to_back_ms): the host's
        # issue time hidden (an eager row stays bound by its launches either way, so it is not timed twice)
        out["unet_step_b2b_ms"] = common.back_to_back_ms(lambda: pipe.unet_step(x, t, ctx), calls=steps)
        out["vae_decode_b2b_ms"] = common.back_to_back_ms(lambda: pipe.decode_latents(z), calls=5, runs=5)

    def image() -> None:
        pipe(
            "a photograph of an astronaut riding a horse",
            steps=steps,
            height=size,
            width=size,
            seed=0,
            output="tensor",
            scheduler=scheduler,
        )
        _sync()

    image()  # warm: Triton JIT, scheduler tables (the first image runs eagerly: GraphCache.capture_after)
    image()  # the second image captures the loop and the VAE decode; the timed ones replay
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # drop blocks cached by eager warm-up runs: what remains is held for real
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(max(3, reps // 5)):
        t0 = time.perf_counter()
        image()
        times.append((time.perf_counter() - t0) * 1e3)
    out["image_ms"] = sorted(times)[len(times) // 2]
    if torch.cuda.is_available():
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        # allocated blocks plus the CUDA-graph pools (activations of the captured graphs live there)
        out["footprint_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def variants(default: ops.Flags) -> list[tuple[str, ops.Flags]]:
    """The default (fastest) set and one change at a time, all with CUDA graphs: what each piece buys."""
    return [
        ("default", default),
        ("default, NCHW", default.replace(channels_last=False)),
        ("default, attention=sdpa", default.replace(attention="sdpa")),
        ("default, attention=flash (ours)", default.replace(attention="flash")),
        ("default, Winograd " + ("off" if default.winograd else "on (per-layer table)"),
         default.replace(winograd=not default.winograd)),
        ("default, no fused epilogues", default.replace(fused_epilogues=False)),
        ("default, no sub-pixel upsample convs", default.replace(subpixel_upsample=False)),
        ("default, no Triton convs", default.replace(igemm_conv=False)),
        ("default, torch's GEMM algorithms", default.replace(gemm_algos=False)),
        ("default, no GroupNorm/GELU kernels", default.replace(group_norm=False, gelu=False)),
    ]  # fmt: skip


def _measure(
    base: Any, name: str, flags: ops.Flags, steps: int, size: int, reps: int, scheduler: str = "pndm"
) -> dict[str, Any]:
    import gc

    pipe = base.with_flags(flags)
    t_first = time.perf_counter()
    try:
        m: dict[str, Any] = measure_row(pipe, steps, size, reps, scheduler)
    except Exception as e:  # one failing row must not lose the table; the error is reported in it
        m = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        print(f"{name:45s} ERROR {m['error']}", flush=True)
        return m
    finally:
        del pipe
        for model in base.models():
            drop_prepared(model)  # derived filters of a Winograd row: not the next row's memory
        gc.collect()  # pipelines hold their graphs through bound methods: free them before the next row
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    m["first_row_s"] = time.perf_counter() - t_first
    print(f"{name:45s} " + " ".join(f"{k}={v:.2f}" for k, v in m.items()), flush=True)
    return m


def run(
    model: str,
    steps: int = 20,
    size: int = 512,
    reps: int = 20,
    peers: bool = True,
    rows: str = "all",
    graphed: bool = True,
    profile: bool = True,
    targets_only: bool = False,
) -> dict:
    """``targets_only``: no ablation; the default flags' rows (PNDM and DPM++ 2M), cold start (CUDA), the
    peers and fidelity: what :mod:`speedsd.bench.targets` judges, in a few minutes."""
    import speedsd

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    base = speedsd.load(model, device=device, dtype=dtype, flags=ops.Flags())
    load_s = time.perf_counter() - t0
    weight_mib = sum(p.numel() * p.element_size() for m in base.models() for p in m.parameters()) / 2**20
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    results: list[dict[str, Any]] = []
    for name, flags in ablation():
        if targets_only or (rows != "all" and name not in rows.split(",")):
            continue
        if device != "cuda" and not interp and (_needs_kernels(flags) or flags.cuda_graphs):
            results.append({"row": name, "flags": asdict(flags), "skipped": "needs CUDA"})
            continue
        row = {"row": name, "flags": asdict(flags), **_measure(base, name, flags, steps, size, reps)}
        if graphed and device == "cuda" and not flags.cuda_graphs:
            # Eager rows are bound by launch overhead (Triton's Python launcher costs more CPU per launch
            # than torch's ops), which hides what each kernel saves on the GPU: measure each row replayed
            # from CUDA graphs as well.
            row["graphed"] = _measure(base, name + " [graphs]", flags.replace(cuda_graphs=True), steps, size, reps)
        results.append(row)
    for key in ("image_ms",):
        base_v = next((r[key] for r in results if key in r), None)
        base_g = next((r["graphed"][key] for r in results if key in r.get("graphed", {})), None)
        for r in results:
            if key in r and base_v:
                r["reduction_pct"] = 100.0 * (1 - r[key] / base_v)
            if key in r.get("graphed", {}) and base_g:
                r["graphed"]["reduction_pct"] = 100.0 * (1 - r["graphed"][key] / base_g)
    payload: dict[str, Any] = {
        "model": model,
        "steps": steps,
        "size": size,
        "dtype": str(dtype),
        "load_s": load_s,
        "weight_mib": weight_mib,
        "ablation": results,
    }
    if targets_only or (device == "cuda" and rows == "all"):
        default = ops.default_flags(device)
        named = [("default", default)] if targets_only else variants(default)
        payload["variants"] = [
            {"row": n, "flags": asdict(f), **_measure(base, n, f, steps, size, reps)} for n, f in named
        ]
        # like for like with peers that count one UNet evaluation per step (PNDM makes steps + 1)
        n = f"default, DPM-Solver++ 2M ({steps} UNet evaluations)"
        row = _measure(base, n, default, steps, size, reps, scheduler="dpmpp_2m")
        payload["variants"].append({"row": n, "flags": asdict(default), "scheduler": "dpmpp_2m", **row})
        if profile and device == "cuda" and not targets_only:
            from speedsd.bench.profile import profile_pipeline

            payload["profile"] = profile_pipeline(base.with_flags(default), size)
        if device == "cuda":
            payload["cold_start"] = cold_start(model, size)
    if peers:
        payload["peers"] = peer_rows(base, steps, size, reps)
        payload["fidelity"] = fidelity(base.with_flags(ops.default_flags(device)), steps, size)
    payload["targets"] = targets.verdicts(payload)
    return payload


def cold_start(model: str, size: int) -> dict[str, float]:
    """New process → first image (default flags), with an empty Triton cache, then with it warm."""
    import subprocess
    import sys
    import tempfile

    code = (
        "import time; t0 = time.perf_counter(); import torch, speedsd, speedsd.pipeline; "
        "torch.empty(1, device='cuda'); ti = time.perf_counter(); "
        f"p = speedsd.load({model!r}); torch.cuda.synchronize(); t1 = time.perf_counter(); "
        f"image = lambda: p('a cat', steps=20, height={size}, width={size}, seed=0, output='tensor'); "
        "image(); torch.cuda.synchronize(); t2 = time.perf_counter(); first_done = time.time(); "
        "image(); torch.cuda.synchronize(); t3 = time.perf_counter(); torch.cuda.empty_cache(); "
        "print('SPLIT', first_done, ti - t0, t1 - ti, t2 - t1, t3 - t2, torch.cuda.max_memory_allocated() / 2**20, "
        "torch.cuda.memory_reserved() / 2**20, torch.cuda.max_memory_reserved() / 2**20)"
    )
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        for label in ("first_ever", "warm_cache"):
            launched = time.time()  # wall clock: the child reports when its first image was done
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                res[f"{label}_error"] = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
                continue
            split = out.stdout.split("SPLIT")[-1].split()
            first_done, import_s, load_s, image_s, second_s, peak, held, peak_reserved = (float(v) for v in split)
            total = first_done - launched  # new process -> first image (the second one is extra)
            res[f"{label}_s"], res[f"{label}_import_s"] = total, import_s
            res[f"{label}_load_s"], res[f"{label}_first_image_s"] = load_s, image_s
            res[f"{label}_second_image_s"] = second_s  # captures the loop and decode graphs
            # over both images (the eager first one, the second one's captures): the true high-water mark
            res[f"{label}_two_images_peak_mib"], res[f"{label}_held_after_mib"] = peak, held
            res[f"{label}_two_images_peak_reserved_mib"] = peak_reserved  # what the device had to give
            print(
                f"cold start ({label}): {total:.1f} s (import {import_s:.1f} s, load {load_s:.1f} s, "
                f"first image {image_s:.1f} s; second image {second_s:.1f} s; peak {peak:.0f} MiB)",
                flush=True,
            )
    return res


def markdown(payload: dict) -> str:
    steps = payload["steps"]
    cols = ["text_encoder_ms", "unet_step_ms", f"unet_x{steps}_ms", "vae_decode_ms", "image_ms", "peak_mib",
            "footprint_mib"]  # fmt: skip
    rows = []
    for r in payload["ablation"]:
        if "skipped" in r:
            rows.append([r["row"]] + ["-"] * (len(cols) + 1))
            continue
        rows.append([r["row"]] + [r.get(c, "-") for c in cols] + [f"{r.get('reduction_pct', 0):.1f} %"])
    head = ["config", "text enc ms", "UNet/step ms", f"UNet x{steps} ms", "VAE ms", "image ms", "peak MiB",
            "held MiB", "vs base"]  # fmt: skip
    md = ""
    if any(t["met"] is not None for t in payload.get("targets", [])):
        where = f"{payload['model']}, {payload['size']}², {steps} steps"
        md += f"## Targets ({where}; they are stated for SD-1.4 at 512², 20 steps)\n\n"
        md += targets.markdown(payload["targets"]) + "\n\n"
    if rows:
        md += f"## Ablation, eager ({payload['model']}, {payload['size']}², {steps} steps, {payload['dtype']})\n\n"
        md += common.md_table(head, rows) + "\n"
    graphed = [r for r in payload["ablation"] if "graphed" in r or r["flags"].get("cuda_graphs")]
    if graphed:
        md += "\n## Ablation, every row replayed from CUDA graphs (GPU work without launch overhead)\n\n"
        grows = []
        for r in graphed:
            g = r.get("graphed", r)
            grows.append([r["row"]] + [g.get(c, "-") for c in cols] + [f"{g.get('reduction_pct', 0):.1f} %"])
        md += common.md_table(head, grows) + "\n"
    if payload.get("variants"):
        md += "\n## The default flags, one piece changed at a time (CUDA graphs on)\n\n"
        b2b = ["unet_step_b2b_ms", "vae_decode_b2b_ms"]  # calls back to back (common.back_to_back_ms)
        vrows = [[r["row"]] + [r.get(c, "-") for c in cols + b2b] for r in payload["variants"]]
        md += common.md_table(head[:-1] + ["UNet/step ms, back to back", "VAE ms, back to back"], vrows) + "\n"
    if payload.get("profile"):
        from speedsd.bench.profile import markdown as profile_md

        md += "\n## Profile of the default flags\n\n" + profile_md(payload["profile"]) + "\n"
    if payload.get("peers"):
        md += "\n## Peers (same weights, same run)\n\n"
        md += common.md_table(
            [
                "peer",
                "UNet/step ms",
                "VAE ms",
                "UNet/step ms, back to back",
                "VAE ms, back to back",
                "first call s",
                "peak MiB",
            ],
            [
                [
                    p["peer"],
                    p.get("unet_step_ms", "-"),
                    p.get("vae_decode_ms", "-"),
                    p.get("unet_step_b2b_ms", "-"),
                    p.get("vae_decode_b2b_ms", "-"),
                    p.get("first_call_s", "-"),
                    p.get("peak_mib", "-"),
                ]
                for p in payload["peers"]
            ],
        )
    if payload.get("cold_start"):
        md += "\n\n## Cold start (new process → first image)\n\n"
        md += common.md_table(["what", "s"], [[k, v] for k, v in payload["cold_start"].items()])
    if payload.get("fidelity"):
        f = payload["fidelity"]
        md += "\n\n## Fidelity (against diffusers fp32, identical weights and noise)\n\n"
        md += common.md_table(
            ["image", "max abs err", "PSNR dB"],
            [[k, v["max_abs"], v["psnr_db"]] for k, v in f.items() if isinstance(v, dict)],
        )
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="speedsd bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:sd1.4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-graphed", action="store_true", help="skip the graphed copy of each eager row")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--rows", default="all", help="comma-separated row names, or all")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="e2e")
    ap.add_argument(
        "--targets",
        action="store_true",
        help="only what the targets need: the default rows, cold start, peers, fidelity (no ablation)",
    )
    a = ap.parse_args(argv)
    if a.steps < 1 or a.size % 8:
        ap.error("steps must be >= 1 and size a multiple of 8")
    payload = run(
        a.model,
        a.steps,
        a.size,
        a.reps,
        peers=not a.no_peers,
        rows=a.rows,
        graphed=not a.no_graphed,
        profile=not a.no_profile,
        targets_only=a.targets,
    )
    md = markdown(payload)
    jp, _ = common.write_results(a.out, a.name, payload, md)
    if any("image_ms" in r for r in payload["ablation"]):
        from speedsd.bench.chart import draw

        draw(json.loads(jp.read_text()), jp.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
