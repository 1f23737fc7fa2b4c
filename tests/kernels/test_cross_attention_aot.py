"""sm_90 ahead-of-time compile of the one-pass cross-attention kernel (kernels/cross_attention.py), no GPU
needed: the launch heuristic's configs on SD's cross shapes (and the widest supported problem) go through
ptxas for sm_90 without register spills, fp16/bf16 ones on wgmma where the tile has 64 rows or more, within
the shared memory of an H100. The numerics are the interpreter tests in test_cross_attention.py.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from gluon_aot import cuobjdump, nvidia_tool, run_compile_child
from speedsd.kernels import cross_attention as ca

# (label, B, H, Nq, Nk, D, dtype): the heuristic's config is compiled for each
CASES = [
    ("sd1-cross4096-d40", 2, 8, 4096, 77, 40, "float16"),
    ("sd1-cross1024-d80", 2, 8, 1024, 77, 80, "float16"),
    ("sd1-cross256-d160", 2, 8, 256, 77, 160, "float16"),
    ("sd2-cross4096-d64", 2, 5, 4096, 77, 64, "float16"),
    ("bf16-cross1024-d80", 2, 8, 1024, 77, 80, "bfloat16"),
    ("nk128-d160", 2, 8, 1024, 128, 160, "float16"),
    ("fp32-cross4096-d40", 2, 8, 4096, 77, 40, "float32"),
    ("fp32-cross256-d160", 2, 8, 256, 77, 160, "float32"),
]
SMS = 132  # an H100 SXM

_AOT_CHILD = """
import json, sys
from pathlib import Path
import torch
from speedsd.kernels import cross_attention as ca
out = Path(sys.argv[1])
for label, B, H, Nq, Nk, D, dt in json.loads(sys.argv[2]):
    dtype = getattr(torch, dt)
    cfg = ca.heuristic_config(B, H, Nq, D, dtype, int(sys.argv[3]))
    k = ca.compile_sm90(D, Nk, cfg, dtype)
    (out / f"{label}.cubin").write_bytes(k.asm["cubin"])
    (out / f"{label}.json").write_text(json.dumps([cfg.block_m, k.metadata.num_warps, k.metadata.shared]))
"""


@pytest.fixture(scope="module")
def sm90_cubins(tmp_path_factory):
    """label -> (cubin, block_m, num_warps, shared bytes), compiled for sm_90 in a child process."""
    if nvidia_tool("ptxas") is None and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("Triton's bundled ptxas is not installed (backends/nvidia/bin/ptxas)")
    out = tmp_path_factory.mktemp("cross_aot")
    run_compile_child(_AOT_CHILD, ca.__file__, str(out), json.dumps(CASES), str(SMS))
    res = {}
    for label, *_ in CASES:
        bm, warps, shared = json.loads((out / f"{label}.json").read_text())
        res[label] = ((out / f"{label}.cubin").read_bytes(), bm, warps, shared)
    return res


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_heuristic_configs_compile_for_sm90_without_spills(sm90_cubins, case):
    label, B, H, Nq, Nk, D, dt = case
    cubin, bm, warps, shared = sm90_cubins[label]
    cfg = ca.heuristic_config(B, H, Nq, D, getattr(torch, dt), SMS)
    assert (bm, warps) == (cfg.block_m, cfg.num_warps)
    usage = cuobjdump(cubin, "-res-usage")
    sass = cuobjdump(cubin, "-sass")
    stack = re.search(r"STACK:(\d+)", usage)
    assert stack is not None and int(stack.group(1)) == 0 and not re.search(r"\b(LDL|STL)\b", sass), usage
    assert shared <= 227 * 1024
    if dt != "float32" and bm >= 64:
        assert "HGMMA" in sass  # wgmma tensor-core dots
    elif dt != "float32":
        assert "HMMA" in sass  # mma.sync tensor-core dots
