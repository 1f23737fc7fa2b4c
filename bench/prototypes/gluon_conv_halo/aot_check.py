"""Compile every conv_halo variant for sm_90 without a GPU (AOT); print registers, spills (must be 0), shared
memory, wgmma / TMA presence, MUFU ops in the PTX (ex2 / rcp / tanh), ld.shared / st.shared counts, C7513.

    python aot_check.py [--only h8x16,h16] [--dump DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time

import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
_spec = importlib.util.spec_from_file_location("gluon_conv_aot", os.path.join(HERE, "..", "gluon_conv", "aot_check.py"))
_old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_old)  # ../gluon_conv/aot_check.py: ptxas / cuobjdump helpers
TARGET, report, dump = _old.TARGET, _old.report, _old.dump
from conv_halo import VARIANTS, _conv3x3_halo_kernel, prepare, variant  # noqa: E402

# (C, Co) of the VAE decoder's 3x3 convs with a GroupNorm+SiLU in front
LAYERS = [(128, 128), (256, 256), (512, 512), (256, 128), (512, 256)]
MODES = [("gn+silu", True, True), ("plain", False, False)]


def compile_variant(cfg, c: int, co: int, affine: bool, silu: bool):
    return _old.compile_prepared(_conv3x3_halo_kernel, prepare, cfg, c, co, affine, silu)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    ap.add_argument("--only", default=None, help="comma list of variant names")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(VARIANTS)
    print(f"triton {triton.__version__}, target {TARGET}")
    print(f"{'variant':10} {'C>Co':>8} {'THxTWxBNxBK':>12} {'ws/ts':>5} {'warps':>5} {'mode':>7} {'regs':>4} "
          f"{'used':>4} {'setmaxnreg':>12} {'shared':>7} {'spill':>7} {'wgmma':>5} {'tma':>4} {'mufu':>5} "
          f"{'lds':>5} {'sts':>5} {'C7513':>5} {'s':>4}")  # fmt: skip
    ok, seen = True, set()
    for name in names:
        for c, co in LAYERS:
            for label, affine, silu in MODES:
                cfg = variant(name, co)
                if label == "plain" and (name != "h8x16" or cfg.silu_impl != "exact"):
                    continue
                key = (cfg, affine, silu)
                if key in seen:
                    continue
                seen.add(key)
                t0 = time.time()
                tile = f"{cfg.th}x{cfg.tw}x{cfg.bn}x{cfg.bk}"
                try:
                    k = compile_variant(cfg, c, co, affine, silu)
                except Exception as e:  # report and go on
                    ok = False
                    msg = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                    print(f"{name:10} {c:>4}>{co:<4} {tile:>12} {label}: FAILED: {' | '.join(msg[-5:])[:900]}")
                    continue
                r = report(k, None)
                ptx = k.asm["ptx"]
                mufu = len(re.findall(r"\b(ex2|rcp|tanh)\.approx", ptx))
                lds, sts = len(re.findall(r"\bld\.shared", ptx)), len(re.findall(r"\bst\.shared", ptx))
                ok = ok and r["ok"]
                print(f"{name:10} {c:>4}>{co:<4} {tile:>12} {cfg.w_stages:>2}/{cfg.t_stages:<2} {cfg.warps:>5} "
                      f"{label:>7} {r['regs']:>4} {r['used']:>4} {r['setmaxnreg']:>12} "
                      f"{k.metadata.shared:>7} {r['spill']:>7} {str(r['wgmma']):>5} {str(r['tma']):>4} {mufu:>5} "
                      f"{lds:>5} {sts:>5} {str(r['c7513']):>5} {time.time() - t0:>4.1f}")  # fmt: skip
                if a.dump:
                    dump(k, r["log"], os.path.join(a.dump, f"{name}_{c}to{co}_{label.replace('+', '_')}"))
    print("ALL OK (no spills, no wgmma serialization, wgmma + TMA in every PTX)" if ok else "SOME FAILED (above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
