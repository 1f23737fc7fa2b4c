"""Sub-pixel upsample-conv on SD-1.4's upsampler shapes: four 2x2 convs + phase interleave vs upsample then 3x3 conv.

    python -m speedsd.bench.kernels_subpixel --out bench/results [--smoke]

Shapes (N, C, H=W) of the upsampler inputs (C -> C conv after nearest 2x): the VAE decoder at 512²
(batch 1) and the UNet at 64x64 latents with classifier-free guidance (batch 2); fp16 channels_last,
weights channels_last too. Per shape:

  (a) "up+conv": ``upsample_nearest2x(x)`` (speedsd's kernel), then ``F.conv2d(u, W, b, padding=1)``
  (b) "subpixel": ``subpixel_upsample_conv(x, W4, b)``, W4 = ``subpixel_weight(W)`` prepared once; it runs
      the four phase convs one at a time where P exceeds ``PHASE_SPLIT_BYTES`` (the VAE's 256² input):
      both forms are also timed on every shape, "one conv" (``by_phase=False``) and "by phase" (``True``)
  (c) "conv only": ``F.conv2d(x, W4, None, padding=1)``, the conv inside (b)
  (d) "torch": ``F.interpolate`` + ``F.conv2d`` (for reference)

Clock: CUDA-graph replay (``common.graph_ms``), once with cuDNN's heuristic algorithm choice (the
engine's default) and once with ``torch.backends.cudnn.benchmark = True``. TFLOP/s counts the 3x3
conv's FLOPs on the upsampled image for every row (the work done), so (b) shows the 9/4 saving.
Error: max |y - ref| and ‖y - ref‖ / ‖ref‖ of (a) and (b) against an fp64 reference over the top and
bottom bands of output rows (2·16 low-res rows each, both image edges; the whole image when smaller):
the fp64 conv on a full 512² VAE image is too slow to run here. Correct: (b)'s relative error
<= 2x (a)'s + 1e-6, finite. Exit 1 if any row is wrong.

CPU (no CUDA): tiny shapes, wall time, run under ``TRITON_INTERPRET=1``: a dry run that must not crash.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from speedsd.bench import common
from speedsd.kernels.subpixel_weight import subpixel_weight_ref

up = importlib.import_module("speedsd.kernels.upsample")
sc = importlib.import_module("speedsd.kernels.subpixel_conv")

# (model, N, C, H=W) of the upsamplers' inputs: VAE decoder (512² image), UNet (64² latents, CFG batch 2)
SHAPES = [("vae", 1, 512, 64), ("vae", 1, 512, 128), ("vae", 1, 256, 256),
          ("unet", 2, 1280, 8), ("unet", 2, 1280, 16), ("unet", 2, 640, 32)]  # fmt: skip
SMOKE_SHAPES = [("smoke", 1, 16, 8), ("smoke", 2, 12, 5), ("smoke", 1, 4, 36)]  # CPU dry run; the last: two bands
BAND = 16  # low-res rows of each fp64 reference band
ALGOS = ("heuristic", "benchmark")  # torch.backends.cudnn.benchmark off / on


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """us per call: CUDA-graph replay on CUDA, wall time on CPU (smoke runs)."""
    if device == "cuda":
        return lambda fn: common.graph_ms(fn) * 1e3
    return lambda fn: common.median_ms(fn, warmup=0, rep=1) * 1e3  # a dry run: one call


def _ref_bands(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> list[tuple[slice, torch.Tensor]]:
    """(output-row slice, fp64 reference of those rows): the top and bottom BAND low-res rows, exact
    (each band's input takes one extra row of context, and the image edge's zero padding)."""
    x64, w64, b64 = x.double(), w.double(), b.double()
    H = x.shape[2]
    if H <= 2 * BAND + 2:
        return [(slice(None), sc.subpixel_upsample_conv_ref(x64, w64, b64))]
    top = sc.subpixel_upsample_conv_ref(x64[:, :, : BAND + 1], w64, b64)[:, :, : 2 * BAND]
    bottom = sc.subpixel_upsample_conv_ref(x64[:, :, H - BAND - 1 :], w64, b64)[:, :, 2:]  # drop the context row
    return [(slice(0, 2 * BAND), top), (slice(2 * (H - BAND), 2 * H), bottom)]


def _errors(y: torch.Tensor, bands: list[tuple[slice, torch.Tensor]]) -> tuple[float, float]:
    """(max |y - ref|, ‖y - ref‖ / ‖ref‖) over the reference bands; inf if y has NaN/inf there."""
    diff = [y[:, :, rows].double() - ref for rows, ref in bands]
    if not all(torch.isfinite(d).all() for d in diff):
        return float("inf"), float("inf")
    num = math.sqrt(sum(float(d.square().sum()) for d in diff))
    den = math.sqrt(sum(float(ref.square().sum()) for _, ref in bands))
    return max(float(d.abs().max()) for d in diff), num / max(den, 1e-30)


def bench_shape(model: str, n: int, c: int, h: int, device: str) -> dict[str, Any]:
    cl = torch.channels_last
    x = (torch.randn(n, c, h, h, device=device) * 2 + 0.5).half().contiguous(memory_format=cl)
    w = (torch.randn(c, c, 3, 3, device=device) / (3 * c**0.5)).half().contiguous(memory_format=cl)
    b = (torch.randn(c, device=device) * 0.5 + 0.1).half()
    w4 = subpixel_weight_ref(w)  # [C, C, 3, 3] -> [4·C, C, 2, 2], channels_last

    def ours_a() -> torch.Tensor:
        return F.conv2d(up.upsample_nearest2x(x), w, b, padding=1)

    def ours_b() -> torch.Tensor:
        return sc.subpixel_upsample_conv(x, w4, b)

    def one_conv() -> torch.Tensor:
        return sc.subpixel_upsample_conv(x, w4, b, by_phase=False)

    def by_phase() -> torch.Tensor:
        return sc.subpixel_upsample_conv(x, w4, b, by_phase=True)

    def conv_c() -> torch.Tensor:
        return F.conv2d(x, w4, None, padding=1)

    def torch_d() -> torch.Tensor:
        return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)

    ya, yb = ours_a(), ours_b()
    bands = _ref_bands(x, w, b)
    (max_a, rel_a), (max_b, rel_b) = _errors(ya, bands), _errors(yb, bands)
    ok = math.isfinite(rel_b) and rel_b <= 2 * rel_a + 1e-6 and yb.is_contiguous(memory_format=cl)
    del ya, yb, bands
    flop = 2 * n * c * c * 9 * (2 * h) ** 2  # the 3x3 conv on the upsampled image
    row: dict[str, Any] = {
        "model": model,
        "shape": f"{n}x{c}x{h}x{h}",
        "gflop": round(flop / 1e9, 2),
        "max_err_a": max_a,
        "max_err_b": max_b,
        "rel_err_a": rel_a,
        "rel_err_b": rel_b,
        "correct": bool(ok),
        "b_by_phase": sc.splits_by_phase(x, c),
        "phases_bit_identical": bool(torch.equal(one_conv(), by_phase())),  # cuDNN: Co vs 4·Co output channels
    }
    timer = _timer(device)
    prev = torch.backends.cudnn.benchmark
    try:
        for algo in ALGOS if device == "cuda" else ALGOS[:1]:
            torch.backends.cudnn.benchmark = algo == "benchmark"
            fns = (
                ("a", ours_a),
                ("b", ours_b),
                ("one", one_conv),
                ("phases", by_phase),
                ("c", conv_c),
                ("torch", torch_d),
            )
            t = {k: timer(fn) for k, fn in fns}
            row[algo] = {
                **{f"{k}_us": v for k, v in t.items()},
                "speedup_b_vs_a": t["a"] / t["b"],
                "tflops_a": flop / (t["a"] * 1e-6) / 1e12,
                "tflops_b": flop / (t["b"] * 1e-6) / 1e12,
                "interleave_share_b": 1 - t["c"] / t["b"],
            }
    finally:
        torch.backends.cudnn.benchmark = prev
    return row


def run(device: str = "cuda", smoke: bool = False) -> dict[str, Any]:
    """Every row plus a summary. ``smoke``: tiny shapes, runnable on CPU under the interpreter."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("speedsd.bench.kernels_subpixel needs a CUDA GPU (or smoke=True, device='cpu')")
    torch.manual_seed(0)
    prev_tf32 = torch.backends.cudnn.allow_tf32
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    try:
        torch.backends.cudnn.allow_tf32 = False  # the fp64 reference bands only; fp16 convs are unaffected
        for model, n, c, h in SMOKE_SHAPES if smoke else SHAPES:
            r = common.guard(errors, f"{n}x{c}x{h}x{h}", bench_shape, model, n, c, h, device)
            if r is not None:
                rows.append(r)
                _print(r)
    finally:
        torch.backends.cudnn.allow_tf32 = prev_tf32
    summary: dict[str, Any] = {
        "correct": f"{sum(r['correct'] for r in rows)}/{len(rows)}",
        "phases_bit_identical": f"{sum(r['phases_bit_identical'] for r in rows)}/{len(rows)}",
        "errors": len(errors),
    }
    for algo in ALGOS:
        sel = [r[algo] for r in rows if algo in r]
        if sel:
            summary[algo] = {k: sum(s[f"{k}_us"] for s in sel) for k in ("a", "b", "c", "torch")}
    return {"summary": summary, "rows": rows, "errors": errors}


