"""GPU check of conv_halo's variants (GN-apply + SiLU prologue, activation once per haloed element) on the SD VAE
decoder's 3x3 convs (fp16, channels_last, no bias).

    python gpu_check.py OUT.json [--variants h8x16,h16,...] [--shapes vae_128_512,...] [--budget 150]
        [--modes gn_silu,plain]
        a variant may carry config overrides: --variants "h8x16,h8x16@w_stages=2,h16@t_stages=3"
    python gpu_check.py --cpu-selftest          (no GPU: imports, shapes, tensor builders, JSON writing)

For every variant and shape, plain (y = conv(x)) and with the prologue (y = conv(silu(x·scale + shift))):
  * correctness: output poisoned with NaN, every element must be written; relative error ||y − ref|| / ||ref||
    against an fp32 reference (TF32 off) must be <= 2x the error of the fp16 torch path on the same inputs
    (cuDNN fp16 conv; with the prologue: the activation rounded to fp16, then cuDNN);
  * timing: CUDA-graph replay of 20 calls, median of 7 replays, next to cuDNN F.conv2d (no bias) on the same
    tensors and, for the prologue, next to "normalize + cuDNN" (one Triton pass writing silu(x·scale + shift)
    in fp16, then F.conv2d).
Phase 1 compiles every variant in parallel subprocesses (tiny smoke shapes, also checked for correctness, including
partial tiles and a batch of 2); phase 2 measures each variant in its own subprocess with a timeout, so a hang or a
crash costs one variant. OUT.json (card, versions, date, rows) is rewritten after every row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "gluon_conv"))  # conv_gluon: the fp32 reference
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "src"))  # speedsd (bench.common.graph_ms)

# (label, N, C, H, W, Co): the VAE decoder's big convs and the UNet's 320-channel conv
SHAPES = [
    ("vae_128_512", 1, 128, 512, 512, 128),
    ("vae_256to128_512", 1, 256, 512, 512, 128),
    ("vae_256_256", 1, 256, 256, 256, 256),
    ("vae_512to256_256", 1, 512, 256, 256, 256),
    ("vae_512_128", 1, 512, 128, 128, 512),
    ("vae_512_64", 1, 512, 64, 64, 512),
]
# smoke shapes for phase 1 (compile + correctness): one per Co class, partial tiles (W = 40, H = 24), batch 2
SMOKE = [
    ("smoke_co128", 2, 128, 24, 40, 128),
    ("smoke_co256", 1, 256, 32, 48, 256),
    ("smoke_co512", 1, 128, 16, 16, 512),
    ("smoke_odd", 1, 64, 13, 21, 128),
]
DEFAULT_VARIANTS = ["h8x16", "h16", "h8x16_1", "h8x16_t32", "h16_t32"]
MODES = ("gn_silu",)  # --modes gn_silu,plain adds y = conv(x)


# the harness shared with ../gluon_conv/gpu_check.py (inputs, reference paths, timing, the worker protocol, JSON)
_BASE = os.path.join(HERE, "..", "gluon_conv", "gpu_check.py")
_spec = importlib.util.spec_from_file_location("gluon_conv_gpu_check", _BASE)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
make_inputs, rel_err, resolve, Results = _base.make_inputs, _base.rel_err, _base.resolve, _base.Results
environment, summary = _base.environment, _base.summary


# ----------------------------------------------------------------------------------------------- worker
def run_worker(name: str, shapes, timing: bool) -> None:
    """Check (and time) one variant on `shapes` (the shared harness's check_variant), one ROW line per (shape, mode)."""
    import conv_halo as cg

    _base.check_variant(
        name, shapes, timing, MODES,
        conv=lambda x, wt, cfg, out, **kw: cg.conv3x3_halo(x, wt, config=cfg, out=out, **kw),
        config=lambda co, pro: resolve(cg.variant, name, co),
        fields=("th", "tw", "bn", "bk", "w_stages", "t_stages", "consumers", "transform_warps", "silu_impl"),
        plain_kw=dict(silu=False),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- parent
def main() -> int:
    global MODES
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; no new variant starts after this")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default=None, help="comma list of shape labels (default: all)")
    ap.add_argument("--cpu-selftest", action="store_true")
    a = ap.parse_args()
    if a.cpu_selftest:
        return cpu_selftest()
    shapes = SHAPES if not a.shapes else [s for s in SHAPES if s[0] in a.shapes.split(",")]
    MODES = tuple(a.modes.split(","))
    if a.worker:
        run_worker(a.worker, SMOKE if a.smoke else shapes, timing=not a.smoke)
        return 0
    if not a.out:
        ap.error("OUT.json is required")
    return _base.run_variants(a.out, a.variants.split(","), a.budget, ["--modes", a.modes],
                              ["--shapes", a.shapes] if a.shapes else [], smoke_timeout=120, measure_timeout=60,
                              script=__file__)  # fmt: skip


def cpu_selftest() -> int:
    """No GPU: the module imports, variants fit every shape, launch args build, the references agree, JSON works."""
    import tempfile

    import conv_gluon
    import conv_halo as cg

    for name in DEFAULT_VARIANTS:
        for label, n, c, _h, _w, co in SHAPES + SMOKE:
            cfg = cg.variant(name, co)
            assert c % cfg.bk == 0 and co % cfg.bn == 0 and cfg.smem_bytes() <= cg.SMEM_LIMIT, (name, label, cfg)
            x, wt, scale, shift = make_inputs(n, c, 8, 8, co, "cpu")
            cg._check(x, wt, scale, shift, cfg)
            y = torch.empty((n, co, 8, 8), dtype=torch.float16).contiguous(memory_format=torch.channels_last)
            cg.prepare(x, wt, y, scale, shift, True, cfg, 132)
    cfg = resolve(cg.variant, "h8x16@w_stages=2+t_stages=3", 256)
    assert (cfg.w_stages, cfg.t_stages, cfg.bn) == (2, 3, 256), cfg
    x, wt, scale, shift = make_inputs(2, 64, 12, 10, 32, "cpu")
    ref = conv_gluon.conv3x3_gluon_ref(x, wt, scale=scale, shift=shift, silu=True)
    alt = cg.conv3x3_halo_ref(x, wt, scale, shift, silu=True)  # activation rounded to fp16
    assert rel_err(alt, ref) < 2e-3, rel_err(alt, ref)
    with tempfile.TemporaryDirectory() as d:
        res = Results(os.path.join(d, "r.json"))
        res.add(dict(variant="h8x16", shape="vae_128_512", mode="gn_silu", ok=True, err=1e-3, torch_fp16_err=1e-3,
                     us=100.0, tflops=500.0, cudnn_us=110.0, speedup_vs_cudnn=1.1))  # fmt: skip
        res.fail("x", "y")
        back = json.load(open(os.path.join(d, "r.json")))
        assert len(back["rows"]) == 1 and back["env"]["card"]
        print(summary(back["rows"]))
    print("cpu selftest OK: variants fit all shapes, launch args build, references agree; env:", environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
