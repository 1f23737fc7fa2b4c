"""All of issue 3's kernel checks and timings in one process (one GPU call):

    python -m speedsd.bench.kernels --out bench/results

GroupNorm(+SiLU) and GEGLU (speedsd.bench.kernels_norm_gelu) and attention
(speedsd.bench.kernels_attention), on every SD-1.4 UNet/VAE shape at 512², against PyTorch, with the
card's copy bandwidth measured in the same run. Also writes the per-shape attention choice used by
Flags(attention="auto") to --attention-table.
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch

from speedsd.bench import common


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speedsd.bench.kernels")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--attention-table", default=None, help="write the auto-attention choice JSON here")
    ap.add_argument("--only", default="norm_gelu,attention")
    ap.add_argument("--attention-shapes", default=None, metavar="LABELS",
                    help="comma-separated attention shape labels: measure only these and add their entries to "
                         "--attention-table, keeping the card's other entries")  # fmt: skip
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("speedsd.bench.kernels needs a CUDA GPU")
    payload: dict = {"copy_gbs": common.copy_bandwidth_gbs(), "matmul_fp16_tflops": common.matmul_tflops()}
    print(f"copy {payload['copy_gbs']:.0f} GB/s, fp16 matmul {payload['matmul_fp16_tflops']:.0f} TFLOP/s", flush=True)
    md = [
        f"Copy bandwidth {payload['copy_gbs']:.0f} GB/s (read+write), fp16 8192³ matmul "
        f"{payload['matmul_fp16_tflops']:.0f} TFLOP/s, same run.\n"
    ]
    for part in a.only.split(","):
        try:
            mod = __import__(f"speedsd.bench.kernels_{part}", fromlist=["run", "markdown"])
            labels = a.attention_shapes.split(",") if part == "attention" and a.attention_shapes else None
            res = mod.run(labels=labels) if labels else mod.run()
            payload[part] = res
            md.append(
                mod.markdown(res) if hasattr(mod, "markdown") else "```\n" + json.dumps(res, indent=1)[:4000] + "\n```"
            )
            if part == "attention" and a.attention_table:
                from speedsd.attention_table import merge_into

                entries = {k: {**v, "measured_at": common.git_commit()} for k, v in res["best_attention"].items()}
                merge_into(Path(a.attention_table), torch.cuda.get_device_name(), entries, keep_others=bool(labels))
        except Exception:
            payload[part] = {"error": traceback.format_exc()}
            print(payload[part]["error"], flush=True)
    common.write_results(a.out, "kernels", payload, "\n\n".join(md))
    print("\n\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