def _print(r: dict[str, Any]) -> None:
    for algo in ALGOS:
        if algo in r:
            t = r[algo]
            print(
                f"{r['model']:5s} {r['shape']:>15s} {algo:9s} up+conv {t['a_us']:8.1f} us  "
                f"subpixel {t['b_us']:8.1f} us (conv {t['c_us']:8.1f}; one conv {t['one_us']:8.1f}, by phase "
                f"{t['phases_us']:8.1f}{', used' if r['b_by_phase'] else ''})  torch {t['torch_us']:8.1f} us  "
                f"x{t['speedup_b_vs_a']:4.2f}  "
                f"max err a {r['max_err_a']:.2e} b {r['max_err_b']:.2e}  ok={r['correct']}  "
                f"phases bit-identical={r['phases_bit_identical']}",
                flush=True,
            )


def _f(v: Any, nd: int = 1) -> Any:
    return "-" if v is None else round(v, nd) if isinstance(v, float) else v


COLS = ["model", "shape", "cuDNN algo", "(a) up+conv us", "(b) subpixel us", "(b) by phase?", "(b) one conv us",
        "(b) by phase us", "(c) one conv's conv us", "torch us", "a/b", "TFLOP/s a", "TFLOP/s b", "max err a",
        "max err b", "rel err a", "rel err b", "ok"]  # fmt: skip


