"""Pipeline A/B of the Gluon attention kernel (d=40/80/160): the default flags with and without it.

    python -m speedsd.bench.attention_gluon_ab --out DIR [--pairs 2] [--model random:sd1.4]

Fresh processes, alternating old / new (the first pair also warms the Triton cache). Both run
``ops.default_flags("cuda")`` (attention="auto", fused QKV, CUDA graphs) with the auto-attention choice
wrapped: "old" turns a table choice of "gluon" into "sdpa" (the engine before the kernel was landed),
"new" picks "gluon" wherever :func:`attention_gluon_supported` (at 512² the UNet's self-attention at every
level: 4096, 1024, 256 and the mid-block's 64 tokens) and the table's choice elsewhere. Each child reports
``bench.e2e.measure_row`` (ms per component, the 20-step image) and how many attention calls the Gluon kernel
served; the first old and new images (seed 0) are compared. Writes attention_gluon_ab.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from speedsd import ops
from speedsd.bench import common
from speedsd.kernels.attention_gluon import attention_gluon_supported

VARIANTS = ("old", "new")


def attention_picker(variant: str, table_pick: Any) -> Any:
    """pick_attention for ``variant``: "old" never picks gluon, "new" picks it wherever it is supported."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")

    def pick(q: torch.Tensor, k: torch.Tensor) -> str:
        if variant == "new" and attention_gluon_supported(q, k):
            return "gluon"
        choice = table_pick(q, k)
        return "sdpa" if choice == "gluon" else choice

    return pick


def child(variant: str, model: str, steps: int, size: int, reps: int, image_path: str) -> dict[str, Any]:
    import speedsd
    from speedsd.bench.e2e import measure_row

    ops.pick_attention = attention_picker(variant, ops.pick_attention)
    served = [0]
    real = ops.attention_gluon

    def counting(*args: Any, **kw: Any) -> torch.Tensor | None:
        out = real(*args, **kw)
        served[0] += out is not None  # eager calls and graph captures (replays run no Python)
        return out

    ops.attention_gluon = counting
    flags = ops.default_flags("cuda")
    pipe = speedsd.load(model, device="cuda", dtype=torch.float16, flags=flags)
    row: dict[str, Any] = {"variant": variant, **measure_row(pipe, steps, size, reps)}
    img = pipe("a photograph of an astronaut riding a horse", steps=steps, height=size, width=size, seed=0,
               output="tensor")  # fmt: skip
    torch.save(img.cpu(), image_path)
    row["gluon_calls"] = served[0]
    return row


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max abs difference and PSNR (dB) of two [N, 3, H, W] images in [0, 1]."""
    d = (a.double() - b.double()).abs()
    mse = d.pow(2).mean().item()
    return {
        "max_abs": d.max().item(),
        "psnr_db": float("inf") if mse == 0 else -10 * torch.log10(torch.tensor(mse)).item(),
    }


def markdown(res: dict[str, Any]) -> str:
    cols = ["text_encoder_ms", "unet_step_ms", "vae_decode_ms", "image_ms", "peak_mib", "gluon_calls"]
    rows = [[r.get("variant")] + [r.get(c, r.get("error", "-")) for c in cols] for r in res["rows"]]
    md = [
        f"# Gluon attention, pipeline A/B ({res['model']}, {res['size']}², {res['steps']} steps, default flags, "
        "fresh processes alternating)",
        common.md_table(["variant"] + cols, rows),
    ]
    for v in VARIANTS:
        ms = sorted(r["image_ms"] for r in res["rows"] if r.get("variant") == v and "image_ms" in r)
        if ms:
            md.append(f"- {v}: image ms {ms} (min {ms[0]:.2f})")
    if "images" in res:
        md.append(f"- first old vs first new image: {res['images']}")
    return "\n\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speedsd.bench.attention_gluon_ab", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--model", default="random:sd1.4")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_gluon_ab needs a CUDA GPU")
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.model, a.steps, a.size, a.reps, a.image)), flush=True)
        return 0
    res: dict[str, Any] = {"model": a.model, "steps": a.steps, "size": a.size, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        images: dict[str, Path] = {}
        for i in range(a.pairs):
            for v in VARIANTS:
                img = Path(tmp) / f"{v}{i}.pt"
                cmd = [sys.executable, "-m", "speedsd.bench.attention_gluon_ab", "--child", v, "--image", str(img)]
                cmd += ["--model", a.model, "--steps", str(a.steps), "--size", str(a.size), "--reps", str(a.reps)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                row = json.loads(lines[-1][7:]) if lines else {"variant": v, "error": p.stderr.strip()[-300:]}
                row["pair"] = i
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                if lines and v not in images:
                    images[v] = img
        if len(images) == 2:
            res["images"] = compare(torch.load(images["old"]), torch.load(images["new"]))
    md = markdown(res)
    common.write_results(a.out, "attention_gluon_ab", res, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
