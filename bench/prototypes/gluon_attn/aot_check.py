"""Compile every attn_gluon variant for sm_90 without a GPU; print registers / shared / spills / PTX checks.

usage: python aot_check.py [variant ...] [--dump DIR]   (DIR gets <variant>.{ttgir,ptx,sass-res})
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attn_gluon as ag  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _desc_ty(rows: int, cols: int = 64) -> str:
    lay = gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float16)
    return f"tensordesc<fp16[{rows}, {cols}],{lay!r}>"


def compile_variant(cfg: ag.AttnConfig):
    bm_desc = 64 if cfg.kind == "ws" else cfg.block_m
    kv = _desc_ty(cfg.block_n)
    sig = {"q_desc": _desc_ty(bm_desc), "kv_desc": kv, "kva_desc": _desc_ty(cfg.block_n, 32) if cfg.narrow else kv,
           "kvb_desc": _desc_ty(cfg.block_n, 16) if cfg.narrow else kv, "o_ptr": "*fp16", "n_ctx": "i32",
           "H": "i32", "qk_c": "fp32"}  # fmt: skip
    if cfg.kind == "plain":
        fn = ag._attn_plain_kernel
        const = dict(STAGES=cfg.stages, EXP=cfg.exp_code, ROWSUM=cfg.rowsum, QK_K=cfg.qk_k, PV_N=cfg.pv_n,
                     NARROW=cfg.narrow, num_warps=4 * cfg.nc)  # fmt: skip
        num_warps = 4 * cfg.nc
    else:
        fn = ag._attn_ws_kernel
        const = dict(NC=cfg.nc, STAGES=cfg.stages, EXP=cfg.exp_code, ROWSUM=cfg.rowsum, QK_K=cfg.qk_k,
                     PV_N=cfg.pv_n, PP_SYNC=cfg.pp_sync, NARROW=cfg.narrow, PRODUCER_REGS=cfg.producer_regs,
                     CONSUMER_REGS=cfg.consumer_regs, LAZY=cfg.lazy)  # fmt: skip
        if cfg.head_fast:  # round-3 knob (kernel default False): older variants compile exactly as before
            const.update(HEAD_FAST=True)
        num_warps = 4
    sig.update({k: "constexpr" for k in const})
    # what the JIT would specialise on the GPU: o_ptr 16-B aligned, n_ctx % 16 == 0
    attrs = {(fn.arg_names.index("o_ptr"),): [["tt.divisibility", 16]],
             (fn.arg_names.index("n_ctx"),): [["tt.divisibility", 16]]}  # fmt: skip
    src = GluonASTSource(fn, sig, constexprs=const, attrs=attrs)
    opts = dict(num_warps=num_warps)
    if cfg.maxnreg is not None:
        opts["maxnreg"] = cfg.maxnreg
    return triton.compile(src, target=TARGET, options=opts)


def res_usage(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
    return " ".join(ln.strip() for ln in out.stdout.splitlines() if "REG" in ln)


def sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True)
    return out.stdout


def summarize(name: str, k, dump: str | None) -> dict:
    ptx = k.asm["ptx"]
    ru = res_usage(k.asm["cubin"])
    regs = re.search(r"REG:(\d+)", ru)
    stack = re.search(r"STACK:(\d+)", ru)
    sa = sass(k.asm["cubin"])
    row = dict(
        name=name,
        regs=int(regs.group(1)) if regs else -1,
        stack=int(stack.group(1)) if stack else -1,
        shared=k.metadata.shared,
        warps=k.metadata.num_warps,
        spill_ld=len(re.findall(r"\bLDL\b", sa)),
        spill_st=len(re.findall(r"\bSTL\b", sa)),
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        ex2f16=len(re.findall(r"ex2\.approx\.f16x2", ptx)),
        ex2f32=len(re.findall(r"ex2\.approx(\.ftz)?\.f32", ptx)),
        setmaxnreg=sorted({int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}),
        bar_sync=len(re.findall(r"bar\.sync|barrier\.sync", ptx)),
        hgmma=len(re.findall(r"HGMMA", sa)),
        mufu=len(re.findall(r"MUFU\.EX2(?!\.F16)", sa)),
        mufu16=len(re.findall(r"MUFU\.EX2\.F16", sa)),
    )
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                f.write(k.asm[ext])
        with open(os.path.join(dump, f"{name}.sass"), "w") as f:
            f.write(sa)
    return row


def main(argv: list[str]) -> int:
    dump = None
    if "--dump" in argv:
        i = argv.index("--dump")
        dump = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    names = argv or list(ag.VARIANTS)
    cols = ["name", "regs", "stack", "spill_ld", "spill_st", "shared", "warps", "setmaxnreg", "wgmma", "hgmma",
            "tma", "ex2f16", "ex2f32", "mufu", "mufu16", "bar_sync"]  # fmt: skip
    print(" | ".join(cols))
    bad = 0
    for name in names:
        try:
            k = compile_variant(ag.VARIANTS[name])
            row = summarize(name, k, dump)
            print(" | ".join(str(row[c]) for c in cols), flush=True)
            if row["spill_ld"] or row["spill_st"] or row["stack"] > 0 or not row["wgmma"] or not row["tma"]:
                bad += 1
        except Exception as e:  # noqa: BLE001
            bad += 1
            msg = str(e).strip().splitlines()
            print(f"{name} | COMPILE ERROR: {type(e).__name__}: {' / '.join(msg[-6:])[:1500]}", flush=True)
    print(f"{len(names) - bad}/{len(names)} variants compile without spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
