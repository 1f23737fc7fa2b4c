"""sm_90 ahead-of-time compile of the Gluon d=40 and d=80 attention kernel (kernels/attention_gluon{,_kernels}.py),
no GPU needed: ptxas for sm_90 (no spills under the register split, wgmma, TMA, fp32 exp2), a spilling
control that the spill check must flag, and the SASS of the prototype variant whose GPU timing the module
docstrings cite (bench/prototypes/gluon_attn), instruction for instruction. The kernel's numerics are GPU
tests in test_attention_gluon.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gluon_aot import cuobjdump, nvidia_tool, run_compile_child
from speedsd.kernels import attention_gluon as ag

# compiled in a child process without TRITON_INTERPRET (gluon_aot.run_compile_child)
_AOT_CHILD = """
import sys
from pathlib import Path
from speedsd.kernels import attention_gluon as ag
out = Path(sys.argv[1])
for name, cfg in [("main", ag.HOPPER_D40), ("regs96", ag.GluonAttentionConfig(consumer_regs=96)),
                  ("d80", ag.HOPPER_D80), ("d80bn64", ag.HOPPER_D80_BN64), ("d160", ag.HOPPER_D160),
                  ("d160bn64", ag.HOPPER_D160_BN64)]:
    k = ag.compile_sm90(cfg)
    (out / f"{name}.ptx").write_text(k.asm["ptx"])
    (out / f"{name}.cubin").write_bytes(k.asm["cubin"])
    (out / f"{name}.meta").write_text(f"{k.metadata.num_warps} {k.metadata.shared}")
proto = Path(sys.argv[2])  # the prototype whose variant was measured (bench/prototypes/gluon_attn)
if (proto / "aot_check.py").exists():
    sys.path.insert(0, str(proto))
    import aot_check
    k = aot_check.compile_variant(aot_check.ag.VARIANTS[ag.PROTOTYPE_VARIANT])
    (out / "proto.cubin").write_bytes(k.asm["cubin"])
"""
PROTOTYPE = Path(__file__).parents[2] / "bench" / "prototypes" / "gluon_attn"


@pytest.fixture(scope="module")
def sm90_kernels(tmp_path_factory):
    """{"main": HOPPER_D40, "regs96": a control with too few consumer registers}: name -> (ptx, cubin,
    num_warps, shared bytes), compiled for sm_90 by ptxas; "proto": the cubin of the prototype variant
    ag.PROTOTYPE_VARIANT, or None where the prototype is not in this checkout."""
    if ag._kernels() is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    if nvidia_tool("ptxas") is None and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("Triton's bundled ptxas is not installed (backends/nvidia/bin/ptxas)")
    out = tmp_path_factory.mktemp("aot")
    run_compile_child(_AOT_CHILD, ag.__file__, str(out), str(PROTOTYPE))
    res = {"proto": (out / "proto.cubin").read_bytes() if (out / "proto.cubin").exists() else None}
    for name in ("main", "regs96", "d80", "d80bn64", "d160", "d160bn64"):
        warps, shared = (int(x) for x in (out / f"{name}.meta").read_text().split())
        res[name] = ((out / f"{name}.ptx").read_text(), (out / f"{name}.cubin").read_bytes(), warps, shared)
    return res


def _spills(cubin: bytes) -> tuple[int, int, str]:
    """(stack bytes, local-memory loads/stores in the SASS, the resource line) of a compiled kernel."""
    usage = cuobjdump(cubin, "-res-usage")
    stack = re.search(r"STACK:(\d+)", usage)
    sass = cuobjdump(cubin, "-sass")
    assert "HGMMA" in sass
    return int(stack.group(1)) if stack else -1, len(re.findall(r"\b(LDL|STL)\b", sass)), usage


def test_aot_compile_sm90(sm90_kernels):
    ptx, cubin, warps, shared = sm90_kernels["main"]
    assert ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert re.search(r"ex2\.approx(\.ftz)?\.f32", ptx) and "ex2.approx.f16x2" not in ptx  # fp32 exp2 on the MUFU
    # register split: the producer warp drops to 24, the 3 worker consumers rise to 112, the default (first)
    # consumer keeps 120: 120 + 3 * 112 + 56 (the producer's warpgroup) = 512 = 64K registers / 128 threads
    regs = set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))
    cfg = ag.HOPPER_D40
    assert {("dec", str(cfg.producer_regs)), ("inc", str(cfg.consumer_regs)), ("dec", "120")} <= regs, regs
    assert warps == 20  # 4 consumer warpgroups + the producer warp's group
    assert shared <= 227 * 1024
    stack, local_ops, usage = _spills(cubin)
    assert stack == 0 and local_ops == 0 and "LOCAL:0" in usage, usage
    assert "REG:96" in usage, usage  # 65536 registers / 640 threads, rounded down to a multiple of 8


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("d80", ag.HOPPER_D80),
        ("d80bn64", ag.HOPPER_D80_BN64),
        ("d160", ag.HOPPER_D160),
        ("d160bn64", ag.HOPPER_D160_BN64),
    ],
)
def test_aot_compile_sm90_wide_heads(sm90_kernels, name, cfg):
    """The d=80 / d=160 instances: two consumer warpgroups (d=80: 12 warps) or one (d=160: 8) + the producer,
    no spills, wgmma and TMA, fp32 exp2, the worker consumer raised to its configured registers (d=80)."""
    ptx, cubin, warps, shared = sm90_kernels[name]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert re.search(r"ex2\.approx(\.ftz)?\.f32", ptx) and "ex2.approx.f16x2" not in ptx
    regs = set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))
    assert ("dec", str(cfg.producer_regs)) in regs, regs
    if cfg.consumers > 1:
        assert ("inc", str(cfg.consumer_regs)) in regs, regs
    assert warps == 4 * cfg.consumers + 4 and shared <= 227 * 1024
    stack, local_ops, usage = _spills(cubin)
    assert stack == 0 and local_ops == 0 and "LOCAL:0" in usage, usage
    assert "HGMMA.64x64x16.F32" in cuobjdump(cubin, "-sass")  # P V over a 64-column box (and S over 64 keys)


def _opcodes(cubin: bytes) -> list[str]:
    """The SASS instruction sequence, mnemonics with modifiers only (operands hold parameter offsets)."""
    sass = cuobjdump(cubin, "-sass")
    return re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass, flags=re.M)


def test_aot_sass_is_the_measured_prototype_variant(sm90_kernels):
    """The engine kernel compiles to the SASS of the prototype variant the docstrings' timing is of,
    instruction for instruction (operands differ only in kernel-parameter and barrier offsets)."""
    if sm90_kernels["proto"] is None:
        pytest.skip(f"prototype not in this checkout: {PROTOTYPE}")
    ours, theirs = _opcodes(sm90_kernels["main"][1]), _opcodes(sm90_kernels["proto"])
    assert len(ours) > 1000 and ours.count("HGMMA.64x64x16.F32") > 0, sorted(set(ours))[:40]
    assert ours == theirs, (len(ours), len(theirs))


def test_aot_spill_check_sees_spills(sm90_kernels):
    """Control: 96 registers for the worker consumers do not hold a warpgroup's tiles; the check must say so."""
    stack, local_ops, _ = _spills(sm90_kernels["regs96"][1])
    assert stack > 0 and local_ops > 0
