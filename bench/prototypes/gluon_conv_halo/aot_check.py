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

import torch
import triton
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
_spec = importlib.util.spec_from_file_location("gluon_conv_aot", os.path.join(HERE, "..", "gluon_conv", "aot_check.py"))
_old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_old)  # ../gluon_conv/aot_check.py: ptxas / cuobjdump helpers
TARGET, cubin_resources, ptxas_log, sass_max_reg, setmaxnreg = (
    _old.TARGET, _old.cubin_resources, _old.ptxas_log, _old.sass_max_reg, _old.setmaxnreg)  # fmt: skip
from conv_halo import VARIANTS, _conv3x3_halo_kernel, prepare, variant  # noqa: E402

# (C, Co) of the VAE decoder's 3x3 convs with a GroupNorm+SiLU in front
LAYERS = [(128, 128), (256, 256), (512, 512), (256, 128), (512, 256)]
MODES = [("gn+silu", True, True), ("plain", False, False)]


def compile_variant(cfg, c: int, co: int, affine: bool, silu: bool):
    cl = torch.channels_last
    x = torch.empty((1, c, 32, 32), dtype=torch.float16).contiguous(memory_format=cl)
    wt = torch.empty((co, c, 3, 3), dtype=torch.float16).contiguous(memory_format=cl)
    y = torch.empty((1, co, 32, 32), dtype=torch.float16).contiguous(memory_format=cl)
    sc = torch.empty((1, c), dtype=torch.float32) if affine else None
    args, const, _, opts = prepare(x, wt, y, sc, sc, silu, cfg, 132)
    names = _conv3x3_halo_kernel.arg_names
    const = dict(const, num_warps=opts["num_warps"])
    sig = {names[i]: mangle_type(a) for i, a in enumerate(args)}
    sig.update({k: "constexpr" for k in const})
    src = GluonASTSource(_conv3x3_halo_kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=TARGET, options=opts)


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
                ptx = k.asm["ptx"]
                res = cubin_resources(k.asm["cubin"])
                log = ptxas_log(ptx, None)
                sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
                spill = f"{sp.group(1)}/{sp.group(2)}" if sp else "?"
                c7513 = "C7513" in log or "C7515" in log or "serialized" in log
                wg, tm = "wgmma.mma_async" in ptx, "cp.async.bulk.tensor" in ptx
                mufu = len(re.findall(r"\b(ex2|rcp|tanh)\.approx", ptx))
                lds, sts = len(re.findall(r"\bld\.shared", ptx)), len(re.findall(r"\bst\.shared", ptx))
                if (not sp or int(sp.group(1)) or int(sp.group(2))) or not (wg and tm) or c7513:
                    ok = False
                print(f"{name:10} {c:>4}>{co:<4} {tile:>12} {cfg.w_stages:>2}/{cfg.t_stages:<2} {cfg.warps:>5} "
                      f"{label:>7} {res['regs']:>4} {sass_max_reg(k.asm['cubin']):>4} {setmaxnreg(ptx):>12} "
                      f"{k.metadata.shared:>7} {spill:>7} {str(wg):>5} {str(tm):>4} {mufu:>5} {lds:>5} {sts:>5} "
                      f"{str(c7513):>5} {time.time() - t0:>4.1f}")  # fmt: skip
                if a.dump:
                    os.makedirs(a.dump, exist_ok=True)
                    stem = os.path.join(a.dump, f"{name}_{c}to{co}_{label.replace('+', '_')}")
                    for ext, txt in (("ttgir", k.asm["ttgir"]), ("ptx", ptx), ("ptxas.txt", log)):
                        open(f"{stem}.{ext}", "w").write(txt)
    print("ALL OK (no spills, no wgmma serialization, wgmma + TMA in every PTX)" if ok else "SOME FAILED (above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
