"""Compile every conv_gluon variant for sm_90 without a GPU (AOT) and report registers, shared memory, spills,
and whether the PTX has wgmma and TMA (cp.async.bulk.tensor).

    python aot_check.py [--dump DIR]     (DIR: write each variant's ttgir / ptx / ptxas log there)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conv_gluon import VARIANTS, _conv3x3_ws_kernel, prepare, variant  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET = GPUTarget("cuda", 90, 32)
# (C, Co): the VAE decoder's and the UNet's convs (the tile depends only on Co, the code on nothing else)
LAYERS = [(128, 128), (256, 256), (512, 512), (320, 320)]


def compile_variant(cfg, c: int, co: int, affine: bool, silu: bool | None = None):
    return compile_prepared(_conv3x3_ws_kernel, prepare, cfg, c, co, affine, affine if silu is None else silu)


def compile_prepared(kernel, prepare_fn, cfg, c: int, co: int, affine: bool, silu: bool):
    """Compile ``kernel`` for TARGET with the launch ``prepare_fn`` builds (this conv's or ../gluon_conv_halo's)."""
    # small CPU stand-ins: the signature holds dtypes, descriptor block shapes and layouts, not sizes
    x = torch.empty((1, c, 32, 32), dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    wt = torch.empty((co, c, 3, 3), dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    y = torch.empty((1, co, 32, 32), dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    sc = torch.empty((1, c), dtype=torch.float32) if affine else None
    args, const, _, opts = prepare_fn(x, wt, y, sc, sc, silu, cfg, 132)
    names = kernel.arg_names
    const = dict(const, num_warps=opts["num_warps"])  # the kernel reads num_warps as a constexpr argument too
    sig = {names[i]: mangle_type(a) for i, a in enumerate(args)}
    sig.update({k: "constexpr" for k in const})
    src = GluonASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=TARGET, options=opts)


def cubin_resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout  # fmt: skip
    res = {}
    for key, pat in (("regs", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("shared", r"SHARED:(\d+)"),
                     ("local", r"LOCAL:(\d+)")):  # fmt: skip
        m = re.search(pat, out)
        res[key] = int(m.group(1)) if m else -1
    return res


def sass_max_reg(cubin: bytes) -> int:
    """1 + the highest general register the SASS touches: the busiest partition's real need (ptxas and
    cuobjdump -res-usage report the launch count, which setmaxnreg then redistributes between partitions)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    return 1 + max((int(r) for r in re.findall(r"\bR(\d+)\b", sass)), default=-1)


def ptxas_log(ptx: str, maxnreg: int | None) -> str:
    """ptxas -v on the PTX (spill stores/loads, wgmma serialization warnings)."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(ptx)
        cmd = [os.path.join(BIN, "ptxas"), "-v", "--gpu-name", "sm_90a", p, "-o", os.path.join(d, "k.cubin")]
        if maxnreg:
            cmd += ["--maxrregcount", str(maxnreg)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r.stdout + r.stderr


def setmaxnreg(ptx: str) -> str:
    """The register budgets warp specialization sets: 'default partition / worker' (setmaxnreg values)."""
    inc = sorted({int(v) for v in re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", ptx)}, reverse=True)
    dec = sorted({int(v) for v in re.findall(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+)", ptx)}, reverse=True)
    return f"{inc[0] if inc else '-'}/{'|'.join(map(str, dec)) or '-'}"


# prologue modes compiled: (label, affine, silu)
def report(k, maxnreg: int | None) -> dict:
    """A compiled kernel's resources and checks: regs, used (SASS), setmaxnreg, spill, wgmma, tma, c7513, ok
    (no spills, wgmma + TMA present, no wgmma serialization) and the ptxas log."""
    ptx = k.asm["ptx"]
    log = ptxas_log(ptx, maxnreg)
    sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    r = dict(regs=cubin_resources(k.asm["cubin"])["regs"], used=sass_max_reg(k.asm["cubin"]),
             setmaxnreg=setmaxnreg(ptx), spill=f"{sp.group(1)}/{sp.group(2)}" if sp else "?",
             wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
             c7513="C7513" in log or "C7515" in log or "serialized" in log, log=log)  # fmt: skip
    r["ok"] = bool(sp) and not (int(sp.group(1)) or int(sp.group(2))) and r["wgmma"] and r["tma"] and not r["c7513"]
    return r


def dump(k, log: str, stem: str) -> None:
    """Write a compiled kernel's ttgir, ptx and ptxas log as stem.{ttgir,ptx,ptxas.txt}."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    for ext, txt in (("ttgir", k.asm["ttgir"]), ("ptx", k.asm["ptx"]), ("ptxas.txt", log)):
        with open(f"{stem}.{ext}", "w") as f:
            f.write(txt)


MODES = [("plain", False, False), ("gn+silu", True, True)]
EXTRA_MODES = [("gn", True, False), ("silu", False, True)]  # compiled for the default variant only


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    ap.add_argument("--only", default=None, help="comma list of variant names")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(VARIANTS)
    print(f"triton {triton.__version__}, ptxas from {BIN}, target {TARGET}")
    head = f"{'variant':8} {'Co':>4} {'tile THxTWxBNxBK':>16} {'st':>2} {'warps':>5} {'mode':>7} "
    head += f"{'regs':>4} {'used':>4} "
    print(head + f"{'maxnreg c/p':>11} {'shared':>7} {'spill st/ld':>11} {'wgmma':>5} {'tma':>4} {'C7513':>5} {'s':>4}")
    ok = True
    seen = set()
    for name in names:
        modes = MODES + (EXTRA_MODES if name == "ws2" else [])
        for c, co in LAYERS:
            for label, affine, silu in modes:
                cfg = variant(name, co, prologue=affine or silu)
                if not (affine or silu) and cfg.silu_impl != "exact":
                    continue  # the SiLU implementation only matters with the prologue
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
                    print(f"{name:8} {co:>4} {tile:>16} {label}: FAILED: {' | '.join(msg[-4:])[:600]}")
                    continue
                r = report(k, cfg.maxnreg)
                ok = ok and r["ok"]
                print(f"{name:8} {co:>4} {tile:>16} {cfg.stages:>2} {cfg.warps:>5} {label:>7} {r['regs']:>4} "
                      f"{r['used']:>4} "
                      f"{r['setmaxnreg']:>11} {k.metadata.shared:>7} {r['spill']:>11} {str(r['wgmma']):>5} "
                      f"{str(r['tma']):>4} {str(r['c7513']):>5} {time.time() - t0:>4.1f}")  # fmt: skip
                if a.dump:
                    dump(k, r["log"], os.path.join(a.dump, f"{name}_co{co}_{label.replace('+', '_')}"))
    print("ALL OK (no spills, no wgmma serialization, wgmma + TMA in every PTX)" if ok else "SOME FAILED (above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