def markdown(res: dict[str, Any]) -> str:
    table = []
    for r in res["rows"]:
        for algo in ALGOS:
            if algo in r:
                t = r[algo]
                table.append(
                    [r["model"], r["shape"], algo, _f(t["a_us"]), _f(t["b_us"]), r["b_by_phase"], _f(t["one_us"]),
                     _f(t["phases_us"]), _f(t["c_us"]), _f(t["torch_us"]),
                     _f(t["speedup_b_vs_a"], 2), _f(t["tflops_a"]), _f(t["tflops_b"]), f"{r['max_err_a']:.2e}",
                     f"{r['max_err_b']:.2e}", f"{r['rel_err_a']:.2e}", f"{r['rel_err_b']:.2e}", r["correct"]]
                )  # fmt: skip
    s = res["summary"]
    sums = [
        f"- cuDNN {algo}: (a) {_f(s[algo]['a'], 0)} us, (b) {_f(s[algo]['b'], 0)} us, (c) {_f(s[algo]['c'], 0)} us, "
        f"torch {_f(s[algo]['torch'], 0)} us (sums over shapes)"
        for algo in ALGOS
        if algo in s
    ]
    return "\n".join(
        [
            "## Sub-pixel upsample-conv (fp16 channels_last): (a) upsample_nearest2x + conv3x3 vs "
            "(b) subpixel_upsample_conv (CUDA-graph replay)\n",
            f"Correct: {s['correct']} (errors vs fp64 over the top/bottom {BAND}-row bands; ok: rel err b <= 2 a).\n",
            f"By phase bit-identical to one conv: {s['phases_bit_identical']} shapes.\n",
            *sums,
            "",
            common.md_table(COLS, table),
        ]
        + [f"\n**ERROR** {e['what']}: {e['error']}" for e in res.get("errors", [])]
    )


def main(argv: list[str] | None = None) -> int:
    a = common.kernel_bench_args("kernels_subpixel", __doc__).parse_args(argv)
    device, smoke = common.device_and_smoke(a.smoke)
    res = run(device, smoke=smoke)
    ok = not res["errors"] and all(r["correct"] for r in res["rows"])
    return common.publish(a.out, "kernels_subpixel", res, markdown(res), ok)


if __name__ == "__main__":
    raise SystemExit(main())
