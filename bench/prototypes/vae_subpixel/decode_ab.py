"""A/B of the VAE decoder's Gluon sub-pixel conv entries (session 27): one process times the graphed 512² VAE
decode (random:sd1.4, fp16, default flags) with the package's conv table, or with that table less the
entries whose key starts with "1x" and that say "subpixel" (the VAE's upsamplers).

    python decode_ab.py with|without LABEL      # prints: LABEL decode_ms median (min max) of 50 graphed calls
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def main(mode: str, label: str) -> None:
    import speedsd
    from speedsd import conv_table

    if mode == "without":
        data = json.loads(conv_table.TABLE_PATH.read_text())
        for card, entries in data["cards"].items():
            data["cards"][card] = {k: v for k, v in entries.items()
                                   if not (k.startswith("1x") and isinstance(v, dict) and v.get("subpixel"))}  # fmt: skip
        path = Path(tempfile.mkdtemp()) / "conv_table.json"
        path.write_text(json.dumps(data))
        conv_table.TABLE_PATH = path
    pipe = speedsd.load("random:sd1.4")
    z = torch.randn(1, 4, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for _ in range(3):  # eager, capture, replay
        pipe.decode_latents(z)
    torch.cuda.synchronize()
    ts = []
    for _ in range(50):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        pipe.decode_latents(z)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    print(f"{label} vae_subpixel={mode} decode_ms {statistics.median(ts):.3f} (min {min(ts):.3f} max {max(ts):.3f})",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
