"""Error-compensated Winograd, emulated on the CPU in fp64: which hi/lo splits bring fp16 F(4,3)/F(6,3) within
2x of torch's fp16 conv error.

    python -m speedsd.bench.winograd_accuracy --out DIR

Per SD-like layer (x = randn + 0.2, w = randn / sqrt(9·Cin), bias 0.1·randn; Cin as in SD, small H·W: the
error ratio does not depend on H·W), per tile: the error ‖out − ref‖/‖ref‖ against F.conv2d in fp64, as a
multiple of torch's fp16 conv error (fp32 accumulation, fp16 output), for U and V stored as
- "none": one fp16 each (the plain kernels),
- "V" / "U": that one as fp16 hi + lo (2 GEMMs), the other plain,
- "UV": both split, M = V_hi U_hi + V_lo U_hi + V_hi U_lo (3 GEMMs = the kernels' triton3 / bmm3 / fused3),
- "UV-noscale": as UV without scaling U by 2^s first (U_lo then falls into fp16's subnormals),
each with M kept in fp32 ("M32") or rounded to fp16 ("M16", what cuBLAS bmm with fp16 output does).
"""

from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch
import torch.nn.functional as F

from speedsd.bench.common import md_table, rel_err, write_results
from speedsd.kernels import winograd as wg

SHAPES = [(1, 128, 48, 128), (1, 320, 24, 320), (1, 640, 16, 640), (1, 1280, 12, 640), (1, 2560, 8, 640)]
SPLITS = {"none": "", "V": "v", "U": "u", "UV": "uv", "UV-noscale": "uv"}


def _emulate(x, w, b, tile: int, split: str, m16: bool, scale_u: bool) -> torch.Tensor:
    # the reference with M optionally rounded to fp16 between the GEMM and the output transform
    if not m16:
        with mock.patch.object(wg, "split_exponent", wg.split_exponent if scale_u else (lambda u: 0)):
            return wg.winograd_conv3x3_ref(x, w, b, tile, storage_dtype=torch.float16, split=split)
    real_einsum = torch.einsum

    def einsum(eq, *ops):  # round M (the GEMM's result) once the output transform takes it
        if eq == "ua,abnlo,vb->nouvl":
            ops = (ops[0], ops[1].to(torch.float16).to(ops[1].dtype), ops[2])
        return real_einsum(eq, *ops)

    with mock.patch.object(torch, "einsum", einsum):
        with mock.patch.object(wg, "split_exponent", wg.split_exponent if scale_u else (lambda u: 0)):
            return wg.winograd_conv3x3_ref(x, w, b, tile, storage_dtype=torch.float16, split=split)


def measure(n: int, cin: int, h: int, cout: int) -> list[dict]:
    g = torch.Generator().manual_seed(cin * 31 + h)
    x = (torch.randn(n, cin, h, h, generator=g) + 0.2).half()
    w = (torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5).half()
    b = (0.1 * torch.randn(cout, generator=g)).half()
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    err_torch = rel_err(F.conv2d(x.float(), w.float(), b.float(), padding=1).half(), ref)
    rows = []
    for tile in wg.TILES:
        for name, split in SPLITS.items():
            for m16 in (False, True):
                out = _emulate(x, w, b, tile, split, m16, scale_u=name != "UV-noscale")
                err = rel_err(out, ref)
                rows.append({"shape": [n, cin, h, h, cout], "tile": tile, "split": name, "m": "M16" if m16 else "M32",
                             "err": err, "err_torch": err_torch, "ratio": err / err_torch})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    args = ap.parse_args(argv)
    rows = [r for s in (SHAPES[:2] if args.quick else SHAPES) for r in measure(*s)]
    head = ["tile", "split", "M"] + [f"Cin {s[1]}" for s in SHAPES if any(r["shape"][1] == s[1] for r in rows)]
    table = []
    for tile in wg.TILES:
        for name in SPLITS:
            for m in ("M32", "M16"):
                sel = [r for r in rows if (r["tile"], r["split"], r["m"]) == (tile, name, m)]
                table.append([f"F({tile},3)", name, m] + [round(r["ratio"], 2) for r in sel])
    summary = []
    for tile in wg.TILES:
        for name in SPLITS:
            sel = [r["ratio"] for r in rows if (r["tile"], r["split"], r["m"]) == (tile, name, "M32")]
            summary.append(f"F({tile},3) {name}: {statistics.median(sel):.2f}x [{min(sel):.2f}-{max(sel):.2f}]")
    md = (
        "# Error-compensated Winograd (CPU, fp64 emulation)\n\nerror vs fp64 / torch fp16 conv error; "
        "rule: <= 2\n\n" + md_table(head, table) + "\n\nM32 median [min-max]: " + "; ".join(summary) + "\n"
    )
    jp, mp = write_results(args.out, "winograd_accuracy", {"shapes": SHAPES, "rows": rows}, md)
    print(md)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
