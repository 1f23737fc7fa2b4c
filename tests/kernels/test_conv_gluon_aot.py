"""sm_90 ahead-of-time compile of the Gluon 3x3 conv (kernels/conv_gluon{,_kernels}.py), no GPU needed:
ptxas for sm_90 (no spills, no wgmma serialization, wgmma and TMA present, the producer's register drop),
and a spilling control the checks must flag. The kernel's numerics are GPU tests in test_conv_gluon.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from gluon_aot import cuobjdump, ptxas_log, require_gluon_aot, run_compile_child, spills
from speedsd.kernels import conv_gluon as cg

# (name, config, bias dtype): the engine's case (ws2, no bias), the 16 x 16 x 128 fitting with an fp16 bias,
# 'ws' with an fp32 bias ('_np' variants compile to the same kernel: persistence is the grid), and a control:
# one warpgroup on a 128 x 256 tile needs 256 accumulator registers a thread, which must spill.
# The fused epilogues (test_conv_gluon_epilogue.py): residual K steps + per-warp GroupNorm statistics on the VAE
# configs, with 4 (128 channels), 8 and 16 channels a group. K splits: fp32 partial stores, no bias in the kernel.
# tb2: two images a tile ([2, 8, 8, 64] boxes seen as 128 rows). bn1: tiles of bn + bn1 channels.
AOT = {
    "ws2": (cg.variant("ws2", 256), None),
    "ws2_co128_bias16": (cg.variant("ws2", 128), torch.float16),
    "ws_bias32": (cg.variant("ws", 128), torch.float32),
    "res_stats4_c2": (cg.GluonConvConfig.parse("g16x16n128k64s4c2e2p"), torch.float16, True, 4),
    "stats8_c2_bn256": (cg.GluonConvConfig.parse("g8x16n256k64s4c2e2p"), torch.float16, False, 8),
    "res_stats16_c1": (cg.GluonConvConfig.parse("g8x16n128k64s4c1e1p"), torch.float16, True, 16),
    "split3_c1": (cg.GluonConvConfig.parse("g8x16n128k64s4c1e1sk3p"), None),
    "split2_c2_bn256": (cg.GluonConvConfig.parse("g8x16n256k64s3c2e4sk2p"), None),
    "tb2_split5_c2": (cg.GluonConvConfig.parse("g8x8b2n128k64s5c2e1sk5p"), None),  # both CFG halves a tile (8²)
    "tb2_c1_bias16": (cg.GluonConvConfig.parse("g8x8b2n128k64s4c1e1p"), torch.float16),
    "bn128+32_c2": (cg.GluonConvConfig.parse("g8x16n128+32k64s5c2e1p"), None),  # 160 channels a tile (Co 320)
    "bn256+64_c1_bias16": (cg.GluonConvConfig.parse("g8x8n256+64k64s4c1e2p"), torch.float16),
    "bn128+32_split3": (cg.GluonConvConfig.parse("g8x16n128+32k64s4c2e1sk3p"), None),
    # the UNet's conv2 at 64² / 32²: residual K steps into both accumulators, per-channel statistics (groups of 10
    # and 20 channels straddle the 256 + 64 and 128 + 32 tiles); 256 + 64 in 64-channel slabs (128-channel slabs
    # spill 12 bytes with the statistics)
    "bn256+64_res_stats10": (cg.GluonConvConfig.parse("g8x8n256+64k64s4c1e4p"), torch.float16, True, 10),
    "bn128+32_res_stats20": (cg.GluonConvConfig.parse("g8x8n128+32k64s5c1e1p"), torch.float16, True, 20),
    "control": (cg.GluonConvConfig(bn=256, epi_split=2), None),
}
# compiled in a child process without TRITON_INTERPRET (gluon_aot.run_compile_child)
_AOT_CHILD = """
import sys, torch
from pathlib import Path
from speedsd.kernels import conv_gluon as cg
out = Path(sys.argv[1])
for name, key, bias, res, cpg in zip(*(sys.argv[i::5] for i in range(2, 7))):
    cfg = cg.GluonConvConfig.parse(key)
    k = cg.compile_sm90(cfg, None if bias == "-" else getattr(torch, bias), residual=res == "1",
                        stats_cpg=None if cpg == "-" else int(cpg))
    (out / f"{name}.ptx").write_text(k.asm["ptx"])
    (out / f"{name}.cubin").write_bytes(k.asm["cubin"])
    (out / f"{name}.meta").write_text(f"{k.metadata.num_warps} {k.metadata.shared}")
"""


@pytest.fixture(scope="module")
def sm90_kernels(tmp_path_factory):
    """name -> (ptx, cubin, num_warps, shared bytes, ptxas -v log) for AOT's configs, compiled for sm_90."""
    require_gluon_aot(cg._kernels() is not None)
    out = tmp_path_factory.mktemp("aot")
    argv = []
    for name, (cfg, b, *epi) in AOT.items():
        res, cpg = epi or (False, None)
        argv += [name, str(cfg), str(b).removeprefix("torch.") if b else "-", "1" if res else "0", str(cpg or "-")]
    run_compile_child(_AOT_CHILD, cg.__file__, str(out), *argv)
    res = {}
    for name in AOT:
        warps, shared = (int(v) for v in (out / f"{name}.meta").read_text().split())
        ptx = (out / f"{name}.ptx").read_text()
        res[name] = (ptx, (out / f"{name}.cubin").read_bytes(), warps, shared, ptxas_log(out / f"{name}.ptx"))
    return res


@pytest.mark.parametrize("name", [n for n in AOT if n != "control"])
def test_aot_compile_sm90(name, sm90_kernels):
    cfg, bias, *epi = AOT[name]
    ptx, cubin, warps, shared, log = sm90_kernels[name]
    stats = bool(epi) and epi[1] is not None
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor.4d.shared::cluster.global" in ptx  # TMA loads of the input boxes
    assert "cp.async.bulk.tensor.2d.shared::cluster.global" in ptx  # ... and of the weight blocks
    assert "cp.async.bulk.tensor.4d.global.shared::cta" in ptx  # TMA store of the output tile
    assert ("ld.global" in ptx) == (bias is not None)  # the bias is the only global load (the residual: TMA)
    assert ("st.global" in ptx) == stats  # the statistics are the only global stores
    assert re.search(rf"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+{cg.PRODUCER_REGS}\b", ptx)  # the producer
    assert warps == cfg.warps + 4 and shared <= cg.SMEM_LIMIT  # + the producer warp's group
    assert spills(log) == (0, 0), log
    assert "serialized" not in log, log  # ptxas C7510-C7515: wgmma pipeline broken
    sass = cuobjdump(cubin, "-sass")
    assert "HGMMA" in sass and not re.search(r"\b(LDL|STL)\b", sass)


def test_aot_checks_see_spills_and_serialization(sm90_kernels):
    """Control: the checks above must fail on a kernel that spills and serializes its wgmmas."""
    _, cubin, _, _, log = sm90_kernels["control"]
    assert spills(log)[0] > 0 and "serialized" in log
    assert re.search(r"\b(LDL|STL)\b", cuobjdump(cubin, "-sass"))
