"""sm_90 ahead-of-time compile of GroupNorm read from K-split partials (no GPU needed): the launches
``group_norm_partials`` makes for the UNet's split conv1s compile with the runtime's argument specialization
and read the fp32 partials with the same vector width as the one-source kernel reads an fp32 tensor."""

from __future__ import annotations

import pytest

from gluon_aot import CATCH_LAUNCHES, compile_cases
from speedsd.kernels import group_norm_kernels

_CHILD = (
    CATCH_LAUNCHES
    + """
gp = importlib.import_module("speedsd.kernels.group_norm_partials")
gn = importlib.import_module("speedsd.kernels.group_norm")
res = {}
for label, (c, hw, split) in json.loads(sys.argv[2]).items():
    w = torch.empty(c, dtype=torch.float16)
    add = torch.empty(2, c)
    for mode in ("partials", "one"):
        caught.clear()
        if mode == "partials":
            parts = torch.empty(split, 2 * hw * hw, c)
            gp.group_norm_partials(parts, (2, c, hw, hw), 32, w, w, 1e-6, True, add=add, gb=1)
        else:  # the one-source kernel on an fp32 channels_last tensor (same plan)
            x = torch.empty(2, c, hw, hw).contiguous(memory_format=torch.channels_last)
            gn.group_norm(x, 32, w, w, 1e-6, True, add=add, path="fused", gb=1)
        (fn, args, kwargs), = caught
        k = compile_caught(fn, args, kwargs)
        loads = sorted(set(re.findall(r"ld\\.global[\\w.]*", k.asm["ptx"])))
        res[f"{label}|{mode}"] = [loads, k.asm["ptx"].count("ld.global")]
with open(sys.argv[1], "w") as f:
    json.dump(res, f)
"""
)

# label -> (C, H = W, K splits): the UNet's split conv1s before norm2 (H200 conv table)
CASES = {"16² 1280 split 3": (1280, 16, 3), "8² 1280 split 5": (1280, 8, 5), "8² 2560->1280 split 6": (1280, 8, 6)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_cases(tmp_path_factory, _CHILD, group_norm_kernels.__file__, CASES)


@pytest.mark.parametrize("label", list(CASES))
def test_partials_kernel_compiles_for_sm90_with_the_same_loads(label, compiled):
    mine, theirs = compiled[f"{label}|partials"], compiled[f"{label}|one"]
    assert mine[0] == theirs[0]  # the same load instructions (vector width) as reading one fp32 tensor
    assert mine[1] > theirs[1]  # one more load per input load for each further split
