"""Winograd tile study: every 3x3 stride-1 conv shape of SD-1.4's UNet and VAE decoder, per method.

    python -m speedsd.bench.winograd_study --out DIR [--table src/speedsd/data/winograd_table.json]
    python -m speedsd.bench.winograd_study --out DIR --from-json DIR/winograd_study.json   # re-render only

Per layer shape, fp16: cuDNN (channels-last and NCHW) and Winograd F(2,3)/F(4,3)/F(6,3) with each GEMM
variant (Triton batched GEMM with fp32 M, cuBLAS bmm with fp16 M, fused GEMM + output transform for
tiles 2 and 4, and the error-compensated triton3 / bmm3: U and V as fp16 hi + lo, 3x the reduction,
fp32 M). Reports median time (do_bench: eager, L2 flushed) and, on CUDA, the time per call replayed
from a CUDA graph (the engine's fast preset; no host launch cost), TFLOP/s counted as direct-conv FLOPs,
extra bytes of transformed tensors, and the error ‖out − ref‖/‖ref‖ against F.conv2d in fp64, next to
cuDNN's own fp16 error. A Winograd variant is usable on a layer only if its error ≤ --max-err-ratio (2)
× cuDNN's; the choice takes the fastest usable method by --timing (graph where measured). The table
is merged into --table under this card's name; the markdown ends with a written conclusion and a
sensitivity line (choices at other error ratios). One process, a few minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench.common import do_bench_ms, md_table, median_ms, rel_err, write_results
from speedsd.bench.winograd_report import SENSITIVITY, choose, conclusion, sensitivity_line
from speedsd.kernels import winograd as wg

# (model, N, Cin, H, Cout), square H = W. UNet: CFG batch 2, 64² latents; VAE decoder: batch 1, 512² image.
UNET = [
    (64, 4, 320), (64, 320, 320), (64, 960, 320), (64, 640, 320), (64, 640, 640), (64, 320, 4),
    (32, 320, 640), (32, 640, 640), (32, 1920, 640), (32, 1280, 640), (32, 960, 640), (32, 1280, 1280),
    (16, 640, 1280), (16, 1280, 1280), (16, 2560, 1280), (16, 1920, 1280),
    (8, 1280, 1280), (8, 2560, 1280),
]  # fmt: skip
VAE = [
    (64, 4, 512), (64, 512, 512), (128, 512, 512), (256, 512, 512), (256, 512, 256), (256, 256, 256),
    (512, 256, 256), (512, 256, 128), (512, 128, 128), (512, 128, 3),
]  # fmt: skip
SHAPES = [("unet", 2, c, h, o) for h, c, o in UNET] + [("vae", 1, c, h, o) for h, c, o in VAE]
SMOKE = [("unet", 2, 16, 6, 24), ("vae", 1, 4, 5, 16)]
# fused3 left out: the fused kernel is 2-8x slower than bmm on every layer already at 1x the reduction
VARIANTS = [(t, g) for t in wg.TILES for g in (*wg.GEMMS, "triton3", "bmm3") if not (g == "fused" and t == 6)]
ERR_CROP = 128  # error measured on the top-left ERR_CROP² output pixels
MIN_CH = 16  # tensor-core GEMM dims pad to 16: Cin or Cout below that (conv_in 4→, conv_out →4/3) is skipped


def _name(tile: int, gemm: str) -> str:
    return f"F{tile}:{gemm}"


def _graph_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=10, return_mode="median"))


def study_shape(
    model: str, n: int, cin: int, h: int, cout: int, max_ratio: float, skip_wino: str | None, timing: str
) -> dict:
    dt, dev = torch.float16, "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(cin * 7919 + h * 31 + cout)
    x = (torch.randn(n, cin, h, h, device=dev, generator=g) + 0.2).to(dt)
    w = (torch.randn(cout, cin, 3, 3, device=dev, generator=g) / (9 * cin) ** 0.5).to(dt)
    b = (0.1 * torch.randn(cout, device=dev, generator=g)).to(dt)
    # fp64 reference on the top-left crop only (fp64 conv of a 512² VAE layer takes seconds): output
    # pixels < c need input pixels <= c, so the crop's values equal the full conv's
    c = min(h, ERR_CROP)
    ref = F.conv2d(x[:, :, : c + 1, : c + 1].double(), w.double(), b.double(), padding=1)[:, :, :c, :c]
    flops = 2 * n * h * h * cout * cin * 9
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    rows: list[dict[str, Any]] = []

    def add(method: str, fn, extra: int, **info) -> None:
        t0 = time.perf_counter()
        out = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        ms = do_bench_ms(fn) if dev == "cuda" else median_ms(fn, warmup=0, rep=1)
        graph_ms = _graph_ms(fn) if timing == "graph" else None
        rows.append(
            {"method": method, "ms": ms, "graph_ms": graph_ms, "tflops": flops / (ms * 1e-3) / 1e12,
             "extra_bytes": extra, "err": rel_err(out[:, :, :c, :c], ref), "first_call_s": first_s, **info}
        )  # fmt: skip

    add("cudnn-cl", lambda: F.conv2d(x_cl, w_cl, b, padding=1), 0)
    add("cudnn-nchw", lambda: F.conv2d(x, w, b, padding=1), 0)
    err_cudnn = rows[0]["err"]
    skipped = {}
    for tile, gemm in VARIANTS:
        if skip_wino:
            skipped[_name(tile, gemm)] = skip_wino
            continue
        prep = wg.prepare_winograd_weight_split if gemm in wg.SPLIT_GEMMS else wg.prepare_winograd_weight
        u = prep(w, tile, dt)
        add(
            _name(tile, gemm),
            lambda u=u, tile=tile, gemm=gemm: wg.winograd_conv3x3_prepared(x_cl, u, b, tile, gemm=gemm),
            wg.extra_bytes(n, cin, h, h, cout, tile, gemm),
            tile=tile,
            gemm=gemm,
        )
        del u
    for r in rows:
        r["err_ratio"] = r["err"] / max(err_cudnn, 1e-30)
        r["usable"] = r["method"].startswith("cudnn") or r["err_ratio"] <= max_ratio
    res = {"model": model, "shape": [n, cin, h, h, cout], "gflop": flops / 1e9, "rows": rows, "skipped": skipped}
    key = "graph_ms" if timing == "graph" else "ms"
    wino = [r for r in rows if "tile" in r]
    res["choice"] = choose(res, max_ratio, key)
    res["fastest_winograd"] = min(wino, key=lambda r: r[key])["method"] if wino else None
    res["cudnn_cl_ms"] = rows[0][key]
    return res


def _merge_table(path: Path, card: str, results: list[dict]) -> int:
    data = json.loads(path.read_text()) if path.exists() else {}
    entries = {k: v for k, v in data.get("entries", {}).items() if not k.endswith("," + card)}
    for res in results:
        n, cin, h, w, cout = res["shape"]
        entries[wg.shape_key(n, cin, h, w, cout, torch.float16, card)] = res["choice"]
    data = {
        "format": "speedsd-winograd-table-1",
        "about": "key N,Cin,H,W,Cout,dtype,card -> 'cudnn' | 'tile:gemm'; written by speedsd.bench.winograd_study",
        "entries": dict(sorted(entries.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return len(results)


def render(payload: dict) -> str:
    """The markdown of a study payload: per-method table, per-layer choice, conclusion, sensitivity."""
    results, card, timing = payload["results"], payload["card"], payload.get("timing", "eager")
    header = ["model", "shape N,Cin,H,Cout", "method", "µs", "graph µs", "TFLOP/s", "extra MiB", "err",
              "err/cuDNN", "usable"]  # fmt: skip
    table_rows = []
    for res in results:
        n, cin, h, _, cout = res["shape"]
        for r in res["rows"]:
            gms = r.get("graph_ms")
            table_rows.append(
                [res["model"], f"{n},{cin},{h},{cout}", r["method"], r["ms"] * 1e3, "-" if gms is None else gms * 1e3,
                 r["tflops"], r["extra_bytes"] / 2**20, f"{r['err']:.2e}", r["err_ratio"],
                 "yes" if r["usable"] else "no"]
            )  # fmt: skip
    return (
        f"# Winograd study (fp16, {card})\n\n{md_table(header, table_rows)}\n\n## Per-layer choice (by {timing} "
        f"time, error <= {payload['max_err_ratio']}x cuDNN's)\n\n"
        + md_table(["model", "N,Cin,H,W,Cout", "choice", "fastest Winograd", "skipped"], _choice_rows(results))
        + f"\n\n{conclusion(payload)}\n\n{sensitivity_line(payload)}\n"
    )


def _choice_rows(results: list[dict]) -> list[list[object]]:
    return [[r["model"], ",".join(map(str, r["shape"])), r["choice"], r["fastest_winograd"] or "-",
             "; ".join(sorted(set(r["skipped"].values()))) or "-"] for r in results]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", default=None, help="merge the per-layer choices into this JSON")
    ap.add_argument("--max-err-ratio", type=float, default=2.0)
    ap.add_argument("--timing", choices=["graph", "eager"], default="graph", help="what the choice ranks by")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip Winograd on the layers left after this")
    ap.add_argument("--models", default="unet,vae")
    ap.add_argument("--smoke", action="store_true", help="two tiny shapes (CPU: TRITON_INTERPRET=1), for tests")
    ap.add_argument("--from-json", default=None, help="re-render a study's JSON (no GPU): md, conclusion")
    args = ap.parse_args(argv)
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        payload.pop("environment", None)  # write_results records this machine's; the card stays the JSON's
        md = render(payload)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "winograd_study.md").write_text(md)
        print(md.split("## Conclusion", 1)[-1])
        return
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    timing = args.timing if torch.cuda.is_available() else "eager"
    t_start = time.perf_counter()
    results = []
    shapes = SMOKE if args.smoke else [s for s in SHAPES if s[0] in args.models.split(",")]
    for model, n, cin, h, cout in shapes:
        skip = None
        if min(cin, cout) < MIN_CH:
            skip = f"Cin {cin} / Cout {cout} < {MIN_CH}: GEMM padded to 16 wastes >= 4x; a tiny memory-bound layer"
        elif time.perf_counter() - t_start > args.budget_s:
            skip = "over the study's time budget"
        res = study_shape(model, n, cin, h, cout, args.max_err_ratio, skip, timing)
        results.append(res)
        key = "graph_ms" if timing == "graph" else "ms"
        best = min(res["rows"], key=lambda r: r[key])
        print(
            f"{model} {n}x{cin}x{h}² -> {cout}: cudnn-cl {res['cudnn_cl_ms'] * 1e3:.1f} µs, fastest {best['method']} "
            f"{best[key] * 1e3:.1f} µs ({timing}), choice {res['choice']}  [{time.perf_counter() - t_start:.0f} s]",
            flush=True,
        )
    payload = {"card": card, "max_err_ratio": args.max_err_ratio, "timing": timing, "results": results,
               "bmm_fp32_out": torch.cuda.is_available() and wg.bmm_fp32_out_supported(),
               "sensitivity_ratios": list(SENSITIVITY), "wall_s": time.perf_counter() - t_start}  # fmt: skip
    md = render(payload)
    jp, mp = write_results(args.out, "winograd_study", payload, md)
    if args.table:
        _merge_table(Path(args.table), card, results)
        print(f"choice table merged into {args.table}")
    print(md_table(["model", "N,Cin,H,W,Cout", "choice", "fastest Winograd", "skipped"], _choice_rows(results)))
    print(md.split("## Conclusion", 1)[-1])
    print(f"wrote {jp} and {mp}; {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
