"""GPU probe: the Gluon split-K conv (kernels/conv_splitk.py) vs cuDNN and the igemm best on the UNet's small convs
(graph replay, weights cycled out of L2); correctness vs an fp32 conv."""

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from conv_splitk import SplitKConfig, conv3x3_splitk, conv_splitk_problem  # this folder

from speedsd.bench import common
from speedsd.kernels import conv_igemm as ci

SHAPES = [  # label, B, C, H, N, calls a step, igemm key
    ("8² 1280->1280", 2, 1280, 8, 1280, 11, "m64n128k128s8w8p4"),
    ("8² 2560->1280", 2, 2560, 8, 1280, 3, "m64n128k128s8w8p4"),
    ("16² 1280->1280", 2, 1280, 16, 1280, 2, None),
    ("16² 2560->1280", 2, 2560, 16, 1280, 2, None),
    ("16² 1920->1280", 2, 1920, 16, 1280, 1, None),
    ("16² 640->1280", 2, 640, 16, 1280, 1, None),
]
TILES = [
    (128, 64, 64, (8, 6), (4, 8)),
    (128, 128, 64, (6, 5), (4, 8)),
    (128, 64, 128, (4, 3), (4, 8)),
    (128, 128, 128, (3,), (4, 8)),
    (64, 64, 64, (8,), (4,)),
    (64, 128, 64, (6,), (4,)),
    (64, 64, 128, (4,), (4,)),
]
L2 = 50 * 2**20
budget = float(sys.argv[1]) if len(sys.argv) > 1 else 240
out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
t0 = time.monotonic()
for label, B, C, H, N, calls, ikey in SHAPES:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, C, H, H, generator=g) + 0.5).cuda().half().contiguous(memory_format=torch.channels_last)
    w0 = torch.randn(N, C, 3, 3, generator=g) / math.sqrt(9 * C)
    bias = (torch.randn(N, generator=g) * 0.1).cuda().half()
    copies = max(1, min(8, math.ceil(3 * L2 / (w0.numel() * 2))))
    ws = [(w0 + 1e-3 * i).cuda().half().contiguous(memory_format=torch.channels_last) for i in range(copies)]
    ref = F.conv2d(x.float(), ws[0].float(), bias.float(), 1, 1)
    terr = float((F.conv2d(x, ws[0], bias, 1, 1).float() - ref).norm() / ref.norm())

    def t(fn):
        st = {"i": 0}

        def call():
            fn(ws[st["i"] % copies])
            st["i"] += 1

        return 1000 * common.graph_ms(call, calls=2 * copies, reps=7)

    row = {"label": label, "calls": calls, "cudnn_us": t(lambda w: F.conv2d(x, w, None, 1, 1)), "torch_err": terr}
    if ikey:
        cfg = ci.IgemmConfig.parse(ikey)
        row["igemm_us"] = t(lambda w: ci.conv2d_igemm(x, w, None, 1, 1, cfg))
    res, errs = {}, {}
    for bm, bn, bk, stages_l, warps_l in TILES:
        for stages in stages_l:
            for warps in warps_l:
                if time.monotonic() - t0 > budget:
                    break
                kt = 9 * C // bk
                tiles = B * H * H // bm * (N // bn)
                for split in sorted(d for d in range(1, 61) if kt % d == 0 and 60 <= tiles * d <= 400):
                    try:
                        cfg = SplitKConfig(bm, bn, bk, stages, split, warps)
                    except ValueError as e:
                        res[f"{bm}x{bn}x{bk}p{stages}w{warps}"] = str(e)[:80]
                        break
                    if conv_splitk_problem(x, ws[0], bias, cfg):
                        res[cfg.key()] = conv_splitk_problem(x, ws[0], bias, cfg)
                        break
                    try:
                        y = conv3x3_splitk(x, ws[0], bias, cfg)
                        y2 = conv3x3_splitk(x, ws[0], bias, cfg)
                        err = float((y.float() - ref).norm() / ref.norm())
                        errs[cfg.key()] = err
                        if err > 2 * terr + 1e-6 or not torch.equal(y, y2):
                            res[cfg.key()] = f"err {err:.3g} repeat-equal {torch.equal(y, y2)}"
                            continue
                        res[cfg.key()] = round(t(lambda w: conv3x3_splitk(x, w, None, cfg)), 2)
                    except Exception as e:  # noqa
                        res[cfg.key()] = f"{type(e).__name__}: {str(e)[:120]}"
                        break
    ok = {k: v for k, v in res.items() if isinstance(v, float)}
    row["best"] = min(ok, key=ok.get) if ok else None
    row["best_us"] = ok.get(row["best"]) if ok else None
    row["top"] = dict(sorted(ok.items(), key=lambda kv: kv[1])[:12])
    row["failed"] = {k: v for k, v in res.items() if not isinstance(v, float)}
    row["max_err"] = max(errs.values()) if errs else None
    out["rows"].append(row)
    print(
        label,
        "cudnn",
        round(row["cudnn_us"], 1),
        "igemm",
        row.get("igemm_us"),
        "splitk",
        row["best"],
        row["best_us"],
        "err",
        row["max_err"],
        "vs torch",
        terr,
        "failed",
        len(row["failed"]),
        flush=True,
    )
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "conv_splitk_probe.json"), "w"), indent=1)
