"""sm_90 ahead-of-time compile of the TMA-fed GEGLU feed-forward kernel (kernels/ff_geglu_tma.py) with the
measured tiles, no GPU needed: TMA loads and store, ONE m64n128 wgmma per K step (value and gate rows in
one box), no spills. Its numerics: test_ff_geglu_tma.py (interpreter; GPU cases marked gpu)."""

from __future__ import annotations

import os
import re

import pytest

from gluon_aot import cuobjdump, nvidia_tool, run_compile_child
from speedsd.kernels import ff_geglu_tma as ft

_AOT_CHILD = """
import sys
from pathlib import Path
from speedsd.kernels import ff_geglu_tma as ft
out = Path(sys.argv[1])
for bias in (True, False):
    k = ft.compile_sm90(bias)
    (out / f"b{int(bias)}.ptx").write_text(k.asm["ptx"])
    (out / f"b{int(bias)}.cubin").write_bytes(k.asm["cubin"])
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if nvidia_tool("ptxas") is None and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("Triton's bundled ptxas is not installed (backends/nvidia/bin/ptxas)")
    out = tmp_path_factory.mktemp("ff_aot")
    run_compile_child(_AOT_CHILD, ft.__file__, str(out))
    return {b: ((out / f"b{b}.ptx").read_text(), (out / f"b{b}.cubin").read_bytes()) for b in (0, 1)}


@pytest.mark.parametrize("bias", [1, 0], ids=["bias", "nobias"])
def test_aot_sm90_one_wide_wgmma_per_k_step_no_spills(compiled, bias):
    ptx, cubin = compiled[bias]
    bm, bn, bk, warps, _ = ft.TMA_CONFIG
    assert ".target sm_90a" in ptx
    assert "cp.async.bulk.tensor.3d" in ptx and "cp.async.bulk.tensor.2d" in ptx  # W's 3-D box, x's 2-D box
    shapes = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16", ptx))
    assert shapes == {str(2 * bn)}, shapes  # value and gate in one N = 2·BN wgmma, never two of N = BN
    usage = cuobjdump(cubin, "-res-usage")
    assert "LOCAL:0" in usage and re.search(r"STACK:0\b", usage), usage
    sass = cuobjdump(cubin, "-sass")
    assert not re.search(r"\b(LDL|STL)\b", sass)
