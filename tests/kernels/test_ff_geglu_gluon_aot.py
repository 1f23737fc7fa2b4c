"""sm_90 ahead-of-time compile of the Gluon GEGLU feed-forward GEMM (kernels/ff_geglu_gluon{,_kernels}.py), no
GPU needed: ptxas for sm_90 with no spills and no wgmma serialization, one wide wgmma (N = 2·BN) per K step, TMA
loads and store, the producer's register drop. The kernel's numerics are GPU tests in test_ff_geglu_gluon.py."""

from __future__ import annotations

import re
import subprocess

import pytest

from gluon_aot import cuobjdump, nvidia_tool, run_compile_child
from speedsd.kernels import ff_geglu_gluon as fg

# the configs the bench sweeps on the UNet's shapes, with and without bias, and the tanh GELU
AOT = {
    "c1_bias": ("ff128x64k64s4c1g8", True, 0),
    "c2_bn128": ("ff128x128k64s4c2g8", True, 0),
    "c2_bm256_nobias": ("ff256x64k64s3c2g4", False, 0),
    "c1_tanh": ("ff128x64k64s4c1g8", True, 1),
    "pingpong": ("ff128x64k64s3c1g8pp", True, 0),
}
_AOT_CHILD = """
import sys
from pathlib import Path
from speedsd.kernels import ff_geglu_gluon as fg
out = Path(sys.argv[1])
for name, key, bias, approx in zip(*(sys.argv[i::4] for i in range(2, 6))):
    k = fg.compile_sm90(fg.FFGluonConfig.parse(key), bias=bias == "1", approx=int(approx))
    (out / f"{name}.ptx").write_text(k.asm["ptx"])
    (out / f"{name}.cubin").write_bytes(k.asm["cubin"])
    (out / f"{name}.meta").write_text(f"{k.metadata.num_warps} {k.metadata.shared}")
"""


@pytest.fixture(scope="module")
def sm90_kernels(tmp_path_factory):
    if fg._kernels() is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    ptxas = nvidia_tool("ptxas")
    if ptxas is None:
        pytest.skip("Triton's bundled ptxas is not installed (backends/nvidia/bin/ptxas)")
    out = tmp_path_factory.mktemp("ff_gluon_aot")
    argv = []
    for name, (key, bias, approx) in AOT.items():
        argv += [name, key, "1" if bias else "0", str(approx)]
    run_compile_child(_AOT_CHILD, fg.__file__, str(out), *argv)
    res = {}
    for name in AOT:
        warps, shared = (int(v) for v in (out / f"{name}.meta").read_text().split())
        cmd = [ptxas, "-v", "--gpu-name", "sm_90a", str(out / f"{name}.ptx"), "-o", str(out / f"{name}.re.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True)
        res[name] = ((out / f"{name}.ptx").read_text(), (out / f"{name}.cubin").read_bytes(), warps, shared,
                     log.stdout + log.stderr)  # fmt: skip
    return res


@pytest.mark.parametrize("name", list(AOT))
def test_aot_compile_sm90(name, sm90_kernels):
    key, bias, _ = AOT[name]
    cfg = fg.FFGluonConfig.parse(key)
    ptx, cubin, warps, shared, log = sm90_kernels[name]
    assert ".target sm_90a" in ptx
    assert re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n{2 * cfg.bn}k16\.f32\.f16\.f16", ptx)  # one wide wgmma
    assert "cp.async.bulk.tensor.2d.shared::cluster.global" in ptx  # TMA loads of the x boxes
    assert "cp.async.bulk.tensor.3d.shared::cluster.global" in ptx  # ... and of the [2, BN, BK] W boxes
    assert "cp.async.bulk.tensor.2d.global.shared::cta" in ptx  # TMA store of the output tile
    assert ("ld.global" in ptx) == bias  # the bias is the only global load
    assert re.search(rf"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+{fg.PRODUCER_REGS}\b", ptx)
    assert warps == cfg.warps + (8 if cfg.pingpong else 4) and shared <= fg.SMEM_LIMIT  # + the workers' groups
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert m and (int(m.group(1)), int(m.group(2))) == (0, 0), log
    assert "serialized" not in log, log
    sass = cuobjdump(cubin, "-sass")
    assert "HGMMA" in sass and not re.search(r"\b(LDL|STL)\b", sass)
